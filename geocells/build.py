"""Build geocells from training coordinates (PIGEON style: real borders, balanced by photo count).

    python -m geocells.build points=train.csv out=cells.parquet [min_points=... max_points=... scheme=...]

Schemes (one file format, one :class:`geoloc.geo.cells.Geocells` reader):

* ``semantic`` (default): start from admin-1 regions (admin-0 where a country has none); regions with
  fewer than ``min_points`` photos merge into touching regions of the same country, or, with none,
  across a short sea gap (closest H3 unit centres within ``bridge_km``) into one; an island farther
  from the rest of its country keeps a cell of its own, below the bound (reported), and one without
  photos gets no cell. Regions with more than ``max_points`` are split by clustering their photos
  (weighted k-means seeds) and growing contiguous, balanced groups of H3 cells from the seeds. Small
  pieces of a split merge into a touching piece of the same admin-1 region first, then into any
  touching piece, then across a gap of at most ``bridge_km``.
* ``admin``: the admin regions as they are (regions with photos), for ablations.
* ``h3``: a plain H3 grid at ``res`` (every H3 cell with at least one photo is a class).

**H3 units.** Every cell is a union of H3 cells. The land of each region is covered at resolution
``res`` (default 5: cells of ~252 km2, ~8.5 km edge; an H3 cell belongs to the region containing its
centre, so borders follow the admin boundaries to within an H3 cell). Where one H3 cell alone holds
more than ``max_points`` photos (city centres) it is replaced by its children, down to ``max_res``
(default 8, ~0.7 km2), so the count bounds can hold. An H3 cell never belongs to two regions, so a
geocell never spans two countries. Photos whose H3 cell has its centre at sea join the nearest region.

Countries with no photos get no cell (their points assign to the nearest cell); a country with fewer
than ``min_points`` photos in all keeps its cell(s) below the bound, and the report lists it.

**Answer point.** ``centroid_lat``/``centroid_lng`` is the point a model answers for a cell
(:attr:`geoloc.geo.cells.Geocells.centroids`: predictor, exported model, haversine label smoothing), so it
must lie among the cell's photos: it is the photo-weighted medoid of the cell's H3 units (the unit with
photos whose photo-weighted sum of great-circle distances to the cell's other units is smallest), then
the member photo nearest to that unit's photo mean. It is thus a real photo location, on land where the
photos are, where the plain mean of a cell whose photos lie in two far-apart groups falls between them
(at sea). The plain mean is kept as ``mean_lat``/``mean_lng``; the file metadata says
``"centroid": "medoid"``.
"""

from __future__ import annotations

import heapq
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.geo import EARTH_RADIUS_KM, latlng_to_xyz, validate_latlng, xyz_to_latlng
from geoloc.geo.h3index import H3Table, h3_centers, h3_neighbors, h3_resolution, latlng_to_h3

SCHEMES = ("semantic", "admin", "h3")


@dataclass
class CellsReport:
    """What a build did, for the log and the benchmark.

    ``countries_below_min``: ``{adm0_a3: photos}``, countries with fewer than ``min_points`` photos in
    all (their cells are below the bound). ``isolated_below_min``: ``{"ADM0/admin-1 name": photos}``,
    cells below the bound in larger countries: regions (or pieces) that no region of their country
    touches or lies within ``bridge_km`` of. ``regions_bridged``: region merges across a gap.
    ``isolated_without_photos``: regions without photos and without such a partner (no cell).
    """

    n_points: int = 0
    n_cells: int = 0
    counts_min: int = 0
    counts_median: float = 0.0
    counts_max: int = 0
    countries_below_min: dict = field(default_factory=dict)
    isolated_below_min: dict = field(default_factory=dict)
    regions_bridged: int = 0
    isolated_without_photos: int = 0
    cells_above_max: int = 0
    n_units: int = 0
    n_refined_units: int = 0
    n_regions_with_points: int = 0
    points_at_sea_reassigned: int = 0
    seconds: dict = field(default_factory=dict)


def _regions_table(boundaries) -> pd.DataFrame:
    cols = ["region_id", "adm0_a3", "iso_a2", "country", "continent", "admin1_code", "admin1_name", "level"]
    missing = [c for c in cols if c not in boundaries.columns]
    if missing:
        raise ValueError(f"boundaries lack column(s) {missing}")
    regions = pd.DataFrame(boundaries[cols]).reset_index(drop=True)
    if not np.array_equal(regions["region_id"].to_numpy(), np.arange(len(regions))):
        raise ValueError("boundaries: region_id must run 0..R-1 in row order")
    return regions


def cover_regions(boundaries, res: int) -> tuple[np.ndarray, np.ndarray]:
    """H3 cells at ``res`` whose centre lies in each region.

    Returns:
        ``(cells, region)``: uint64 cells and the region row of each (a cell is in one region only).
    """
    import pyarrow as pa
    import shapely
    from h3ronpy.vector import wkb_to_cells

    wkb = pa.array(shapely.to_wkb(np.asarray(boundaries.geometry.values)))
    lists = pa.array(wkb_to_cells(wkb, res))
    cells = np.asarray(lists.values, dtype=np.uint64)
    region = np.repeat(np.arange(len(boundaries)), np.diff(np.asarray(lists.offsets)))
    # a centre on a shared border can fall in two polygons: keep the first region
    order = np.lexsort((region, cells))
    cells, region = cells[order], region[order]
    first = np.ones(len(cells), bool)
    first[1:] = cells[1:] != cells[:-1]
    return cells[first], region[first]


def _nearest_region(boundaries, latlng: np.ndarray) -> np.ndarray:
    import shapely

    tree = shapely.STRtree(np.asarray(boundaries.geometry.values))
    pts = shapely.points(latlng[:, 1], latlng[:, 0])
    idx = tree.query_nearest(pts, all_matches=False)
    out = np.full(len(latlng), -1, dtype=np.int64)
    out[idx[0]] = idx[1]
    return out


class _Units:
    """The H3 cells (mixed resolution, non-overlapping) that geocells are made of."""

    def __init__(self, cells, region, count, xyz_sum):
        self.cells = cells
        self.region = region
        self.count = count
        self.xyz_sum = xyz_sum

    def __len__(self):
        return len(self.cells)


