"""Reading geocell files and assigning points to cells.

A geocell file (GeoParquet, written by ``python -m geocells.build``) holds one row per cell:
``cell_id`` (0..C-1, the class index), ``geometry``, ``n_points``, ``centroid_lat``/``centroid_lng``
(the cell's answer point: a member training photo at its centre, see geocells/README.md), country and
admin-1 attributes, ``h3_cells`` (the member H3 cells; a cell is exactly their union) and
``neighbors`` (cell ids that share an edge). The scheme and the
build settings are in the file's metadata.

:class:`Geocells` assigns points through the H3 index (vectorized), which agrees with containment in
the cell polygons because each polygon is the union of its H3 cells; points in no cell go to the
nearest cell (by the nearest member H3 cell centre). ``geoloc`` only reads these files; the code that
builds them lives in the ``geocells`` package.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.geo import EARTH_RADIUS_KM, latlng_to_xyz, validate_latlng
from geoloc.geo.h3index import H3Table, h3_centers, h3_mean_area_km2, h3_resolution

GEOCELLS_FORMAT_VERSION = 1
METADATA_KEY = b"geoloc.geocells"
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
        """Reads a geocell GeoParquet file.

        Raises:
            FileNotFoundError: there is no such file.
            ValueError: the path is a directory, or a file that is not a readable geocell file (empty,
                truncated, not Parquet, bad metadata), or of a format newer than this geoloc reads.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        def reason(e: Exception) -> str:  # pyarrow's first sentence says what is wrong; the rest is advice
            return str(e).strip().split(". ")[0].rstrip(".") or type(e).__name__

        path = Path(path)
        refused = f"{path}: not a geocell file (GeoParquet written by python -m geocells.build)"
        if path.is_dir():
            raise ValueError(f"{refused}: it is a directory")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no geocell file (build one with python -m geocells.build)")
        if path.stat().st_size == 0:
            raise ValueError(f"{refused}: it is empty (0 bytes)")
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{refused}: {reason(e)}") from e
        raw = (schema.metadata or {}).get(METADATA_KEY)
        try:
            meta = json.loads(raw) if raw else {}
        except ValueError as e:
            raise ValueError(f"{refused}: its {METADATA_KEY.decode()} metadata is not JSON ({e})") from e
        if not isinstance(meta, dict):
            raise ValueError(f"{refused}: its {METADATA_KEY.decode()} metadata is not a JSON object")
        if meta.get("format_version", GEOCELLS_FORMAT_VERSION) > GEOCELLS_FORMAT_VERSION:
            raise ValueError(f"{path}: geocell format {meta['format_version']} is newer than this geoloc reads")
        try:
            try:
                import geopandas as gpd

                table = gpd.read_parquet(path)
            except ValueError as e:  # no geometry column: still usable for assignment
                if isinstance(e, pa.ArrowException):  # ArrowInvalid is a ValueError too: a damaged file
                    raise
                table = pd.read_parquet(path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{refused}: {reason(e)}") from e
        return cls(table, meta, str(path))

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"Geocells({len(self)} cells, scheme={self.meta.get('scheme')!r}, source={self.source!r})"

    def fingerprint(self) -> str:
        """A short hash of the cell ids and centroids: what a classifier's output index ``k`` means.

        A checkpoint and an exported model store it, so that they refuse a cells file whose cells are
        other ones or the same ones in another order (which would silently give wrong region names).
        """
        h = hashlib.sha256(b"geoloc.geocells:ids+centroids")
        h.update(np.ascontiguousarray(self.table["cell_id"].to_numpy(np.int64)).tobytes())
        h.update(np.ascontiguousarray(np.round(self.centroids, 6)).tobytes())
        return h.hexdigest()[:16]

    @property
    def centroids(self) -> np.ndarray:
        """``(C, 2)`` ``[lat, lng]``: where each cell answers (the member photo nearest the centre of its
        photo-weighted medoid H3 unit, on land among its photos; older files: the members' mean)."""
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
                self._areas = np.array([h3_mean_area_km2(h3_resolution(c)).sum() for c in self.table["h3_cells"]])
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

    def distance_km(self, latlng) -> np.ndarray:
        """``(N,)`` km from each point to the nearest cell: 0 inside a cell, else the great-circle distance
        to the nearest member H3 cell centre (to tell points far from every cell, e.g. cells built for
        other data)."""
        ids, inside = self.assign(latlng, return_inside=True)
        out = np.zeros(len(ids))
        if (~inside).any():
            _, tree, _ = self._index
            chord, _ = tree.query(latlng_to_xyz(validate_latlng(latlng, what="points")[~inside]))
            out[~inside] = 2.0 * EARTH_RADIUS_KM * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))
        return out

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

