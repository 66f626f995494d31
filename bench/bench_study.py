"""The real-data study: which component helps on real photos at this scale.

    .venv/bin/python bench/bench_study.py [--out outputs/study]

Data: the 1,821 real Im2GPS3k dev photos in ../shared/data, split into 5 photographer-disjoint folds
balanced by photo count (``geoloc.data.readers.photographer_folds``): train on folds 0-2 (1,093 photos),
choose refinement temperatures on fold 3 (364), report on fold 4 (364, never used for any choice).
Geocells: 310 semantic cells built from the 100K MP-16 gallery coordinates (min 400, max 4000 points).

Fixed CPU budget, the same for every trained row: ``experiment=im2gps3k_dev`` (a ViT of 4 blocks x 192
on 96 px, 8 px patches, from scratch: no pretrained weights can be downloaded here), 25 epochs at batch
32 (about 850 AdamW steps), on this 2-core CPU; the checkpoint with the best validation median (fold 3)
is kept. Rows:

* ``constant``, ``prior``: the baselines fitted on the MP-16 gallery coordinates;
* ``classification only``: hard cell labels (``tau_km=0``), no GPS encoder loss;
* ``+ haversine smoothing``: labels smoothed with tau = 65 km (PIGEON);
* ``+ contrastive GPS encoder``: + image-GPS InfoNCE with a queue, GPS encoder started from GeoCLIP's
  released weights;
* ``+ prototype refinement``: that model, top 10 cells reranked by location-cluster prototypes of the
  training photos (``python -m geoloc index``), answer = nearest training photo in the winning cluster;
* ``+ gallery``: prototypes and the 100K MP-16 GPS gallery together (``refine=both``);
* ``gallery only`` for reference (``refine=gallery``).

The validation median of every epoch (from the runs' CSV logs) goes into study.json: it shows which
epoch the kept checkpoint comes from and what later epochs did.

Each row also carries a bootstrap 95% interval (1,000 resamples of the test photos) for GeoScore and the
2500 km accuracy: with 364 test photos, differences inside those intervals are noise. Rerunning resumes:
finished trainings (``RUN/done``) and evaluations (``metrics.json``) are kept. Writes
bench/results/study.json and bench/results/study.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("GEOLOC_SHARED_DATA", REPO.parent / "shared" / "data"))
PY = sys.executable

VARIANTS = {  # name -> train.py overrides on top of experiment=im2gps3k_dev
    "cls": ["model.module.tau_km=0", "model.module.loss_weights.gps=0"],
    "smooth": ["model.module.loss_weights.gps=0"],
    "contrastive": ["model/location_encoder=geoclip"],
}
TEMPERATURES = (0.01, 0.03, 0.1)


def _run(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\nsee {log}")
    return time.perf_counter() - t


def _data(fold) -> list[str]:
    return ["data=im2gps3k", f"data.root={SHARED / 'im2gps3k-dev'}", "data.folds=5", f"data.fold={fold}",
            "progress=false"]


def evaluate(out: Path, name: str, fold, args: list[str]) -> dict:
    folder = out / "eval" / name
    if not (folder / "metrics.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        _run([PY, "evaluate.py", *_data(fold), f"output_dir={folder}", *args], folder.parent / f"{folder.name}.log")
    return json.loads((folder / "metrics.json").read_text())


def bootstrap(folder: Path, n: int = 1000, seed: int = 0) -> dict:
    """95% intervals of GeoScore and 2500 km accuracy over resampled test photos."""
    from geoloc.evaluation.metrics import geoscore

    d = pd.read_csv(folder / "predictions.csv")["distance_km"].to_numpy()
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n, len(d)))
    gs = geoscore(d)[idx].mean(axis=1)
    acc = 100 * (d[idx] <= 2500).mean(axis=1)
    return {"geoscore_ci95": [round(float(v), 1) for v in np.percentile(gs, [2.5, 97.5])],
            "acc_2500km_ci95": [round(float(v), 1) for v in np.percentile(acc, [2.5, 97.5])]}


def _val_curve(run: Path) -> list[float]:
    """Validation median km per epoch, from the run's CSV log."""
    logs = sorted(run.glob("csv/version_*/metrics.csv"))
    if not logs:
        return []
    df = pd.concat([pd.read_csv(f) for f in logs])
    v = df.dropna(subset=["val/median_km"]).groupby("epoch")["val/median_km"].last()
    return [round(float(x), 0) for x in v.to_numpy()]


