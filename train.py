"""Train a geolocator (Hydra + PyTorch Lightning).

    python train.py experiment=demo                        # the embedded sample, a small CPU model
    python train.py data=shards data.dir=SHARDS cells=cells.parquet backbone=vit_large_clip trainer=gpu
    python train.py ... trainer=ddp trainer.devices=8 trainer.num_nodes=2       # several GPUs / nodes
    python train.py ... trainer=ddp_cpu                    # 2 CPU processes (gloo), to try DDP anywhere
    python train.py ... ckpt_path=last                     # resume the run in output_dir exactly

The number of geocells comes from the cells file (``cells=...``), never from the config.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from geoloc.cells import Geocells
from geoloc.evidence.labels import evidence_head_sizes
from geoloc.models.geolocator import GeoLocator


def _resolve_ckpt(ckpt_path: str | None, output_dir: Path) -> str | None:
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None  # nothing to resume yet: start afresh
    return ckpt_path


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Builds everything from the config and fits.

    Returns:
        ``(metrics, objects)``: the trainer's final callback metrics (floats) and the built objects
        (``cfg``, ``cells``, ``model``, ``module``, ``datamodule``, ``trainer``).
    """
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.output_dir)
    cells = Geocells.load(cfg.cells)
    backbone = hydra.utils.instantiate(cfg.backbone)
    location_encoder = hydra.utils.instantiate(cfg.model.location_encoder)
    if cfg.model.geoclip_weights:
        from geoloc.models.location_encoder import load_geoclip_weights

        load_geoclip_weights(location_encoder)
    evidence = dict(cfg.model.get("evidence") or {})
    heads = evidence_head_sizes(evidence)
    net = GeoLocator(backbone, location_encoder, num_cells=len(cells), dropout=cfg.model.dropout,
                     evidence_heads=heads)
    module = hydra.utils.instantiate(cfg.model.module, model=net, evidence_weights=evidence,
                                     cell_centroids=torch.tensor(cells.centroids, dtype=torch.float32))
    datamodule = hydra.utils.instantiate(cfg.data.datamodule, cells_path=str(cfg.cells))
    datamodule.set_data_config(backbone.data_config)
    datamodule.set_evidence_heads(heads)
    loggers = [hydra.utils.instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                                                  default_root_dir=str(output_dir))
    if trainer.global_rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resolve_ckpt(cfg.ckpt_path, output_dir))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    objects = {"cfg": cfg, "cells": cells, "model": net, "module": module, "datamodule": datamodule,
               "trainer": trainer}
    return metrics, objects


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    metrics, _ = train(cfg)
    shown = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith("val/")}
    print(f"done: {shown}")


if __name__ == "__main__":
    main()
