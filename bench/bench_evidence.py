"""The evidence study: how well the evidence heads read real photos, and what the evidence
reranking and the reasoning chain do with them.

    .venv/bin/python bench/bench_evidence.py [--out outputs/evidence_study]

Data and budget as in bench_study.py: the 1,821 real Im2GPS3k dev photos in ../shared/data in 5
photographer-disjoint folds: train on folds 0-2, choose the reranking weights on fold 3, report on fold 4
(364 photos, never used for a choice). Geocells: the 310 semantic cells of the 100K MP-16 gallery
coordinates, with cell evidence (``evidence=true``). Model: ``experiment=im2gps3k_dev`` (ViT 4x192,
96 px, from scratch, 25 epochs at batch 32, GPS encoder from GeoCLIP's weights) with every evidence
head at loss weight 0.3 (``scene`` from the dataset's ``S3_Label``); the same model without evidence
heads is trained for reference. The last checkpoint of each is used (the heads need the whole budget;
the best-validation-median checkpoint of these from-scratch runs is epoch 0, see study.md).

Reported (bench/results/evidence.json and evidence.md):

* per head on the test fold: accuracy of the predicted class, the majority-class baseline (the most
  frequent class of the *training* folds' labels), the expected calibration error of the top-1
  probability (15 bins), and n (photos where the head has a label);
* geolocation on the test fold: without reranking, with the evidence reranking at weight 1 for every
  head, with the weights chosen on fold 3 (``python -m geoloc tune``), and the model without
  evidence heads, each with a bootstrap 95% interval of GeoScore;
* faithfulness over every test photo: each claim of each chain re-derived from the network outputs
  (:func:`geoloc.evidence.verbalize.verify_chain`), and how often the top cell agrees with the evidence;
* the OCR stage on the test photos (when rapidocr-onnxruntime is installed): how many photos show
  legible text, and how often its script is the main script of the country the photo was taken in.

Rerunning resumes: finished trainings (``RUN/done``) and evaluations (``metrics.json``) are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_study import PY, REPO, SHARED, _run, _val_curve, bootstrap, evaluate, study_cells  # noqa: E402

HEAD_WEIGHT = 0.3


def _train(out: Path, cells: Path, name: str, extra: list[str]) -> None:
    run = out / "runs" / name
    if (run / "done").is_file():
        return
    _run([PY, "train.py", "experiment=im2gps3k_dev", f"data.root={SHARED / 'im2gps3k-dev'}", f"cells={cells}",
              "trainer.enable_progress_bar=false", f"output_dir={run}", "ckpt_path=last",
              "model/location_encoder=geoclip", *extra], out / "runs" / f"{name}.log")
    (run / "done").touch()


def _train_seconds(run: Path) -> float | None:
    """Wall time of a finished training: from its config (written at the start) to its ``done`` marker."""
    done, cfg = run / "done", run / "config.yaml"
    return round(done.stat().st_mtime - cfg.stat().st_mtime, 1) if done.is_file() and cfg.is_file() else None


def _fold(fold, images: bool = True):
    from geoloc.data.readers import read_im2gps

    return read_im2gps(SHARED / "im2gps3k-dev", folds=5, fold=fold, images="images" if images else None)


def _photos(ds) -> tuple[list, np.ndarray, list, np.ndarray]:
    from geoloc.data.images import SkipReport

    images, latlng, keys, scene = [], [], [], []
    for it in ds.iter_items(SkipReport()):
        images.append(it.image)
        latlng.append(it.latlng)
        keys.append(it.key)
        scene.append(it.meta.get("S3_Label"))
    return images, np.asarray(latlng, np.float64), keys, np.asarray(scene, dtype=object)


def head_metrics(out: dict, labels, train_labels, heads: list[str]) -> dict:
    """Accuracy, majority baseline, ECE and n of each head on labelled photos."""
    from geoloc.evaluation.metrics import expected_calibration_error
    from geoloc.evidence.labels import HEADS

    rows = {}
    for h in heads:
        y = labels[h].to_numpy(np.int64)
        ok = y >= 0
        prob = out[f"evidence/{h}"][ok]
        tr = train_labels[h].to_numpy(np.int64)
        tr = tr[tr >= 0]
        majority = int(np.bincount(tr, minlength=len(HEADS[h])).argmax()) if len(tr) else -1
        correct = prob.argmax(1) == y[ok]
        rows[h] = {"n": int(ok.sum()), "classes": len(HEADS[h]),
                   "accuracy": round(100 * float(correct.mean()), 1) if ok.any() else None,
                   "majority_class": HEADS[h][majority] if majority >= 0 else None,
                   "majority_accuracy": round(100 * float((y[ok] == majority).mean()), 1) if ok.any() else None,
                   "ece": round(expected_calibration_error(prob.max(1), correct)["ece"], 3) if ok.any() else None,
                   "mean_confidence": round(float(prob.max(1).mean()), 3) if ok.any() else None}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "outputs" / "evidence_study"))
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args()
    from geoloc.evidence.labels import HEADS

    out = Path(args.out)
    cells = study_cells(out, "cells_mp16_400_evidence.parquet", "evidence=true")
    heads = list(HEADS)
    evidence = "model.evidence={" + ", ".join(f"{h}: {HEAD_WEIGHT}" for h in heads) + "}"
    _train(out, cells, "evidence", [evidence])
    _train(out, cells, "plain", [])
    if not args.train_only:
        report(out, heads)


def report(out: Path, heads: list[str]) -> None:
    from geoloc.evidence.labels import dataset_evidence_labels, evidence_labels
    from geoloc.evidence.verbalize import verify_chain
    from geoloc.inference.predictor import build_predictor

    ckpt = out / "runs" / "evidence" / "checkpoints" / "last.ckpt"
    plain = out / "runs" / "plain" / "checkpoints" / "last.ckpt"

    # --- weights chosen on the validation fold
    wfile = out / "runs" / "evidence" / "evidence_weights_v1.json"
    if not wfile.is_file():
        _run([PY, "-m", "geoloc", "tune", f"ckpt={ckpt}", "data=im2gps3k", f"data.root={SHARED / 'im2gps3k-dev'}",
              "data.folds=5", "data.fold=3", f"out={wfile}"], out / "tune.log")
    tuned = json.loads(wfile.read_text())

    # --- the heads on the test fold
    pred = build_predictor(str(ckpt), refine="evidence", evidence_weights=str(wfile), explain=True, topk=5)
    images, latlng, keys, scene = _photos(_fold(4))
    t = time.perf_counter()
    net_out = pred.forward(images)
    forward_s = time.perf_counter() - t
    labels = evidence_labels(latlng, scene=scene)
    train_labels = dataset_evidence_labels(_fold([0, 1, 2], images=False))
    per_head = head_metrics(net_out, labels, train_labels, [h for h in heads if f"evidence/{h}" in net_out])

    # --- chains: faithfulness over every test photo, and agreement of the top cell with the evidence
    res = pred.refine_batch(net_out)
    t = time.perf_counter()
    chains = pred.explain_batch(net_out, res, images)
    explain_ms = 1000 * (time.perf_counter() - t) / max(len(images), 1)
    problems = [p for i, c in enumerate(chains) for p in verify_chain(c, net_out, i, res, pred.cells)]
    n_claims = sum(len(c["claims"]) for c in chains)
    top_checks = [c for chain in chains for c in chain["checks"] if c["rank"] == 1 and c["verdict"] != "no data"]
    verdicts = {v: sum(c["verdict"] == v for c in top_checks) for v in ("agrees", "partly", "disagrees")}
    (out / "test_chains.jsonl").write_text("".join(json.dumps({"IMG_ID": k, **c}, ensure_ascii=False) + "\n"
                                                   for k, c in zip(keys, chains)))

    # --- geolocation with and without the reranking (evaluate.py on the test fold)
    model = ["predictor=model", "data.reference.source=mp16_gallery"]
    rows = [("no reranking", "none", [*model, f"ckpt={ckpt}"]),
            ("evidence reranking, all weights 1", "evidence_w1", [*model, f"ckpt={ckpt}", "refine=evidence"]),
            ("evidence reranking, weights from fold 3", "evidence_tuned",
             [*model, f"ckpt={ckpt}", "refine=evidence", f"predictor.evidence_weights={wfile}"]),
            *([("model without evidence heads (reference)", "plain", [*model, f"ckpt={plain}"])]
              if (out / "runs" / "plain" / "done").is_file() else []),
            ("constant (reference)", "constant", ["predictor=constant", "data.reference.source=mp16_gallery"])]
    geo = {}
    for label, name, extra in rows:
        m = evaluate(out, f"test/{name}", 4, extra)
        geo[label] = {**{k: m.get(k) for k in ("n", "acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km",
                                               "median_km", "geoscore", "acc_country", "acc_admin1")},
                      **bootstrap(out / "eval" / "test" / name)}

    # --- OCR on the test photos (slow: cached in the study folder)
    ocr_file = out / "ocr_test.json"
    if ocr_file.is_file():
        ocr = json.loads(ocr_file.read_text())
    else:
        ocr = _ocr_study(images, labels)
        if "skipped" not in ocr:
            ocr_file.write_text(json.dumps(ocr, ensure_ascii=False))

    result = {
        "data": "im2gps3k-dev, 5 photographer-disjoint folds: train 0-2, weights chosen on 3, test 4",
        "cells": "310 semantic geocells from the 100K MP-16 gallery with cell evidence (min 400, max 4000 points)",
        "budget": f"experiment=im2gps3k_dev + model/location_encoder=geoclip, every head at loss weight {HEAD_WEIGHT}; "
                  "last checkpoint (25 epochs)",
        "train_seconds": {n: _train_seconds(out / "runs" / n) for n in ("evidence", "plain")},
        "val_median_km_per_epoch": {n: _val_curve(out / "runs" / n) for n in ("evidence", "plain")},
        "heads": per_head,
        "weights_chosen_on_fold_3": tuned["weights"],
        "fold_3_geoscore": {k: round(tuned[k], 1) for k in ("geoscore_without", "geoscore_uniform", "geoscore")},
        "geolocation": geo,
        "faithfulness": {"photos": len(chains), "claims": n_claims, "claims_not_backed": len(problems),
                         "examples_of_problems": problems[:5], "top_cell_checks": verdicts,
                         "explain_ms_per_photo": round(explain_ms, 2),
                         "forward_ms_per_photo": round(1000 * forward_s / max(len(images), 1), 2)},
        "ocr": ocr, "cores": os.cpu_count(), "machine": platform.machine(),
    }
    from geoloc.artifacts import atomic_write_json, atomic_write_text

    atomic_write_json(HERE / "results" / "evidence.json", result)
    md = _markdown(result, chains[0]["text"], keys[0])
    atomic_write_text(HERE / "results" / "evidence.md", md)
    print(md)


def _ocr_study(images: list, labels) -> dict:
    try:
        from geoloc.evidence.ocr import TextReader

        reader = TextReader()
    except ImportError as e:
        return {"skipped": str(e)}
    from geoloc.evidence.labels import HEADS

    t = time.perf_counter()
    found = [reader.text_evidence(im) for im in images]
    seconds = time.perf_counter() - t
    truth = labels["script"].to_numpy()
    with_text = [i for i, f in enumerate(found) if f]
    known = [i for i in with_text if truth[i] >= 0]
    match = [i for i in known if found[i]["script"] == HEADS["script"][truth[i]]]
    scripts: dict[str, int] = {}
    for i in with_text:
        scripts[found[i]["script"]] = scripts.get(found[i]["script"], 0) + 1
    return {"photos": len(images), "with_legible_text": len(with_text), "scripts_read": scripts,
            "with_text_and_country": len(known), "script_is_the_country_main_script": len(match),
            "ms_per_photo": round(1000 * seconds / max(len(images), 1), 1),
            "examples": [found[i]["text"][:3] for i in with_text[:8]]}


def _markdown(r: dict, example: str, key: str) -> str:
    lines = ["# Evidence study: im2gps3k-dev, test fold (real photos)\n\n", f"{r['budget']}. {r['data']}. "
             f"Training wall time in seconds (2 shared cores): {r['train_seconds']}.\n\n",
             "## Evidence heads on the test fold\n\n",
             "| head | classes | n | accuracy % | majority-class baseline % | majority class | ECE "
             "| mean confidence |\n",
             "|---|---|---|---|---|---|---|---|\n"]
    for h, m in r["heads"].items():
        lines.append(f"| {h} | {m['classes']} | {m['n']} | {m['accuracy']} | {m['majority_accuracy']} | "
                     f"{m['majority_class']} | {m['ece']} | {m['mean_confidence']} |\n")
    lines += ["\n## Geolocation on the test fold\n\n",
              "| | n | 1 km | 25 km | 200 km | 750 km | 2500 km | median km | GeoScore | 95% CI | country % |\n",
              "|---|---|---|---|---|---|---|---|---|---|---|\n"]
    for label, m in r["geolocation"].items():
        lines.append(f"| {label} | {m['n']} | {m['acc_1km']:.1f} | {m['acc_25km']:.1f} | {m['acc_200km']:.1f} | "
                     f"{m['acc_750km']:.1f} | {m['acc_2500km']:.1f} | {m['median_km']:.0f} | {m['geoscore']:.0f} | "
                     f"{m['geoscore_ci95'][0]:.0f}-{m['geoscore_ci95'][1]:.0f} | {m.get('acc_country') or 0:.1f} |\n")
    f = r["faithfulness"]
    lines += [f"\nWeights chosen on fold 3: {r['weights_chosen_on_fold_3']} (fold-3 mean GeoScore without / all 1 / "
              f"chosen: {r['fold_3_geoscore']}).\n\n## Faithfulness\n\n",
              f"{f['claims']} claims in {f['photos']} chains re-derived from the network outputs: "
              f"{f['claims_not_backed']} not backed. Top cell against the evidence: {f['top_cell_checks']}. "
              f"Explaining costs {f['explain_ms_per_photo']} ms per photo (forward pass: {f['forward_ms_per_photo']} "
              "ms).\n\n", f"Example chain ({key}):\n\n```\n{example}\n```\n\n## OCR stage\n\n"]
    o = r["ocr"]
    if "skipped" in o:
        lines.append(f"Skipped: {o['skipped']}\n")
    else:
        lines.append(f"Legible text in {o['with_legible_text']} of {o['photos']} photos ({o['ms_per_photo']} ms per "
                     f"photo); scripts read: {o['scripts_read']}; the script is the main script of the photo's "
                     f"country in {o['script_is_the_country_main_script']} of {o['with_text_and_country']}. "
                     f"Examples: {o['examples']}\n")
    return "".join(lines)


if __name__ == "__main__":
    main()
