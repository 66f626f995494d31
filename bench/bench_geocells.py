"""Geocells at MP-16 scale: build time and memory, assignment throughput, cell quality.

    .venv/bin/python bench/bench_geocells.py [--shared ../shared/data] [--only gallery|mp16|all] [--keep DIR]
                                             [--boundaries PATH] [--timeout SECONDS]

Two point sets:

* ``mp16``: 4,658,503 points drawn from the MP-16 photo density in ``coords/cells_50_1000.csv`` (one row per S2
  cell: its token, photo count and mean location). Each row gives exactly ``imgs_per_cell`` points scattered
  uniformly in a square the size of its S2 cell, centred on the mean. Built with the defaults of
  ``conf/geocells.yaml``.
* ``gallery``: the 100K MP-16 gallery coordinates (``coords/mp16_gallery_100K.csv``), built with
  ``min_points=20, max_points=500`` (the defaults would leave about a hundred country-sized cells).

The build runs in a child process (this script again, with a hidden flag) so its wall time and peak RSS
(``os.wait4`` rusage of that child, KiB on Linux) are its own. Assignment (``Geocells.assign``) is timed in
this process: one warm-up call that builds the index (timed apart), then the best of 3 calls on all points.

Writes ``bench/results/geocells.json`` (runs from earlier invocations with other ``--only`` values are kept,
each with its date) and ``bench/results/geocells.md``. Targets are reported, never enforced.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.artifacts import atomic_write_json, atomic_write_text

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EARTH_RADIUS_KM = 6371.0088
KM_PER_DEG = np.pi * EARTH_RADIUS_KM / 180.0
MP16_TOTAL = 4_658_503
TARGETS = {"build_s": 120.0, "peak_rss_gib": 4.0, "assign_points_per_s": 2_000_000.0}
GALLERY_SETTINGS = {"min_points": 20, "max_points": 500}
GALLERY_WHY = ("conf defaults (50/2000) would leave about a hundred mostly country-sized cells for 100K photos; "
               "20/500 keeps the cells fine enough to exercise splitting and merging")
S2_HEADER = "class_label,hex_id,imgs_per_cell,latitude_mean,longitude_mean"


# ------------------------------------------------------------------------------------------------ points


def read_s2_density(path: str | Path) -> pd.DataFrame:
    """The S2-cell photo counts of ``cells_50_1000.csv``: the comment lines before the header are skipped."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for skip, line in enumerate(f):  # noqa: B007 (skip is used after the loop)
            if line.strip() == S2_HEADER:
                break
        else:
            raise ValueError(f"{path}: no header line {S2_HEADER!r}")
    return pd.read_csv(path, skiprows=skip, dtype={"hex_id": str})


def s2_level(tokens) -> np.ndarray:
    """S2 cell levels from tokens (the 64-bit id in hex with trailing zeros stripped).

    The lowest set bit of a level-L id is bit ``2 * (30 - L)``, so ``L = 30 - tz / 2`` with ``tz`` the
    trailing zero bits of the id: 4 per stripped hex zero plus those of the last kept digit.

    Args:
        tokens: ``(N,)`` S2 tokens.

    Returns:
        ``(N,)`` int levels 0..30.
    """
    tok = pd.Series(tokens, dtype=str).str.strip().str.lower()
    bad = ~tok.str.fullmatch(r"[0-9a-f]{1,16}") | tok.str.endswith("0")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"S2 token {tok.iat[i]!r} (row {i}): expected 1-16 hex digits without trailing zeros")
    last = tok.str[-1].map(lambda c: int(c, 16)).to_numpy()
    ctz_digit = np.array([0, 0, 1, 0, 2, 0, 1, 0, 3, 0, 1, 0, 2, 0, 1, 0])[last]
    tz = 4 * (16 - tok.str.len().to_numpy()) + ctz_digit
    if (tz % 2).any():
        i = int(np.flatnonzero(tz % 2)[0])
        raise ValueError(f"S2 token {tok.iat[i]!r} (row {i}): lowest set bit at an odd position, not an S2 cell id")
    return 30 - tz // 2


