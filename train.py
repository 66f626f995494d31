"""Train a geolocator (Hydra + PyTorch Lightning).

    python train.py experiment=demo                        # the embedded sample, a small CPU model
    python train.py data=shards data.dir=SHARDS cells=cells.parquet backbone=vit_large_clip trainer=gpu
    python train.py ... trainer=ddp trainer.devices=8 trainer.num_nodes=2       # several GPUs / nodes
    python train.py ... trainer=ddp_cpu                    # 2 CPU processes (gloo), to try DDP anywhere
    python train.py ... ckpt_path=last                     # resume the run in output_dir exactly

The number of geocells comes from the cells file (``cells=...``), never from the config.

Finished work is never replaced: an ``output_dir`` that holds checkpoints is refused unless the command
resumes that run (``ckpt_path=last``), a resume is checked against the cells and the model before
anything is written, and ``RUN/config.yaml`` is written (atomically) only once training has started.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from geoloc.cli import user_errors
from geoloc.evidence.labels import evidence_head_sizes
from geoloc.geo.cells import Geocells
from geoloc.models.geolocator import GeoLocator

#: Training photos farther than this from every cell are reported (they train on the nearest cell).
FAR_FROM_CELLS_KM = 250.0


def _checkpoints(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "checkpoints").glob("*.ckpt"))


def _resolve_ckpt(ckpt_path: str | None, output_dir: Path) -> str | None:
    """The checkpoint to resume from, refusing anything that would replace an earlier run's checkpoints."""
    existing = _checkpoints(output_dir)
    names = ", ".join(p.name for p in existing)
    if ckpt_path in (None, "", "null"):
        if existing:
            raise ValueError(f"{output_dir}: holds the checkpoints of an earlier run ({names}); training here "
                             "again would replace them. Resume that run with ckpt_path=last, or give another "
                             "output_dir=")
        return None
    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            return str(last)
        if existing:
            raise ValueError(f"{output_dir}/checkpoints: no last.ckpt to resume from, but {names}; resume from one "
                             f"of them with ckpt_path={existing[0]}, or give another output_dir=")
        return None  # nothing to resume yet: start afresh
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (ckpt_path=)")
    if existing and path.resolve().parent != (output_dir / "checkpoints").resolve():
        raise ValueError(f"{output_dir}: holds the checkpoints of an earlier run ({names}); starting from {path} "
                         "here would replace them. Give another output_dir=")
    return str(path)


def _check_resume(path: str, module: pl.LightningModule, cells: Geocells, output_dir: Path) -> dict:
    """Reads the checkpoint to resume from and checks it fits this run before anything is written.

    Returns:
        The checkpoint (its ``epoch`` and ``global_step`` tell whether training moved on).
    """
    from geoloc.models.loading import check_cells, read_checkpoint

    best = output_dir / "checkpoints" / "best.ckpt"
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        hint = (f" To resume from the best checkpoint instead: ckpt_path={best}" if best.is_file()
                and Path(path).resolve() != best.resolve() else "")
        raise ValueError(f"{e}.{hint}") from e
    check_cells(cells, ckpt, ckpt_path=path)
    mine = module.state_dict()
    theirs = ckpt["state_dict"]
    missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    shapes = [k for k in sorted(set(mine) & set(theirs)) if tuple(mine[k].shape) != tuple(theirs[k].shape)]
    if missing or extra or shapes:
        what = (f"{shapes[0]} is {tuple(theirs[shapes[0]].shape)} there, {tuple(mine[shapes[0]].shape)} here"
                if shapes else f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}")
        raise ValueError(f"{path}: was trained with another model ({what}); resume with the settings of its run "
                         f"({output_dir / 'config.yaml'}), or give another output_dir= for a new run")
    return ckpt


