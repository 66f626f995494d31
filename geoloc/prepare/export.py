"""Export a checkpoint as one TorchScript (or ONNX) file that others embed without geoloc.

    python -m geoloc export ckpt=RUN/checkpoints/best.ckpt out=model.pt [topk=5] [refine=prototypes+evidence]
    python -m geoloc export ckpt=... out=model.pt prototypes=true index=DIR    # = refine=prototypes
    python -m geoloc export ckpt=... out=model.onnx format=onnx               # or format=both: model.pt + .onnx

The file reranks as the predictor of ``conf/export.yaml`` (``predictor.*``: fusion weights, temperatures,
evidence weights) does. See :mod:`geoloc.inference.export` for what it holds and how to use it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from geoloc.cli import run_step
from geoloc.inference.export import ONNX_OPSET, export, export_onnx

FORMATS = ("torchscript", "onnx", "both")


def main(cfg) -> Path:
    """Builds the predictor, exports it to ``out`` (``format``) and runs each written file once on random images
    as a check (the ONNX one through onnxruntime)."""
    import hydra

    from geoloc.inference.predictor import refine_name, refine_scorers
    from geoloc.retrieval.index import default_index_dir

    names = list(refine_scorers(cfg.refine))
    if cfg.prototypes and "prototypes" not in names:
        names.insert(0, "prototypes")
    extra = {"refine": refine_name(names)}
    if "prototypes" in names and not cfg.predictor.index:
        extra["index"] = str(default_index_dir(cfg.ckpt))  # named: a missing index is an error, not a fall-back
    fmt = str(cfg.get("format", "torchscript"))
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    predictor = hydra.utils.instantiate(cfg.predictor, **extra)
    if fmt in ("onnx", "both"):
        onnx_out = Path(cfg.out) if fmt == "onnx" else Path(cfg.out).with_suffix(".onnx")
        onnx_path, meta = export_onnx(predictor, onnx_out)
        _check_onnx(onnx_path, meta)
        if fmt == "onnx":
            return onnx_path
    path, meta = export(predictor, cfg.out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m = torch.jit.load(str(path))
    h, w = meta["preprocess"]["input_size"][1:]
    out = m(torch.randint(0, 256, (2, 3, h + 17, w + 5), dtype=torch.uint8))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {meta['backbone']}, {meta['num_cells']} cells, "
          f"refine={meta['refine']}; check: latlng {tuple(out['latlng'].shape)}, "
          f"topk_cells {tuple(out['topk_cells'].shape)}")
    return path


def _check_onnx(path: Path, meta: dict) -> None:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    h, w = meta["preprocess"]["input_size"][1:]
    images = np.random.default_rng(0).integers(0, 256, (2, 3, h + 17, w + 5), dtype=np.uint8)
    out = dict(zip(meta["output_names"], session.run(None, {"images": images})))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, ONNX opset {ONNX_OPSET}): "
          f"{meta['backbone']}, {meta['num_cells']} cells, refine={meta['refine']}; onnxruntime check: latlng "
          f"{tuple(out['latlng'].shape)}, topk_cells {tuple(out['topk_cells'].shape)}")


def run():
    return run_step("export", main, "geoloc export")


if __name__ == "__main__":
    run()
