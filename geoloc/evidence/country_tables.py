"""Country tables: the side of the road a country drives on and the script(s) it writes in.

The committed table ``geoloc/evidence/data/country_tables_v1.csv`` has one row per ISO 3166-1 country:

================  ==============================================================================
column            meaning and source
================  ==============================================================================
iso_a2, iso_a3    ISO 3166-1 codes
name              English name (country-coder)
driving_side      ``left`` or ``right``: npm ``@rapideditor/country-coder`` (ISC licence; the iD
                  editor's borders, which list left-hand traffic regions and default to right).
                  Countries made of several regions take the side of most of their own parts.
main_script       the script of the country's most widely used *official* language (any official
                  status, CLDR territory data shipped in ``babel``, BSD licence), grouped into
                  :data:`SCRIPTS`; the most widely used language overall when none is official
scripts           every script group written by at least 20% of the population in an official
                  language, ``|``-separated, most used first
================  ==============================================================================

Rebuild (an offline step, :mod:`geoloc.prepare.country_tables`; neither package is a run-time dependency)::

    npm pack @rapideditor/country-coder@5.6.1 && .venv/bin/pip install babel==2.19.0
    .venv/bin/python -m geoloc country_tables country_coder=rapideditor-country-coder-5.6.1.tgz

:func:`country_table` reads the committed file; the evidence labels (:mod:`geoloc.evidence.labels`)
join it to the country of each point.
"""

from __future__ import annotations

import collections
import functools
import json
import tarfile
from pathlib import Path

import pandas as pd

from geoloc.data.packages import package_path

TABLE_VERSION = 1
#: Script groups (ISO 15924 codes folded together where one writing system is meant).
SCRIPTS: tuple[str, ...] = ("Latin", "Cyrillic", "Arabic", "Han", "Japanese", "Korean", "Devanagari",
                            "Bengali", "Thai", "Greek", "Hebrew", "Georgian", "Armenian", "Ethiopic", "other")
_ISO15924 = {"Latn": "Latin", "Cyrl": "Cyrillic", "Arab": "Arabic", "Hans": "Han", "Hant": "Han", "Hani": "Han",
             "Jpan": "Japanese", "Kore": "Korean", "Hang": "Korean", "Deva": "Devanagari", "Beng": "Bengali",
             "Thai": "Thai", "Grek": "Greek", "Hebr": "Hebrew", "Geor": "Georgian", "Armn": "Armenian",
             "Ethi": "Ethiopic"}
UNINHABITED = {"AQ"}  # no roads, no national script: points there stay unlabelled for these heads
SCRIPT_SHARE = 20.0  # percent of the population for a script to be listed in ``scripts``


def country_table_path() -> Path:
    """The committed table inside the installed geoloc (what :func:`country_table` reads)."""
    return package_path("geoloc", "evidence", "data", f"country_tables_v{TABLE_VERSION}.csv",
                        purpose="driving side and script evidence labels")


def default_table_path() -> Path:
    """Where a rebuild writes the table by default: the committed file beside this module."""
    return Path(__file__).resolve().parent / "data" / f"country_tables_v{TABLE_VERSION}.csv"


@functools.lru_cache(maxsize=1)
def country_table() -> pd.DataFrame:
    """The committed table, indexed by ``iso_a3``."""
    return pd.read_csv(country_table_path(), keep_default_na=False).set_index("iso_a3")


def _driving_sides(borders: dict) -> dict[str, tuple[str, str, str]]:
    """``iso_a2 -> (iso_a3, name, side)`` from country-coder's borders (left listed, right by default)."""
    feats = [f["properties"] | {"_geom": f.get("geometry") is not None} for f in borders["features"]]
    out = {}
    for p in feats:
        a2 = p.get("iso1A2")
        if not a2 or not p.get("iso1A3"):
            continue
        if p["_geom"]:
            side = p.get("driveSide") or "right"
        else:  # an aggregate: the side most of its own (non-ISO) parts drive on, else of any part
            parts = [q for q in feats if q["_geom"] and q.get("country") == a2 and not q.get("iso1A2")] or \
                    [q for q in feats if q["_geom"] and q.get("country") == a2]
            if not parts:
                continue
            side = collections.Counter(q.get("driveSide") or "right" for q in parts).most_common(1)[0][0]
        out[a2] = (p["iso1A3"], p.get("nameEn", a2), side)
    return out


def _scripts(a2: str) -> tuple[str, list[str]]:
    """``(main script group, script groups of >= 20% of people in an official language)`` for a territory."""
    from babel.core import get_global

    langs = get_global("territory_languages").get(a2, {})
    likely = get_global("likely_subtags")

    def script(lang: str) -> str:
        parts = lang.split("_")
        code = next((p for p in parts[1:] if len(p) == 4), None)
        if code is None:
            full = likely.get(parts[0], "")
            code = next((p for p in full.split("_")[1:] if len(p) == 4), "")
        return _ISO15924.get(code, "other")

    official = {k: v for k, v in langs.items() if v.get("official_status")}
    pool = official or langs
    if not pool:
        return "", []
    share: dict[str, float] = collections.defaultdict(float)
    for lang, info in pool.items():
        share[script(lang)] += float(info.get("population_percent") or 0.0)
    main = script(max(pool, key=lambda k: float(pool[k].get("population_percent") or 0.0)))
    listed = [s for s, p in sorted(share.items(), key=lambda kv: -kv[1]) if p >= SCRIPT_SHARE] or [main]
    return main, listed


def build(country_coder_tgz: str | Path) -> pd.DataFrame:
    """The table from a ``npm pack`` of ``@rapideditor/country-coder`` and the installed ``babel``.

    Raises:
        ModuleNotFoundError: ``babel`` is not installed (the message says which version to install).
        FileNotFoundError: no file at ``country_coder_tgz``.
        ValueError: the tarball is not country-coder's.
    """
    try:
        import babel  # noqa: F401
    except ImportError as e:
        raise ModuleNotFoundError("building the country tables needs babel, which is not installed: "
                                  "pip install babel==2.19.0", name="babel") from e
    path = Path(country_coder_tgz)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (npm pack @rapideditor/country-coder@5.6.1 makes it)")
    try:
        with tarfile.open(path) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("src/data/borders.json")), None)
            if member is None:
                raise ValueError(f"{path}: no src/data/borders.json (is it @rapideditor/country-coder?)")
            borders = json.load(tar.extractfile(member))
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a tarball ({e}); expected the npm pack of @rapideditor/country-coder") from None
    rows = []
    for a2, (a3, name, side) in sorted(_driving_sides(borders).items()):
        if a2 in UNINHABITED:
            continue
        main, listed = _scripts(a2)
        rows.append({"iso_a2": a2, "iso_a3": a3, "name": name, "driving_side": side, "main_script": main,
                     "scripts": "|".join(listed)})
    return pd.DataFrame(rows)
