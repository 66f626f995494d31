"""Vectorized H3 (v4 cell indexes as ``uint64``) for millions of points.

``h3`` (the reference bindings) works one cell at a time; the hot paths here go through ``h3ronpy``
(Rust, whole arrays at once) and plain bit arithmetic on the index layout, and are checked against
``h3`` in the tests.

H3 index layout (64 bits): mode in bits 59-62, resolution in bits 52-55, base cell in bits 45-51,
then 15 three-bit digits, the digit of resolution r in bits ``3 * (15 - r)`` to ``3 * (15 - r) + 2``;
digits below the cell's resolution are 7.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from geoloc.geo import validate_latlng

_RES_SHIFT = np.uint64(52)
_RES_MASK = np.uint64(0xF) << _RES_SHIFT


def _threads(n: int) -> int:
    return max(1, min(os.cpu_count() or 1, n // 200_000))


def latlng_to_h3(latlng, res: int, *, validate: bool = True) -> np.ndarray:
    """H3 cells containing the points.

    Args:
        latlng: ``(N, 2)`` ``[lat, lng]`` in degrees.
        res: H3 resolution 0..15.
        validate: check the coordinates first (errors name the row).

    Returns:
        ``(N,)`` uint64 cell indexes.
    """
    from h3ronpy.vector import coordinates_to_cells

    pts = validate_latlng(latlng, what="points") if validate else np.asarray(latlng, dtype=np.float64)
    lat = np.ascontiguousarray(pts[:, 0])
    lng = np.ascontiguousarray(pts[:, 1])
    n = len(pts)
    k = _threads(n)
    if k == 1:
        return np.asarray(coordinates_to_cells(lat, lng, res), dtype=np.uint64)
    bounds = np.linspace(0, n, k + 1).astype(int)
    with ThreadPoolExecutor(k) as ex:  # h3ronpy releases the GIL
        parts = ex.map(lambda s: np.asarray(coordinates_to_cells(lat[s[0]:s[1]], lng[s[0]:s[1]], res),
                                            dtype=np.uint64), zip(bounds[:-1], bounds[1:]))
        return np.concatenate(list(parts))


def h3_resolution(cells: np.ndarray) -> np.ndarray:
    """``(N,)`` resolutions of uint64 cells."""
    return ((np.asarray(cells, dtype=np.uint64) & _RES_MASK) >> _RES_SHIFT).astype(np.int8)


@functools.lru_cache(maxsize=1)
def _mean_area_table_km2() -> np.ndarray:
    import h3

    return np.array([h3.average_hexagon_area(r, unit="km^2") for r in range(16)])


def h3_mean_area_km2(res) -> np.ndarray:
    """H3's mean hexagon area at each resolution (``h3.average_hexagon_area``), in km².

    Args:
        res: resolutions 0..15, any shape.

    Returns:
        float64 areas in km², the shape of ``res``.
    """
    return _mean_area_table_km2()[np.asarray(res, dtype=np.int64)]


def h3_parent(cells: np.ndarray, res: int) -> np.ndarray:
    """Ancestors at resolution ``res`` (cells must be at resolution >= res).

    Args:
        cells: ``(N,)`` uint64 cells.
        res: the parent resolution.

    Returns:
        ``(N,)`` uint64 parents.
    """
    cells = np.asarray(cells, dtype=np.uint64)
    fill = np.uint64((1 << (3 * (15 - res))) - 1)  # digits below res set to 7
    return (cells & ~_RES_MASK) | (np.uint64(res) << _RES_SHIFT) | fill


def h3_centers(cells: np.ndarray) -> np.ndarray:
    """``(N, 2)`` ``[lat, lng]`` degrees of the cells' centres."""
    import pyarrow as pa
    from h3ronpy.vector import cells_to_coordinates

    cells = np.asarray(cells, dtype=np.uint64)
    if len(cells) == 0:
        return np.zeros((0, 2))
    batch = pa.record_batch(cells_to_coordinates(pa.array(cells)))
    return np.column_stack([batch.column("lat").to_numpy(), batch.column("lng").to_numpy()])