def _units(pts: np.ndarray, pts_xyz: np.ndarray, cov_cells: np.ndarray, cov_region: np.ndarray,
           res: int, max_res: int, max_points: int, boundaries, report: CellsReport) -> tuple[_Units, np.ndarray]:
    """Coverage cells plus refinement where one H3 cell holds more than ``max_points`` photos.

    Returns:
        the units and, per point, its unit index (exactly what :class:`geoloc.geo.cells.Geocells` assigns).
    """
    import h3

    at_res = latlng_to_h3(pts, res, validate=False)
    uniq, inv = np.unique(at_res, return_inverse=True)
    pos = np.minimum(np.searchsorted(cov_cells, uniq), max(len(cov_cells) - 1, 0))
    covered = (cov_cells[pos] == uniq) if len(cov_cells) else np.zeros(len(uniq), bool)
    # H3 cells with photos whose centre is at sea (or in no polygon) join the nearest region
    sea = ~covered
    report.points_at_sea_reassigned = int(sea[inv].sum())
    sea_region = _nearest_region(boundaries, h3_centers(uniq[sea])) if sea.any() else np.zeros(0, np.int64)
    cells = np.concatenate([cov_cells, uniq[sea]])
    region = np.concatenate([cov_region, sea_region])

    # refine: replace crowded cells by their children, level by level; only the photos of the
    # refined cells are located again (the lookup is coarse-first, so the others keep their cell)
    unit_of_point, lost = _assign_units(pts, cells)
    while True:
        counts = np.bincount(unit_of_point, minlength=len(cells))
        crowded = np.flatnonzero((counts > max_points) & (h3_resolution(cells) < max_res))
        if len(crowded) == 0:
            break
        kids = np.concatenate([
            np.array([h3.str_to_int(k) for k in h3.cell_to_children(h3.int_to_str(int(c)), int(r) + 1)], np.uint64)
            for c, r in zip(cells[crowded], h3_resolution(cells[crowded]))])
        keep = np.ones(len(cells), bool)
        keep[crowded] = False
        new_index = np.cumsum(keep) - 1
        moved = np.isin(unit_of_point, crowded) | lost  # nearest-cell fallbacks may change too
        cells = np.concatenate([cells[keep], kids])
        region = np.concatenate([region[keep], np.repeat(region[crowded], 7)])
        unit_of_point = new_index[unit_of_point]
        unit_of_point[moved], lost[moved] = _assign_units(pts[moved], cells)
        report.n_refined_units += len(kids)
    if report.n_refined_units:  # the lookup depends on the finest stored level: assign once more, exactly
        unit_of_point, _ = _assign_units(pts, cells)
    count = np.bincount(unit_of_point, minlength=len(cells))
    xyz_sum = np.stack([np.bincount(unit_of_point, weights=pts_xyz[:, k], minlength=len(cells))
                        for k in range(3)], axis=1)
    return _Units(cells, region, count, xyz_sum), unit_of_point