def _check_enough_data(datamodule, trainer: pl.Trainer, batch_size: int) -> None:
    """A table-backed training set must fill at least one batch on every process (``drop_last``)."""
    from geoloc.data.readers import GeoDataset

    source = datamodule.train_source
    if not isinstance(source, GeoDataset):
        return  # a shard stream's length is known only by reading it: checked after fitting
    world = trainer.world_size
    if -(-len(source) // world) < batch_size:
        raise ValueError(f"{source.source}: the training set has {len(source)} photo(s), fewer than one batch of "
                         f"batch_size={batch_size} per process x {world} process(es); lower batch_size= or "
                         "give more training photos")


def _warn_far_from_cells(datamodule, cells: Geocells) -> None:
    """Warns when training photos lie far from every cell: the cells were likely built for other data."""
    import warnings

    from geoloc.data.readers import GeoDataset

    source = datamodule.train_source
    if not isinstance(source, GeoDataset) or len(source) == 0:
        return
    dist = cells.distance_km(source.latlng)
    far = np.flatnonzero(dist > FAR_FROM_CELLS_KM)
    if len(far):
        i = int(far[np.argmax(dist[far])])
        lat, lng = source.latlng[i]
        warnings.warn(f"{len(far)} of {len(source)} training photos ({100 * len(far) / len(source):.1f}%) lie more "
                      f"than {FAR_FROM_CELLS_KM:.0f} km from every cell of {cells.source} (farthest: "
                      f"{source.table['key'].iloc[i]} at [{lat:.3f}, {lng:.3f}], {dist[i]:,.0f} km away); they are "
                      "trained on their nearest cell. Were the cells built from these photos' coordinates?",
                      stacklevel=2)


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Builds everything from the config and fits.

    Returns:
        ``(metrics, objects)``: the trainer's final callback metrics (floats) and the built objects
        (``cfg``, ``cells``, ``model``, ``module``, ``datamodule``, ``trainer``, ``skipped``: photos
        dropped by reason).

    Raises:
        ValueError: the output folder holds another run's checkpoints, a resume does not fit this run,
            the training set is smaller than one batch, or no training step ran.
    """
    from geoloc.training.callbacks import RunConfigWriter, SkipRecorder

    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.output_dir)
    resume = _resolve_ckpt(cfg.ckpt_path, output_dir)
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
                                     cell_centroids=torch.tensor(cells.centroids, dtype=torch.float32),
                                     cells_fingerprint=cells.fingerprint())
    start = _check_resume(resume, module, cells, output_dir) if resume else None
    datamodule = hydra.utils.instantiate(cfg.data.datamodule, cells_path=str(cfg.cells))
    datamodule.set_data_config(backbone.data_config)
    datamodule.set_evidence_heads(heads)
    loggers = [hydra.utils.instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    skips = SkipRecorder(output_dir)
    callbacks += [RunConfigWriter(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True)), skips]
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                                                  default_root_dir=str(output_dir))
    _check_enough_data(datamodule, trainer, int(cfg.batch_size))
    _warn_far_from_cells(datamodule, cells)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    if module.trained_batches == 0:
        done_epochs = int(start["epoch"]) + 1 if start else 0
        if start is not None and (trainer.global_step >= trainer.max_steps > 0 or (
                trainer.max_epochs is not None and done_epochs >= trainer.max_epochs)):
            print(f"nothing to train: {resume} has finished {done_epochs} epoch(s) of max_epochs="
                  f"{trainer.max_epochs} (max_steps={trainer.max_steps}); raise them to train longer")
        else:
            if start is None and trainer.is_global_zero:  # checkpoints of an untrained model: not work to keep
                for p in _checkpoints(output_dir):
                    p.unlink()
            raise ValueError(f"no training step ran: the training data gave no usable batch (skipped photos: "
                             f"{skips.counts or 'none'}); check the training set and batch_size={cfg.batch_size}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    objects = {"cfg": cfg, "cells": cells, "model": net, "module": module, "datamodule": datamodule,
               "trainer": trainer, "skipped": dict(skips.counts)}
    return metrics, objects


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@user_errors("train.py")
def main(cfg: DictConfig) -> None:
    metrics, objects = train(cfg)
    shown = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith("val/")}
    print(f"done: {shown}")
    skipped = objects["skipped"]
    if skipped:
        print(f"skipped {sum(skipped.values())} unusable photo(s): "
              + ", ".join(f"{k}: {v}" for k, v in skipped.items()) + f" (listed in {cfg.output_dir}/skipped.csv)")


if __name__ == "__main__":
    main()
