import math

import numpy as np
import pytest
import torch

from geoloc.geo import (
    EARTH_RADIUS_KM,
    haversine_km,
    haversine_matrix_km,
    latlng_to_xyz,
    validate_latlng,
    wrap_lng,
    xyz_to_latlng,
)

# name: (lat, lng)
CITIES = {
    "paris": (48.8566, 2.3522),
    "london": (51.5074, -0.1278),
    "new_york": (40.7128, -74.0060),
    "los_angeles": (34.0522, -118.2437),
    "sydney": (-33.8688, 151.2093),
    "tokyo": (35.6762, 139.6503),
    "cape_town": (-33.9249, 18.4241),
    "honolulu": (21.3069, -157.8583),
}


def vincenty_sphere_km(a, b):
    """Independent reference: Vincenty's formula on the sphere (atan2 form), plain math, one pair."""
    p1, l1 = map(math.radians, a)
    p2, l2 = map(math.radians, b)
    dl = l2 - l1
    num = math.hypot(math.cos(p2) * math.sin(dl),
                     math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl))
    den = math.sin(p1) * math.sin(p2) + math.cos(p1) * math.cos(p2) * math.cos(dl)
    return EARTH_RADIUS_KM * math.atan2(num, den)


def test_radius_convention():
    assert EARTH_RADIUS_KM == 6371.0088


@pytest.mark.parametrize(
    ("a", "b", "km"),
    [
        # exact on the sphere
        ((0.0, 0.0), (0.0, 180.0), math.pi * 6371.0088),
        ((90.0, 0.0), (-90.0, 0.0), math.pi * 6371.0088),
        ((0.0, 0.0), (90.0, 123.0), math.pi / 2 * 6371.0088),
        ((0.0, 0.0), (0.0, 90.0), math.pi / 2 * 6371.0088),
        ((10.0, 179.5), (10.0, -179.5), None),  # across the antimeridian: short way, about 109.5 km
    ],
)
def test_exact_cases(a, b, km):
    got = float(haversine_km(np.array(a), np.array(b)))
    want = km if km is not None else vincenty_sphere_km(a, b)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-9)
    if km is None:
        assert 109 < got < 110


# Published great-circle distances (km) for well-known pairs, rounded: haversine on a mean-radius
# sphere agrees with them to a few km.
PUBLISHED = [("paris", "london", 343.5), ("new_york", "los_angeles", 3936.0), ("london", "new_york", 5570.0),
             ("sydney", "tokyo", 7823.0)]


@pytest.mark.parametrize(("c1", "c2", "km"), PUBLISHED)
def test_city_pairs_published(c1, c2, km):
    assert float(haversine_km(np.array(CITIES[c1]), np.array(CITIES[c2]))) == pytest.approx(km, rel=0.003)


def test_city_pairs_independent_formula_numpy_and_torch():
    names = list(CITIES)
    pts = np.array([CITIES[n] for n in names])
    want = np.array([[vincenty_sphere_km(CITIES[a], CITIES[b]) for b in names] for a in names])
    got = haversine_matrix_km(pts, pts)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-6)
    got_t = haversine_matrix_km(torch.tensor(pts), torch.tensor(pts))
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.float64
    np.testing.assert_allclose(got_t.numpy(), want, rtol=1e-9, atol=1e-6)
    # pairwise == diagonal of a shifted matrix
    shifted = np.roll(pts, 1, axis=0)
    np.testing.assert_allclose(haversine_km(pts, shifted), np.diag(haversine_matrix_km(pts, shifted)))


def test_torch_float32_and_grad():
    a = torch.tensor([[48.8566, 2.3522]], requires_grad=True)
    b = torch.tensor([[51.5074, -0.1278]])
    d = haversine_km(a, b)
    assert d.dtype == torch.float32 and d.shape == (1,)
    d.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_validate_refuses_out_of_range_longitudes_and_names_bad_rows():
    out = validate_latlng([[-5.0, -180.0], [0.0, 180.0], [1.0, 2.5]])
    np.testing.assert_array_equal(out[:, 1], [-180.0, -180.0, 2.5])  # 180 is the meridian of -180
    msg = r"photos.csv: 1 invalid.*lng in \[-180, 180\].*row 7 \(b\): lat=10.0, lng=200.0"
    with pytest.raises(ValueError, match=msg):
        validate_latlng([[10.0, 20.0], [10.0, 200.0]], what="photos.csv", row_labels=["2 (a)", "7 (b)"])
    with pytest.raises(ValueError, match="lng=-180.5"):
        validate_latlng([[0.0, -180.5]])
    with pytest.raises(ValueError, match=r"row img_b: lat=91.0"):
        validate_latlng([[0, 0], [91.0, 3.0]], what="x.csv", row_labels=["img_a", "img_b"])
    with pytest.raises(ValueError, match=r"x.csv: 1 invalid.*row 0: lat=nan"):
        validate_latlng([[np.nan, 0.0]], what="x.csv")
    with pytest.raises(ValueError, match="shape"):
        validate_latlng([1.0, 2.0, 3.0])


def test_wrap_lng_keeps_in_range_values_exact():
    lng = np.array([-2.746474, 179.999999, -180.0])
    assert (wrap_lng(lng) == lng).all()
    assert wrap_lng(np.array([360.0]))[0] == 0.0


def test_xyz_round_trip():
    pts = np.array(list(CITIES.values()))
    np.testing.assert_allclose(xyz_to_latlng(latlng_to_xyz(pts)), pts, atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(latlng_to_xyz(pts), axis=1), 1.0)
