"""Rebuild the committed country tables (driving side, writing scripts) from two registry packages.

    npm pack @rapideditor/country-coder@5.6.1 && .venv/bin/pip install babel==2.19.0
    python -m geoloc country_tables country_coder=rapideditor-country-coder-5.6.1.tgz [out=PATH]

Writes ``geoloc/evidence/data/country_tables_v1.csv`` (or ``out=``) atomically; the table's columns and
sources are in :mod:`geoloc.evidence.country_tables`. Neither package is a run-time dependency; a missing
one ends in one line saying what to install.
"""

from __future__ import annotations

import sys
from pathlib import Path

from geoloc.artifacts import atomic_path
from geoloc.cli import EXIT_USER_ERROR, run_step
from geoloc.evidence.country_tables import build, default_table_path

PROG = "geoloc country_tables"


def main(cfg) -> Path:
    """Builds the table from ``cfg.country_coder`` and writes it to ``cfg.out`` (default: the committed file)."""
    try:
        table = build(cfg.country_coder)
    except ImportError as e:  # babel is not installed: say so in one line, it is not a bug
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    out = Path(cfg.out) if cfg.out else default_table_path()
    with atomic_path(out, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    print(f"{out}: {len(table)} countries; driving side {table.driving_side.value_counts().to_dict()}; "
          f"main script {table.main_script.value_counts().to_dict()}")
    return out


def run():
    return run_step("country_tables", main, PROG)


if __name__ == "__main__":
    run()
