"""The checks that keep a training run from losing or mislabelling work (train.py runs them).

Finished work is never replaced: an ``output_dir`` that holds checkpoints is refused unless the command
resumes that run (``ckpt_path=last``), and a resume is checked against the cells and the model before
anything is written. A run that trained nothing is an error, not a success, and photos far from every
cell are reported. Training on cached features is allowed only where it trains what photos would
(:func:`use_features`), and a resume of such a run must have the backbone its features were made with.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from geoloc.data.features import FeatureCache, module_fingerprint, state_fingerprint
from geoloc.data.readers import GeoDataset
from geoloc.geo.cells import Geocells

#: Training photos farther than this from every cell are reported (they train on the nearest cell).
FAR_FROM_CELLS_KM = 250.0


def checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoints a run folder holds."""
    return sorted((Path(output_dir) / "checkpoints").glob("*.ckpt"))


def resolve_resume(ckpt_path: str | None, output_dir: Path) -> str | None:
    """The checkpoint to resume from, refusing anything that would replace an earlier run's checkpoints.

    Args:
        ckpt_path: None (a new run), ``"last"`` (``output_dir/checkpoints/last.ckpt``, or a new run when the
            folder holds no checkpoint yet) or a checkpoint file.
        output_dir: the run folder.

    Raises:
        ValueError: the folder holds another run's checkpoints that this command would replace.
        FileNotFoundError: ``ckpt_path`` names no file.
    """
    output_dir = Path(output_dir)
    existing = checkpoints(output_dir)
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


def check_resume(path: str, module: pl.LightningModule, cells: Geocells, output_dir: Path) -> dict:
    """Reads the checkpoint to resume from and checks it fits this run, before anything is written.

    Returns:
        The checkpoint (its ``epoch`` and ``global_step`` tell whether training moved on).

    Raises:
        ValueError: a damaged checkpoint (naming ``best.ckpt`` to resume from instead), other cells, or
            another model.
    """
    from geoloc.models.loading import check_cells, read_checkpoint

    best = Path(output_dir) / "checkpoints" / "best.ckpt"
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
                         f"({Path(output_dir) / 'config.yaml'}), or give another output_dir= for a new run")
    return ckpt


def use_features(enabled: bool | str, encoder, *, trainable_blocks, augment: bool) -> bool:
    """Whether a run trains its heads on cached features (``features.enabled``) rather than on photos.

    Cached features are those of un-augmented photos through the backbone in eval mode, so they train
    exactly what photos would only when the backbone is frozen and the photos are not augmented.

    Args:
        enabled: True, False or ``"auto"`` (features exactly when they train the same as photos).
        encoder: the run's image encoder (frozen when none of its parameters is trained).
        trainable_blocks: the backbone's ``trainable_blocks`` setting, named in messages.
        augment: the ``augment`` setting.

    Raises:
        ValueError: features asked for (True) with a backbone that is trained or with augmentation.
    """
    if enabled not in (True, False, "auto"):
        raise ValueError(f"features.enabled must be true, false or auto, got {enabled!r}")
    frozen = not any(p.requires_grad for p in encoder.parameters())
    if enabled == "auto":
        return frozen and not augment
    if enabled and not frozen:
        trained = ("every block" if trainable_blocks is None
                   else f"its last {trainable_blocks} block(s)" if trainable_blocks else "some of it")
        raise ValueError(f"features.enabled=true trains the heads on features cached from a frozen backbone, but "
                         f"backbone.trainable_blocks={trainable_blocks} trains {trained}; set "
                         "backbone.trainable_blocks=0 to train the heads on cached features, or features.enabled="
                         "false (or auto) to fine-tune the backbone on photos")
    if enabled and augment:
        raise ValueError("features.enabled=true trains on features cached from un-augmented photos, but augment=true "
                         "asks for augmented ones; set augment=false, or features.enabled=false (or auto) to train "
                         "on augmented photos")
    return bool(enabled)


