"""Which country a coordinate lies in, for country-level accuracy.

The default boundaries are Natural Earth 10m admin-0 countries (public domain) as shipped in the
``geo-country-service`` wheel (``world_countries.geojson``, 258 features), read from the installed
file without importing that package. Codes are Natural Earth's ``adm0_a3`` (ISO 3166-1 alpha-3 where
one exists). Points in no polygon (sea, coastline simplification) get ``""``: unknown.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import shapely

from geoloc.geo import validate_latlng
from geoloc.io import package_path


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


@lru_cache(maxsize=2)
def default_country_lookup() -> CountryLookup:
    """The default lookup, read once per process."""
    return CountryLookup.from_file()
