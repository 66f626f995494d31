"""Reading geocell files and assigning points to cells.

A geocell file (GeoParquet, written by ``python -m geocells.build``) holds one row per cell:
``cell_id`` (0..C-1, the class index), ``geometry``, ``n_points``, ``centroid_lat``/``centroid_lng``
(mean of member training points), country and admin-1 attributes, ``h3_cells`` (the member H3 cells;
a cell is exactly their union) and ``neighbors`` (cell ids that share an edge). The scheme and the
build settings are in the file's metadata.

:class:`Geocells` assigns points through the H3 index (vectorized), which agrees with containment in
the cell polygons because each polygon is the union of its H3 cells; points in no cell go to the
nearest cell (by the nearest member H3 cell centre). ``geoloc`` only reads these files; the code that
builds them lives in the ``geocells`` package.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.geo import latlng_to_xyz, validate_latlng
from geoloc.h3index import H3Table, h3_centers

GEOCELLS_FORMAT_VERSION = 1
METADATA_KEY = b"geoloc.geocells"
#: Mean hexagon area per H3 resolution 0..15 (km², H3's published table).
H3_MEAN_AREA_KM2 = np.array([4357449.416078383, 609788.441794133, 86801.780398997, 12393.434655088,
                             1770.347654491, 252.903858182, 36.129062164, 5.161293360, 0.737327598,
                             0.105332513, 0.015047502, 0.002149643, 0.000307092, 0.000043870, 0.000006267,
                             0.000000895])
REQUIRED_COLUMNS = ("cell_id", "n_points", "centroid_lat", "centroid_lng", "h3_cells", "neighbors")


class Geocells:
    """A set of geocells with vectorized point assignment.

    Args:
        table: one row per cell with at least :data:`REQUIRED_COLUMNS` (``cell_id`` must be 0..C-1 in
            order); geometry optional.
        meta: build metadata (scheme, resolutions, thresholds).
        source: where it was read from, for messages.
    """

    def __init__(self, table: pd.DataFrame, meta: dict | None = None, source: str = "<memory>"):
        missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"{source}: not a geocell table, missing column(s) {missing}")
        ids = table["cell_id"].to_numpy()
        if not np.array_equal(ids, np.arange(len(table))):
            raise ValueError(f"{source}: cell_id must run 0..{len(table) - 1} in row order")
        self.table = table
        self.meta = dict(meta or {})
        self.source = source
        self._index = None
        self._areas: np.ndarray | None = None

    @classmethod
    def load(cls, path: str | Path) -> Geocells:
        """Reads a geocell GeoParquet file."""
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no geocell file (build one with python -m geocells.build)")
        schema = pq.read_schema(path)
        raw = (schema.metadata or {}).get(METADATA_KEY)
        meta = json.loads(raw) if raw else {}
        if meta.get("format_version", GEOCELLS_FORMAT_VERSION) > GEOCELLS_FORMAT_VERSION:
            raise ValueError(f"{path}: geocell format {meta['format_version']} is newer than this geoloc reads")
        try:
            import geopandas as gpd

            table = gpd.read_parquet(path)
        except ValueError:  # no geometry column: still usable for assignment
            table = pd.read_parquet(path)
        return cls(table, meta, str(path))

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"Geocells({len(self)} cells, scheme={self.meta.get('scheme')!r}, source={self.source!r})"

    @property
    def centroids(self) -> np.ndarray:
        """``(C, 2)`` ``[lat, lng]``: mean location of each cell's training points."""
        return self.table[["centroid_lat", "centroid_lng"]].to_numpy(dtype=np.float64)

    @property
    def areas_km2(self) -> np.ndarray:
        """``(C,)`` cell areas in km²: geodesic (WGS84) area of each polygon, or, for a table without
        geometry, the sum of its member H3 cells' mean areas per resolution."""
        if self._areas is None:
            geoms = self.table.geometry if "geometry" in self.table.columns else None
            if geoms is not None and geoms.notna().all():
                from pyproj import Geod

                geod = Geod(ellps="WGS84")
                self._areas = np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in geoms]) / 1e6
            else:
                res = [(np.asarray(c, np.uint64) >> np.uint64(52)) & np.uint64(0xF) for c in self.table["h3_cells"]]
                self._areas = np.array([H3_MEAN_AREA_KM2[r.astype(np.int64)].sum() for r in res])
        return self._areas

    def evidence(self, head: str, *, alpha: float = 1.0) -> np.ndarray:
        """``(C, K)`` distribution of the cells' member points over an evidence head's classes
        (:data:`geoloc.evidence.labels.HEADS`), with add-``alpha`` smoothing (a cell without labelled
        members gets the uniform distribution)."""
        col = f"evidence_{head}"
        if col not in self.table.columns:
            raise ValueError(f"{self.source}: no {col} column (rebuild the cells with python -m geocells.build "
                             "evidence=true)")
        counts = np.stack([np.asarray(c, np.float64) for c in self.table[col]]) + alpha
        return counts / counts.sum(axis=1, keepdims=True)

    @property
    def n_points(self) -> np.ndarray:
        return self.table["n_points"].to_numpy()

    @property
    def neighbors(self) -> list[np.ndarray]:
        """Per cell, the ids of the cells it shares an edge with."""
        return [np.asarray(n, dtype=np.int64) for n in self.table["neighbors"]]

    def _build_index(self):
        lengths = self.table["h3_cells"].map(len).to_numpy()
        cells = np.concatenate([np.asarray(c, dtype=np.uint64) for c in self.table["h3_cells"]]) \
            if len(self.table) else np.zeros(0, np.uint64)
        owner = np.repeat(np.arange(len(self.table)), lengths)
        table = H3Table(cells, owner)
        from scipy.spatial import cKDTree

        tree = cKDTree(latlng_to_xyz(h3_centers(cells)))
        self._index = (table, tree, owner)

    def assign(self, latlng, *, return_inside: bool = False):
        """Cell ids for points.

        Args:
            latlng: ``(N, 2)`` ``[lat, lng]`` degrees (validated: errors name the row).
            return_inside: also return whether each point lay inside a cell (False: nearest cell).

        Returns:
            ``(N,)`` int64 cell ids (and ``(N,)`` bool when ``return_inside``).
        """
        latlng = validate_latlng(latlng, what="points to assign")
        if self._index is None:
            self._build_index()
        table, tree, owner = self._index
        ids = table.lookup(latlng, validate=False)  # geometric, coarse to fine
        outside = ids < 0
        if outside.any():
            _, nearest = tree.query(latlng_to_xyz(latlng[outside]))
            ids[outside] = owner[nearest]
        return (ids, ~outside) if return_inside else ids