def _assign_units(pts: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit of each point: H3 lookup, else the nearest unit centre (as Geocells.assign does).

    Returns:
        ``(unit, lost)``: unit indexes and where the nearest-centre fallback was used.
    """
    from scipy.spatial import cKDTree

    ids = H3Table(cells, np.arange(len(cells))).lookup(pts, validate=False)
    lost = ids < 0
    if lost.any():
        _, nearest = cKDTree(latlng_to_xyz(h3_centers(cells))).query(latlng_to_xyz(pts[lost]))
        ids[lost] = nearest
    return ids, lost


class _Edges:
    """Symmetric unit adjacency in CSR form: the neighbours of unit u are ``dst[off[u]:off[u + 1]]``."""

    def __init__(self, src: np.ndarray, dst: np.ndarray, n: int):
        key = np.sort(np.concatenate([src * n + dst, dst * n + src]))
        key = key[np.r_[True, key[1:] != key[:-1]]] if len(key) else key
        self.src, self.dst, self.n = key // n, key % n, n
        self.off = np.searchsorted(self.src, np.arange(n + 1))

    def within(self, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Local index pairs ``(i, j)`` of edges between members (sorted by i)."""
        loc = np.full(self.n, -1, dtype=np.int64)
        loc[members] = np.arange(len(members))
        starts, ends = self.off[members], self.off[members + 1]
        lens = ends - starts
        idx = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
        i = np.repeat(np.arange(len(members)), lens)
        j = loc[self.dst[idx]]
        keep = j >= 0
        return i[keep], j[keep]


def _unit_edges(units: _Units) -> _Edges:
    """Units that touch: each unit's ring-1 H3 neighbours, mapped to the unit holding their centres
    (which also links units of different resolutions)."""
    table = H3Table(units.cells, np.arange(len(units)))
    src_all, dst_all = [], []
    res = h3_resolution(units.cells)
    for r in np.unique(res):
        sel = np.flatnonzero(res == r)
        s, d = h3_neighbors(units.cells[sel])
        src_unit = sel[s]
        dst_unit = table.lookup(h3_centers(d), validate=False)  # the unit holding the neighbour's centre
        ok = (dst_unit >= 0) & (dst_unit != src_unit)
        src_all.append(src_unit[ok])
        dst_all.append(dst_unit[ok])
    src = np.concatenate(src_all) if src_all else np.zeros(0, np.int64)
    dst = np.concatenate(dst_all) if dst_all else np.zeros(0, np.int64)
    return _Edges(src, dst, len(units))


def _merge_small(counts: np.ndarray, adj: dict[int, set[int]], key: np.ndarray, min_points: int,
                 bridges: dict[int, dict[int, float]] | None = None) -> tuple[np.ndarray, int]:
    """Merges groups below ``min_points`` into a touching group with the same ``key`` (country or region).

    Smallest first; the smallest touching partner wins (balanced growth). A group with no touching
    partner merges across the shortest gap in ``bridges``; with neither it stays below the bound (the
    caller reports it), so an island never joins a group far away.

    Args:
        counts: ``(G,)`` photos per group.
        adj: touching groups.
        key: ``(G,)`` merging is allowed only within equal keys.
        min_points: the bound.
        bridges: ``{g: {h: gap_km}}`` (symmetric): groups with the same key that do not touch but whose
            closest units lie within the bridge distance (:func:`_bridges`).

    Returns:
        ``(root, n_bridged)``: ``(G,)`` the group each group ended in, and the merges across a gap.
    """
    n = len(counts)
    parent = np.arange(n)
    counts = counts.astype(np.int64).copy()
    adj = {i: set(adj.get(i, ())) for i in range(n)}
    gaps = {i: dict(d) for i, d in (bridges or {}).items()}
    n_bridged = 0

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    heap = [(int(counts[i]), i) for i in range(n) if counts[i] < min_points]
    heapq.heapify(heap)
    alive = np.ones(n, bool)
    while heap:
        c, i = heapq.heappop(heap)
        if not alive[i] or counts[i] != c or counts[i] >= min_points:
            continue
        partners = [j for j in adj[i] if alive[j] and key[j] == key[i] and j != i]
        if partners:
            j = min(partners, key=lambda p: (counts[p], p))
        else:
            across = [(g, counts[j], j) for j, g in gaps.get(i, {}).items() if alive[j] and key[j] == key[i]]
            if not across:
                continue  # touches nothing and no short gap: stays below the bound (reported)
            j = min(across)[2]
            n_bridged += 1
        # merge i into j
        parent[i] = j
        alive[i] = False
        counts[j] += counts[i]
        adj[j] |= adj[i]
        adj[j].discard(j)
        adj[j].discard(i)
        for k in adj[i]:
            adj[k].discard(i)
            if k != j:
                adj[k].add(j)
        for k, g in gaps.pop(i, {}).items():
            gaps[k].pop(i, None)
            if k != j:
                g = min(g, gaps.setdefault(j, {}).get(k, np.inf))
                gaps[j][k] = gaps[k][j] = g
        if counts[j] < min_points:
            heapq.heappush(heap, (int(counts[j]), j))
    return np.array([find(i) for i in range(n)]), n_bridged


def _short_of_min(n: int, a: np.ndarray, b: np.ndarray, counts: np.ndarray, min_points: int) -> np.ndarray:
    """``(n,)`` bool: groups whose touching component (edges ``a``-``b``) holds fewer than ``min_points``
    photos. Touching merges end below the bound only there, so only these groups can need a bridge."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    comp = connected_components(graph, directed=False)[1]
    return np.bincount(comp, weights=counts, minlength=n)[comp] < min_points


def _bridges(xyz: np.ndarray, label: np.ndarray, src: np.ndarray, key: np.ndarray,
             max_km: float) -> dict[int, dict[int, float]]:
    """Short gaps between labelled sets of H3 units: the distance between their closest unit centres.

    Args:
        xyz: ``(U, 3)`` unit vectors of unit centres (those that can be closest: e.g. border units).
        label: ``(U,)`` the group of each unit.
        src: ``(U,)`` bool, units of the groups to measure from.
        key: group -> key; only groups with equal keys are paired.
        max_km: longest gap kept.

    Returns:
        ``{a: {b: gap_km}}``, symmetric, for each group ``a`` of ``src`` and each other group ``b`` within
        ``max_km``.
    """
    from scipy.spatial import cKDTree

    out: dict[int, dict[int, float]] = {}
    if not src.any() or max_km <= 0:
        return out
    chord = 2.0 * np.sin(min(max_km / EARTH_RADIUS_KM, np.pi) / 2.0)
    pairs = cKDTree(xyz[src]).sparse_distance_matrix(cKDTree(xyz), chord, output_type="ndarray")
    a, b, v = label[src][pairs["i"]], label[pairs["j"]], pairs["v"]
    ok = (a != b) & (key[a] == key[b])
    a, b, v = a[ok], b[ok], v[ok]
    order = np.lexsort((v, b, a))  # per pair of groups, the closest units first
    a, b, v = a[order], b[order], v[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])] if len(a) else np.zeros(0, bool)
    km = 2.0 * EARTH_RADIUS_KM * np.arcsin(np.minimum(v[first] / 2.0, 1.0))
    for x, y, d in zip(a[first].tolist(), b[first].tolist(), km.tolist()):
        d = min(d, out.get(x, {}).get(y, np.inf))
        out.setdefault(x, {})[y] = out.setdefault(y, {})[x] = d
    return out


def _adjacency(labels_src: np.ndarray, labels_dst: np.ndarray) -> dict[int, set[int]]:
    """Touching labels from labelled edge ends."""
    keep = labels_src != labels_dst
    if not keep.any():
        return {}
    a, b = labels_src[keep].astype(np.int64), labels_dst[keep].astype(np.int64)
    m = int(max(a.max(), b.max())) + 1
    key = np.unique(a * m + b)
    adj: dict[int, set[int]] = {}
    for x, y in zip((key // m).tolist(), (key % m).tolist()):
        adj.setdefault(x, set()).add(y)
    return adj


def _grow(unit_ids: np.ndarray, units: _Units, edges: _Edges, k: int, seed: int,
          unit_xyz: np.ndarray) -> np.ndarray:
    """Splits a set of units into k contiguous groups of balanced photo counts.

    Seeds come from weighted k-means on the photos' mean positions; groups then grow over H3
    adjacency, the group with the fewest photos taking its nearest free neighbour each step. Units
    no group can reach (islands) join the nearest group.

    Returns:
        ``(len(unit_ids),)`` group index 0..k-1 per unit.
    """
    from sklearn.cluster import KMeans

    w = units.count[unit_ids].astype(np.float64)
    xyz = unit_xyz[unit_ids]
    has = np.flatnonzero(w > 0)
    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(xyz[has], sample_weight=w[has])
    centers = km.cluster_centers_
    li, lj = edges.within(unit_ids)  # local adjacency, sorted by li
    loff = np.searchsorted(li, np.arange(len(unit_ids) + 1))
    label = np.full(len(unit_ids), -1)
    seeds = []
    for c in range(k):
        order = has[np.argsort(-(xyz[has] @ centers[c]), kind="stable")]
        s = next((int(i) for i in order if label[i] < 0), None)
        if s is None:
            break
        label[s] = c
        seeds.append(s)
    k = len(seeds)
    counts = np.zeros(k)
    for c, s in enumerate(seeds):
        counts[c] = w[s]
    frontier: list[list[tuple[float, int]]] = [[] for _ in range(k)]

    def push(c, i):
        nb = lj[loff[i]:loff[i + 1]]
        nb = nb[label[nb] < 0]
        if len(nb):
            for score, j in zip((-(xyz[nb] @ centers[c])).tolist(), nb.tolist()):
                heapq.heappush(frontier[c], (score, j))

    for c, s in enumerate(seeds):
        push(c, s)
    active = [(counts[c], c) for c in range(k)]
    heapq.heapify(active)
    while active:
        cnt, c = heapq.heappop(active)
        if cnt != counts[c]:
            continue
        while frontier[c] and label[frontier[c][0][1]] >= 0:
            heapq.heappop(frontier[c])
        if not frontier[c]:
            continue  # this group is boxed in
        _, j = heapq.heappop(frontier[c])
        label[j] = c
        counts[c] += w[j]
        push(c, j)
        heapq.heappush(active, (counts[c], c))
    free = np.flatnonzero(label < 0)
    if len(free):
        centre_xyz = np.stack([xyz[label == c].mean(0) for c in range(k)])
        label[free] = np.argmax(xyz[free] @ centre_xyz.T, axis=1)
    return label


def build_geocells(points, boundaries, *, scheme: str = "semantic", min_points: int = 50,
                   max_points: int = 2000, res: int = 5, max_res: int = 10, seed: int = 0,
                   bridge_km: float = 150.0):
    """Builds geocells.

    Args:
        points: ``(N, 2)`` ``[lat, lng]`` training coordinates (validated; errors name the row).
        boundaries: GeoDataFrame of regions (``geoloc.geo.boundaries.load_boundaries()``).
        scheme: ``semantic``, ``admin`` or ``h3``.
        min_points: cells with fewer photos merge into neighbours (same country).
        max_points: cells with more photos are split.
        res: H3 resolution of the coverage (and of the ``h3`` scheme's grid).
        max_res: finest H3 resolution used to split crowded cells.
        seed: k-means seed (the build is deterministic for fixed input and settings).
        bridge_km: a small region that touches no region of its country merges across a sea gap up to
            this long (km, between the closest H3 unit centres); farther islands keep their own cell.

    Returns:
        ``(GeoDataFrame of cells, CellsReport)``.
    """
    import geopandas as gpd

    t0 = time.perf_counter()
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if not 0 <= res <= max_res <= 15:
        raise ValueError(f"need 0 <= res <= max_res <= 15, got res={res}, max_res={max_res}")
    if min_points < 0 or max_points < 1 or (scheme == "semantic" and max_points < 2 * min_points):
        raise ValueError(f"need max_points >= 2 * min_points >= 0 so split pieces can satisfy both bounds; "
                         f"got min_points={min_points}, max_points={max_points}")
    if not np.isfinite(bridge_km) or bridge_km < 0:
        raise ValueError(f"bridge_km={bridge_km} must be a distance in km >= 0 (0: no merges across the sea)")
    pts = validate_latlng(points, what="points")
    if len(pts) == 0:
        raise ValueError("points: empty input, geocells need training coordinates")
    if scheme == "semantic" and len(pts) < min_points:
        raise ValueError(f"min_points={min_points} is larger than the {len(pts)} points given: every cell "
                         "would be below the bound; lower min_points")
    report = CellsReport(n_points=len(pts))
    regions = _regions_table(boundaries)
    pts_xyz = latlng_to_xyz(pts)

    t = time.perf_counter()
    if scheme == "h3":
        cov_cells = np.zeros(0, np.uint64)
        cov_region = np.zeros(0, np.int64)
    else:
        cov_cells, cov_region = cover_regions(boundaries, res)
    report.seconds["coverage"] = time.perf_counter() - t

    t = time.perf_counter()
    # only the semantic scheme refines crowded H3 cells; admin and h3 keep one resolution
    refine_to = max_res if scheme == "semantic" else res
    units, unit_of_point = _units(pts, pts_xyz, cov_cells, cov_region, res, refine_to, max_points, boundaries,
                                  report)
    report.n_units = len(units)
    report.seconds["units"] = time.perf_counter() - t

    # drop countries with no photos (their land maps to the nearest cell)
    country_of_unit = regions["adm0_a3"].to_numpy()[units.region]
    country_pts = pd.Series(units.count).groupby(country_of_unit).sum()
    keep = np.asarray(country_pts.reindex(country_of_unit).to_numpy() > 0)
    if scheme in ("admin", "h3"):
        region_pts = np.bincount(units.region, weights=units.count, minlength=len(regions))
        keep &= region_pts[units.region] > 0 if scheme == "admin" else units.count > 0
    remap = np.cumsum(keep) - 1
    units = _Units(units.cells[keep], units.region[keep], units.count[keep], units.xyz_sum[keep])
    unit_of_point = remap[unit_of_point]
    unit_xyz = units.xyz_sum / np.maximum(units.count, 1)[:, None]
    empty = units.count == 0
    unit_xyz[empty] = latlng_to_xyz(h3_centers(units.cells[empty]))
    unit_xyz /= np.linalg.norm(unit_xyz, axis=1, keepdims=True)

    t = time.perf_counter()
    if scheme == "semantic":
        group, edges = _semantic_groups(units, unit_xyz, regions, min_points, max_points, seed, bridge_km, report)
        if (group < 0).any():  # regions left without a cell hold no photos: drop their units
            keep = group >= 0
            remap = np.cumsum(keep) - 1
            units = _Units(units.cells[keep], units.region[keep], units.count[keep], units.xyz_sum[keep])
            unit_of_point, group = remap[unit_of_point], group[keep]
            both = keep[edges.src] & keep[edges.dst]
            edges = _Edges(remap[edges.src[both]], remap[edges.dst[both]], len(units))
    else:
        edges = _unit_edges(units)
        group = np.arange(len(units)) if scheme == "h3" else np.unique(units.region, return_inverse=True)[1]
    report.seconds["grouping"] = time.perf_counter() - t

    t = time.perf_counter()
    cells = _cells_frame(units, group, unit_of_point, pts, pts_xyz, regions, edges)
    report.seconds["geometry"] = time.perf_counter() - t
    counts = cells["n_points"].to_numpy()
    report.n_cells = len(cells)
    report.counts_min, report.counts_max = int(counts.min()), int(counts.max())
    report.counts_median = float(np.median(counts))
    report.cells_above_max = int((counts > max_points).sum()) if scheme == "semantic" else 0
    if scheme == "semantic":
        country_total = cells.groupby("adm0_a3")["n_points"].transform("sum").to_numpy()
        poor = cells[country_total < min_points]
        report.countries_below_min = {str(k): int(v) for k, v in poor.groupby("adm0_a3")["n_points"].sum().items()}
        isolated = cells[(counts < min_points) & (country_total >= min_points)]
        name = isolated["adm0_a3"].astype(str) + "/" + isolated["admin1_name"].where(
            isolated["admin1_name"].astype(str) != "", isolated["country"]).astype(str)
        report.isolated_below_min = {str(k): int(v) for k, v in isolated.groupby(name)["n_points"].sum().items()}
    report.n_regions_with_points = int(len(np.unique(units.region[units.count > 0])))
    report.seconds["total"] = time.perf_counter() - t0
    report.seconds = {k: round(v, 3) for k, v in report.seconds.items()}
    return gpd.GeoDataFrame(cells, geometry="geometry", crs="EPSG:4326"), report


def _semantic_groups(units: _Units, unit_xyz, regions, min_points, max_points, seed, bridge_km, report):
    """Groups of units for the semantic scheme.

    Returns:
        ``(group, edges)``: ``(U,)`` group 0..G-1 of each unit, -1 for units of regions left without a cell
        (no photos, and no region of their country touching or within ``bridge_km``); the unit adjacency.
    """
    edges = _unit_edges(units)
    # 1. regions below min_points merge into touching regions of the same country, else across a short gap
    region_ids, unit_region = np.unique(units.region, return_inverse=True)
    n_regions = len(region_ids)
    r_counts = np.bincount(unit_region, weights=units.count, minlength=n_regions).astype(np.int64)
    country = np.unique(regions["adm0_a3"].to_numpy()[region_ids], return_inverse=True)[1]
    ra, rb = unit_region[edges.src], unit_region[edges.dst]
    same = (ra != rb) & (country[ra] == country[rb])
    short = _short_of_min(n_regions, ra[same], rb[same], r_counts, min_points)
    bridges = {}
    if short.any() and bridge_km > 0:
        # a region's unit closest to anything outside it lies on its border: search border units only
        inner = np.bincount(edges.src[ra == rb], minlength=len(units))
        sel = np.flatnonzero((inner < 6) & np.isin(country[unit_region], country[short]))
        bridges = _bridges(latlng_to_xyz(h3_centers(units.cells[sel])), unit_region[sel], short[unit_region[sel]],
                           country, bridge_km)
    root, report.regions_bridged = _merge_small(r_counts, _adjacency(ra[same], rb[same]), country, min_points,
                                                bridges)
    merged = np.unique(root, return_inverse=True)[1]
    g_counts = np.bincount(merged, weights=r_counts)
    report.isolated_without_photos = int((g_counts[merged] == 0).sum())
    group = merged[unit_region]  # per unit
    base_region = unit_region  # admin-1 membership, for "same admin-1 first"

    # 2. groups above max_points split into contiguous balanced pieces
    out = np.full(len(units), -1)
    next_id = 0
    for g in np.flatnonzero(g_counts > 0):  # a group without photos gets no cell
        members = np.flatnonzero(group == g)
        total = int(units.count[members].sum())
        if total <= max_points or (units.count[members] > 0).sum() < 2:
            out[members] = next_id
            next_id += 1
            continue
        labels = _split(members, units, edges, unit_xyz, min_points, max_points, seed, base_region, bridge_km)
        out[members] = labels + next_id
        next_id += labels.max() + 1
    return out, edges


def _split(members, units, edges, unit_xyz, min_points, max_points, seed, base_region, bridge_km) -> np.ndarray:
    """Labels 0..k-1 for the members of one over-full group, each piece within the bounds if it can be."""
    total = int(units.count[members].sum())
    n_nonempty = int((units.count[members] > 0).sum())
    k = min(n_nonempty, max(2, int(np.ceil(total / (0.85 * max_points)))))
    labels = _grow(members, units, edges, k, seed, unit_xyz)
    # pieces still above max_points: split again (recursively)
    final = np.full(len(members), -1)
    next_id = 0
    for c in range(labels.max() + 1):
        sub = np.flatnonzero(labels == c)
        cnt = int(units.count[members[sub]].sum())
        if cnt > max_points and (units.count[members[sub]] > 0).sum() >= 2:
            sub_labels = _split(members[sub], units, edges, unit_xyz, min_points, max_points, seed + 1,
                                base_region, bridge_km)
            final[sub] = sub_labels + next_id
            next_id += sub_labels.max() + 1
        elif len(sub):
            final[sub] = next_id
            next_id += 1
    final = np.unique(final, return_inverse=True)[1]
    # pieces below min_points merge into a touching piece of the same admin-1 region first, then into
    # any touching piece of the group (a group never spans two countries), then across a gap of at most
    # bridge_km. Pieces need not touch: a seed on an island grows a piece there, and units no seed
    # reaches join the nearest piece (_grow)
    counts = np.bincount(final, weights=units.count[members]).astype(np.int64)
    for same_region in (True, False):
        if not (counts < min_points).any() or len(counts) < 2:
            break
        adj, la, lb = _piece_adjacency(members, final, edges)
        bridges = {}
        if same_region:  # the admin-1 region holding most of each piece's photos
            key = np.array([np.bincount(base_region[members[final == p]],
                                        weights=units.count[members[final == p]] + 1e-9).argmax()
                            for p in range(len(counts))])
        else:
            key = np.zeros(len(counts), dtype=np.int64)
            short = _short_of_min(len(counts), la, lb, counts, min_points)
            if short.any() and bridge_km > 0:
                bridges = _bridges(latlng_to_xyz(h3_centers(units.cells[members])), final, short[final], key,
                                   bridge_km)
        merged, _ = _merge_small(counts, adj, key, min_points, bridges)
        final = np.unique(merged, return_inverse=True)[1][final]
        counts = np.bincount(final, weights=units.count[members]).astype(np.int64)
    return final


def _piece_adjacency(members, labels, edges: _Edges):
    """Touching pieces, for pieces labelled over ``members``: ``(adj, a, b)`` with the labelled edge ends."""
    i, j = edges.within(members)
    keep = labels[i] != labels[j]
    return _adjacency(labels[i], labels[j]), labels[i][keep], labels[j][keep]


def _medoid_units(group: np.ndarray, weight: np.ndarray, xyz: np.ndarray, n_groups: int, *,
                  max_candidates: int = 2048, max_pairs: int = 1 << 22) -> np.ndarray:
    """Per group, its photo-weighted medoid unit.

    The medoid is the unit with photos whose sum of great-circle distances to the group's other units,
    weighted by their photos, is smallest (ties: the lowest unit index). Exact for groups of up to
    ``max_candidates`` units with photos (every cell of a build with max_points <= max_candidates); in
    larger groups the candidates are the ``max_candidates`` units with the most photos. Groups go in
    batches of similar size, at most ``max_pairs`` distances at a time.

    Args:
        group: ``(U,)`` group 0..n_groups-1 of each unit.
        weight: ``(U,)`` photos per unit.
        xyz: ``(U, 3)`` unit vectors of the units' photo means.
        n_groups: number of groups.

    Returns:
        ``(n_groups,)`` unit index of each group's medoid, -1 for a group without photos.
    """
    has = np.flatnonzero(weight > 0)
    has = has[np.argsort(group[has], kind="stable")]  # by group, then unit index
    size = np.bincount(group[has], minlength=n_groups)
    start = np.cumsum(size) - size
    out = np.full(n_groups, -1, dtype=np.int64)
    out[size == 1] = has[start[size == 1]]
    many = np.flatnonzero(size > 1)
    many = many[np.argsort(size[many], kind="stable")]  # similar sizes together: little padding
    w = weight.astype(np.float64)
    exact = many[size[many] <= max_candidates]
    i = 0
    while i < len(exact):
        j = i + 1
        while j < len(exact) and (j + 1 - i) * int(size[exact[j]]) ** 2 <= max_pairs:
            j += 1
        g = exact[i:j]
        m = int(size[g[-1]])
        valid = np.arange(m) < size[g][:, None]  # (B, m)
        u = has[start[g][:, None] + np.where(valid, np.arange(m), 0)]  # padding repeats the first unit
        x = xyz[u]  # (B, m, 3)
        arc = np.matmul(x, x.transpose(0, 2, 1))  # (B, m, m) cosines
        np.arccos(np.clip(arc, -1.0, 1.0, out=arc), out=arc)
        cost = np.matmul(arc, np.where(valid, w[u], 0.0)[..., None])[..., 0]  # (B, m)
        cost[~valid] = np.inf
        out[g] = u[np.arange(len(g)), np.argmin(cost, axis=1)]
        i = j
    for g in many[size[many] > max_candidates]:
        u = has[start[g]:start[g] + size[g]]
        cand = u[np.sort(np.argsort(-w[u], kind="stable")[:max_candidates])]
        cost = np.zeros(len(cand))
        step = max(1, max_pairs // len(cand))
        for k in range(0, len(u), step):
            cost += np.arccos(np.clip(xyz[cand] @ xyz[u[k:k + step]].T, -1.0, 1.0)) @ w[u[k:k + step]]
        out[g] = cand[np.argmin(cost)]
    return out


def _answer_points(group: np.ndarray, n_groups: int, units: _Units, unit_of_point: np.ndarray, pts: np.ndarray,
                   pts_xyz: np.ndarray) -> np.ndarray:
    """``(n_groups, 2)`` ``[lat, lng]``: the point a model answers for each cell.

    The member photo nearest to the photo mean of the cell's medoid unit (:func:`_medoid_units`): a real
    photo location among the cell's photos, where the plain mean of photos in two far-apart groups lies
    between them. A cell without photos (none in a build today; kept for other callers) gets the centre
    of its unit nearest to the mean of its unit centres.
    """
    out = np.full((n_groups, 2), np.nan)
    unit_xyz = units.xyz_sum / np.maximum(np.linalg.norm(units.xyz_sum, axis=1, keepdims=True), 1e-300)
    medoid = _medoid_units(group, units.count, unit_xyz, n_groups)
    has = medoid >= 0
    if has.any():
        is_medoid = np.zeros(len(units), bool)
        is_medoid[medoid[has]] = True
        pick = np.flatnonzero(is_medoid[unit_of_point])  # the photos of medoid units
        u = unit_of_point[pick]
        score = np.einsum("ij,ij->i", pts_xyz[pick], unit_xyz[u])
        order = np.lexsort((pick, -score, u))  # per unit: nearest its mean first, then the first photo
        u, pick = u[order], pick[order]
        first = np.r_[True, u[1:] != u[:-1]]
        photo = np.full(len(units), -1, dtype=np.int64)
        photo[u[first]] = pick[first]
        out[has] = pts[photo[medoid[has]]]
    if not has.all():
        sel = np.flatnonzero(~has[group])
        centre = latlng_to_xyz(h3_centers(units.cells[sel]))
        mean = np.stack([np.bincount(group[sel], weights=centre[:, k], minlength=n_groups) for k in range(3)], 1)
        score = np.einsum("ij,ij->i", centre, mean[group[sel]])
        order = np.lexsort((sel, -score, group[sel]))
        g, best = group[sel][order], sel[order]
        first = np.r_[True, g[1:] != g[:-1]]
        out[g[first]] = h3_centers(units.cells[best[first]])
    return out


def _cells_frame(units: _Units, group: np.ndarray, unit_of_point, pts, pts_xyz, regions: pd.DataFrame,
                 edges: _Edges) -> pd.DataFrame:
    """One row per geocell, in a deterministic order, with attributes and geometry."""
    from geocells.geometry import cells_to_geometry

    n_groups = group.max() + 1
    count = np.bincount(group, weights=units.count, minlength=n_groups).astype(np.int64)
    # order: by country, then admin-1 code, then the smallest member H3 cell (stable across runs)
    dom_region = np.array([0] * n_groups)
    best = np.full(n_groups, -1.0)
    for r in np.unique(units.region):
        sel = units.region == r
        w = np.bincount(group[sel], weights=units.count[sel] + 1e-6, minlength=n_groups)
        better = w > best
        dom_region[better] = r
        best[better] = w[better]
    min_cell = pd.Series(units.cells).groupby(group).min().to_numpy()
    reg = regions.iloc[dom_region].reset_index(drop=True)
    order = np.lexsort((min_cell, reg["admin1_code"].to_numpy(), reg["adm0_a3"].to_numpy()))
    new_id = np.empty(n_groups, dtype=np.int64)
    new_id[order] = np.arange(n_groups)
    group = new_id[group]
    count, reg = count[order], reg.iloc[order].reset_index(drop=True)

    cell_of_point = group[unit_of_point]
    xyz = np.stack([np.bincount(cell_of_point, weights=pts_xyz[:, k], minlength=n_groups) for k in range(3)], 1)
    empty = count == 0  # the mean of a cell without photos: of its units' centres
    if empty.any():
        sel = np.flatnonzero(empty[group])
        centre = latlng_to_xyz(h3_centers(units.cells[sel]))
        xyz[empty] = np.stack([np.bincount(group[sel], weights=centre[:, k], minlength=n_groups)
                               for k in range(3)], 1)[empty]
    mean = xyz_to_latlng(xyz)
    answer = _answer_points(group, n_groups, units, unit_of_point, pts, pts_xyz)
    members = [np.sort(units.cells[group == g]) for g in range(n_groups)]
    # neighbours: cells whose member H3 cells touch
    gs, gd = group[edges.src], group[edges.dst]
    keep = gs != gd
    nb = pd.DataFrame({"a": gs[keep], "b": gd[keep]}).drop_duplicates().sort_values(["a", "b"])
    neighbors = nb.groupby("a")["b"].apply(lambda s: s.to_numpy(dtype=np.int32)).reindex(range(n_groups))
    regions_of = pd.DataFrame({"g": group, "r": units.region}).drop_duplicates()
    codes = regions["admin1_code"].to_numpy()
    admin1_codes = regions_of.groupby("g")["r"].apply(lambda s: sorted({str(codes[r]) for r in s}))
    frame = pd.DataFrame({
        "cell_id": np.arange(n_groups, dtype=np.int32),
        "n_points": count,
        "centroid_lat": answer[:, 0],
        "centroid_lng": answer[:, 1],
        "mean_lat": mean[:, 0],
        "mean_lng": mean[:, 1],
        "adm0_a3": reg["adm0_a3"].to_numpy(),
        "iso_a2": reg["iso_a2"].to_numpy(),
        "country": reg["country"].to_numpy(),
        "continent": reg["continent"].to_numpy(),
        "admin1_code": reg["admin1_code"].to_numpy(),
        "admin1_name": reg["admin1_name"].to_numpy(),
        "admin1_codes": admin1_codes.reindex(range(n_groups)).to_list(),
        "h3_cells": members,
        "neighbors": [n if isinstance(n, np.ndarray) else np.zeros(0, np.int32) for n in neighbors],
    })
    frame["geometry"] = cells_to_geometry(members)
    return frame


def write_geocells(cells, path: str | Path, *, meta: dict) -> Path:
    """Writes a geocell GeoParquet atomically with build metadata in the file's schema."""
    import pyarrow.parquet as pq

    from geoloc.artifacts import atomic_path
    from geoloc.geo.cells import GEOCELLS_FORMAT_VERSION, METADATA_KEY

    with atomic_path(path, suffix=".parquet") as tmp:
        cells.to_parquet(tmp, index=False)
        table = pq.read_table(tmp)
        md = dict(table.schema.metadata or {})
        md[METADATA_KEY] = json.dumps({"format_version": GEOCELLS_FORMAT_VERSION, **meta}).encode()
        pq.write_table(table.replace_schema_metadata(md), tmp, compression="zstd")
    return Path(path)


def add_cell_evidence(cells, points: np.ndarray):
    """Adds ``evidence_<head>`` columns: per cell, its member points' counts over each evidence head's
    classes (:data:`geoloc.evidence.labels.HEADS`, labels looked up from the coordinates), so the
    reasoning head's predictions can be compared with candidate cells. The scene head stays empty
    (it is not a property of a location)."""
    from geoloc.evidence.labels import cell_evidence_counts, evidence_labels
    from geoloc.geo.cells import Geocells

    cell_of_point = Geocells(cells).assign(points)
    counts = cell_evidence_counts(evidence_labels(points), cell_of_point, len(cells))
    cells = cells.copy()
    for head, c in counts.items():
        cells[f"evidence_{head}"] = list(c)
    return cells


def _first_bad_utf8(path: Path) -> str:
    """Where a file first stops being UTF-8, as ``line L, byte 0xXX`` (streamed: the file may be large)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {n}, byte 0x{line[e.start]:02x}"
    return "a multi-byte character cut at the end"


def read_points(path: str | Path, split: str | None = None) -> np.ndarray:
    """``(N, 2)`` ``[lat, lng]`` from a CSV or Parquet table with lat/lng columns.

    Column names are matched case-insensitively: ``lat``/``latitude`` and ``lng``/``lon``/``longitude``
    (so Im2GPS-style ``LAT,LON`` works). With ``split``, only rows whose ``split`` column equals it.
    Errors (``ValueError``, ``FileNotFoundError``, ``PermissionError``) start with the path and say what is
    wrong: an empty or header-only file, one that is not UTF-8 CSV or not Parquet, missing columns, and
    the offending row of a bad coordinate.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; points= takes a CSV or Parquet file with lat and lng columns")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such points file")
    parquet = path.suffix.lower() in (".parquet", ".pq")
    want = "a Parquet table" if parquet else "a CSV file with a header line"
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file; expected {want} with lat and lng columns")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except PermissionError:
        raise PermissionError(f"{path}: cannot read the points file (permission denied)") from None
    if not parquet and magic == b"PAR1":
        raise ValueError(f"{path}: a Parquet file without a .parquet suffix; rename it to .parquet")
    try:
        df = pd.read_parquet(path) if parquet else pd.read_csv(path, comment=None, low_memory=False)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text ({_first_bad_utf8(path)}); save it as UTF-8 CSV "
                         "(e.g. iconv -f latin1 -t utf-8)") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: no header line (the file holds only blank lines); expected {want} "
                         "with lat and lng columns") from None
    except (ValueError, OSError) as e:  # pandas ParserError, pyarrow ArrowInvalid, a broken compressed file
        what = "Parquet" if parquet else "CSV"
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable {what} file ({detail}); expected {want} with lat and lng "
                         "columns") from None
    line0 = 0 if parquet else 2
    if len(df) == 0:
        raise ValueError(f"{path}: no rows{'' if parquet else ', only a header'} (columns {list(df.columns)[:12]}); "
                         "expected one row per training photo")
    df.index = pd.RangeIndex(line0, line0 + len(df))
    if split is not None:
        if "split" not in df.columns:
            raise ValueError(f"{path}: points_split={split!r} given but the file has no 'split' column")
        splits = df["split"]
        df = df[splits == split]
        if len(df) == 0:
            raise ValueError(f"{path}: no rows with split == {split!r}; the file's splits are "
                             f"{sorted(map(str, splits.dropna().unique()))[:12]}")
    cols = {str(c).strip().lower(): c for c in df.columns}
    lat = next((cols[c] for c in ("lat", "latitude") if c in cols), None)
    lng = next((cols[c] for c in ("lng", "lon", "longitude") if c in cols), None)
    if lat is None or lng is None:
        raise ValueError(f"{path}: needs lat and lng (or lon) columns; found {list(df.columns)[:12]}")
    latlng = np.stack([pd.to_numeric(df[lat], errors="coerce").to_numpy(np.float64),
                       pd.to_numeric(df[lng], errors="coerce").to_numpy(np.float64)], 1)
    return validate_latlng(latlng, what=f"{path} (row = {'file line' if line0 else 'row index'})",
                           row_labels=list(df.index))


