"""Geography: the latlng geodesy core, H3 lookups, global rasters, geocells and admin regions.

* :mod:`~geoloc.geo.latlng`: haversine distances, the one latlng validator, unit vectors.
* :mod:`~geoloc.geo.h3index`: vectorized H3 (cells of millions of points, parents, neighbours, mean areas).
* :mod:`~geoloc.geo.raster`: :class:`~geoloc.geo.raster.GridRaster`, the latlng -> pixel lookup of every
  global raster (Köppen-Geiger, land mask, land cover).
* :mod:`~geoloc.geo.boundaries`: the admin-0/admin-1 boundary file and its loader.
* :mod:`~geoloc.geo.countries`: point-in-country and point-in-region lookups.
* :mod:`~geoloc.geo.cells`: :class:`~geoloc.geo.cells.Geocells`, reading geocell files and assigning points.

The geodesy core is re-exported here, as everything uses it:
``from geoloc.geo import haversine_km, validate_latlng``.
"""

from geoloc.geo.latlng import (
    EARTH_RADIUS_KM,
    haversine_km,
    haversine_matrix_km,
    invalid_latlng,
    latlng_to_xyz,
    validate_latlng,
    wrap_lng,
    xyz_to_latlng,
)

__all__ = ["EARTH_RADIUS_KM", "haversine_km", "haversine_matrix_km", "invalid_latlng", "latlng_to_xyz",
           "validate_latlng", "wrap_lng", "xyz_to_latlng"]