def s2_side_km(level: np.ndarray) -> np.ndarray:
    """Side in km of a square with the mean area of an S2 cell at ``level`` (the sphere over 6 * 4**level)."""
    return np.sqrt(4 * np.pi * EARTH_RADIUS_KM**2 / (6.0 * 4.0 ** np.asarray(level, dtype=np.float64)))


def mp16_points(density: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """``imgs_per_cell`` points per S2 cell, uniform in a square of the cell's size around its mean location.

    Returns:
        ``(sum(imgs_per_cell), 2)`` ``[lat, lng]`` degrees.
    """
    rng = np.random.default_rng(seed)
    counts = density["imgs_per_cell"].to_numpy(np.int64)
    half_km = np.repeat(s2_side_km(s2_level(density["hex_id"])) / 2, counts)
    lat0 = np.repeat(density["latitude_mean"].to_numpy(np.float64), counts)
    lng0 = np.repeat(density["longitude_mean"].to_numpy(np.float64), counts)
    u = rng.uniform(-1.0, 1.0, size=(len(lat0), 2))
    lat = np.clip(lat0 + u[:, 0] * half_km / KM_PER_DEG, -90.0, 90.0)
    coslat = np.maximum(np.cos(np.radians(lat0)), 1e-3)  # near a pole the offset wraps around, as it should
    lng = lng0 + u[:, 1] * half_km / (KM_PER_DEG * coslat)
    lng = (lng + 180.0) % 360.0 - 180.0
    return np.stack([lat, lng], axis=1)


# ------------------------------------------------------------------------------------------------- build


def _child_build(spec_path: str) -> None:
    """Child process: read points and boundaries, build, write the cells and the report (spec in a JSON file)."""
    from geocells.boundaries import load_boundaries
    from geocells.build import build_geocells, read_points, write_geocells

    spec = json.loads(Path(spec_path).read_text())
    times = {}
    t = time.perf_counter()
    points = read_points(spec["points"])
    times["read_points"] = time.perf_counter() - t
    t = time.perf_counter()
    boundaries = load_boundaries(spec["boundaries"])
    times["load_boundaries"] = time.perf_counter() - t
    t = time.perf_counter()
    cells, report = build_geocells(points, boundaries, **spec["settings"])
    times["build_geocells"] = time.perf_counter() - t
    t = time.perf_counter()
    meta = {**spec["settings"], "points": spec["points"], "n_points": len(points),
            "boundaries": str(spec["boundaries"] or "geocells/data/admin_boundaries_v1.parquet")}
    write_geocells(cells, spec["out"], meta=meta)
    times["write_geocells"] = time.perf_counter() - t
    out = {"report": dataclasses.asdict(report), "child_seconds": {k: round(v, 3) for k, v in times.items()}}
    atomic_write_json(spec["report"], out)


def run_build(points_path: Path, out: Path, settings: dict, boundaries: str | None, timeout_s: float) -> dict:
    """Builds geocells in a child process; wall time, peak RSS and the build's own report.

    Returns:
        dict with ``wall_s``, ``peak_rss_gib`` (None when the child failed) and, on success, ``report`` and
        ``child_seconds``; ``error`` on failure or timeout.
    """
    spec = {"points": str(points_path), "out": str(out), "settings": settings, "boundaries": boundaries,
            "report": str(out.with_suffix(".report.json"))}
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_child-build", str(spec_path)],
                            cwd=REPO)
    timed_out = False
    while True:  # os.wait4 gives this child's own rusage (RUSAGE_CHILDREN is a max over all children)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - t > timeout_s:
            proc.kill()
            timed_out = True
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    res = {"wall_s": round(wall, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
           "rusage_children_max_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3),
           "cpu_user_s": round(usage.ru_utime, 1), "cpu_sys_s": round(usage.ru_stime, 1)}
    if timed_out:
        res["error"] = f"stopped after {timeout_s:.0f} s (timeout)"
    elif proc.returncode != 0:
        res["error"] = f"child exited with {proc.returncode}"
    else:
        res.update(json.loads(Path(spec["report"]).read_text()))
    return res


# ------------------------------------------------------------------------------------------ measurements


def cell_stats(gc, min_points: int, max_points: int) -> dict:
    """Cell count, points per cell, cells outside the bounds and the countries of those below."""
    n = gc.n_points
    t = gc.table
    below = t[n < min_points]
    by_country = (below.groupby(["adm0_a3", "country"])["n_points"].agg(["size", "sum"])
                  .reset_index().sort_values("sum"))
    return {
        "n_cells": len(gc),
        "points_per_cell": {"min": int(n.min()), "median": float(np.median(n)), "max": int(n.max()),
                            "p10": float(np.percentile(n, 10)), "p90": float(np.percentile(n, 90))},
        "cells_below_min": int(len(below)),
        "cells_above_max": int((n > max_points).sum()),
        "countries_below_min": {f"{r.adm0_a3} {r.country}": {"cells": int(r.size), "points": int(r.sum)}
                                for r in by_country.itertuples()},
        "n_countries": int(t["adm0_a3"].nunique()),
    }


def time_assign(gc, latlng: np.ndarray, repeats: int = 3) -> tuple[dict, np.ndarray, np.ndarray]:
    """Index build time (a warm-up call on 1,000 points) and the best of ``repeats`` calls on all points.

    Returns:
        ``(figures, ids, inside)`` with ``ids`` and ``inside`` from ``assign(latlng, return_inside=True)``.
    """
    t = time.perf_counter()
    gc.assign(latlng[:1000])
    index_s = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        gc.assign(latlng)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    ids, inside = gc.assign(latlng, return_inside=True)
    inside_s = time.perf_counter() - t
    best = min(times)
    return ({"index_build_s": round(index_s, 3), "assign_s_best": round(best, 3),
             "assign_s_all": [round(x, 3) for x in times], "assign_return_inside_s": round(inside_s, 3),
             "points_per_s": round(len(latlng) / best)}, ids, inside)


def containment(gc, latlng: np.ndarray, ids: np.ndarray, sample: int, seed: int = 0) -> dict:
    """Share of (a sample of) points that the polygon of their assigned cell contains / covers.

    Grouped by cell so each polygon is prepared once.
    """
    import shapely

    rng = np.random.default_rng(seed)
    pick = rng.choice(len(latlng), size=sample, replace=False) if sample < len(latlng) else np.arange(len(latlng))
    pts, cid = latlng[pick], ids[pick]
    geoms = np.asarray(gc.table.geometry.values)
    order = np.argsort(cid, kind="stable")
    cid, pts = cid[order], pts[order]
    starts = np.flatnonzero(np.r_[True, cid[1:] != cid[:-1]])
    ends = np.r_[starts[1:], len(cid)]
    contains = np.zeros(len(cid), bool)
    covers = np.zeros(len(cid), bool)
    t = time.perf_counter()
    for s, e in zip(starts, ends):
        g = geoms[cid[s]]
        shapely.prepare(g)
        contains[s:e] = shapely.contains_xy(g, pts[s:e, 1], pts[s:e, 0])
        covers[s:e] = shapely.intersects_xy(g, pts[s:e, 1], pts[s:e, 0])  # a point intersects iff covered
    out = {"sample": int(len(cid)), "contains_share": round(float(contains.mean()), 6),
           "covers_share": round(float(covers.mean()), 6), "seconds": round(time.perf_counter() - t, 2)}
    miss = ~covers
    if miss.any():  # how far outside the polygon the misses are, in km (planar degrees, a rough figure)
        d = shapely.distance(geoms[cid[miss]], shapely.points(pts[miss, 1], pts[miss, 0]))
        out["miss_distance_km"] = {"median": round(float(np.median(d)) * KM_PER_DEG, 3),
                                   "max": round(float(d.max()) * KM_PER_DEG, 3)}
    return out


def answer_points(gc, latlng: np.ndarray, ids: np.ndarray) -> dict:
    """Where cells answer: the share of answer points (``centroid_lat/lng``) inside their own polygon and
    their distance to the nearest member photo, against the members' mean (``mean_lat/lng``) where the
    file has it."""
    import shapely

    from geoloc.geo import haversine_km

    geoms = np.asarray(gc.table.geometry.values)
    out = {}
    for name, cols in (("answer_point", ("centroid_lat", "centroid_lng")), ("mean", ("mean_lat", "mean_lng"))):
        if not set(cols) <= set(gc.table.columns):
            continue
        pt = gc.table[list(cols)].to_numpy(np.float64)
        inside = shapely.contains_xy(geoms, pt[:, 1], pt[:, 0]) | shapely.intersects_xy(geoms, pt[:, 1], pt[:, 0])
        nearest = pd.Series(haversine_km(latlng, pt[ids])).groupby(ids).min().reindex(range(len(gc)))
        out[name] = {"outside_own_polygon": int((~inside).sum()),
                     "km_to_nearest_member": {"median": round(float(nearest.median()), 3),
                                              "p99": round(float(nearest.quantile(0.99)), 3),
                                              "max": round(float(nearest.max()), 3)}}
    return out


def measure(name: str, latlng: np.ndarray, points_path: Path, settings: dict, workdir: Path,
            boundaries: str | None, timeout_s: float, sample: int) -> dict:
    """Build in a child, then load, assign and check containment in this process."""
    from geoloc.geo.cells import Geocells

    out = workdir / f"{name}_geocells.parquet"
    print(f"[{name}] building {len(latlng):,} points with {settings} ...", flush=True)
    build = run_build(points_path, out, settings, boundaries, timeout_s)
    res = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "n_points": len(latlng),
           "settings": settings, "build": build}
    print(f"[{name}] build wall {build['wall_s']} s, peak RSS {build['peak_rss_gib']} GiB"
          + (f" -- {build['error']}" if "error" in build else ""), flush=True)
    if "error" in build:
        return res
    t = time.perf_counter()
    gc = Geocells.load(out)
    res["load_s"] = round(time.perf_counter() - t, 3)
    res["cells"] = cell_stats(gc, settings["min_points"], settings["max_points"])
    res["assign"], ids, inside = time_assign(gc, latlng)
    res["assign"]["inside_share"] = round(float(inside.mean()), 6)
    # every training point lies in a member H3 cell of its cell, so assignment must reproduce n_points
    diff = np.bincount(ids, minlength=len(gc)) - gc.n_points
    res["assign"]["cells_with_count_mismatch"] = int((diff != 0).sum())
    res["assign"]["points_count_mismatch"] = int(np.abs(diff).sum())
    res["containment"] = containment(gc, latlng, ids, sample)
    res["answer_points"] = answer_points(gc, latlng, ids)
    res["cells_file_mb"] = round(out.stat().st_size / 1e6, 2)
    return res


