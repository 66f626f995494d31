"""ONNX through onnxruntime on this CPU: throughput in fp32 against TorchScript, and int8 where it keeps the answers.

    .venv/bin/python bench/bench_onnx.py [--study outputs/study14] [--batch 32] [--repeats 5]

The model is the evidence study's fold-4 network (bench_study.py's smoothing recipe on frozen EfficientNet-Lite2
ImageNet features, rotation 4; ``--study`` is its output folder), exported whole (preprocessing, encoder,
heads, argmax answer) as TorchScript and as ONNX. On the 1,821 real Im2GPS3k dev photos:

* **throughput**: photos per second at ``--batch`` for TorchScript (torch), ONNX fp32 and ONNX int8
  (onnxruntime), each photo resized to 320x320 uint8 first so that a batch is one array (the models resize and
  crop it themselves); timings alternate between the three in every repeat, the median is kept;
* **agreement**: the top-1 cell of ONNX fp32 and of int8 against TorchScript's, photo by photo at the photo's own
  size, and the largest cell-probability difference of fp32 (target <= 1e-4);
* **int8**: onnxruntime's static quantization (QDQ, per-channel weights, MinMax calibration on 64 photos of the
  *training* folds) of the convolutions and matrix products; the target is the same top-1 cell for >= 99% of
  the photos, and int8 is recommended only when it is met.

Writes bench/results/onnx.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_study import SHARED, rotation  # noqa: E402

TARGET_AGREEMENT = 99.0


def _photos(folds) -> tuple[list[Path], list[str]]:
    from geoloc.data.readers import read_im2gps

    paths, keys = [], []
    for f in folds:
        t = read_im2gps(SHARED / "im2gps3k-dev", folds=5, fold=f, images=None).table
        keys += [str(k) for k in t["key"]]
        paths += [SHARED / "im2gps3k-dev" / "images" / str(k) for k in t["key"]]
    return paths, keys


def _uint8(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image

    im = Image.open(path).convert("RGB")
    if size is not None:
        im = im.resize(size, Image.BILINEAR)
    return np.asarray(im, np.uint8).transpose(2, 0, 1)


class _Calibration:
    """onnxruntime's CalibrationDataReader: one photo (at its own size) per call."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)

    def get_next(self):
        return {"images": _uint8(self.paths.pop())[None]} if self.paths else None

    def rewind(self):  # (called by some onnxruntime versions)
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", default="outputs/study14")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from geoloc.inference.export import export, export_onnx

    study = Path(args.study)
    ckpt = study / "runs" / "r4" / "smooth_tau_km65" / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        sys.exit(f"{ckpt}: not found; run bench/bench_study.py --out {study} first")
    tmp = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    t = time.perf_counter()
    settings = {"cells": str(study / "cells.parquet"), "calibration": None}  # (argmax: calibration changes nothing)
    ts_path, meta = export(ckpt, tmp / "model.pt", **settings)
    ts_s = time.perf_counter() - t
    t = time.perf_counter()
    onnx_path, _ = export_onnx(ckpt, tmp / "model.onnx", **settings)
    onnx_s = time.perf_counter() - t
    train_paths, _ = _photos(rotation(4)[0])
    calib = [train_paths[i] for i in np.random.default_rng(0).choice(len(train_paths), 64, replace=False)]
    int8_path = tmp / "model_int8.onnx"
    t = time.perf_counter()
    quantize_static(str(onnx_path), str(int8_path), _Calibration(calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax)
    quant_s = time.perf_counter() - t
    ts = torch.jit.load(str(ts_path)).eval()
    so = ort.SessionOptions()
    fp32 = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(int8_path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in fp32.get_outputs()]

    def run_ts(x):
        with torch.inference_mode():
            o = ts(torch.from_numpy(x))
        return {k: v.numpy() for k, v in o.items()}

    def run_ort(session):
        return lambda x: dict(zip(names, session.run(None, {"images": x})))

    runners = {"torchscript": run_ts, "onnx_fp32": run_ort(fp32), "onnx_int8": run_ort(int8)}
    # agreement on every dev photo at its own size
    paths, keys = _photos(range(5))
    top = {k: [] for k in runners}
    max_diff = 0.0
    for p in paths:
        x = _uint8(p)[None]
        outs = {k: f(x) for k, f in runners.items()}
        for k in runners:
            top[k].append(int(outs[k]["topk_cells"][0, 0]))
        max_diff = max(max_diff, float(np.abs(outs["onnx_fp32"]["cell_prob"] - outs["torchscript"]["cell_prob"]).max()))
    ref = np.array(top["torchscript"])
    agree = {k: round(100 * float((np.array(v) == ref).mean()), 2) for k, v in top.items() if k != "torchscript"}
    # throughput: the same batches through each, alternating
    batch = np.stack([_uint8(p, (320, 320)) for p in paths[: args.batch]])
    for f in runners.values():
        f(batch)
    times = {k: [] for k in runners}
    for _ in range(args.repeats):
        for k, f in runners.items():
            t = time.perf_counter()
            f(batch)
            times[k].append(time.perf_counter() - t)
    per_s = {k: round(args.batch / statistics.median(v), 1) for k, v in times.items()}
    result = {
        "model": f"{ckpt} ({meta['backbone']}, {meta['num_cells']} cells, refine={meta['refine']}, "
                 f"decode={meta['decode']})",
        "photos": len(paths), "batch": args.batch, "batch_photo_size": [320, 320], "repeats": args.repeats,
        "photos_per_second": per_s,
        "ratio_to_torchscript": {k: round(v / per_s["torchscript"], 2) for k, v in per_s.items()},
        "top1_cell_agreement_with_torchscript_percent": agree,
        "onnx_fp32_max_cell_prob_difference": max_diff,
        "int8_target_percent": TARGET_AGREEMENT, "int8_meets_target": agree["onnx_int8"] >= TARGET_AGREEMENT,
        "file_mb": {"torchscript": round(ts_path.stat().st_size / 1e6, 1),
                    "onnx_fp32": round(onnx_path.stat().st_size / 1e6, 1),
                    "onnx_int8": round(int8_path.stat().st_size / 1e6, 1)},
        "export_seconds": {"torchscript": round(ts_s, 1), "onnx": round(onnx_s, 1),
                           "int8_quantization": round(quant_s, 1)},
        "int8": "onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 activations, MinMax calibration "
                "on 64 training-fold photos; Conv, MatMul, Gemm",
        "onnxruntime": ort.__version__, "torch": torch.__version__, "cores": os.cpu_count(),
        "machine": platform.machine(),
    }
    from geoloc.artifacts import atomic_write_json

    atomic_write_json(HERE / "results" / "onnx.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
