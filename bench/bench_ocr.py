"""The OCR stage on real photos, per engine: how many show legible text, whether the script read is the main script
of the photo's country, and the time per photo.

    .venv/bin/python bench/bench_ocr.py [--fold 4] [--tune-fold 3] [--engines tesseract rapidocr]

Photos: Im2GPS3k dev folds (photographer-disjoint, as in bench_evidence.py). Truth: the main script of the country
at the photo's coordinates (:func:`geoloc.evidence.labels.evidence_labels`, ``script``); photos whose country has
none are left out of the match. Each engine's lines are read once per fold and cached in
``outputs/ocr/<engine>-fold<k>.json`` (OCR is slow); the confidence below which a line is no evidence is
chosen on ``--tune-fold`` (most right minus wrong script claims) and reported on ``--fold`` beside the engine's
default. An engine that is not installed is reported as skipped, with the reason. Writes bench/results/ocr.json.
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
from bench_study import SHARED  # noqa: E402

THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def _fold(fold: int):
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_im2gps
    from geoloc.evidence.labels import evidence_labels

    items = list(read_im2gps(SHARED / "im2gps3k-dev", folds=5, fold=fold).iter_items(SkipReport()))
    return items, evidence_labels(np.asarray([it.latlng for it in items]))["script"].to_numpy()


def read_lines(engine: str, fold: int, items, cache: Path) -> dict:
    """``{"lines": per photo [(text, confidence)], "ms_per_photo", ...}`` for one engine and fold (cached)."""
    from geoloc.evidence.ocr import TextReader

    path = cache / f"{engine}-fold{fold}.json"
    if path.is_file():
        return json.loads(path.read_text())
    try:
        reader = TextReader(engine)
    except (ImportError, RuntimeError) as e:
        return {"skipped": str(e)}
    t = time.perf_counter()
    lines = [reader.read(it.image) for it in items]
    out = {"lines": lines, "ms_per_photo": round(1000 * (time.perf_counter() - t) / max(len(items), 1), 1),
           "default_min_confidence": reader.engine.min_confidence}
    if engine == "tesseract":
        out["languages"] = reader.engine.langs
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, ensure_ascii=False))
    return out


def score(lines: list, truth: np.ndarray, min_confidence: float) -> dict:
    from geoloc.evidence.labels import HEADS
    from geoloc.evidence.ocr import script_evidence

    found = [script_evidence([tuple(x) for x in ls], min_confidence) for ls in lines]
    with_text = [i for i, f in enumerate(found) if f]
    known = [i for i in with_text if truth[i] >= 0]
    match = [i for i in known if found[i]["script"] == HEADS["script"][truth[i]]]
    scripts: dict[str, int] = {}
    for i in with_text:
        scripts[found[i]["script"]] = scripts.get(found[i]["script"], 0) + 1
    return {"min_confidence": min_confidence, "photos": len(lines), "with_legible_text": len(with_text),
            "scripts_read": dict(sorted(scripts.items())), "with_text_and_country_script": len(known),
            "script_is_the_country_main_script": len(match),
            "share_matching": round(len(match) / len(known), 3) if known else None,
            "examples": [found[i]["text"][:2] for i in with_text[:8]]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fold", type=int, default=4)
    parser.add_argument("--tune-fold", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["tesseract", "rapidocr"])
    parser.add_argument("--cache", default=str(HERE.parent / "outputs" / "ocr"))
    args = parser.parse_args()
    cache = Path(args.cache)
    test_items, test_truth = _fold(args.fold)
    tune_items, tune_truth = _fold(args.tune_fold)
    engines = {}
    for engine in args.engines:
        tune = read_lines(engine, args.tune_fold, tune_items, cache)
        if "skipped" in tune:
            engines[engine] = tune
            continue
        test = read_lines(engine, args.fold, test_items, cache)

        def net(r):  # right minus wrong script claims
            return 2 * r["script_is_the_country_main_script"] - r["with_text_and_country_script"]

        chosen = max(THRESHOLDS, key=lambda c: (net(score(tune["lines"], tune_truth, c)), -c))
        engines[engine] = {"ms_per_photo": test["ms_per_photo"], "languages": test.get("languages"),
                           "min_confidence_chosen_on_tune_fold": chosen,
                           "default": score(test["lines"], test_truth, test["default_min_confidence"]),
                           "chosen": score(test["lines"], test_truth, chosen)}
    result = {"data": f"im2gps3k-dev: test fold {args.fold} ({len(test_items)} photos), confidence chosen on fold "
                      f"{args.tune_fold} ({len(tune_items)} photos), 5 photographer-disjoint folds",
              "truth": "the main script of the country at the photo's coordinates",
              "engines": engines, "cores": os.cpu_count(), "machine": platform.machine()}
    from geoloc.artifacts import atomic_write_json

    atomic_write_json(HERE / "results" / "ocr.json", result)
    print(json.dumps(engines, ensure_ascii=False, indent=1)[:6000])


if __name__ == "__main__":
    main()
