"""Baselines on the real benchmark files, and the speed of the evaluation path.

    .venv/bin/python bench/bench_baselines.py [--shared ../shared/data]

Scores `constant` and `prior` (fitted on the 100K MP-16 gallery coordinates) on the public Im2GPS3k
photos (`im2gps3k-dev`, 1,821 photos, images decoded) and on YFCC4k and Im2GPS metadata (coordinates
only: no photos are available here), and times the evaluation loop (decode + predict + write) in
photos per second. Writes bench/results/baselines.json and bench/results/baselines.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from geoloc.artifacts import atomic_write_json, atomic_write_text
from geoloc.data.images import SkipReport
from geoloc.data.readers import load_reference_latlng, read_im2gps, read_yfcc4k
from geoloc.evaluation.engine import TABLE_HEADER, evaluate, table_row
from geoloc.geo.countries import default_country_lookup
from geoloc.inference.baselines import ConstantPredictor, PriorPredictor

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=str(HERE.parent.parent / "shared" / "data"))
    args = parser.parse_args()
    shared = Path(args.shared)
    if not (shared / "im2gps3k-dev").is_dir():
        raise SystemExit(f"{shared}/im2gps3k-dev not found: this benchmark needs the shared data")

    ref = load_reference_latlng("mp16_gallery")
    t = time.perf_counter()
    predictors = {"constant": ConstantPredictor(ref), "prior": PriorPredictor(ref)}
    fit_s = time.perf_counter() - t
    datasets = {
        "im2gps3k-dev (1,821 real photos)": read_im2gps(shared / "im2gps3k-dev"),
        "yfcc4k (metadata only)": read_yfcc4k(shared / "coords", images=None),
        "im2gps (metadata only)": read_im2gps(shared / "coords", csv="im2gps_places365.csv", images=None,
                                              name="im2gps"),
    }
    country = default_country_lookup()

    # decode throughput alone (the photo path every predictor pays)
    ds = datasets["im2gps3k-dev (1,821 real photos)"]
    t = time.perf_counter()
    n_dec = sum(1 for _ in ds.iter_items(SkipReport()))
    decode_ips = n_dec / (time.perf_counter() - t)

    results: dict = {"machine": {"cores": os.cpu_count(), "arch": platform.machine()},
                     "reference": "MP-16 100K gallery (geoclip package)", "constant_fit_s": round(fit_s, 3),
                     "decode_images_per_s": round(decode_ips, 1), "runs": {}}
    md = ["# Baselines on real benchmark files\n\n"]
    with tempfile.TemporaryDirectory() as tmp:
        for dname, ds in datasets.items():
            md.append(f"## {dname}\n\n{TABLE_HEADER}")
            for pname, pred in predictors.items():
                t = time.perf_counter()
                m = evaluate(ds, pred, Path(tmp) / f"{ds.name}-{pname}", progress=False, country_of=country)
                secs = time.perf_counter() - t
                keep = {k: m[k] for k in ("n", "n_skipped", "acc_1km", "acc_25km", "acc_200km", "acc_750km",
                                          "acc_2500km", "median_km", "mean_km", "geoscore", "acc_country",
                                          "n_country")}
                keep["items_per_s"] = round((m["n"] + m["n_skipped"]) / secs, 1)
                results["runs"][f"{ds.name}/{pname}"] = keep
                md.append(table_row(pname, m))
                print(f"{dname:36s} {pname:9s} " + " ".join(f"{k}={v:.4g}" for k, v in keep.items()))
            md.append("\n")
    md.append(f"Constant = geodesic medoid of the MP-16 gallery ({predictors['constant'].medoid.round(4).tolist()}). "
              f"Decode: {decode_ips:.0f} photos/s on {os.cpu_count()} cores.\n")
    atomic_write_json(HERE / "results" / "baselines.json", results)
    atomic_write_text(HERE / "results" / "baselines.md", "".join(md))
    print(f"decode {decode_ips:.0f} photos/s; wrote bench/results/baselines.json and baselines.md")


if __name__ == "__main__":
    main()
