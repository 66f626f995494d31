"""Polygons of sets of H3 cells, correct across the antimeridian."""

from __future__ import annotations

import numpy as np
import shapely

from geoloc.geo.h3index import h3_resolution

_WORLD = shapely.box(-180.0, -90.0, 180.0, 90.0)
_EAST = shapely.box(180.0, -90.0, 540.0, 90.0)


def _fix_antimeridian(poly):
    """A polygon whose ring jumps across +-180 (span > 180 deg) is unrolled east and cut at 180."""
    minx, _, maxx, _ = shapely.bounds(poly)
    if maxx - minx <= 180.0:
        return poly
    polys = list(poly.geoms) if hasattr(poly, "geoms") else [poly]
    parts = []
    for p in polys:
        def unroll(coords):
            c = np.asarray(coords)
            c[:, 0] = np.where(c[:, 0] < 0, c[:, 0] + 360.0, c[:, 0])
            return c

        q = shapely.Polygon(unroll(p.exterior.coords), [unroll(r.coords) for r in p.interiors])
        q = shapely.make_valid(q)
        west = shapely.intersection(q, _WORLD)
        east = shapely.affinity.translate(shapely.intersection(q, _EAST), xoff=-360.0)
        parts.extend([west, east])
    return shapely.union_all([g for g in parts if not g.is_empty])


def hex_polygons(cells: np.ndarray, link: bool = False) -> list:
    """Shapely polygons (lng/lat) of uint64 H3 cells; ``link`` merges neighbours (one resolution only)."""
    import pyarrow as pa
    from h3ronpy.vector import cells_to_wkb_polygons

    if len(cells) == 0:
        return []
    wkb = pa.array(cells_to_wkb_polygons(pa.array(np.asarray(cells, dtype=np.uint64)), link_cells=link))
    geoms = shapely.from_wkb(np.asarray(wkb.to_pylist(), dtype=object))
    return [_fix_antimeridian(g) for g in geoms]


def cells_to_geometry(members: list[np.ndarray]) -> list:
    """One (multi)polygon per set of H3 cells (mixed resolutions allowed): their union."""
    from geoloc.geo.h3index import h3_centers

    out = []
    for cells in members:
        cells = np.asarray(cells, dtype=np.uint64)
        res = h3_resolution(cells)
        # linking neighbours is fast but breaks rings that cross the antimeridian: there, union hexes
        near_180 = bool(len(cells)) and bool((np.abs(h3_centers(cells)[:, 1]) > 178.0).any())
        parts = []
        for r in np.unique(res):
            parts.extend(hex_polygons(cells[res == r], link=not near_180))
        geom = shapely.union_all(parts) if len(parts) > 1 else (parts[0] if parts else shapely.Polygon())
        out.append(shapely.make_valid(geom) if not geom.is_valid else geom)
    return out
