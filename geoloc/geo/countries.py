"""Which country (and admin-1 region) a coordinate lies in, for country- and region-level accuracy.

:class:`AdminLookup` (the default of ``evaluate.py``) reads the project's own boundary file,
``geocells/data/admin_boundaries_v1.parquet`` (Natural Earth 10m admin-1 regions that tile each
country, built by ``python -m geocells.boundaries``; see ``geocells/data/README.md``) through
:func:`geoloc.geo.boundaries.load_boundaries`: per point the country (``adm0_a3``) and the admin-1
region (``admin1_code``, e.g. ``FR-75`` for Paris; ``""`` for the 13 level-0 rows, countries or parts
of countries that Natural Earth does not subdivide).

:class:`CountryLookup` reads any boundary file. Its default boundaries are Natural Earth 10m admin-0
countries (public domain) as shipped in the
``geo-country-service`` wheel (``world_countries.geojson``, 258 features), read from the installed
file without importing that package. Codes are Natural Earth's ``adm0_a3`` (ISO 3166-1 alpha-3 where
one exists). Points in no polygon (sea, coastline simplification) get ``""``: unknown.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import shapely

from geoloc.data.packages import package_path
from geoloc.geo import validate_latlng
from geoloc.geo.boundaries import admin_boundaries_path, load_boundaries

__all__ = ["AdminLookup", "CountryLookup", "admin_boundaries_path", "default_admin_lookup", "default_boundaries_path",
           "default_country_lookup"]


def default_boundaries_path() -> Path:
    """The Natural Earth countries file inside the installed ``geo-country-service`` package."""
    return package_path("geo_country_service", "world_countries.geojson",
                        purpose="country lookup (Natural Earth 10m countries)")


class CountryLookup:
    """Vectorized point-in-country lookup.

    Args:
        codes: ``(C,)`` country codes.
        names: ``(C,)`` country names.
        geometries: ``(C,)`` shapely polygons in lng/lat.
    """

    def __init__(self, codes, names, geometries):
        self.codes = np.asarray(codes, dtype=object)
        self.names = np.asarray(names, dtype=object)
        self._tree = shapely.STRtree(np.asarray(geometries))

    @classmethod
    def from_file(cls, path: str | Path | None = None, code_column: str = "adm0_a3",
                  name_column: str = "name") -> CountryLookup:
        """Reads a boundary file (any format pyogrio reads: GeoJSON, GeoParquet via geopandas, ...)."""
        import geopandas as gpd

        path = Path(path) if path is not None else default_boundaries_path()
        gdf = gpd.read_parquet(path) if path.suffix == ".parquet" else gpd.read_file(path, engine="pyogrio")
        for col in (code_column, name_column):
            if col not in gdf.columns:
                raise ValueError(f"{path}: no column {col!r}; found {list(gdf.columns)[:15]}")
        geoms = shapely.make_valid(gdf.geometry.to_numpy())
        return cls(gdf[code_column].astype(str).to_numpy(), gdf[name_column].astype(str).to_numpy(), geoms)

    def __call__(self, latlng) -> np.ndarray:
        """Country codes.

        Args:
            latlng: ``(N, 2)`` ``[lat, lng]`` in degrees.

        Returns:
            ``(N,)`` object array of codes, ``""`` where the point lies in no country.
        """
        latlng = validate_latlng(latlng, what="country lookup")
        points = shapely.points(latlng[:, 1], latlng[:, 0])
        point_idx, geom_idx = self._tree.query(points, predicate="intersects")
        out = np.full(len(latlng), "", dtype=object)
        # Where borders overlap (disputed areas) the first polygon wins: assign in reverse order.
        out[point_idx[::-1]] = self.codes[geom_idx[::-1]]
        return out


class AdminLookup:
    """Vectorized point-in-region lookup: country and admin-1 code of each point.

    Args:
        path: a boundary file (:func:`geoloc.geo.boundaries.load_boundaries` reads and checks it); None:
            the committed one, :func:`admin_boundaries_path`.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else admin_boundaries_path()
        gdf = load_boundaries(self.path)
        self.adm0 = gdf["adm0_a3"].to_numpy(dtype=object)
        self.admin1 = gdf["admin1_code"].to_numpy(dtype=object)
        self.iso_a2 = gdf["iso_a2"].to_numpy(dtype=object)
        self.continent = gdf["continent"].to_numpy(dtype=object)
        self._tree = shapely.STRtree(gdf.geometry.to_numpy())

    def regions(self, latlng) -> np.ndarray:
        """Index of the region holding each point (-1: none; the lowest index where regions overlap)."""
        latlng = validate_latlng(latlng, what="admin lookup")
        point_idx, geom_idx = self._tree.query(shapely.points(latlng[:, 1], latlng[:, 0]), predicate="intersects")
        out = np.full(len(latlng), -1, dtype=np.int64)
        out[point_idx[::-1]] = geom_idx[::-1]
        return out

    def __call__(self, latlng) -> np.ndarray:
        """``(N,)`` country codes (``adm0_a3``), ``""`` where a point lies in no country: a drop-in
        ``country_of``."""
        return self.lookup(latlng)[0]

    def lookup(self, latlng) -> tuple[np.ndarray, np.ndarray]:
        """``(country (N,), admin1 (N,))`` code arrays, ``""`` where unknown."""
        r = self.regions(latlng)
        ok = r >= 0
        country = np.full(len(r), "", dtype=object)
        admin1 = np.full(len(r), "", dtype=object)
        country[ok], admin1[ok] = self.adm0[r[ok]], self.admin1[r[ok]]
        return country, admin1


@lru_cache(maxsize=2)
def default_admin_lookup() -> AdminLookup:
    """The project's admin-0/admin-1 lookup, read once per process."""
    return AdminLookup()


@lru_cache(maxsize=2)
def default_country_lookup() -> CountryLookup:
    """The default lookup, read once per process."""
    return CountryLookup.from_file()
