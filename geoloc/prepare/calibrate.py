"""A temperature for a checkpoint's cell probabilities, fitted on validation photos.

    python -m geoloc calibrate ckpt=RUN/checkpoints/best.ckpt data=sample data.split=val
    python -m geoloc calibrate ckpt=... data=im2gps3k data.root=DIR data.folds=5 data.fold=3 [out=PATH]
    python -m geoloc calibrate predictor=geoclip predictor.clip_weights=DIR data=... out=geoclip_calibration_v1.json

Runs the network once over the photos, fits ``T`` by the exact minimum of the NLL of the true cells
(:func:`geoloc.inference.calibration.fit_temperature`) and writes ``RUN/calibration_v1.json`` (or ``out=``)
atomically, bound to the network weights; see :mod:`geoloc.inference.calibration` for the format. Every
predictor of the run uses it from then on (``predictor.calibration=auto``, the default;
``predictor.calibration=null`` turns it off) and ``python -m geoloc export`` carries it. The photos must be
ones the network was not trained on (a validation split or fold): on training photos the fit would make
an overfitted model look even more certain.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from geoloc.artifacts import atomic_write_json
from geoloc.cli import run_step
from geoloc.inference.calibration import (
    CALIBRATION_FORMAT_VERSION,
    DEFAULT_BOUNDS,
    default_calibration_path,
    fit_temperature,
    network_fingerprint,
)

#: The predictor builders whose networks can be calibrated.
MODEL_TARGETS = ("geoloc.inference.predictor.build_predictor", "geoloc.inference.geoclip.build_geoclip_predictor")


def _softmax_top1(z: np.ndarray, temperature: float) -> np.ndarray:
    """``(N,)`` the largest probability of each row of ``softmax(z / T)``."""
    u = z / temperature
    u = u - u.max(axis=1, keepdims=True)
    return 1.0 / np.exp(u).sum(axis=1)


def calibrate(predictor, source, *, out: str | Path | None = None, bounds=DEFAULT_BOUNDS, batch_size: int = 64,
              progress: bool = False) -> tuple[dict, Path]:
    """Fits the cell temperature of ``predictor``'s network on ``source`` and writes the calibration file.

    Args:
        predictor: an uncalibrated :class:`~geoloc.inference.predictor.ModelPredictor` (``calibration=None``).
        source: the validation photos (an :class:`~geoloc.data.readers.ItemSource` with images).
        out: the file; None: ``RUN/calibration_v1.json`` beside the checkpoint's ``checkpoints/`` folder.
        bounds: ``(T_min, T_max)`` searched.
        batch_size: photos per forward pass.
        progress: show a progress bar.

    Returns:
        ``(record, path)``: what was written (the format of :mod:`geoloc.inference.calibration`) and where.

    Raises:
        ValueError: a calibrated or non-model predictor, a source without photos, no usable photo, or no
            ``out`` for a network that has no run folder.
    """
    from geoloc.data.images import SkipReport
    from geoloc.evaluation.metrics import expected_calibration_error

    if not hasattr(predictor, "forward") or not hasattr(predictor, "net"):
        raise ValueError(f"{getattr(predictor, 'name', predictor)}: calibrate needs a model predictor "
                         "(predictor=model ckpt=... or predictor=geoclip), not a baseline")
    if getattr(predictor, "calibration", None) is not None:
        raise ValueError("calibrate fits the network's own probabilities: build the predictor with calibration=None "
                         f"(it has {predictor.calibration.source or predictor.calibration.temperature})")
    ckpt = Path(predictor.ckpt)
    if out is None:
        if not ckpt.is_file():
            raise ValueError(f"{ckpt}: no run folder to write the calibration into; give out=PATH")
        out = default_calibration_path(ckpt)
    skipped = SkipReport()
    logits, latlng, batch = [], [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(source), desc=f"calibrate on {source.name}", unit="img", dynamic_ncols=True)

    def run(items):
        if any(it.image is None for it in items):
            raise ValueError(f"{source.name}: read without images (data.images=null?); calibrate needs the photos")
        logits.append(predictor.forward([it.image for it in items])["cell_logits"].astype(np.float32))
        latlng.extend(it.latlng for it in items)
        if bar is not None:
            bar.update(len(items))

    for it in source.iter_items(skipped):
        batch.append(it)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    if bar is not None:
        bar.close()
    if not latlng:
        raise ValueError(f"{source.name}: no usable photos to calibrate on (skipped: {dict(skipped.counts)})")
    z = np.concatenate(logits).astype(np.float64)  # (N, C)
    true = predictor.cells.assign(np.asarray(latlng, np.float64))
    fit = fit_temperature(z, true, bounds=bounds)
    t = fit["temperature"]
    correct = z.argmax(axis=1) == true  # the same top cell at every temperature
    ece_before = expected_calibration_error(_softmax_top1(z, 1.0), correct)["ece"]
    ece_after = expected_calibration_error(_softmax_top1(z, t), correct)["ece"]
    record = {
        "kind": "calibration", "format_version": CALIBRATION_FORMAT_VERSION,
        "fingerprint": network_fingerprint(predictor.net),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "temperature": t, "nll_before": fit["nll_before"], "nll_after": fit["nll_after"],
        "ece_before": ece_before, "ece_after": ece_after, "acc_cell_top1": float(100.0 * correct.mean()),
        "n": fit["n"], "n_skipped": len(skipped.items),
        "skipped_by_reason": {str(k): int(v) for k, v in sorted(skipped.counts.items())},
        "dataset": source.name, "source": str(getattr(source, "source", source.name)),
        "synthetic": bool(getattr(source, "synthetic", False)),
        "ckpt": str(ckpt.resolve()) if ckpt.is_file() else str(ckpt),
        "cells_fingerprint": predictor.cells.fingerprint(), "n_cells": len(predictor.cells),
        "bounds": [float(b) for b in bounds], "iterations": fit["iterations"], "at_bound": fit["at_bound"],
    }
    atomic_write_json(out, record)
    return record, Path(out)


def summary(record: dict, path: Path) -> str:
    """What a run fitted, in a few lines."""
    lines = [f"cell temperature {record['temperature']:.4g} fitted on {record['n']} photos of {record['dataset']} "
             f"({record['n_skipped']} skipped)" + (" (at the search bound)" if record["at_bound"] else ""),
             f"NLL of the true cell {record['nll_before']:.4f} -> {record['nll_after']:.4f} nats; ECE of the top-1 "
             f"cell {record['ece_before']:.4f} -> {record['ece_after']:.4f} (top-1 cell accuracy "
             f"{record['acc_cell_top1']:.1f}%)",
             f"calibration: {path}"]
    return "\n".join(lines)


def main(cfg) -> dict:
    """Builds the (uncalibrated) predictor and the photos from the config, fits and writes the temperature."""
    import hydra

    target = str(cfg.predictor.get("_target_", ""))
    if target not in MODEL_TARGETS:
        raise ValueError(f"calibrate needs a model predictor (predictor=model ckpt=... or predictor=geoclip), not "
                         f"predictor={cfg.predictor.get('name')} ({target})")
    predictor = hydra.utils.instantiate(cfg.predictor, calibration=None)
    source = hydra.utils.instantiate(cfg.data.dataset)
    record, path = calibrate(predictor, source, out=cfg.out, bounds=tuple(cfg.bounds), batch_size=cfg.batch_size,
                             progress=cfg.progress)
    print(summary(record, path))
    return record


def run():
    return run_step("calibrate", main, "geoloc calibrate")


if __name__ == "__main__":
    run()
