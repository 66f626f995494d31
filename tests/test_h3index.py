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
