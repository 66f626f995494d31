"""The geocell map CLI on a tiny synthetic world: two square countries side by side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _two_countries():
    import geopandas as gpd
    import shapely

    return gpd.GeoDataFrame(
        {
            "region_id": [0, 1],
            "adm0_a3": ["AAA", "BBB"],
            "iso_a2": ["AA", "BB"],
            "country": ["Westland", "Eastland"],
            "continent": ["Europe", "Europe"],
            "admin1_code": ["", ""],
            "admin1_name": ["", ""],
            "level": [0, 0],
        },
        geometry=[shapely.box(0.0, 40.0, 10.0, 50.0), shapely.box(10.0, 40.0, 20.0, 50.0)],  # lng/lat
        crs="EPSG:4326",
    )


def test_plot_cli_writes_png_of_expected_size(tmp_path):
    from PIL import Image

    from geocells.build import build_geocells, write_geocells
    from geocells.plot import figure_size

    boundaries = _two_countries()
    boundaries_path = tmp_path / "boundaries.parquet"
    boundaries.to_parquet(boundaries_path)
    rng = np.random.default_rng(0)
    latlng = np.stack([rng.uniform(40.5, 49.5, 300), rng.uniform(0.5, 19.5, 300)], axis=1)
    cells, _ = build_geocells(latlng, boundaries, min_points=10, max_points=60, res=3, max_res=5, seed=0)
    cells_path = write_geocells(cells, tmp_path / "cells.parquet", meta={"scheme": "semantic"})

    out = tmp_path / "map" / "cells.png"
    bbox, dpi = (-2.0, 38.0, 22.0, 52.0), 40
    proc = subprocess.run(
        [sys.executable, "-m", "geocells.plot", str(cells_path), str(out), "--boundaries", str(boundaries_path),
         "--bbox=" + ",".join(map(str, bbox)), "--dpi", str(dpi)],  # "=": the value starts with a minus
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and out.stat().st_size > 1000
    assert not [p for p in out.parent.iterdir() if p != out], "the temporary file was left behind"
    width_in, height_in = figure_size(bbox)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert abs(im.width - width_in * dpi) <= 1 and abs(im.height - height_in * dpi) <= 1
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # not a blank image
