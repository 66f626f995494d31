"""Training speed: Lightning overhead per step, and whether the data pipeline keeps up.

    .venv/bin/python bench/bench_train.py [--steps 30] [--batch 64]

1. Step overhead: our LightningModule trained by ``pl.Trainer`` against a bare PyTorch loop running the
   very same forward, losses, backward and AdamW step on the same batch (target ratio <= 1.15); and,
   for reference, against a bare step of the backbone with a plain classifier head.
2. Data pipeline: decode + GeoCLIP augmentation from webdataset shards in one process (one core),
   in images per second, against the training step's images per second (target >= 2x).
3. Precision: the Lightning step in ``bf16-mixed`` against ``32-true`` on the demo model and on a ViT-S/16
   at 224 px (target >= 1.8x), the same batch and fresh weights for each.

Uses the demo model (``experiment=demo``: ViT 4 blocks x 192 on 64 px) and the embedded sample.
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _cfg(cells: Path, out: Path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=demo", f"cells={cells}", f"output_dir={out}",
                                                      "logger=none", "trainer.enable_progress_bar=false"])


def _build(cfg, cells):
    """The demo's network and LightningModule, built from their config nodes as train.py builds them."""
    import hydra

    net = hydra.utils.instantiate(cfg.model.net, num_cells=len(cells), evidence_heads=None)
    module = hydra.utils.instantiate(cfg.model.module, model=net, cells=cells, evidence_weights=None)
    return net.image_encoder, module


class _FixedBatches(torch.utils.data.IterableDataset):
    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __iter__(self):
        for _ in range(self.n):
            yield self.batch


def _lightning_step_s(module, batch, steps: int, precision: str, warm: int = 3) -> float:
    """Seconds per ``pl.Trainer`` step of ``module`` on a fixed batch, in ``precision``."""

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, b_, i):
            if i == warm:
                self.t = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.s = (time.perf_counter() - self.t) / steps

    timer = Timer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=warm + steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[timer], precision=precision)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_FixedBatches(batch, warm + steps),
                                                                      batch_size=None))
    return timer.s


def _precision_ratio(cfg, cells, batch, steps: int) -> dict:
    """The training step in 32-true and in bf16-mixed (fresh modules, same batch), and their ratio."""
    out = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        _, module = _build(cfg, cells)
        out[precision] = round(_lightning_step_s(module, batch, steps, precision), 4)
    out["speedup"] = round(out["32-true"] / out["bf16-mixed"], 2)
    out["batch"] = len(batch["latlng"])
    return out


def sample_cells(tmp: Path):
    """The embedded sample's training split and geocells built from it (25-200 points per cell) in ``tmp``:
    ``(dataset, cells path)``."""
    from geocells.boundaries import load_boundaries
    from geocells.build import build_geocells, write_geocells
    from geoloc.data.readers import read_sample

    train_ds = read_sample(split="train")
    cells_gdf, _ = build_geocells(train_ds.latlng, load_boundaries(), min_points=25, max_points=200)
    return train_ds, write_geocells(cells_gdf, tmp / "cells.parquet", meta={"scheme": "semantic"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)

    from geoloc.data.shards import make_webdataset, write_shards
    from geoloc.data.transforms import train_transform
    from geoloc.geo.cells import Geocells
    from geoloc.training.datamodule import Collate

    tmp = Path(tempfile.mkdtemp(prefix="bench_train."))
    train_ds, cells_path = sample_cells(tmp)
    cells = Geocells.load(cells_path)
    cfg = _cfg(cells_path, tmp / "run")
    backbone, module = _build(cfg, cells)
    data_config = backbone.data_config
    size = data_config["input_size"][-1]
    b = args.batch
    batch = {"image": torch.randn(b, 3, size, size), "latlng": torch.tensor(train_ds.latlng[:b], dtype=torch.float32),
             "cell": torch.from_numpy(cells.assign(train_ds.latlng[:b]))}
    n, warm = args.steps, 5

    # (a) bare loop: the same model, losses and optimizer, no Lightning
    opt = module.optimizer_factory([p for p in module.parameters() if p.requires_grad])
    module.train()
    for i in range(warm + n):
        if i == warm:
            t = time.perf_counter()
        out = module.model(batch["image"])
        loss = module._losses(batch, out)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        module.queue.enqueue(batch["latlng"])
    bare_s = (time.perf_counter() - t) / n

    # (b) bare backbone + linear head + cross-entropy
    head = torch.nn.Linear(backbone.num_features, len(cells))
    opt2 = torch.optim.AdamW(list(backbone.parameters()) + list(head.parameters()), lr=1e-3)
    for i in range(warm + n):
        if i == warm:
            t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(head(backbone(batch["image"])), batch["cell"])
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        opt2.step()
    backbone_s = (time.perf_counter() - t) / n

    # (c) Lightning: the same module under pl.Trainer (fresh weights, same shapes)
    _, module2 = _build(cfg, cells)
    lightning_s = _lightning_step_s(module2, batch, n, "32-true", warm=warm)

    # (d) data pipeline on one core: decode + augment from shards
    shards = tmp / "shards"
    write_shards(train_ds, shards, split="train", max_count=500)
    collate = Collate(cells)
    stream = make_webdataset(sorted(str(p) for p in shards.glob("train-*.tar")), shuffle=256,
                             transform=train_transform(data_config))
    loader = torch.utils.data.DataLoader(stream, batch_size=b, num_workers=0, collate_fn=collate)
    torch.set_num_threads(1)
    t = time.perf_counter()
    n_img = 0
    for xb in loader:
        n_img += len(xb["key"])
    data_ips = n_img / (time.perf_counter() - t)
    torch.set_num_threads(os.cpu_count() or 1)

    # (e) bf16-mixed against fp32: the same Lightning step, on the demo model and on a ViT-S/16 at 224 px
    precision = {"demo": _precision_ratio(cfg, cells, batch, n)}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        vit_cfg = compose(config_name="train", overrides=["experiment=demo", "backbone=vit_small",
                                                          "backbone.pretrained=false", f"cells={cells_path}",
                                                          f"output_dir={tmp / 'vit'}", "logger=none"])
    vit_b = 16
    vit_batch = {"image": torch.randn(vit_b, 3, 224, 224), "latlng": batch["latlng"][:vit_b],
                 "cell": batch["cell"][:vit_b]}
    precision["vit_small_patch16_224"] = _precision_ratio(vit_cfg, cells, vit_batch, max(n // 3, 5))

    step_ips = b / lightning_s
    res = {
        "machine": {"cores": os.cpu_count(), "arch": platform.machine()},
        "model": {"backbone": cfg.backbone.name, "img_size": size, "params_m": round(
            sum(p.numel() for p in module.parameters()) / 1e6, 2), "n_cells": len(cells), "batch": b},
        "step_s": {"lightning": round(lightning_s, 4), "bare_same_model": round(bare_s, 4),
                   "bare_backbone_ce": round(backbone_s, 4)},
        "overhead_ratio_vs_bare_same_model": round(lightning_s / bare_s, 3),
        "ratio_vs_bare_backbone_ce": round(lightning_s / backbone_s, 3),
        "data_images_per_s_one_core": round(data_ips, 1),
        "train_images_per_s": round(step_ips, 1),
        "data_over_train_ratio": round(data_ips / step_ips, 2),
        "targets": {"overhead_ratio": 1.15, "data_over_train_ratio": 2.0, "bf16_over_fp32": 1.8},
        "bf16_mixed_vs_fp32": precision,
    }
    from geoloc.artifacts import atomic_write_json

    atomic_write_json(HERE / "results" / "train.json", res)
    for k, v in res.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
