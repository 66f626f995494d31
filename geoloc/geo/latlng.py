"""Geodesy core: the one place that knows how far apart two points on Earth are.

Conventions used everywhere in geoloc:

* Coordinates are ``latlng`` arrays of shape ``(N, 2)`` in degrees, ``[lat, lng]`` (the h3 order).
  Latitude lies in ``[-90, 90]``, longitude in ``[-180, 180]`` (180 is stored as -180); anything else
  in an input is an error (:func:`validate_latlng`).
* Distances are great-circle (haversine) distances on a sphere of radius
  :data:`EARTH_RADIUS_KM` = 6371.0088 km (the IUGG mean Earth radius), in kilometres.

Every function takes numpy arrays or torch tensors and returns the same kind; torch is never imported
here unless a tensor is passed in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EARTH_RADIUS_KM = 6371.0088


def _xp(x: Any):
    """The array namespace of ``x``: torch for tensors, numpy otherwise."""
    if type(x).__module__.startswith("torch"):
        import torch

        return torch
    return np


def wrap_lng(lng):
    """Wraps longitudes in degrees to ``[-180, 180)``.

    Args:
        lng: array or tensor of longitudes, any shape.

    Returns:
        Same shape and kind, wrapped; values already in range are returned unchanged (bit for bit).
    """
    xp = _xp(lng)
    inside = (lng >= -180.0) & (lng < 180.0)
    return xp.where(inside, lng, (lng + 180.0) % 360.0 - 180.0)


def invalid_latlng(arr: np.ndarray) -> np.ndarray:
    """``(...)`` bool: where ``arr (..., 2)`` is not a finite ``[lat, lng]`` with lat in ``[-90, 90]`` and
    lng in ``[-180, 180]``. The one definition of a valid coordinate in geoloc."""
    with np.errstate(invalid="ignore"):
        return ~(np.isfinite(arr).all(axis=-1) & (np.abs(arr[..., 0]) <= 90.0) & (np.abs(arr[..., 1]) <= 180.0))


def validate_latlng(latlng, *, what: str = "latlng", row_labels=None) -> np.ndarray:
    """Checks and normalizes coordinates.

    A longitude outside ``[-180, 180]`` is an error, not wrapped: in a data file it means a fault (swapped
    or projected columns), and wrapping would hide it. Longitude 180 becomes -180 (the same meridian).

    Args:
        latlng: ``(N, 2)`` array-like of ``[lat, lng]`` in degrees.
        what: name of the source used in error messages (a file name, say).
        row_labels: optional sequence of N labels (row numbers, image ids) named in errors.

    Returns:
        ``(N, 2)`` float64 array with longitudes in ``[-180, 180)``.

    Raises:
        ValueError: a coordinate is not finite, a latitude lies outside ``[-90, 90]`` or a longitude
            outside ``[-180, 180]``; the message names the first offending rows and their values.
    """
    arr = np.asarray(latlng, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what}: expected coordinates of shape (N, 2) as [lat, lng], got shape {arr.shape}")
    bad = np.flatnonzero(invalid_latlng(arr))
    if len(bad):
        labels = row_labels if row_labels is not None else range(len(arr))
        labels = list(labels) if not isinstance(labels, list) else labels
        shown = ", ".join(
            f"row {labels[i]}: lat={float(arr[i, 0])!r}, lng={float(arr[i, 1])!r}" for i in bad[:5]
        )
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(
            f"{what}: {len(bad)} invalid coordinate(s); expected finite values with lat in [-90, 90] and lng in "
            f"[-180, 180]: {shown}{more}"
        )
    out = arr.copy()
    out[:, 1] = wrap_lng(out[:, 1])
    return out


def haversine_km(a, b):
    """Great-circle distance between paired points.

    Args:
        a: ``(..., 2)`` ``[lat, lng]`` in degrees (numpy or torch).
        b: same shape as ``a`` (broadcastable).

    Returns:
        ``(...)`` distances in km, same kind and float dtype as the inputs.
    """
    xp = _xp(a)
    a_rad = xp.deg2rad(a)
    b_rad = xp.deg2rad(b)
    dlat = b_rad[..., 0] - a_rad[..., 0]
    dlng = b_rad[..., 1] - a_rad[..., 1]
    h = xp.sin(dlat / 2) ** 2 + xp.cos(a_rad[..., 0]) * xp.cos(b_rad[..., 0]) * xp.sin(dlng / 2) ** 2
    return 2.0 * EARTH_RADIUS_KM * xp.arcsin(xp.sqrt(xp.clip(h, 0.0, 1.0)))


def haversine_matrix_km(a, b):
    """All-pairs great-circle distances.

    Args:
        a: ``(N, 2)`` ``[lat, lng]`` in degrees (numpy or torch).
        b: ``(M, 2)`` ``[lat, lng]`` in degrees, same kind as ``a``.

    Returns:
        ``(N, M)`` distances in km.
    """
    return haversine_km(a[:, None, :], b[None, :, :])


def latlng_to_xyz(latlng):
    """Unit vectors on the sphere.

    Args:
        latlng: ``(..., 2)`` ``[lat, lng]`` in degrees.

    Returns:
        ``(..., 3)`` unit vectors (x towards lng 0 on the equator, z towards the north pole).
    """
    xp = _xp(latlng)
    lat = xp.deg2rad(latlng[..., 0])
    lng = xp.deg2rad(latlng[..., 1])
    cos_lat = xp.cos(lat)
    return xp.stack([cos_lat * xp.cos(lng), cos_lat * xp.sin(lng), xp.sin(lat)], -1)


def xyz_to_latlng(xyz):
    """Inverse of :func:`latlng_to_xyz` (the vectors need not be unit length).

    Args:
        xyz: ``(..., 3)``.

    Returns:
        ``(..., 2)`` ``[lat, lng]`` in degrees.
    """
    xp = _xp(xyz)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    lat = xp.rad2deg(xp.arctan2(z, xp.sqrt(x * x + y * y)))
    lng = xp.rad2deg(xp.arctan2(y, x))
    return xp.stack([lat, lng], -1)
