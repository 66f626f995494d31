"""DataModule: geotagged photos in, ``{"image", "latlng", "cell", "key"}`` batches out.

Sources are the readers of :mod:`geoloc.data` (a :class:`~geoloc.data.readers.GeoDataset` is read as a
map-style dataset with a seeded per-epoch sampler that also splits by rank) or webdataset shards
(:class:`~geoloc.data.shards.ShardDataset` streams through :func:`~geoloc.data.shards.make_webdataset`,
split by node and by worker). Cell labels are assigned on load, batch by batch, through the geocells'
H3 index. Photos that cannot be decoded are dropped from their batch and counted (``skipped``).

Augmentation follows GeoCLIP: random resized crop, horizontal flip, colour jitter, random grayscale;
evaluation uses timm's own transform for the backbone.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from geoloc.data.images import ImageError, decode_image
from geoloc.data.readers import GeoDataset
from geoloc.data.transforms import eval_transform, train_transform
from geoloc.geo.cells import Geocells


class _Photos(Dataset):
    """Map-style view of a GeoDataset: ``(image tensor, latlng, key)`` (with ``scene``, plus the row's
    ``S3_Label`` scene label, -1 where it has none), or a dict naming a bad photo.

    Index ``k`` means photo ``k % N`` in epoch ``k // N`` (see :class:`EpochSampler`); its random
    augmentation is seeded by ``(seed, k)``, so a resumed run sees exactly the same pixels.
    """

    def __init__(self, ds: GeoDataset, transform, seed: int = 0, scene: bool = False):
        from geoloc.data.shards import scene_label

        self.paths = ds.table["path"].to_numpy()
        col = ds.table["S3_Label"] if "S3_Label" in ds.table.columns else None
        self.scene = (np.array([scene_label(v) for v in col], np.int64) if col is not None
                      else np.full(len(self.paths), -1, np.int64)) if scene else None
        self.latlng = ds.latlng.astype(np.float32)
        self.keys = ds.table["key"].to_numpy()
        self.transform = transform
        self.max_pixels = ds.max_pixels
        self.seed = seed

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, k: int):
        i = k % len(self.keys)
        try:
            img = decode_image(self.paths[i], max_pixels=self.max_pixels)
        except ImageError as e:
            return {"bad": e.reason, "key": str(self.keys[i])}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + k)
            x = self.transform(img)
        if self.scene is not None:
            return x, torch.from_numpy(self.latlng[i]), str(self.keys[i]), int(self.scene[i])
        return x, torch.from_numpy(self.latlng[i]), str(self.keys[i])


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch (Lightning calls ``set_epoch``), yielding ``epoch * N + i``.

    Under DDP each rank takes every ``world_size``-th index of the same permutation (padded to equal
    length), like ``DistributedSampler``.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self):
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        total = len(self) * self.world_size
        order = np.concatenate([order, order[: total - self.n]])
        return iter((order[self.rank::self.world_size] + self.epoch * self.n).tolist())


class Collate:
    """Stacks a batch, drops bad photos, assigns geocell labels and, for the evidence heads asked for, their
    labels from the coordinates (``evidence/<head>``, -1 where masked). The ``scene`` label comes from the
    samples' fourth element when they carry one (masked otherwise). Dropped photos are counted in
    ``skipped`` and listed in the batch's ``skipped`` (``[(key, reason)]``), so that a training run can
    report them even when the collate runs in a worker process."""

    def __init__(self, cells: Geocells, evidence_heads: tuple[str, ...] = ()):
        self.cells = cells
        self.evidence_heads = tuple(evidence_heads)
        self.skipped: Counter = Counter()

    def __call__(self, samples: list) -> dict:
        good = [s for s in samples if not isinstance(s, dict)]
        bad = [(str(s.get("key", "?")), str(s["bad"])) for s in samples if isinstance(s, dict)]
        for _, reason in bad:
            self.skipped[reason] += 1
        if not good:
            return {"image": torch.zeros(0), "latlng": torch.zeros(0, 2), "cell": torch.zeros(0, dtype=torch.long),
                    "key": [], "skipped": bad,
                    **{f"evidence/{h}": torch.zeros(0, dtype=torch.long) for h in self.evidence_heads}}
        images, latlng, keys, *rest = zip(*good)
        latlng = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in latlng])
        ll = latlng.numpy().astype(np.float64)
        batch = {"image": torch.stack(images), "latlng": latlng, "cell": torch.from_numpy(self.cells.assign(ll)),
                 "key": list(keys), "skipped": bad}
        if self.evidence_heads:
            from geoloc.evidence.labels import evidence_labels

            labels = evidence_labels(ll, scene=np.asarray(rest[0]) if rest else None)
            for h in self.evidence_heads:
                batch[f"evidence/{h}"] = torch.from_numpy(labels[h].to_numpy(np.int64))
        return batch


class GeoDataModule(pl.LightningDataModule):
    """Train and validation photos for a geolocator.

    Args:
        train: a GeoDataset or ShardDataset.
        val: a GeoDataset or ShardDataset.
        cells_path: the geocells file (labels are assigned through it).
        batch_size: per process.
        num_workers: DataLoader workers per process.
        shuffle_buffer: samples shuffled in memory when streaming shards.
        epoch_size: samples per epoch per worker when streaming shards (keeps DDP ranks in step);
            None streams each worker's shards once.
        seed: shuffling seed.
    """

    def __init__(self, train, val, cells_path: str, batch_size: int = 64, num_workers: int = 0,
                 shuffle_buffer: int = 1000, epoch_size: int | None = None, seed: int = 0):
        super().__init__()
        self.train_source, self.val_source = train, val
        self.cells_path = cells_path
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.epoch_size, self.seed = shuffle_buffer, epoch_size, seed
        self.data_config: dict | None = None
        self.evidence_heads: tuple[str, ...] = ()
        self._cells: Geocells | None = None

    def set_data_config(self, data_config: dict) -> None:
        """The backbone's preprocessing (input size, mean, std): set before the loaders are made."""
        self.data_config = dict(data_config)

    def set_evidence_heads(self, heads) -> None:
        """The evidence heads whose labels each batch carries (looked up from its coordinates)."""
        self.evidence_heads = tuple(heads)

    @property
    def cells(self) -> Geocells:
        if self._cells is None:
            self._cells = Geocells.load(self.cells_path)
        return self._cells

    def _loader(self, source, train: bool) -> DataLoader:
        if self.data_config is None:
            raise RuntimeError("GeoDataModule.set_data_config(backbone.data_config) must be called first")
        transform = train_transform(self.data_config) if train else eval_transform(self.data_config)
        collate = Collate(self.cells, self.evidence_heads)
        scene = "scene" in self.evidence_heads
        common = dict(batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate,
                      persistent_workers=self.num_workers > 0)
        if isinstance(source, GeoDataset):
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            sampler = EpochSampler(len(source), seed=self.seed, shuffle=train, rank=rank, world_size=world)
            return DataLoader(_Photos(source, transform, seed=self.seed, scene=scene), sampler=sampler,
                              drop_last=train,
                              **common)
        from geoloc.data.shards import make_webdataset

        stream = make_webdataset(source.shards, shuffle=self.shuffle_buffer if train else 0, scene=scene,
                                 seed=self.seed, transform=transform, epoch_size=self.epoch_size if train else None,
                                 mark_bad=True)
        return DataLoader(stream, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_source, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_source, train=False)
