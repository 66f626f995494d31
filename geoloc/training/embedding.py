"""Embedding passes through Lightning's predict loop: one forward over every photo of a dataset, spread over
the processes of a trainer (``trainer=ddp`` on GPUs and nodes, ``trainer=ddp_cpu`` here) as training is.

Each process reads its own share of the source (:meth:`~geoloc.data.readers.GeoDataset.iter_items` with
``part=(rank, world)``, further split between its DataLoader workers), so no photo is decoded or embedded
twice and none is left out. :class:`PartWriter` (a ``BasePredictionWriter``) writes each batch's outputs to
a part file in a folder the processes share; at the end of the pass the first process checks the parts
(every row once: an index written twice, or a part whose outputs and rows differ in number, is an error;
the folder is removed, also when the pass fails) and merges them into the
source's reading order, which is the order a one-process pass gives. The other processes return None, so
that only one writes the artifact the pass was for (the index, the feature cache, the predictions).

The network runs under :func:`geoloc.precision.autocast` in the pass's own ``precision``; outputs are stored
in float32.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from geoloc.data.images import SkipReport


@dataclass
class EmbeddingResult:
    """What a pass gave, in the source's reading order.

    Attributes:
        index: ``(N,)`` each row's position in the source (:attr:`geoloc.data.readers.Item.index`).
        keys: ``(N,)`` image ids.
        latlng: ``(N, 2)`` float64 degrees.
        meta: each row's ``meta`` (the source's other columns).
        outputs: ``{name: (N, ...) float32}``.
        skipped: the photos that could not be used, from every process.
        world_size: how many processes shared the pass.
    """

    index: np.ndarray
    keys: np.ndarray
    latlng: np.ndarray
    meta: list[dict]
    outputs: dict[str, np.ndarray]
    skipped: SkipReport = field(default_factory=SkipReport)
    world_size: int = 1

    def __len__(self) -> int:
        return len(self.keys)

    def as_source(self, source) -> PassSource:
        """The pass's photos as an :class:`~geoloc.data.readers.ItemSource` standing for ``source``: the same
        items in the same order (without images) and the same skips, read from memory."""
        return PassSource(self, source)


class PassSource:
    """An :class:`~geoloc.data.readers.ItemSource` of an :class:`EmbeddingResult`: what evaluation iterates
    once the network has run, so the photos are not decoded again (see :meth:`EmbeddingResult.as_source`)."""

    def __init__(self, result: EmbeddingResult, source):
        self.result = result
        self.name = getattr(source, "name", "photos")
        self.source = getattr(source, "source", self.name)
        self.synthetic = bool(getattr(source, "synthetic", False))
        self.notes = list(getattr(source, "notes", []))

    def __len__(self) -> int:
        return len(self.result) + len(self.result.skipped)

    def iter_items(self, skipped: SkipReport, *, exclude=frozenset(), part: tuple[int, int] = (0, 1)):
        from geoloc.data.readers import Item, check_part

        i, n = check_part(part)
        r = self.result
        if i == 0:
            for key, reason, detail in r.skipped.items:
                if key not in exclude:
                    skipped.add(key, reason, detail)
        for j, (index, key) in enumerate(zip(r.index, r.keys)):
            if j % n == i and key not in exclude:
                yield Item(str(key), (float(r.latlng[j, 0]), float(r.latlng[j, 1])), None, r.meta[j], index=int(index))


class SourcePart(torch.utils.data.IterableDataset):
    """One process's share of an :class:`~geoloc.data.readers.ItemSource`, split again between its
    DataLoader workers: ``{"index", "key", "latlng", "meta", "image"}`` per usable photo (the image through
    ``transform``), and ``{"skipped": (key, reason, detail)}`` for each photo the source skipped.

    Args:
        source: the dataset.
        transform: PIL image -> ``(3, H, W)`` tensor.
        rank, world_size: this process's place among the pass's processes.

    A row without a photo is skipped (``no_image``): a pass embeds photos.
    """

    def __init__(self, source, transform: Callable, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.source, self.transform = source, transform
        self.rank, self.world_size = int(rank), int(world_size)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        part = (self.rank * workers + worker, self.world_size * workers)
        skipped = SkipReport()
        reported = 0
        for item in self.source.iter_items(skipped, part=part):
            while reported < len(skipped.items):  # the source's skips, as they happen
                yield {"skipped": skipped.items[reported]}
                reported += 1
            if item.image is None:
                yield {"skipped": (item.key, "no_image", "the dataset gives no photo for this row")}
                continue
            yield {"index": int(item.index), "key": item.key, "latlng": tuple(item.latlng), "meta": dict(item.meta),
                   "image": self.transform(item.image)}
        for entry in skipped.items[reported:]:
            yield {"skipped": entry}


def collate_part(samples: list[dict]) -> dict:
    """A batch of :class:`SourcePart` samples: the photos stacked, the skips listed."""
    good = [s for s in samples if "skipped" not in s]
    batch = {"skipped": [s["skipped"] for s in samples if "skipped" in s],
             "index": torch.tensor([s["index"] for s in good], dtype=torch.int64),
             "key": [s["key"] for s in good], "latlng": [s["latlng"] for s in good],
             "meta": [s["meta"] for s in good]}
    batch["image"] = torch.stack([s["image"] for s in good]) if good else torch.zeros(0)
    return batch


class EmbeddingModule(pl.LightningModule):
    """Runs ``forward(images) -> {name: tensor (B, ...)}`` on each batch under the pass's precision.

    Args:
        forward: the network call (``lambda x: net(x)`` restricted to the outputs wanted).
        modules: the networks ``forward`` uses (registered, so the trainer puts them on its device).
        precision: ``32 | bf16 | 16 | auto`` (:mod:`geoloc.precision`).
    """

    def __init__(self, forward: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
                 modules: Mapping[str, torch.nn.Module], precision: str = "32"):
        super().__init__()
        self.nets = torch.nn.ModuleDict(dict(modules))
        self._forward = forward
        self.pass_precision = precision

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        from geoloc.precision import autocast, resolve_precision

        out = {}
        if len(batch["index"]):
            with autocast(resolve_precision(self.pass_precision, self.device), self.device):
                got = self._forward(batch["image"].to(self.device))
            out = {k: v.detach().float().cpu() for k, v in got.items()}
        return {"outputs": out, "index": batch["index"], "key": batch["key"], "latlng": batch["latlng"],
                "meta": batch["meta"], "skipped": batch["skipped"]}


class PartWriter(BasePredictionWriter):
    """Writes each batch of a pass to ``folder/rank<r>-<batch>.npz`` (+ its rows' keys, coordinates, metadata
    and skips in a json beside it); at the end the first process merges the parts (:func:`merge_parts`)
    into :attr:`result` and removes the folder."""

    def __init__(self, folder: str | Path):
        super().__init__(write_interval="batch")
        self.base = Path(folder)
        self.folder: Path | None = None
        self.result: EmbeddingResult | None = None
        self.rows = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        run = trainer.strategy.broadcast(uuid.uuid4().hex[:12])  # one folder for every process
        self.folder = self.base / f"parts-{run}"
        self.folder.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        stem = self.folder / f"rank{trainer.global_rank:05d}-{batch_idx:08d}"
        np.savez(f"{stem}.npz", index=prediction["index"].numpy(),
                 **{f"out_{k}": v.numpy() for k, v in prediction["outputs"].items()})
        rows = {"key": list(prediction["key"]), "latlng": [list(map(float, ll)) for ll in prediction["latlng"]],
                "meta": prediction["meta"], "skipped": [list(s) for s in prediction["skipped"]]}
        Path(f"{stem}.json").write_text(json.dumps(rows, default=str))
        self.rows += len(prediction["index"])

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier()  # every part is on disk
        if trainer.global_rank == 0:
            try:
                self.result = merge_parts(self.folder, world_size=trainer.world_size)
            finally:
                shutil.rmtree(self.folder, ignore_errors=True)
        trainer.strategy.barrier()


def merge_parts(folder: Path, *, world_size: int = 1) -> EmbeddingResult:
    """The parts of a pass in ``folder``, checked and put in the source's reading order.

    Raises:
        ValueError: a row written by two batches (or two processes), or a part whose outputs and rows differ.
    """
    index, keys, latlng, meta, outs = [], [], [], [], {}
    skipped = SkipReport()
    for npz in sorted(folder.glob("rank*.npz")):
        rows = json.loads(npz.with_suffix(".json").read_text())
        with np.load(npz) as f:
            idx = f["index"]
            for name in f.files:
                if name.startswith("out_"):
                    outs.setdefault(name[4:], []).append(f[name])
        if len(idx) != len(rows["key"]):
            raise ValueError(f"{npz}: {len(idx)} outputs for {len(rows['key'])} rows; the part is damaged")
        index.append(idx)
        keys += rows["key"]
        latlng += rows["latlng"]
        meta += rows["meta"]
        for key, reason, detail in rows["skipped"]:
            skipped.add(key, reason, detail)
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    order = np.argsort(index, kind="stable")
    index = index[order]
    twice = index[1:][index[1:] == index[:-1]]
    if len(twice):
        raise ValueError(f"{folder}: rows {twice[:5].tolist()} were embedded twice; the processes' shares of the "
                         "source overlap")
    outputs = {k: np.concatenate(v)[order] if v else np.zeros(0, np.float32) for k, v in outs.items()}
    return EmbeddingResult(index=index, keys=np.asarray(keys, dtype=str)[order] if keys else np.zeros(0, str),
                           latlng=np.asarray(latlng, np.float64).reshape(-1, 2)[order],
                           meta=[meta[i] for i in order], outputs=outputs, skipped=skipped, world_size=world_size)


def run_embedding_pass(source, transform: Callable, forward: Callable, modules: Mapping[str, torch.nn.Module], *,
                       trainer: pl.Trainer | None = None, work_dir: str | Path, batch_size: int = 64,
                       num_workers: int = 0, precision: str = "32") -> EmbeddingResult | None:
    """One forward over every usable photo of ``source`` through ``trainer.predict``.

    Args:
        source: an :class:`~geoloc.data.readers.ItemSource` whose ``iter_items`` takes ``part``.
        transform: the evaluation transform (runs in the DataLoader workers).
        forward: ``images (B, 3, H, W) -> {name: (B, ...)}``.
        modules: the networks ``forward`` uses (moved to the trainer's device).
        trainer: a ``pl.Trainer`` (its devices, nodes and strategy decide the processes); None: one CPU
            process without a logger.
        work_dir: where the parts are written (a folder every process sees; removed after the merge).
        batch_size, num_workers: of each process's DataLoader.
        precision: of the forward pass.

    Returns:
        The merged outputs on the first process; None on the others (they write nothing else).
    """
    if trainer is None:
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False)
    writer = PartWriter(work_dir)
    trainer.callbacks.append(writer)
    module = EmbeddingModule(forward, modules, precision=precision)

    class _Data(pl.LightningDataModule):  # the rank is known only once the strategy has set up
        def predict_dataloader(self):
            t = self.trainer
            return torch.utils.data.DataLoader(
                SourcePart(source, transform, rank=t.global_rank, world_size=t.world_size), batch_size=batch_size,
                num_workers=num_workers, collate_fn=collate_part, persistent_workers=False)

    try:
        trainer.predict(module, datamodule=_Data(), return_predictions=False)
    finally:
        trainer.callbacks.remove(writer)
        if writer.folder is not None and trainer.global_rank == 0:  # a failed pass leaves no parts behind
            shutil.rmtree(writer.folder, ignore_errors=True)
    return writer.result if trainer.global_rank == 0 else None


def pass_trainer(node, *, progress: bool = False) -> pl.Trainer:
    """A ``pl.Trainer`` for an embedding pass from a ``trainer`` config node (``conf/trainer``): its devices,
    nodes, strategy, accelerator and precision; no logger, checkpoints or model summary (a pass writes only
    its artifact); a progress bar only with ``progress``."""
    import hydra

    from geoloc.precision import lightning_precision

    precision = lightning_precision(node.get("precision", "32-true"), node.get("accelerator", "cpu"))
    return hydra.utils.instantiate(node, logger=False, enable_checkpointing=False, enable_model_summary=False,
                                   callbacks=[], enable_progress_bar=bool(progress), precision=precision)
