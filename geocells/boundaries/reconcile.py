"""Reconciling admin-0 and admin-1 into one set of regions that tile the land without overlaps.

Every step is counted in the :class:`~geocells.boundaries.report.BoundariesReport`; the numbers below are
for the default sources (:mod:`geocells.boundaries.fetch`):

1. Each admin-1 ``adm0_a3`` is matched to an admin-0 ``adm0_a3``: directly, else through the admin-1 ``gu_a3``,
   else through the admin-0 code variants (:data:`~geocells.boundaries.fetch.ADM0_CODE_VARIANTS`), else
   spatially (the admin-0 feature holding most of the region's area, at least half), else through
   ``sov_a3``; a region matching nothing keeps its code and its ``admin`` name and is reported. With the
   default sources every admin-1 code matches directly.
2. Admin-0 countries without admin-1 polygons are kept whole at level 0. With the default sources these are
   the 7 "Indeterminate" areas: BJN Bajo Nuevo Bank, SER Serranilla Bank, SCR Scarborough Reef, BRI
   Brazilian I., SPI Southern Patagonian Ice Field, CNM Cyprus U.N. Buffer Zone, BRT Bir Tawil. The admin-1
   layer draws the last two inside other countries (CNM inside the Cypriot districts Nicosia, Larnaca and
   Famagusta; BRT inside Sudan's Red Sea state), so admin-0 wins there: those countries are cut out of the
   admin-1 regions they overlap, so every admin-0 country is represented and no two rows overlap (three more
   cuts only remove slivers under 0.01 km2 from Northern Cyprus, Magallanes and Egypt's Red Sea governorate).
3. Admin-0 land that no admin-1 polygon covers becomes a level-0 row of its country when its pieces reach
   :data:`MIN_REMAINDER_KM2` (smaller pieces are coastline slivers between the two editions). With the
   default sources: Aland (ALD; 5 of its 16 municipalities are missing from admin-1, 456 km2), the
   north-west of Basilan island around Isabela City (PHL, 205 km2), Kingman Reef (UMI, 2.7 km2), Hans Island
   (GRL, 1.4 km2), the Harbor Head area at the mouth of the San Juan (NIC, 1.2 km2) and Herm (GGY, 1.1 km2).
   Cutting and subtracting add vertices where borders cross; :func:`node_coverage` adds them to the
   neighbours too (10 rows), so that all rows form a valid polygonal coverage.
4. ``iso_a2`` is admin-0 ``iso_a2_eh``, else ``iso_a2``, else the most common valid admin-1 ``iso_a2`` of the
   country, else ``''`` (Natural Earth writes ``-99`` and ``-1`` for unknown).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from geocells.boundaries.fetch import ADM0_CODE_VARIANTS
from geocells.boundaries.report import BoundariesReport
from geoloc.geo.boundaries import polygonal_part

MIN_REMAINDER_KM2 = 1.0
KM_PER_DEG = 111.32

_ISO_A2 = re.compile(r"^[A-Z]{2}$")
_POLYGON = 3


def match_admin1_countries(admin0, admin1, report: BoundariesReport) -> np.ndarray:
    """Maps each admin-1 region to an admin-0 ``adm0_a3`` (step 1 of the module docstring).

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


def approx_area_km2(geoms) -> np.ndarray:
    """Approximate areas in km^2 (degrees^2 scaled at each geometry's centroid latitude)."""
    import shapely

    lat = shapely.get_coordinates(shapely.centroid(geoms))[:, 1] if len(geoms) else np.zeros(0)
    return shapely.area(geoms) * KM_PER_DEG**2 * np.cos(np.radians(lat))


def assemble_regions(admin0, admin1, *, min_remainder_km2: float = MIN_REMAINDER_KM2, report: BoundariesReport):
    """Joins repaired admin-0 and admin-1 into one non-overlapping set of regions (the module docstring's steps).

    Args:
        admin0: :func:`~geocells.boundaries.fetch.read_admin0` output, repaired.
        admin1: :func:`~geocells.boundaries.fetch.read_admin1` output, repaired.
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
            km2 = float(approx_area_km2(np.array([shapely.intersection(a1_geoms[i], a0_geoms[j])]))[0])
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
        km2 = approx_area_km2(parts)
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


def node_coverage(geoms, *, report: BoundariesReport | None = None, rounds: int = 3) -> np.ndarray:
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
