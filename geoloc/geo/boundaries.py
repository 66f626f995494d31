"""The admin-0 + admin-1 boundary file and its run-time loader.

``geocells/data/admin_boundaries_v1.parquet`` (Natural Earth 10m, simplified; built offline by
``python -m geocells.boundaries``, see ``geocells/data/README.md``) is read by the admin lookup of
evaluation and evidence labels (:mod:`geoloc.geo.countries`) and by the geocell builder. Both read it
through :func:`load_boundaries`, which checks it. One row per region (EPSG:4326, geometry in lng/lat;
coordinates elsewhere in the project are ``latlng``):

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

The file is a data file of the ``geocells`` package, found without importing it: geoloc reads the
file, never the code that builds it. :func:`repair_polygons` is shared with that build, which repairs
its raw inputs the same way.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from geoloc.data.packages import package_path

__all__ = ["BOUNDARIES_FILE", "REQUIRED_COLUMNS", "STRING_COLUMNS", "admin_boundaries_path", "load_boundaries",
           "polygonal_part", "repair_polygons"]

BOUNDARIES_FILE = "admin_boundaries_v1.parquet"
REQUIRED_COLUMNS = (
    "region_id", "adm0_a3", "iso_a2", "country", "continent", "admin1_code", "admin1_name", "level", "geometry",
)
STRING_COLUMNS = ("adm0_a3", "iso_a2", "country", "continent", "admin1_code", "admin1_name")
REBUILD = "python -m geocells.boundaries"

_POLYGON, _MULTIPOLYGON, _COLLECTION = 3, 6, 7


def admin_boundaries_path() -> Path:
    """The committed boundary file, ``geocells/data/admin_boundaries_v1.parquet``.

    Raises:
        ModuleNotFoundError: the ``geocells`` package (this repository's) is not installed.
        FileNotFoundError: it is, without the file.
    """
    return package_path("geocells", "data", BOUNDARIES_FILE,
                        purpose=f"the admin-0/admin-1 regions (rebuild the file with {REBUILD})")


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


def load_boundaries(path: str | Path | None = None):
    """Reads and checks a boundary file (the committed one by default).

    Args:
        path: a GeoParquet file in the schema of the module docstring; None: :func:`admin_boundaries_path`.

    Returns:
        GeoDataFrame in EPSG:4326 with the columns of the module docstring, string columns without nulls;
        invalid geometries are repaired with ``shapely.make_valid`` (polygonal parts only).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: missing columns (all are named), a CRS other than EPSG:4326, bad ``region_id`` or ``level``
            values, or a feature with no polygonal geometry even after repair (named by region_id, adm0_a3,
            admin1_name).
    """
    import geopandas as gpd

    path = Path(path) if path is not None else admin_boundaries_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: boundary file not found (build it with: {REBUILD})")
    gdf = gpd.read_parquet(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in gdf.columns]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; found {list(gdf.columns)} "
                         f"(a boundary file is written by {REBUILD})")
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
