"""Where a cell's answer point lies, and which regions merge across the sea, on the real admin boundaries."""

import numpy as np
import pandas as pd
import pytest

from geocells.build import _answer_points, _medoid_units, _Units, build_geocells
from geoloc.geo import haversine_matrix_km, latlng_to_xyz
from geoloc.geo.cells import Geocells
from geoloc.geo.h3index import h3_centers, latlng_to_h3

MIN, MAX = 50, 600


def answer_is_member_photo(cells, points) -> np.ndarray:
    """``(C,)`` bool: the cell's ``centroid_lat/lng`` is exactly the coordinates of one of its member photos."""
    ids = Geocells(cells).assign(points)
    members = pd.MultiIndex.from_arrays([ids, points[:, 0], points[:, 1]])
    answers = pd.MultiIndex.from_arrays([cells["cell_id"], cells["centroid_lat"], cells["centroid_lng"]])
    return answers.isin(members)


@pytest.fixture(scope="module")
def world():
    from geocells.boundaries import load_boundaries

    return load_boundaries()


def regions(world, adm0_a3: str, names: list[str]):
    """The named admin-1 regions of one country, with region_id renumbered 0..R-1 (a small, fast build)."""
    sel = world[(world["adm0_a3"] == adm0_a3) & world["admin1_name"].isin(names)].reset_index(drop=True)
    assert sorted(sel["admin1_name"]) == sorted(names)
    sel["region_id"] = np.arange(len(sel), dtype=np.int32)
    return sel


def around(rng, centre, n, spread_deg):
    return rng.normal(centre, spread_deg, size=(n, 2))


@pytest.fixture(scope="module")
def us_points():
    """Many photos in California (Los Angeles, San Francisco), a few in Nevada (touching) and Hawaii."""
    rng = np.random.default_rng(0)
    return {
        "CA": np.vstack([around(rng, [34.05, -118.25], 500, 0.08), around(rng, [37.75, -122.2], 400, 0.05)]),
        "NV": around(rng, [36.17, -115.14], 10, 0.03),       # Las Vegas
        "HI": np.vstack([around(rng, [21.31, -157.86], 25, 0.01), around(rng, [20.80, -156.33], 15, 0.01)]),
    }


@pytest.fixture(scope="module")
def us(world):
    return regions(world, "USA", ["California", "Nevada", "Hawaii"])


def cell_of(cells, points):
    return Geocells(cells).assign(points)


def test_island_keeps_its_own_cell_and_touching_region_merges(us, us_points):
    pts = np.vstack(list(us_points.values()))
    cells, report = build_geocells(pts, us, min_points=MIN, max_points=MAX, res=5, max_res=8)
    ca, nv, hi = (set(cell_of(cells, us_points[k]).tolist()) for k in ("CA", "NV", "HI"))
    # Hawaii (40 photos, 3,800 km from California) stays alone, below min_points, and is reported
    assert len(hi) == 1 and not hi & ca and not hi & nv
    (h,) = hi
    assert cells.loc[h, "n_points"] == 40 and cells.loc[h, "admin1_name"] == "Hawaii"
    assert report.isolated_below_min == {"USA/Hawaii": 40} and report.countries_below_min == {}
    assert report.regions_bridged == 0
    # Nevada (10 photos) touches California: it merges, into a cell with California photos
    assert nv <= ca
    assert answer_is_member_photo(cells, pts).all()


def test_bimodal_cell_answers_in_its_big_group(us, us_points):
    pts = np.vstack(list(us_points.values()))
    # bridge_km far beyond the Pacific gap forces Hawaii into a California cell
    cells, report = build_geocells(pts, us, min_points=MIN, max_points=MAX, res=5, max_res=8, bridge_km=5000)
    assert report.regions_bridged == 1 and report.isolated_below_min == {}
    ids = cell_of(cells, pts)
    (h,) = set(cell_of(cells, us_points["HI"]).tolist())
    members = pts[ids == h]
    assert (members[:, 1] > -125).sum() >= 300  # hundreds of California photos and Hawaii's 40
    answer = cells.loc[h, ["centroid_lat", "centroid_lng"]].to_numpy(np.float64)
    mean = cells.loc[h, ["mean_lat", "mean_lng"]].to_numpy(np.float64)
    # the plain mean lies in the Pacific, far from every photo; the answer is a California photo
    assert haversine_matrix_km(mean[None], members).min() > 200
    assert answer[1] > -125 and haversine_matrix_km(answer[None], us_points["CA"]).min() == 0.0
    assert answer_is_member_photo(cells, pts).all()