# ---------------------------------------------------------------------------------------------- reporting


def _verdicts(build: dict, assign: dict | None) -> dict:
    v = {"build_s": build["wall_s"] <= TARGETS["build_s"],
         "peak_rss_gib": build["peak_rss_gib"] <= TARGETS["peak_rss_gib"]}
    if assign:
        v["assign_points_per_s"] = assign["points_per_s"] >= TARGETS["assign_points_per_s"]
    return v


def print_run(name: str, r: dict) -> None:
    b = r["build"]
    print(f"== {name}: {r['n_points']:,} points, settings {r['settings']}")
    print(f"  build: wall {b['wall_s']} s, peak RSS {b['peak_rss_gib']} GiB, cpu user {b['cpu_user_s']} s")
    if "error" in b:
        print(f"  build FAILED: {b['error']}")
        return
    print(f"  build phases (s): {b['report']['seconds']}; child: {b['child_seconds']}")
    c = r["cells"]
    print(f"  cells {c['n_cells']:,}; points per cell min {c['points_per_cell']['min']}, median "
          f"{c['points_per_cell']['median']:g}, max {c['points_per_cell']['max']}; below min_points "
          f"{c['cells_below_min']}, above max_points {c['cells_above_max']}")
    rep = b["report"]
    if rep.get("countries_below_min"):
        print(f"  countries with fewer than min_points photos in all: {', '.join(rep['countries_below_min'])}")
    if rep.get("isolated_below_min"):
        print(f"  isolated regions below min_points (own cell, no region of their country within bridge_km): "
              f"{', '.join(rep['isolated_below_min'])}")
    for kind, v in r.get("answer_points", {}).items():
        print(f"  {kind}: {v['outside_own_polygon']} outside its own polygon; km to the nearest member photo "
              f"{v['km_to_nearest_member']}")
    a = r["assign"]
    print(f"  assign: index {a['index_build_s']} s, best {a['assign_s_best']} s -> {a['points_per_s']:,.0f} "
          f"points/s; inside {a['inside_share']:.4%}; count mismatches {a['cells_with_count_mismatch']} cells / "
          f"{a['points_count_mismatch']} points")
    k = r["containment"]
    print(f"  polygon of assigned cell: contains {k['contains_share']:.4%}, covers {k['covers_share']:.4%} "
          f"of {k['sample']:,} points" + (f"; misses {k['miss_distance_km']} km outside"
                                          if "miss_distance_km" in k else ""))
    print(f"  verdicts vs targets {TARGETS}: {r['verdicts']}")


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# Geocells at scale\n\n",
             f"Machine: {m['cores']} cores, {m['arch']}, Python {m['python']}. Targets: build <= "
             f"{TARGETS['build_s']:.0f} s, peak RSS <= {TARGETS['peak_rss_gib']:.0f} GiB, assignment >= "
             f"{TARGETS['assign_points_per_s']:,.0f} points/s. Made by `bench/bench_geocells.py`.\n"]
    for name, r in results["runs"].items():
        b = r["build"]
        lines.append(f"\n## {name}: {r['n_points']:,} points ({r['date']})\n\n"
                     f"Settings: {', '.join(f'{k}={v}' for k, v in r['settings'].items())}."
                     + (f" {r['settings_why']}." if r.get("settings_why") else "") + "\n")
        ok = r.get("verdicts", {})

        def mark(key, ok=ok):
            return "" if key not in ok else (" (pass)" if ok[key] else " (**fail**)")

        rows = [("build wall time", f"{b['wall_s']} s{mark('build_s')}"),
                ("build peak RSS", f"{b['peak_rss_gib']} GiB{mark('peak_rss_gib')}")]
        if "error" in b:
            rows.append(("build error", b["error"]))
        else:
            c, a, k = r["cells"], r["assign"], r["containment"]
            ppc = c["points_per_cell"]
            rows += [
                ("build phases (s)", ", ".join(f"{k2} {v}" for k2, v in b["report"]["seconds"].items())),
                ("cells", f"{c['n_cells']:,} in {c['n_countries']} countries"),
                ("points per cell (min / median / max)", f"{ppc['min']} / {ppc['median']:g} / {ppc['max']}"),
                ("cells below min_points / above max_points", f"{c['cells_below_min']} / {c['cells_above_max']}"),
                ("H3 units (refined)", f"{b['report']['n_units']:,} ({b['report']['n_refined_units']:,})"),
                ("points in H3 cells at sea, reassigned", f"{b['report']['points_at_sea_reassigned']:,}"),
                ("index build", f"{a['index_build_s']} s"),
                ("assignment (best of 3)",
                 f"{a['assign_s_best']} s = {a['points_per_s']:,.0f} points/s{mark('assign_points_per_s')}"),
                ("assign reports inside", f"{a['inside_share']:.4%}"),
                ("assigned counts = n_points", "yes" if a["cells_with_count_mismatch"] == 0 else
                 f"no: {a['cells_with_count_mismatch']} cells, {a['points_count_mismatch']} points"),
                (f"assigned cell's polygon contains / covers ({k['sample']:,} points)",
                 f"{k['contains_share']:.4%} / {k['covers_share']:.4%}"),
            ]
            if "miss_distance_km" in k:
                rows.append(("distance of misses outside the polygon (median / max)",
                             f"{k['miss_distance_km']['median']} / {k['miss_distance_km']['max']} km"))
            for kind, v in r.get("answer_points", {}).items():
                what = "answer points" if kind == "answer_point" else "members' means (not used to answer)"
                km = v["km_to_nearest_member"]
                rows.append((f"{what}: outside their own polygon; km to the nearest member photo "
                             "(median / p99 / max)",
                             f"{v['outside_own_polygon']}; {km['median']} / {km['p99']} / {km['max']}"))
        lines.append("\n| figure | value |\n|---|---|\n" + "".join(f"| {a} | {v} |\n" for a, v in rows))
        rep = b.get("report", {})
        if rep.get("countries_below_min"):
            lines.append("\nCountries with fewer than min_points photos in all (one cell each): "
                         + ", ".join(f"{k2} ({v})" for k2, v in rep["countries_below_min"].items()) + ".\n")
        if rep.get("isolated_below_min"):
            lines.append("\nIsolated regions below min_points (their own cell: no region of their country touches "
                         "them or lies within bridge_km): "
                         + ", ".join(f"{k2} ({v})" for k2, v in rep["isolated_below_min"].items()) + ".\n")
    return "".join(lines)


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--only", choices=("gallery", "mp16", "all"), default="all")
    parser.add_argument("--keep", default=None, help="keep the cells files in this folder")
    parser.add_argument("--boundaries", default=None,
                        help="admin boundary GeoParquet (default: geocells.boundaries.load_boundaries())")
    parser.add_argument("--timeout", type=float, default=600.0, help="stop a build after this many seconds")
    parser.add_argument("--sample", type=int, default=200_000, help="points checked against cell polygons")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_child-build", dest="child_build", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_build:
        _child_build(args.child_build)
        return

    from omegaconf import OmegaConf

    from geocells.build import read_points

    shared = Path(args.shared)
    coords = shared / "coords"
    if not coords.is_dir():
        raise SystemExit(f"{coords} not found: this benchmark needs the shared data (--shared)")
    conf = OmegaConf.load(REPO / "conf" / "geocells.yaml")
    defaults = {k: conf[k] for k in ("scheme", "min_points", "max_points", "res", "max_res", "seed")}
    results_path = HERE / "results" / "geocells.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["machine"] = {"cores": os.cpu_count(), "arch": platform.machine(), "system": platform.system(),
                          "python": platform.python_version()}
    results["targets"] = TARGETS
    results.setdefault("runs", {})
    names = ["gallery", "mp16"] if args.only == "all" else [args.only]

    with tempfile.TemporaryDirectory(prefix="bench-geocells-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in names:
            if name == "gallery":
                path = coords / "mp16_gallery_100K.csv"
                latlng = read_points(path)
                settings = {**defaults, **GALLERY_SETTINGS}
                points_path, why, source = path, GALLERY_WHY, str(path)
            else:
                t = time.perf_counter()
                density = read_s2_density(coords / "cells_50_1000.csv")
                latlng = mp16_points(density, seed=args.seed)
                gen_s = time.perf_counter() - t
                assert len(latlng) == MP16_TOTAL, f"expected {MP16_TOTAL:,} points, drew {len(latlng):,}"
                print(f"[mp16] drew {len(latlng):,} points from {len(density):,} S2 cells in {gen_s:.1f} s",
                      flush=True)
                points_path = Path(tmp) / "mp16_points.parquet"
                pd.DataFrame({"lat": latlng[:, 0], "lng": latlng[:, 1]}).to_parquet(points_path, index=False)
                settings = dict(defaults)
                why, source = "conf/geocells.yaml defaults", f"{coords / 'cells_50_1000.csv'} (seed {args.seed})"
            r = measure(name, latlng, points_path, settings, workdir, args.boundaries, args.timeout, args.sample)
            r["source"], r["settings_why"] = source, why
            if name == "mp16":
                r["points_draw_s"] = round(gen_s, 2)
            r["boundaries"] = args.boundaries or "geocells.boundaries.load_boundaries() default"
            r["verdicts"] = _verdicts(r["build"], r.get("assign"))
            results["runs"][name] = r
            print_run(name, r)
    results["runs"] = {k: results["runs"][k] for k in ("gallery", "mp16") if k in results["runs"]}
    atomic_write_json(results_path, results)
    atomic_write_text(HERE / "results" / "geocells.md", markdown(results))
    print(f"wrote {results_path.relative_to(REPO)} and geocells.md")


if __name__ == "__main__":
    main()
