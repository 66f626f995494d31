"""The evaluation engine behind ``evaluate.py``: run a predictor over a benchmark and score it.

Outputs in ``output_dir``:

* ``predictions.csv``: ``IMG_ID,true_lat,true_lng,pred_lat,pred_lng,distance_km`` (+ ``top{k}_lat``,
  ``top{k}_lng``, ``top{k}_prob`` when the predictor ranks alternatives, + ``true_cell``, ``cell_top1``,
  ``cell_top1_prob`` (the classifier's own top cell and probability, before any refinement),
  ``true_cell_rank``, ``area_to_cover_km2`` when it gives a probability to every geocell:
  see :func:`geoloc.evaluation.metrics.cell_ranking`; + ``cell_top1_prob_uncalibrated`` when those
  probabilities are calibrated, :mod:`geoloc.inference.calibration`), appended and fsynced batch by batch,
  so a killed run resumes where it stopped;
* ``skipped.csv``: ``IMG_ID,reason,detail`` for each photo that could not be used;
* ``explanations.jsonl`` (predictors with ``explain`` on): one reasoning chain per photo,
  ``{"IMG_ID", "stages", "claims", "checks", "text"}`` (:mod:`geoloc.evidence.verbalize`), appended
  through a :class:`~geoloc.artifacts.Journal` (fsynced per batch) before the batch's prediction rows;
  a resumed run may repeat a chain (the last line of an ``IMG_ID`` wins);
* ``metrics.json``: ``n``, ``n_skipped``, ``acc_{1,25,200,750,2500}km`` (percent), ``median_km``,
  ``mean_km``, ``geoscore``, ``acc_country``/``n_country``, ``acc_admin1``/``n_admin1`` and, for
  predictors that rank geocells, ``acc_cell_top1``, ``ece_top1`` (+ ``calibration_bins``; of the
  calibrated probabilities for a calibrated predictor, which also gets ``ece_top1_uncalibrated`` and
  ``calibration_bins_uncalibrated``), ``recall_area_auc``, ``median_area_to_cover_km2``,
  ``recall_at_area``, and what was run on what;
* ``results.md``: the standard table and the extra figures;
* ``error_cdf.png``, ``error_map.png`` and, for cell-ranking predictors, ``reliability.png`` and
  ``recall_area.png`` (:mod:`geoloc.evaluation.plots`).

``metrics.json`` and ``results.md`` are written atomically at the end from the whole
``predictions.csv``, so they always describe every row done, resumed or not.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.artifacts import Journal, atomic_write_json, atomic_write_text, complete_lines
from geoloc.data.images import SkipReport
from geoloc.data.readers import Item, ItemSource
from geoloc.evaluation.metrics import (
    THRESHOLDS_KM,
    admin1_accuracy,
    cell_ranking,
    country_accuracy,
    distance_metrics,
    expected_calibration_error,
    recall_area_auc,
    recall_vs_area,
)
from geoloc.geo import EARTH_RADIUS_KM, haversine_km
from geoloc.inference.base import Prediction, Predictor

BASE_COLUMNS = ["IMG_ID", "true_lat", "true_lng", "pred_lat", "pred_lng", "distance_km"]
SKIP_COLUMNS = ["IMG_ID", "reason", "detail"]
CELL_COLUMNS = ["true_cell", "cell_top1", "cell_top1_prob", "true_cell_rank", "area_to_cover_km2"]
#: The classifier's top-cell probability before calibration (predictors with a calibration temperature).
UNCALIBRATED_COLUMN = "cell_top1_prob_uncalibrated"
#: Areas at which ``recall_at_area`` is reported (km²): a city, a region, a large country, a continent.
RECALL_AREAS_KM2 = (1e3, 1e4, 1e5, 1e6, 1e7)


def _done_keys(path: Path) -> set[str]:
    if not path.exists() or path.stat().st_size == 0:
        return set()
    return set(pd.read_csv(path, usecols=["IMG_ID"], dtype={"IMG_ID": str})["IMG_ID"])


def _batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


#: The error of a photo a predictor did not answer (scored as a failure): the largest distance on Earth.
UNANSWERED_KM = math.pi * EARTH_RADIUS_KM


def _rows(batch: list[Item], pred: Prediction, cells=None) -> list[list]:
    true = np.array([it.latlng for it in batch], dtype=np.float64)  # (B, 2)
    guess = np.asarray(pred.latlng, dtype=np.float64)  # (B, 2)
    if guess.shape != true.shape:
        raise ValueError(f"predictor returned latlng of shape {guess.shape} for a batch of {len(batch)}")
    answered = np.isfinite(guess).all(axis=1)  # NaN: the predictor gave no answer (a failure, at UNANSWERED_KM)
    dist = np.where(answered, haversine_km(true, np.where(answered[:, None], guess, 0.0)), UNANSWERED_KM)
    cols = [np.array([it.key for it in batch], dtype=object)[:, None], true, guess, dist[:, None]]
    if pred.topk_latlng is not None:
        k = pred.topk_latlng.shape[1]
        prob = pred.topk_prob if pred.topk_prob is not None else np.full((len(batch), k), np.nan)
        # interleave per rank: top1_lat, top1_lng, top1_prob, top2_lat, ...
        cols.append(np.concatenate([pred.topk_latlng, prob[:, :, None]], axis=2).reshape(len(batch), 3 * k))
    if cells is not None and pred.cell_prob is not None:
        true_cell = cells.assign(true)
        r = cell_ranking(pred.cell_prob, true_cell, cells.areas_km2)
        cell_cols = [true_cell, r["top1_cell"], r["top1_prob"], r["true_rank"], r["area_to_cover_km2"]]
        if pred.cell_prob_uncalibrated is not None:  # the same top cell, its probability before the temperature
            cell_cols.append(np.asarray(pred.cell_prob_uncalibrated, np.float64).max(axis=1))
        block = np.empty((len(batch), len(cell_cols)), dtype=object)  # ids and ranks stay integers in the CSV
        for j, c in enumerate(cell_cols):
            block[:, j] = c.tolist()
        cols.append(block)
    return np.concatenate([np.asarray(c, dtype=object) for c in cols], axis=1).tolist()


def _select(pred: Prediction, keep: np.ndarray) -> Prediction:
    """The rows ``keep`` of a prediction."""
    pick = (lambda a: None if a is None else np.asarray(a)[keep])  # noqa: E731
    chains = None if pred.explanations is None else [c for c, k in zip(pred.explanations, keep) if k]
    return Prediction(pick(pred.latlng), pick(pred.topk_latlng), pick(pred.topk_prob), pick(pred.topk_cells),
                      pick(pred.cell_prob), chains, pick(pred.cell_prob_uncalibrated))


def _differences(before: dict, now: dict) -> str:
    """`` (differing: decode argmax -> geoscore, ...)``: the predictor settings that tell two runs apart."""
    a, b = before.get("predictor") or {}, now.get("predictor") or {}
    if not isinstance(a, dict) or not isinstance(b, dict):
        return ""
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    if not keys:
        return ""
    shown = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:5])
    return f" (differing: {shown}{', ...' if len(keys) > 5 else ''})"


def _topk_columns(k: int) -> list[str]:
    return [f"top{r}_{f}" for r in range(1, k + 1) for f in ("lat", "lng", "prob")]


def run_predictions(source: ItemSource, predictor: Predictor, output_dir: str | Path, *,
                    batch_size: int = 64, resume: bool = True, progress: bool = True,
                    run_info: dict | None = None) -> SkipReport:
    """Predicts every item of ``source`` not yet in ``output_dir/predictions.csv``.

    Args:
        source: the benchmark.
        predictor: what to score.
        output_dir: where predictions go.
        batch_size: photos per predictor call.
        resume: continue an earlier run in the same folder (it must be the same dataset and predictor);
            False starts afresh.
        progress: show a progress bar.
        run_info: identity of the run, checked against ``run.json`` on resume.

    Returns:
        The skip report of this call (earlier runs' skips are in ``skipped.csv``).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path, skip_path, run_path = out / "predictions.csv", out / "skipped.csv", out / "run.json"
    chain_path = out / "explanations.jsonl"
    info = run_info or {}
    if resume and pred_path.exists() and pred_path.stat().st_size > 0 and not run_path.exists():
        raise ValueError(f"{pred_path}: holds predictions but {out} has no run.json saying what made them, so "
                         "this run cannot resume them; use another output_dir or resume=false")
    if resume and run_path.exists() and pred_path.exists():
        try:
            before = json.loads(run_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{run_path}: not JSON ({e}); use another output_dir or resume=false") from e
        now = json.loads(json.dumps(info))
        if before != now:
            raise ValueError(
                f"{out}: holds a run of {before.get('predictor')} on {before.get('dataset')}, not "
                f"{info.get('predictor')} on {info.get('dataset')}{_differences(before, now)}; use another "
                "output_dir or resume=false"
            )
    if not resume:
        for p in (pred_path, skip_path, chain_path):
            p.unlink(missing_ok=True)
    atomic_write_json(run_path, info)
    for p in (pred_path, skip_path, chain_path):
        complete_lines(p)  # a kill in mid-write leaves a partial last line
    done = _done_keys(pred_path) | _done_keys(skip_path)
    skipped = SkipReport()
    total = max(len(source) - len(done), 0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"{predictor.name} on {source.name}", unit="img", dynamic_ncols=True)
    header_written = pred_path.exists() and pred_path.stat().st_size > 0
    existing_header = pd.read_csv(pred_path, nrows=0).columns.tolist() if header_written else None
    cells = getattr(predictor, "cells", None)  # predictors that rank geocells get the cell-level columns
    chains = Journal(chain_path) if getattr(predictor, "explain", False) else None
    with open(pred_path, "a", newline="") as pf, open(skip_path, "a", newline="") as sf:
        pw, sw = csv.writer(pf), csv.writer(sf)
        if sf.tell() == 0:
            sw.writerow(SKIP_COLUMNS)
        n_skip_written = 0
        for batch in _batches(source.iter_items(skipped, exclude=frozenset(done)), batch_size):
            if predictor.needs_images and any(it.image is None for it in batch):
                raise ValueError(f"{predictor.name} needs photos but {source.name} was read without images "
                                 "(data.images=null?)")
            pred = predictor.predict([it.image for it in batch], [it.key for it in batch])
            if getattr(predictor, "unanswered", "fail") == "skip":  # photos without an answer are left out
                keep = np.isfinite(np.asarray(pred.latlng, np.float64)).all(axis=1)
                for it in (it for it, k in zip(batch, keep) if not k):
                    skipped.add(it.key, "unanswered", f"{predictor.name} gave no answer")
                batch, pred = [it for it, k in zip(batch, keep) if k], _select(pred, keep)
                if not batch:
                    continue
            rows = _rows(batch, pred, cells)
            k = 0 if pred.topk_latlng is None else pred.topk_latlng.shape[1]
            ranked = cells is not None and pred.cell_prob is not None
            header = BASE_COLUMNS + _topk_columns(k) + (CELL_COLUMNS if ranked else []) + (
                [UNCALIBRATED_COLUMN] if ranked and pred.cell_prob_uncalibrated is not None else [])
            if not header_written:
                pw.writerow(header)
                header_written = True
            elif existing_header is not None and existing_header != header:
                raise ValueError(f"{pred_path}: its columns {existing_header} differ from this run's {header}; "
                                 "use another output_dir or resume=false")
            existing_header = None  # checked once per call
            if chains is not None and pred.explanations is not None:  # before the rows: a done row has its chain
                chains.extend({"IMG_ID": it.key, **chain} for it, chain in zip(batch, pred.explanations))
            pw.writerows(rows)
            new_skips = skipped.items[n_skip_written:]
            sw.writerows([list(s) for s in new_skips])
            n_skip_written = len(skipped.items)
            for f in (pf, sf):
                f.flush()
                os.fsync(f.fileno())
            if bar is not None:
                bar.update(len(batch) + len(new_skips))
        sw.writerows([list(s) for s in skipped.items[n_skip_written:]])
        if bar is not None:
            bar.update(len(skipped.items) - n_skip_written)
            bar.close()
    return skipped


def generated_claim_counts(path: Path) -> dict | None:
    """What the checker did with the generated chains of ``explanations.jsonl``: claims by verdict, sentences
    it could not parse, photos; None when no chain there was generated."""
    if not path.is_file():
        return None
    counts: dict[str, int] = {}
    photos = unparsed = 0
    with open(path) as f:
        for line in f:
            g = json.loads(line).get("generated") if line.strip() else None
            if not g:
                continue
            photos += 1
            unparsed += int(g.get("unparsed", 0))
            for c in g["claims"]:
                counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    if not photos:
        return None
    total = sum(counts.values())
    return {"photos": photos, "claims": total, "by_verdict": dict(sorted(counts.items())),
            "share_kept": round(counts.get("backed", 0) / total, 4) if total else None, "unparsed_sentences": unparsed}


def score(output_dir: str | Path, *, country_of: Callable[[np.ndarray], np.ndarray] | None = None,
          admin_of=None) -> dict:
    """Metrics over every row of ``output_dir/predictions.csv`` and ``skipped.csv``.

    Args:
        output_dir: a folder written by :func:`run_predictions`.
        country_of: maps ``(N, 2)`` latlng to ``(N,)`` country codes (``""`` unknown); adds
            ``acc_country`` and ``n_country``.
        admin_of: an object whose ``lookup(latlng)`` gives ``(country, admin1)`` codes
            (:class:`geoloc.geo.countries.AdminLookup`); adds country and ``acc_admin1``/``n_admin1``.
    """
    out = Path(output_dir)
    pred_path = out / "predictions.csv"
    df = (pd.read_csv(pred_path, dtype={"IMG_ID": str}) if pred_path.exists() and pred_path.stat().st_size
          else pd.DataFrame(columns=BASE_COLUMNS))
    skip_path = out / "skipped.csv"
    sk = pd.read_csv(skip_path, dtype=str) if skip_path.exists() else pd.DataFrame(columns=SKIP_COLUMNS)
    metrics = distance_metrics(df["distance_km"].to_numpy(dtype=np.float64))
    answered = df[["pred_lat", "pred_lng"]].notna().all(axis=1).to_numpy()
    metrics["n_unanswered"] = int((~answered).sum())
    df = df[answered] if not answered.all() else df  # region accuracies: over the photos that have an answer
    metrics["n_skipped"] = int(len(sk))
    metrics["skipped_by_reason"] = {str(k): int(v) for k, v in sk["reason"].value_counts().sort_index().items()}
    if country_of is not None and len(df):
        true = country_of(df[["true_lat", "true_lng"]].to_numpy(dtype=np.float64))
        guess = country_of(df[["pred_lat", "pred_lng"]].to_numpy(dtype=np.float64))
        metrics.update(country_accuracy(true, guess))
    if admin_of is not None and len(df):
        true_c, true_a = admin_of.lookup(df[["true_lat", "true_lng"]].to_numpy(dtype=np.float64))
        pred_c, pred_a = admin_of.lookup(df[["pred_lat", "pred_lng"]].to_numpy(dtype=np.float64))
        metrics.update(country_accuracy(true_c, pred_c))
        metrics.update(admin1_accuracy(true_a, pred_a))
    if "area_to_cover_km2" in df.columns and len(df):
        correct = df["cell_top1"].to_numpy(np.int64) == df["true_cell"].to_numpy(np.int64)
        area = df["area_to_cover_km2"].to_numpy(np.float64)
        cal = expected_calibration_error(df["cell_top1_prob"].to_numpy(np.float64), correct)
        _, at = recall_vs_area(area, RECALL_AREAS_KM2)
        if UNCALIBRATED_COLUMN in df.columns:
            raw = expected_calibration_error(df[UNCALIBRATED_COLUMN].to_numpy(np.float64), correct)
            metrics.update(ece_top1_uncalibrated=raw["ece"], calibration_bins_uncalibrated=raw["bins"])
        metrics.update({
            "acc_cell_top1": float(100.0 * correct.mean()),
            "ece_top1": cal["ece"], "calibration_bins": cal["bins"],
            "recall_area_auc": recall_area_auc(area), "median_area_to_cover_km2": float(np.median(area)),
            "median_true_cell_rank": float(np.median(df["true_cell_rank"].to_numpy(np.float64))),
            "recall_at_area": {f"{a:.0e}": float(r) for a, r in zip(RECALL_AREAS_KM2, at)},
        })
    return metrics


TABLE_HEADER = ("| Method | Street 1 km | City 25 km | Region 200 km | Country 750 km | Continent 2500 km "
                "| Median km | GeoScore | n |\n|---|---|---|---|---|---|---|---|---|\n")


def table_row(name: str, m: dict) -> str:
    """One row of the standard table (accuracies in percent)."""
    accs = " | ".join(f"{m[f'acc_{t}km']:.1f}" for t in THRESHOLDS_KM)
    return f"| {name} | {accs} | {m['median_km']:.0f} | {m['geoscore']:.0f} | {m['n']} |\n"


def results_markdown(metrics: dict) -> str:
    """``results.md``: the standard table for one run, with what it was run on."""
    ds = metrics["dataset"]
    lines = [f"# {metrics['predictor']['name']} on {ds['name']}\n\n"]
    if ds.get("synthetic"):
        lines.append("> **SYNTHETIC DATA.** These images are generated from real geography at real photo "
                     "locations; they are not photographs, and these numbers say nothing about real photos.\n\n")
    lines.append(TABLE_HEADER)
    lines.append(table_row(metrics["predictor"]["name"], metrics))
    lines.append(f"\nAccuracy is the percentage of photos within each great-circle distance (hit: distance <= "
                 f"threshold, Earth radius 6371.0088 km). GeoScore = mean 5000 exp(-d / 1492.7 km). "
                 f"n = {metrics['n']} scored, {metrics['n_skipped']} skipped")
    if metrics["n_skipped"]:
        lines.append(f" ({', '.join(f'{k}: {v}' for k, v in metrics['skipped_by_reason'].items())})")
    lines.append(".\n")
    if metrics.get("n_unanswered"):
        lines.append(f"{metrics['n_unanswered']} photo(s) had no answer from the predictor and are scored as failures "
                     f"(error {UNANSWERED_KM:,.0f} km, half the Earth's circumference).\n")
    decode = metrics["predictor"].get("decode")
    if decode and decode != "argmax":
        lines.append(f"Answers chosen for the metric: decode={decode}, the candidate point with the best expected "
                     f"score under the predicted distribution over the top {metrics['predictor'].get('candidates')} "
                     "cells (not the most probable cell's).\n")
    if metrics["predictor"].get("random_clip"):
        lines.append("\n> **RANDOM CLIP WEIGHTS.** This GeoCLIP model ran with randomly initialised CLIP weights to "
                     "test the code path: its numbers are not GeoCLIP's and say nothing about accuracy.\n\n")
    if "acc_country" in metrics:
        lines.append(f"Country accuracy: {metrics['acc_country']:.1f}% over the {metrics['n_country']} photos "
                     "whose true and predicted countries are both known.\n")
    if "acc_admin1" in metrics:
        lines.append(f"Admin-1 (region) accuracy: {metrics['acc_admin1']:.1f}% over the {metrics['n_admin1']} "
                     "photos whose true and predicted regions are both known.\n")
    if "acc_cell_top1" in metrics:
        temperature = metrics["predictor"].get("cell_temperature")
        before = (f", {metrics['ece_top1_uncalibrated']:.3f} before the calibration temperature {temperature:.3g}"
                  if "ece_top1_uncalibrated" in metrics and temperature is not None else "")
        lines.append(
            f"\nGeocells: top-1 cell accuracy {metrics['acc_cell_top1']:.1f}%, median rank of the true cell "
            f"{metrics['median_true_cell_rank']:.0f}; calibration of the top-1 cell probability: ECE "
            f"{metrics['ece_top1']:.3f}{before} (15 equal-width bins); Recall-vs-Area: area under the curve "
            f"{metrics['recall_area_auc']:.3f} (log area from 1 km² to the whole Earth), median area to "
            f"search before the truth is covered {metrics['median_area_to_cover_km2']:,.0f} km².\n")
    for fig in metrics.get("figures", []):
        lines.append(f"\n![{fig}]({fig})")
    if metrics.get("figures"):
        lines.append("\n")
    lines.append(f"\nData: `{ds['source']}`.")
    for note in ds.get("notes", []):
        lines.append(f"\n- {note}")
    lines.append(f"\n\nRun: {metrics['finished_at']} on {metrics['machine']}.\n")
    return "".join(lines)


def evaluate(source: ItemSource, predictor: Predictor, output_dir: str | Path, *, batch_size: int = 64,
             resume: bool = True, progress: bool = True,
             country_of: Callable[[np.ndarray], np.ndarray] | None = None, admin_of=None,
             plots: bool = False) -> dict:
    """Runs ``predictor`` on ``source``, writes predictions, metrics.json and results.md; returns metrics.

    ``country_of``/``admin_of``: see :func:`score`; ``plots``: also write the PNG figures.
    """
    out = Path(output_dir)
    info = {"dataset": source.name, "source": getattr(source, "source", source.name),
            "predictor": predictor.describe()}
    started = time.perf_counter()
    run_predictions(source, predictor, out, batch_size=batch_size, resume=resume, progress=progress,
                    run_info=info)
    metrics = score(out, country_of=country_of, admin_of=admin_of)
    generated = generated_claim_counts(out / "explanations.jsonl")
    if generated:
        metrics["generated_claims"] = generated
    metrics["dataset"] = {"name": source.name, "source": info["source"], "synthetic": bool(source.synthetic),
                          "notes": list(getattr(source, "notes", []))}
    metrics["predictor"] = predictor.describe()
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    metrics["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    metrics["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    if plots and metrics["n"]:
        from geoloc.evaluation.plots import evaluation_plots

        metrics["figures"] = [p.name for p in evaluation_plots(out, metrics)]
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "results.md", results_markdown(metrics))
    return metrics
