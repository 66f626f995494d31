"""Simplifying the regions as one coverage, and measuring what it costs in km.

All regions together form a polygonal coverage (checked with ``shapely.coverage_is_valid``; the default
sources pass) and are simplified at once with ``shapely.coverage_simplify`` (GEOS >= 3.12,
topology-preserving Visvalingam-Whyatt), so neighbours keep identical shared borders and no gaps or overlaps
appear. If the input is not a clean coverage, or a simplified geometry comes out invalid or empty, that region
falls back to ``simplify(preserve_topology=True)`` (valid, but its borders no longer match its neighbours'
exactly) and the report counts it (the default sources need no fallback).

The error is measured per region as the Hausdorff distance in km between the original and simplified
boundaries (:func:`hausdorff_km`: great-circle distance from every vertex of one to the nearest point of the
other, edges straight in lng/lat as every consumer draws them). The default tolerance was chosen from that
measurement: at 0.003 degrees the median region moves 0.11 km, the 99th percentile 0.35 km, the worst 2.3 km
(a narrow spit in Atyrau, KZ); 10 of 4,609 regions exceed 1 km anywhere. See ``geocells/data/README.md`` for
the sweep over tolerances.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from geocells.boundaries.reconcile import approx_area_km2
from geocells.boundaries.report import BoundariesReport
from geoloc.geo.boundaries import polygonal_part

DEFAULT_TOLERANCE_DEG = 0.003


def simplify_regions(geoms, tolerance_deg: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Topology-preserving simplification of a polygonal coverage.

    Args:
        geoms: ``(R,)`` valid Polygons/MultiPolygons in lng/lat that do not overlap.
        tolerance_deg: ``shapely.coverage_simplify`` tolerance in degrees (Visvalingam-Whyatt; the removed
            triangle areas are below ``tolerance_deg**2``).

    Returns:
        ``(simplified (R,) array, info)``; ``info`` says whether the input was a valid coverage and which rows
        fell back to ``simplify(preserve_topology=True)``.
    """
    import shapely

    geoms = np.asarray(geoms, dtype=object)
    info: dict[str, Any] = {"tolerance_deg": tolerance_deg, "method": "coverage_simplify"}
    if tolerance_deg <= 0:
        info.update(method="none", coverage_invalid_rows=[], fallback_rows=[])
        return geoms.copy(), info
    invalid_edges = shapely.coverage_invalid_edges(geoms)
    bad_rows = np.flatnonzero(~shapely.is_empty(invalid_edges))
    info["coverage_invalid_rows"] = bad_rows.tolist()
    out = shapely.coverage_simplify(geoms, tolerance_deg)
    # Rows whose borders do not match a neighbour's are not part of a clean coverage: simplify each alone.
    fallback = set(bad_rows.tolist())
    ok = shapely.is_valid(out) & ~shapely.is_empty(out)
    fallback |= set(np.flatnonzero(~ok).tolist())
    for i in sorted(fallback):
        out[i] = shapely.simplify(geoms[i], tolerance_deg, preserve_topology=True)
    for i in range(len(out)):
        poly = polygonal_part(out[i] if shapely.is_valid(out[i]) else shapely.make_valid(out[i]))
        if poly is None:  # never seen in practice: keep the original rather than lose the region
            poly = geoms[i]
            fallback.add(i)
        out[i] = poly
    info["fallback_rows"] = sorted(fallback)
    return out, info


def _segments(xy: np.ndarray, part: np.ndarray) -> np.ndarray:
    """``(S, 2, 2)`` consecutive vertex pairs of the lines in ``xy`` (vertices) / ``part`` (line index)."""
    same = part[1:] == part[:-1]
    return np.stack([xy[:-1][same], xy[1:][same]], axis=1)


def _directed_km(pts: np.ndarray, segs: np.ndarray, scale: float) -> np.ndarray:
    """Distance in km from each lng/lat point to the nearest of the lng/lat segments.

    Edges are straight in lng/lat (as every consumer of the file draws them). The nearest segment and the
    nearest point on it are found after scaling longitudes by ``scale`` (cos of the region's mid-latitude,
    an affine map that keeps edges straight); the distance to that point is then great-circle.
    """
    import shapely

    from geoloc.geo import haversine_km

    f = np.array([scale, 1.0])
    tree = shapely.STRtree(shapely.linestrings(segs * f))
    (_, j), _ = tree.query_nearest(shapely.points(pts * f), return_distance=True, all_matches=False)
    p0, p1 = segs[j, 0] * f, segs[j, 1] * f
    q = pts * f
    d = p1 - p0
    t = np.clip(np.einsum("ij,ij->i", q - p0, d) / np.maximum(np.einsum("ij,ij->i", d, d), 1e-300), 0.0, 1.0)
    near = (p0 + t[:, None] * d) / f  # back to lng/lat
    return haversine_km(pts[:, ::-1], near[:, ::-1])  # haversine takes latlng


