"""Geography: the latlng geodesy core, H3 lookups, geocells and admin regions.

The geodesy core (:mod:`geoloc.geo.latlng`) is re-exported here, as everything uses it:
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
