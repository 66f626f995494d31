import h3
import numpy as np
import pytest

from geoloc.geo.h3index import (
    H3Table,
    h3_center_child,
    h3_centers,
    h3_neighbors,
    h3_parent,
    h3_resolution,
    latlng_to_h3,
)


def _ref(cells):
    return [h3.int_to_str(int(c)) for c in cells]


@pytest.fixture
def pts():
    rng = np.random.default_rng(0)
    return np.column_stack([rng.uniform(-89.9, 89.9, 3000), rng.uniform(-180, 180, 3000)])


@pytest.mark.parametrize("res", [0, 5, 8, 15])
def test_latlng_to_h3_matches_reference(pts, res):
    got = latlng_to_h3(pts, res)
    assert got.dtype == np.uint64
    assert _ref(got) == [h3.latlng_to_cell(a, b, res) for a, b in pts]


def test_large_batch_threads_agree(pts):
    big = np.tile(pts, (150, 1))  # 450K points: the threaded path
    np.testing.assert_array_equal(latlng_to_h3(big, 7)[: len(pts)], latlng_to_h3(pts, 7))


def test_parent_center_child_resolution(pts):
    c9 = latlng_to_h3(pts[:200], 9)
    assert (h3_resolution(c9) == 9).all()
    for r in (0, 4, 9):
        assert _ref(h3_parent(c9, r)) == [h3.cell_to_parent(c, r) for c in _ref(c9)]
    c4 = h3_parent(c9, 4)
    assert _ref(h3_center_child(c4, 7)) == [h3.cell_to_center_child(c, 7) for c in _ref(c4)]


def test_centers_and_neighbors(pts):
    c = latlng_to_h3(pts[:100], 5)
    np.testing.assert_allclose(h3_centers(c), [h3.cell_to_latlng(x) for x in _ref(c)], atol=1e-12)
    src, dst = h3_neighbors(c[:10])
    want = {(a, b) for a in _ref(c[:10]) for b in h3.grid_ring(a, 1)}
    assert set(zip(_ref(c[:10][src]), _ref(dst))) == want


def test_table_mixed_resolutions(pts):
    c5 = np.unique(latlng_to_h3(pts, 5))
    refined = c5[0]
    kids = np.array([h3.str_to_int(k) for k in h3.cell_to_children(h3.int_to_str(int(refined)), 6)], np.uint64)
    table = H3Table(np.concatenate([c5[1:], kids]), np.concatenate([np.arange(1, len(c5)), 10**6 + np.arange(7)]))
    got = table.lookup(pts)
    inside_refined = h3_parent(latlng_to_h3(pts, 6), 5) == refined
    assert inside_refined.sum() >= 1
    assert (got[inside_refined] >= 10**6).all() and (got[~inside_refined] < 10**6).all()
    only = H3Table(c5[:1], np.array([7]))
    assert (only.lookup(pts) == np.where(latlng_to_h3(pts, 5) == c5[0], 7, -1)).all()


#: H3's published mean hexagon areas (km², to 9 decimals), the table geoloc carried before asking h3.
PUBLISHED_MEAN_AREA_KM2 = [4357449.416078383, 609788.441794133, 86801.780398997, 12393.434655088, 1770.347654491,
                           252.903858182, 36.129062164, 5.161293360, 0.737327598, 0.105332513, 0.015047502,
                           0.002149643, 0.000307092, 0.000043870, 0.000006267, 0.000000895]


def test_mean_hexagon_areas_are_h3s():
    from geoloc.geo.h3index import h3_mean_area_km2

    got = h3_mean_area_km2(np.arange(16))
    assert got.tolist() == [h3.average_hexagon_area(r, unit="km^2") for r in range(16)]
    np.testing.assert_allclose(got, PUBLISHED_MEAN_AREA_KM2, rtol=0, atol=5e-10)  # the table, to its last digit
    assert h3_mean_area_km2(np.array([[5, 9]], np.int8)).shape == (1, 2)


def test_cell_areas_without_geometry_sum_their_hexagons(pts):
    import pandas as pd

    from geoloc.geo.cells import Geocells

    c5 = np.unique(latlng_to_h3(pts[:50], 5))
    c9 = latlng_to_h3(pts[50:53], 9)
    table = pd.DataFrame({"cell_id": [0, 1, 2], "n_points": [1, 1, 0], "centroid_lat": [0.0] * 3,
                          "centroid_lng": [0.0] * 3, "h3_cells": [list(c5), list(c9), []], "neighbors": [[], [], []]})
    areas = Geocells(table).areas_km2
    # the same as with the published table, to its 9 decimals (5e-10 km² per hexagon)
    np.testing.assert_allclose(areas, [len(c5) * PUBLISHED_MEAN_AREA_KM2[5], 3 * PUBLISHED_MEAN_AREA_KM2[9], 0.0],
                               rtol=0, atol=len(c5) * 5e-10)