def hausdorff_km(original, simplified) -> np.ndarray:
    """Hausdorff distance between the boundaries of paired geometries, in km.

    The discrete Hausdorff distance: the largest distance from a vertex of either boundary to the nearest
    segment of the other (an STRtree of segments keeps it fast on 10^6 vertices), with edges straight in
    lng/lat and distances great-circle (see :func:`_directed_km`). Every simplified vertex is an original
    vertex, so this is a close bound on the continuous Hausdorff distance.

    Args:
        original: ``(R,)`` geometries in lng/lat.
        simplified: ``(R,)`` geometries in lng/lat.

    Returns:
        ``(R,)`` float64 distances in km (0 where nothing changed).
    """
    import shapely

    original = np.asarray(original, dtype=object)
    simplified = np.asarray(simplified, dtype=object)
    out = np.zeros(len(original))
    for i, (a, b) in enumerate(zip(original, simplified)):
        if shapely.equals_exact(a, b, 0.0):
            continue
        xy_a, part_a = shapely.get_coordinates(shapely.get_parts(shapely.boundary(a)), return_index=True)
        xy_b, part_b = shapely.get_coordinates(shapely.get_parts(shapely.boundary(b)), return_index=True)
        scale = float(np.cos(np.radians((xy_a[:, 1].min() + xy_a[:, 1].max()) / 2)))
        out[i] = max(
            float(_directed_km(xy_a, _segments(xy_b, part_b), scale).max()),
            float(_directed_km(xy_b, _segments(xy_a, part_a), scale).max()),
        )
    return out


def coverage_overlap_km2(geoms) -> float:
    """Total area (km^2, approximate) of pairwise intersections: 0 for a clean partition."""
    import shapely

    geoms = np.asarray(geoms, dtype=object)
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="intersects")
    pair = left < right
    if not pair.any():
        return 0.0
    inter = shapely.intersection(geoms[left[pair]], geoms[right[pair]])
    return float(np.nansum(approx_area_km2(inter)))


def simplify_and_measure(regions, tolerance_deg: float, *, report: BoundariesReport, measure: bool = True):
    """Simplifies ``regions`` as one coverage and records vertex counts, validity and Hausdorff error (km).

    Returns:
        A copy of ``regions`` with simplified geometries; ``report.simplification`` is filled in.
    """
    import shapely

    original = regions.geometry.to_numpy()
    t1 = time.perf_counter()
    simplified, info = simplify_regions(original, tolerance_deg)
    info["seconds"] = round(time.perf_counter() - t1, 1)
    info["vertices_before"] = int(shapely.get_num_coordinates(original).sum())
    info["vertices_after"] = int(shapely.get_num_coordinates(simplified).sum())
    info["all_valid_after"] = bool(shapely.is_valid(simplified).all())
    info["coverage_valid_after"] = bool(shapely.coverage_is_valid(simplified))
    info["overlap_km2_after"] = round(coverage_overlap_km2(simplified), 4)
    if measure:
        t1 = time.perf_counter()
        h = hausdorff_km(original, simplified)
        worst = int(np.argmax(h))
        info["hausdorff_km"] = {
            "max": round(float(h.max()), 3),
            "p99": round(float(np.percentile(h, 99)), 3),
            "p90": round(float(np.percentile(h, 90)), 3),
            "median": round(float(np.median(h)), 3),
            "worst": f"{regions['adm0_a3'].iat[worst]} {regions['admin1_code'].iat[worst]} "
                     f"{regions['admin1_name'].iat[worst] or regions['country'].iat[worst]}",
            "regions_over_1km": int((h > 1.0).sum()),
            "seconds": round(time.perf_counter() - t1, 1),
        }
    report.simplification = info
    return regions.set_geometry(simplified)