def h3_center_child(cells: np.ndarray, res: int) -> np.ndarray:
    """The centre descendant at resolution ``res`` (>= the cells' own) of each cell."""
    cells = np.asarray(cells, dtype=np.uint64)
    own = h3_resolution(cells).astype(np.uint64)
    below = np.uint64(3 * (15 - res))
    # zero the digits between the cell's resolution and res; those past res stay 7
    span = (np.uint64(1) << (np.uint64(3) * (np.uint64(15) - own))) - (np.uint64(1) << below)
    return (cells & ~span & ~_RES_MASK) | (np.uint64(res) << _RES_SHIFT)


def h3_neighbors(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges between each cell and its ring-1 neighbours (same resolution).

    Returns:
        ``(src, dst)``: ``src[i]`` is a position in ``cells`` and ``dst[i]`` (uint64) a cell touching it.
    """
    from h3ronpy import grid_disk

    cells = np.asarray(cells, dtype=np.uint64)
    if len(cells) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    import pyarrow as pa

    disks = pa.array(grid_disk(cells, 1))  # list array: the disk of each cell
    flat = np.asarray(disks.values, dtype=np.uint64)
    src = np.repeat(np.arange(len(cells)), np.diff(np.asarray(disks.offsets, dtype=np.int64)))
    keep = cells[src] != flat
    return src[keep], flat[keep]


REFINED = -2


class H3Table:
    """A mapping from H3 cells (any mix of resolutions, non-overlapping) to integer values.

    Points are looked up coarsest resolution first, geometrically: a point's own H3 cell at the
    coarsest stored resolution (``latlng_to_cell``, not the index parent of a finer cell, which can
    lie elsewhere near edges) is looked for among the stored cells. Where that cell was refined into
    finer stored cells, the search goes on through the index parents of the point's cell at the finest
    stored resolution (one conversion instead of one per level). So a stored cell's polygon holds the
    points it is given, except in the seams of refined cells, whose children do not tile them exactly.

    Args:
        cells: ``(M,)`` uint64 cells.
        values: ``(M,)`` non-negative int values.
    """

    def __init__(self, cells: np.ndarray, values: np.ndarray):
        cells = np.asarray(cells, dtype=np.uint64)
        values = np.asarray(values, dtype=np.int64)
        res = h3_resolution(cells)
        self.resolutions = sorted(int(r) for r in np.unique(res))
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if not self.resolutions:
            return
        lo = self.resolutions[0]
        for r in range(lo, self.resolutions[-1] + 1):
            sel = res == r
            keys, vals = cells[sel], values[sel]
            # ancestors (at r) of finer stored cells are marked REFINED: look deeper there
            finer = cells[res > r]
            if len(finer):
                marks = np.unique(h3_parent(finer, r))
                marks = marks[~np.isin(marks, keys)]
                keys = np.concatenate([keys, marks])
                vals = np.concatenate([vals, np.full(len(marks), REFINED, dtype=np.int64)])
            order = np.argsort(keys, kind="stable")
            self._tables[r] = (keys[order], vals[order])

    @property
    def max_res(self) -> int:
        return self.resolutions[-1] if self.resolutions else 0

    def lookup(self, latlng, missing: int = -1, *, validate: bool = True) -> np.ndarray:
        """``(N,)`` values for ``(N, 2)`` points, ``missing`` where no stored cell contains them."""
        pts = validate_latlng(latlng, what="points") if validate else np.asarray(latlng, dtype=np.float64)
        out = np.full(len(pts), missing, dtype=np.int64)
        todo = np.arange(len(pts))
        fine = None
        for r, (keys, vals) in self._tables.items():
            if len(todo) == 0 or len(keys) == 0:
                continue
            if fine is None:
                q = latlng_to_h3(pts[todo], r, validate=False)
            else:  # inside refined cells: one conversion at the finest level, index parents above it
                q = h3_parent(fine, r)
            pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
            hit = keys[pos] == q
            v = np.where(hit, vals[pos], missing)
            done = v != REFINED
            out[todo[done]] = v[done]
            todo = todo[~done]
            if len(todo) and r < self.max_res:
                fine = latlng_to_h3(pts[todo], self.max_res, validate=False) if fine is None else fine[~done]
        return out