def test_region_across_a_narrow_strait_merges(world):
    """Argentina's Tierra del Fuego touches no other Argentine province (Chile lies between) but is
    ~40 km of sea from Santa Cruz across the mouth of the Strait of Magellan."""
    arg = regions(world, "ARG", ["Tierra del Fuego", "Santa Cruz"])
    rng = np.random.default_rng(1)
    santa_cruz = np.vstack([around(rng, [-51.62, -69.25], 120, 0.03), around(rng, [-50.34, -72.27], 80, 0.03)])
    fuego = around(rng, [-53.79, -67.72], 15, 0.02)  # Rio Grande
    pts = np.vstack([santa_cruz, fuego])
    cells, report = build_geocells(pts, arg, min_points=MIN, max_points=MAX, res=5, max_res=8)
    assert len(cells) == 1 and report.regions_bridged == 1 and report.isolated_below_min == {}
    assert answer_is_member_photo(cells, pts).all()
    # a bridge shorter than the gap leaves it alone
    cells, report = build_geocells(pts, arg, min_points=MIN, max_points=MAX, res=5, max_res=8, bridge_km=20)
    assert len(cells) == 2 and report.isolated_below_min == {"ARG/Tierra del Fuego": 15}


def test_medoid_is_weighted_golden():
    # three units on the equator at lng 0, 1 and 10 (km costs ~ 111 * degrees)
    xyz = latlng_to_xyz(np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 10.0], [5.0, 5.0]]))
    group = np.array([0, 0, 0, 1])
    # equal weights: the middle one (1 + 9 < 1 + 10 < 10 + 9); the unit without photos is never chosen
    np.testing.assert_array_equal(_medoid_units(group, np.array([1, 1, 1, 0]), xyz, 2), [1, -1])
    # weight on the far unit pulls the medoid there (10 + 9 < 1 + 45 < 1 + 50)
    np.testing.assert_array_equal(_medoid_units(group, np.array([1, 1, 5, 0]), xyz, 2), [2, -1])


def test_medoid_batches_and_large_groups_agree_with_direct_sums():
    rng = np.random.default_rng(2)
    n = 3000
    xyz = latlng_to_xyz(rng.uniform([30, -10], [60, 40], size=(n, 2)))
    group = rng.integers(0, 40, size=n)
    group[:1200] = 40  # one large group
    weight = rng.integers(0, 4, size=n)
    got = _medoid_units(group, weight, xyz, 41, max_pairs=1 << 14)
    for g in range(41):
        u = np.flatnonzero((group == g) & (weight > 0))
        cost = np.arccos(np.clip(xyz[u] @ xyz[u].T, -1, 1)) @ weight[u]
        assert got[g] == u[np.argmin(cost)]
    # candidates limited to the heaviest units of large groups: still one of the group's units with photos
    capped = _medoid_units(group, weight, xyz, 41, max_candidates=64)
    np.testing.assert_array_equal(capped[:40], got[:40])
    assert group[capped[40]] == 40 and weight[capped[40]] == weight[group == 40].max()


def test_cell_without_photos_answers_a_unit_centre():
    """No build makes one today (regions without photos and without partners get no cell), but the answer
    point of such a cell is the centre of its unit nearest to the mean of its unit centres."""
    pts = np.array([[48.85, 2.35], [48.86, 2.34], [48.80, 2.30]])
    cells = np.unique(latlng_to_h3(pts, 5))
    far = latlng_to_h3(np.array([[45.0, 5.0], [45.3, 5.0], [45.6, 5.0]]), 5)
    cells = np.concatenate([cells, far])
    unit_of_point = np.searchsorted(cells[: len(cells) - 3], latlng_to_h3(pts, 5))
    count = np.bincount(unit_of_point, minlength=len(cells))
    xyz = latlng_to_xyz(pts)
    xyz_sum = np.stack([np.bincount(unit_of_point, weights=xyz[:, k], minlength=len(cells)) for k in range(3)], 1)
    units = _Units(cells, np.zeros(len(cells), np.int64), count, xyz_sum)
    group = np.r_[np.zeros(len(cells) - 3, np.int64), [1, 1, 1]]
    answer = _answer_points(group, 2, units, unit_of_point, pts, xyz)
    assert any((answer[0] == p).all() for p in pts)
    np.testing.assert_allclose(answer[1], h3_centers(far[1:2])[0])
