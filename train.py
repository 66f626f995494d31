"""Train a geolocator (Hydra + PyTorch Lightning).

    python train.py experiment=demo                        # the embedded sample, a small CPU model
    python train.py data=shards data.dir=SHARDS cells=cells.parquet backbone=vit_large_clip trainer=gpu
    python train.py ... model/location_encoder=geoclip     # start the GPS encoder from GeoCLIP's weights
    python train.py ... trainer=ddp trainer.devices=8 trainer.num_nodes=2       # several GPUs / nodes
    python train.py ... trainer=ddp_cpu                    # 2 CPU processes (gloo), to try DDP anywhere
    python train.py ... ckpt_path=last                     # resume the run in output_dir exactly
    python train.py experiment=im2gps3k_features data.root=DIR cells=CELLS backbone=...  # heads on cached features
    python train.py experiment=im2gps3k_features ... backbone.trainable_blocks=2    # the same, fine-tuning on photos

Every object is built by Hydra from its config node: the cells (``geocells``, from ``cells=PATH``), the
network (``model.net``, which nests the ``backbone`` and ``model.location_encoder`` groups), the
LightningModule (``model.module``), the data (``data.datamodule``), callbacks, loggers and the trainer.
The number of geocells comes from the cells file, never from the config.

With ``features.enabled=true`` (or ``auto`` when the backbone is frozen and ``augment=false``) the heads
train on the backbone's features of the train and validation photos, embedded once and cached
(``features.store``: :class:`geoloc.data.features.FeatureStore`, which reuses a valid cache or builds one;
``python -m geoloc features`` builds them ahead). The backbone stays in the network and in its checkpoints,
so a run trained on features predicts from photos like any other.

Finished work is never replaced (:mod:`geoloc.training.guards`): an ``output_dir`` that holds checkpoints
is refused unless the command resumes that run (``ckpt_path=last``), a resume is checked against the cells
and the model before anything is written, and ``RUN/config.yaml`` is written (atomically) only once
training has started.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from geoloc.cli import USER_ERRORS, user_errors

#: Settings that were replaced, and what to use instead.
REPLACED = {
    "model.geoclip_weights": "the GPS encoder is a config group now: model/location_encoder=geoclip starts it from "
                             "GeoCLIP's released weights, model/location_encoder=random (the default) from a "
                             "seeded random encoder of the same architecture",
}


def check_settings(cfg: DictConfig) -> None:
    """Refuses a setting from :data:`REPLACED` given a value (naming its replacement), and a missing ``cells``
    (which the ``geocells`` node reads)."""
    for key, instead in REPLACED.items():
        if OmegaConf.select(cfg, key) is not None:
            raise ValueError(f"{key} was removed; {instead}")
    if OmegaConf.is_missing(cfg, "cells"):
        raise ValueError("the setting 'cells' is required: give the geocells file on the command line "
                         "(cells=PATH; python -m geocells.build writes one)")


def instantiate(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate``, raising what the target raised for a bad setting (a ValueError naming
    it, say) instead of Hydra's wrapper around it."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, USER_ERRORS):
            raise e.__cause__ from None
        raise


def instantiate_each(node: DictConfig | None) -> list:
    """One object per ``_target_`` node of a group such as ``callbacks`` or ``logger`` (null entries skipped)."""
    return [instantiate(c) for c in (node or {}).values() if c is not None and "_target_" in c]


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Builds everything from the config and fits.

    Returns:
        ``(metrics, objects)``: the trainer's final callback metrics (floats) and the built objects
        (``cfg``, ``cells``, ``model`` (the network), ``module``, ``datamodule``, ``trainer``, ``skipped``:
        photos dropped by reason).

    Raises:
        ValueError: a replaced setting, an output folder that holds another run's checkpoints, a resume that
            does not fit this run, features asked for with a trained backbone or augmentation, a damaged or
            stale feature cache, a training set smaller than one batch, or no training step ran.
    """
    from geoloc.precision import lightning_precision
    from geoloc.training import guards
    from geoloc.training.callbacks import RunConfigWriter, SkipRecorder

    check_settings(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.output_dir)
    resume = guards.resolve_resume(cfg.ckpt_path, output_dir)

    cells = instantiate(cfg.geocells)
    net = instantiate(cfg.model.net, num_cells=len(cells))
    on_features = guards.use_features(cfg.features.enabled, net.image_encoder, augment=bool(cfg.augment),
                                      trainable_blocks=OmegaConf.select(cfg, "backbone.trainable_blocks"))
    module = instantiate(cfg.model.module, model=net, cells=cells)
    start = guards.check_resume(resume, module, cells, output_dir) if resume else None
    if on_features and start is not None:
        guards.check_resume_backbone(start, net.image_encoder, resume)

    datamodule = instantiate(cfg.data.datamodule, cells=cells)
    if on_features:
        from geoloc.training.datamodule import FeatureDataModule

        datamodule = FeatureDataModule.from_datamodule(datamodule, net.image_encoder, instantiate(cfg.features.store))
        for cache in (datamodule.train_source, datamodule.val_source):
            print(f"features: {cache.status} {cache.folder} ({len(cache)} photos of {cache.name}, {cache.dim}-d"
                  + (f"; {len(cache.skipped)} skipped" if cache.skipped else "") + ")")
    else:
        datamodule.set_data_config(net.image_encoder.data_config)
    # the text decoder's training text is written from evidence labels: the batches carry them, head or not
    carried = list(net.evidence)
    if net.text_decoder is not None:
        from geoloc.evidence.captions import CAPTION_HEADS

        carried += [h for h in CAPTION_HEADS if h not in carried]
    datamodule.set_evidence_heads(carried)

    # trainer.precision=auto: bf16-mixed where the accelerator computes bfloat16 natively, else 32-true (the
    # run's config.yaml records which)
    cfg.trainer.precision = lightning_precision(cfg.trainer.get("precision", "32-true"),
                                                cfg.trainer.get("accelerator", "cpu"))
    skips = SkipRecorder(output_dir)
    callbacks = [*instantiate_each(cfg.get("callbacks")),
                 RunConfigWriter(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True)), skips]
    loggers = instantiate_each(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      default_root_dir=str(output_dir))

    guards.check_enough_data(datamodule.train_source, trainer.world_size, int(cfg.batch_size))
    guards.warn_far_from_cells(datamodule.train_source, cells)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    guards.check_trained(trainer, module.trained_batches, start, resume, output_dir, skips.counts, cfg.batch_size)

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
