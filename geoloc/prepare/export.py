"""Export a checkpoint as one TorchScript file that others embed without geoloc.

    python -m geoloc export ckpt=RUN/checkpoints/best.ckpt out=model.pt [topk=5] [prototypes=true index=DIR]

See :mod:`geoloc.inference.export` for what the file holds and how to use it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from geoloc.cli import run_step
from geoloc.inference.export import export


def main(cfg) -> Path:
    """Exports ``ckpt`` to ``out`` and runs the written file once on random images as a check."""
    path, meta = export(cfg.ckpt, cfg.out, topk=cfg.topk, prototypes=cfg.prototypes, index=cfg.index,
                        candidates=cfg.candidates, temperature=cfg.temperature)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m = torch.jit.load(str(path))
    h, w = meta["preprocess"]["input_size"][1:]
    out = m(torch.randint(0, 256, (2, 3, h + 17, w + 5), dtype=torch.uint8))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {meta['backbone']}, {meta['num_cells']} cells"
          f"{', prototypes' if meta['prototypes'] else ''}; check: latlng {tuple(out['latlng'].shape)}, "
          f"topk_cells {tuple(out['topk_cells'].shape)}")
    return path


def run():
    return run_step("export", main, "geoloc export")


if __name__ == "__main__":
    run()