def study_cells(out: Path, name: str, *extra: str) -> Path:
    """Checks the real photos are there, makes ``out/runs`` and builds the study's geocells (310 cells of
    the 100K MP-16 gallery coordinates) once, as ``out/name``."""
    if not (SHARED / "im2gps3k-dev" / "im2gps3k_places365.csv").is_file():
        sys.exit(f"needs the real photos at {SHARED / 'im2gps3k-dev'} (set GEOLOC_SHARED_DATA)")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cells = out / name
    if not cells.is_file():
        _run([PY, "-m", "geocells.build", f"points={SHARED / 'coords' / 'mp16_gallery_100K.csv'}", f"out={cells}",
              "min_points=400", "max_points=4000", *extra], out / "cells.log")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "outputs" / "study"))
    args = parser.parse_args()
    out = Path(args.out)
    cells = study_cells(out, "cells_mp16_400.parquet")

    train_s = {}
    for name, overrides in VARIANTS.items():
        run = out / "runs" / name
        if not (run / "done").is_file():
            train_s[name] = _run([PY, "train.py", "experiment=im2gps3k_dev", f"data.root={SHARED / 'im2gps3k-dev'}",
                                  f"cells={cells}", "trainer.enable_progress_bar=false", f"output_dir={run}",
                                  "ckpt_path=last", *overrides], out / "runs" / f"{name}.log")
            (run / "done").touch()
    ckpt = {name: out / "runs" / name / "checkpoints" / "best.ckpt" for name in VARIANTS}

    index = out / "runs" / "contrastive" / "index_v1"
    if not (index / "meta.json").is_file():
        _run([PY, "-m", "geoloc", "index", f"ckpt={ckpt['contrastive']}", "data=im2gps3k",
              f"data.root={SHARED / 'im2gps3k-dev'}", "data.folds=5", "data.fold=[0,1,2]", f"out={index}"],
             out / "index.log")
    if not (out / "runs" / "contrastive" / "gallery_v1.npz").is_file():  # the 100K MP-16 GPS gallery, embedded once
        _run([PY, "-m", "geoloc", "gallery", f"ckpt={ckpt['contrastive']}"], out / "gallery.log")

    model = ["predictor=model", "data.reference.source=mp16_gallery"]
    # temperatures chosen on the validation fold (3) by GeoScore; the test fold (4) is only reported
    chosen = {}
    for refine in ("prototypes", "gallery"):
        key = "temperature" if refine == "prototypes" else "gallery_temperature"
        scores = {t: evaluate(out, f"val/{refine}_T{t}", 3, [*model, f"ckpt={ckpt['contrastive']}",
                                                            f"refine={refine}", f"predictor.{key}={t}"])["geoscore"]
                  for t in TEMPERATURES}
        chosen[key] = max(scores, key=scores.get)
    temps = [f"predictor.temperature={chosen['temperature']}",
             f"predictor.gallery_temperature={chosen['gallery_temperature']}"]

    rows = [
        ("constant", "constant", ["predictor=constant"]),
        ("prior", "prior", ["predictor=prior"]),
        ("classification only", "cls", [*model, f"ckpt={ckpt['cls']}"]),
        ("+ haversine smoothing", "smooth", [*model, f"ckpt={ckpt['smooth']}"]),
        ("+ contrastive GPS encoder", "contrastive", [*model, f"ckpt={ckpt['contrastive']}"]),
        ("+ prototype refinement", "prototypes", [*model, f"ckpt={ckpt['contrastive']}", "refine=prototypes",
                                                  *temps]),
        ("+ gallery", "both", [*model, f"ckpt={ckpt['contrastive']}", "refine=both", *temps]),
        ("gallery only (reference)", "gallery", [*model, f"ckpt={ckpt['contrastive']}", "refine=gallery", *temps]),
    ]
    from geoloc.evaluation.engine import TABLE_HEADER, table_row

    results, table = {}, [TABLE_HEADER]
    for label, name, extra in rows:
        m = evaluate(out, f"test/{name}", 4, extra)
        ci = bootstrap(out / "eval" / "test" / name)
        keep = {k: m.get(k) for k in ("n", "acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km",
                                      "median_km", "geoscore", "acc_country", "acc_admin1", "acc_cell_top1",
                                      "ece_top1", "recall_area_auc") if k in m}
        results[label] = {**keep, **ci}
        table.append(table_row(label, m))
    result = {
        "data": "im2gps3k-dev, 5 photographer-disjoint folds: train 0-2, validation 3, test 4",
        "cells": "310 semantic geocells from the 100K MP-16 gallery (min 400, max 4000 points)",
        "budget": "experiment=im2gps3k_dev: ViT 4x192, 96 px, from scratch, 25 epochs x 1,093 photos, batch 32",
        "train_seconds": {k: round(v, 1) for k, v in train_s.items()} or "(resumed: trained in an earlier run)",
        "temperatures_chosen_on_validation": chosen,
        "best_checkpoint_epochs": {name: int(torch.load(c, map_location="cpu", weights_only=False)["epoch"])
                                   for name, c in ckpt.items()},
        "val_median_km_per_epoch": {name: _val_curve(out / "runs" / name) for name in VARIANTS},
        "rows": results, "cores": os.cpu_count(), "machine": platform.machine(),
    }
    from geoloc.artifacts import atomic_write_json, atomic_write_text

    atomic_write_json(HERE / "results" / "study.json", result)
    lines = ["# Real-data study: im2gps3k-dev, test fold (364 real photos)\n\n", *table, "\n",
             "| Method | GeoScore 95% CI | 2500 km 95% CI | country % | admin-1 % | ECE top-1 |\n",
             "|---|---|---|---|---|---|\n"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['geoscore_ci95'][0]}-{r['geoscore_ci95'][1]} | "
                     f"{r['acc_2500km_ci95'][0]}-{r['acc_2500km_ci95'][1]} | "
                     f"{r.get('acc_country', float('nan')):.1f} | {r.get('acc_admin1', float('nan')):.1f} | "
                     f"{r.get('ece_top1', float('nan')):.3f} |\n")
    lines.append(f"\nTemperatures chosen on the validation fold: {chosen}. {result['budget']}. Checkpoints kept by "
                 f"validation median (epoch, from 0): {result['best_checkpoint_epochs']}.\n\nValidation median km "
                 "per epoch (fold 3):\n\n")
    for name, curve in result["val_median_km_per_epoch"].items():
        lines.append(f"- {name}: {', '.join(f'{v:.0f}' for v in curve)}\n")
    atomic_write_text(HERE / "results" / "study.md", "".join(lines))
    print("".join(lines))


if __name__ == "__main__":
    main()
