"""Callbacks."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl


class KeyRecorder(pl.Callback):
    """Writes the image ids each rank trained on to ``out_dir/keys_rank{r}.txt`` (to check data splits).

    Args:
        out_dir: folder for the files.
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.keys: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.extend(batch["key"])

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"keys_rank{trainer.global_rank}.txt").write_text("\n".join(self.keys) + "\n")


class RunConfigWriter(pl.Callback):
    """Writes the run's ``config.yaml`` once training really starts (rank 0, atomically).

    ``on_train_start`` comes after Lightning has restored a resumed checkpoint, so a resume that fails
    (another cells file, another model) leaves the run's config as it was: its checkpoints still load.

    Args:
        path: ``RUN/config.yaml``.
        text: the resolved config as YAML.
    """

    def __init__(self, path: str | Path, text: str):
        self.path, self.text = Path(path), text

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            from geoloc.artifacts import atomic_write_text

            atomic_write_text(self.path, self.text)


class SkipRecorder(pl.Callback):
    """Collects the photos the collate dropped (batch ``skipped``: ``[(key, reason)]``) on every rank, and
    at the end of training writes them to ``RUN/skipped.csv`` (``IMG_ID,reason,split``, once per photo).

    Attributes:
        counts: after training, skipped photos by reason over all ranks (what train.py reports).
    """

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.seen: dict[tuple[str, str], str] = {}
        self.counts: dict[str, int] = {}

    def _add(self, batch, split: str) -> None:
        for key, reason in batch.get("skipped", ()) if isinstance(batch, dict) else ():
            self.seen.setdefault((split, str(key)), str(reason))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._add(batch, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._add(batch, "val")

    def on_train_end(self, trainer, pl_module) -> None:
        import torch.distributed as dist

        items = [self.seen]
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            items = [None] * dist.get_world_size()
            dist.all_gather_object(items, self.seen)
        merged: dict[tuple[str, str], str] = {}
        for part in items:
            merged.update(part or {})
        counts: dict[str, int] = {}
        for reason in merged.values():
            counts[reason] = counts.get(reason, 0) + 1
        self.counts = dict(sorted(counts.items()))
        if trainer.is_global_zero and merged:
            from geoloc.artifacts import atomic_write_text

            rows = "".join(f"{_csv(k)},{_csv(r)},{s}\n" for (s, k), r in sorted(merged.items()))
            atomic_write_text(self.out_dir / "skipped.csv", "IMG_ID,reason,split\n" + rows)


def _csv(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n') else value
