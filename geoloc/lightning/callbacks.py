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