def check_resume_backbone(ckpt: dict, encoder, path: str) -> None:
    """A run trained on cached features resumes only with the backbone weights its features are made with
    (this run's ``encoder``, whose features the caches hold).

    Raises:
        ValueError: the checkpoint's backbone weights are others (another seed, other pretrained weights).
    """
    prefix = "model.image_encoder."
    theirs = state_fingerprint({k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    fingerprint = module_fingerprint(encoder)
    if theirs != fingerprint:
        raise ValueError(f"{path}: its backbone weights (fingerprint {theirs}) are not those the cached features were "
                         f"made with ({fingerprint}); resume with the settings of its run (seed, backbone weights), "
                         "or give another output_dir= for a new run")


def check_enough_data(source, world_size: int, batch_size: int) -> None:
    """A table-backed (or cached) training set must fill at least one batch on every process (``drop_last``).

    A shard stream's length is known only by reading it: :func:`check_trained` catches that case.
    """
    if not isinstance(source, GeoDataset | FeatureCache):
        return
    usable = " usable" if isinstance(source, FeatureCache) else ""
    if -(-len(source) // world_size) < batch_size:
        raise ValueError(f"{source.source}: the training set has {len(source)}{usable} photo(s), fewer than one batch "
                         f"of batch_size={batch_size} per process x {world_size} process(es); lower batch_size= or "
                         "give more training photos")


def warn_far_from_cells(source, cells: Geocells) -> None:
    """Warns when training photos lie far from every cell: the cells were likely built for other data."""
    if not isinstance(source, GeoDataset | FeatureCache) or len(source) == 0:
        return
    keys = source.keys if isinstance(source, FeatureCache) else source.table["key"].to_numpy()
    dist = cells.distance_km(source.latlng)
    far = np.flatnonzero(dist > FAR_FROM_CELLS_KM)
    if len(far):
        i = int(far[np.argmax(dist[far])])
        lat, lng = source.latlng[i]
        warnings.warn(f"{len(far)} of {len(source)} training photos ({100 * len(far) / len(source):.1f}%) lie more "
                      f"than {FAR_FROM_CELLS_KM:.0f} km from every cell of {cells.source} (farthest: "
                      f"{keys[i]} at [{lat:.3f}, {lng:.3f}], {dist[i]:,.0f} km away); they are "
                      "trained on their nearest cell. Were the cells built from these photos' coordinates?",
                      stacklevel=2)


def check_trained(trainer: pl.Trainer, trained_batches: int, start: dict | None, resume: str | None,
                  output_dir: Path, skipped: dict, batch_size: int) -> None:
    """After fitting: a run in which no training step ran is an error, unless it resumed a finished run.

    The checkpoints of a new run that trained nothing are removed (they hold an untrained model: no work to
    keep, and they would block the rerun).

    Args:
        trainer: the trainer after ``fit``.
        trained_batches: batches with photos this process trained on.
        start: the checkpoint resumed from (:func:`check_resume`), or None.
        resume: its path.
        output_dir: the run folder.
        skipped: skipped photos by reason (named in the error).
        batch_size: named in the error.

    Raises:
        ValueError: no training step ran.
    """
    if trained_batches:
        return
    done_epochs = int(start["epoch"]) + 1 if start else 0
    if start is not None and (trainer.global_step >= trainer.max_steps > 0 or (
            trainer.max_epochs is not None and done_epochs >= trainer.max_epochs)):
        print(f"nothing to train: {resume} has finished {done_epochs} epoch(s) of max_epochs="
              f"{trainer.max_epochs} (max_steps={trainer.max_steps}); raise them to train longer")
        return
    if start is None and trainer.is_global_zero:
        for p in checkpoints(output_dir):
            p.unlink()
    raise ValueError(f"no training step ran: the training data gave no usable batch (skipped photos: "
                     f"{skipped or 'none'}); check the training set and batch_size={batch_size}")
