"""Combine evaluation runs into one standard table.

    python -m geoloc report OUT_A OUT_B ... --out results.md

Each OUT is a folder written by ``evaluate.py`` (it reads ``OUT/metrics.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from geoloc.artifacts import atomic_write_text
from geoloc.cli import user_errors
from geoloc.evaluation.engine import TABLE_HEADER, table_row


def _answer_note(run: dict) -> str:
    """How a run chose its answers and scaled its cell probabilities, when not the defaults ("" otherwise)."""
    p = run.get("predictor") or {}
    notes = []
    if p.get("decode") not in (None, "argmax"):
        notes.append(f"decode={p['decode']} over {p.get('candidates')} candidate cells")
    t = p.get("cell_temperature")
    if t not in (None, 1.0):
        ece = (f" (top-1 ECE {run['ece_top1_uncalibrated']:.3f} -> {run['ece_top1']:.3f})"
               if run.get("ece_top1_uncalibrated") is not None and run.get("ece_top1") is not None else "")
        notes.append(f"cell temperature {t:.3g}{ece}")
    return f"{p.get('name')}: {', '.join(notes)}" if notes else ""


def combined_table(run_dirs: list[str | Path]) -> str:
    """Markdown: one row per run, grouped by dataset, with a synthetic-data banner where it applies."""
    runs = []
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no metrics.json (run evaluate.py with output_dir={d} first)")
        runs.append(json.loads(path.read_text()))
    parts = []
    for name in dict.fromkeys(r["dataset"]["name"] for r in runs):
        group = [r for r in runs if r["dataset"]["name"] == name]
        parts.append(f"## {name}\n\n")
        if any(r["dataset"].get("synthetic") for r in group):
            parts.append("> **SYNTHETIC DATA.** Generated images at real photo locations, not photographs: "
                         "these numbers check the pipeline, they say nothing about real photos.\n\n")
        parts.append(TABLE_HEADER)
        for r in group:
            parts.append(table_row(r["predictor"]["name"], {k: (float("nan") if v is None else v)
                                                            for k, v in r.items()}))
        answers = [_answer_note(r) for r in group]
        if any(answers):
            parts.append("\nAnswers and calibration: " + "; ".join(a for a in answers if a) + ".\n")
        skipped = {r["predictor"]["name"]: r["n_skipped"] for r in group if r["n_skipped"]}
        if skipped:
            parts.append(f"\nSkipped photos: {skipped}.\n")
        parts.append("\n")
    parts.append("Accuracy: % of photos within the distance (great circle, R = 6371.0088 km, hit if <=). "
                 "GeoScore: mean 5000 exp(-d / 1492.7 km).\n")
    return "".join(parts)


@user_errors("geoloc.evaluation.report")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("runs", nargs="+", help="evaluate.py output folders")
    parser.add_argument("--out", help="write the table here (atomically) as well as printing it")
    parser.add_argument("--require-better", nargs=2, metavar=("RUN", "BASELINE"),
                        help="exit 1 unless RUN has a higher GeoScore and a lower median error than BASELINE")
    args = parser.parse_args(argv)
    text = combined_table(args.runs)
    if args.out:
        atomic_write_text(args.out, text)
    print(text, end="")
    if args.require_better:
        a, b = (json.loads((Path(d) / "metrics.json").read_text()) for d in args.require_better)
        ok = a["geoscore"] > b["geoscore"] and a["median_km"] < b["median_km"]
        verdict = "beats" if ok else "does NOT beat"
        print(f"\n{a['predictor']['name']} {verdict} {b['predictor']['name']}: GeoScore {a['geoscore']:.0f} vs "
              f"{b['geoscore']:.0f}, median {a['median_km']:.0f} vs {b['median_km']:.0f} km")
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