def _check_writable(path: str | Path) -> Path:
    """Checks that a file can be written at ``path`` before any work, creating its folder if needed.

    Raises:
        ValueError: ``path`` is a folder, or its folder cannot be made (a file stands in the way).
        PermissionError: the folder cannot be created or written (read-only folder or file system).
    """
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; out= takes the cells file to write, e.g. out={path / 'cells.parquet'}")
    folder = path.parent
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"{path}: cannot create its folder: {blocker} is a file, not a folder; choose another out=")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".check"):
            pass
    except PermissionError as e:
        raise PermissionError(f"{path}: cannot write in {folder} (permission denied); choose another out= "
                              "or make the folder writable") from e
    except OSError as e:  # a read-only file system, a name too long, ...
        raise PermissionError(f"{path}: cannot write in {folder} ({e.strerror or e}); choose another out=") from e
    return path


def _main(cfg) -> None:
    from geoloc.geo.boundaries import load_boundaries

    out = _check_writable(cfg.out)  # before the build: an unwritable out= must not cost the whole run
    points = read_points(cfg.points, split=cfg.points_split)
    boundaries = load_boundaries(cfg.boundaries)
    cells, report = build_geocells(points, boundaries, scheme=cfg.scheme, min_points=cfg.min_points,
                                   max_points=cfg.max_points, res=cfg.res, max_res=cfg.max_res, seed=cfg.seed,
                                   bridge_km=cfg.bridge_km)
    if cfg.evidence:
        cells = add_cell_evidence(cells, points)
    if not cfg.geometry:  # a small file: areas then come from the member H3 cells' mean areas
        cells = pd.DataFrame(cells.drop(columns="geometry"))
    meta = {"scheme": cfg.scheme, "evidence": bool(cfg.evidence), "geometry": bool(cfg.geometry),
            "min_points": cfg.min_points,
            "max_points": cfg.max_points, "res": cfg.res, "max_res": cfg.max_res, "seed": cfg.seed,
            "bridge_km": cfg.bridge_km, "centroid": "medoid",
            "points": str(cfg.points), "points_split": cfg.points_split, "n_points": len(points),
            "boundaries": str(cfg.boundaries or "geocells/data/admin_boundaries_v1.parquet")}
    write_geocells(cells, out, meta=meta)
    print(f"{report.n_cells} cells from {report.n_points} points -> {out}")
    print(f"points per cell: min {report.counts_min}, median {report.counts_median:g}, max {report.counts_max}")
    if report.countries_below_min:
        print(f"countries with fewer than min_points={cfg.min_points} photos in all (cells below the bound): "
              f"{report.countries_below_min}")
    if report.isolated_below_min:
        print(f"{len(report.isolated_below_min)} region(s) below min_points={cfg.min_points} with no region of "
              f"their country touching or within bridge_km={cfg.bridge_km:g} (own cells, below the bound): "
              f"{report.isolated_below_min}")
    if report.isolated_without_photos:
        print(f"{report.isolated_without_photos} region(s) without photos and no region of their country touching "
              f"or within bridge_km={cfg.bridge_km:g}: no cell (their land assigns to the nearest cell)")
    if report.cells_above_max:
        print(f"{report.cells_above_max} cell(s) above max_points: single H3 cells at max_res={cfg.max_res}")
    print(f"seconds: {report.seconds}")


if __name__ == "__main__":
    import hydra

    from geoloc.cli import user_errors

    main = hydra.main(version_base="1.3", config_path="../conf", config_name="geocells")
    main(user_errors("geocells.build")(_main))()
