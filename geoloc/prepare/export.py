"""Export a checkpoint as one TorchScript file that others embed without geoloc.

    python -m geoloc export ckpt=RUN/checkpoints/best.ckpt out=model.pt [topk=5] [refine=prototypes+evidence]
    python -m geoloc export ckpt=... out=model.pt prototypes=true index=DIR    # = refine=prototypes

The file reranks as the predictor of ``conf/export.yaml`` (``predictor.*``: fusion weights, temperatures,
evidence weights) does. See :mod:`geoloc.inference.export` for what it holds and how to use it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from geoloc.cli import run_step
from geoloc.inference.export import export


def main(cfg) -> Path:
    """Builds the predictor, exports it to ``out`` and runs the written file once on random images as a check."""
    import hydra

    from geoloc.inference.predictor import refine_name, refine_scorers
    from geoloc.retrieval.index import default_index_dir

    names = list(refine_scorers(cfg.refine))
    if cfg.prototypes and "prototypes" not in names:
        names.insert(0, "prototypes")
    extra = {"refine": refine_name(names)}
    if "prototypes" in names and not cfg.predictor.index:
        extra["index"] = str(default_index_dir(cfg.ckpt))  # named: a missing index is an error, not a fall-back
    predictor = hydra.utils.instantiate(cfg.predictor, **extra)
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


def run():
    return run_step("export", main, "geoloc export")


if __name__ == "__main__":
    run()
