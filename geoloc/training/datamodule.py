"""DataModule: geotagged photos in, ``{"image", "latlng", "cell", "key", "evidence/<head>", "skipped"}``
batches out.

Sources are the readers of :mod:`geoloc.data` (a :class:`~geoloc.data.readers.GeoDataset` is read as a
map-style dataset with a seeded per-epoch sampler that also splits by rank) or webdataset shards
(:class:`~geoloc.data.shards.ShardDataset` streams through :func:`~geoloc.data.shards.make_webdataset`,
split by node and by worker). Both yield the sample dicts of :func:`~geoloc.data.transforms.decode_sample`;
a photo that cannot be used is a :func:`~geoloc.data.transforms.bad_sample` marker that the collate drops
and counts (``skipped``).

Evidence labels are computed once, not per batch: a shard record carries its own (written at sharding
time), and a table's are looked up for all its rows at :meth:`GeoDataModule.setup`. Cell labels are
assigned batch by batch through the geocells' H3 index.

Augmentation follows GeoCLIP: random resized crop, horizontal flip, colour jitter, random grayscale
(``augment=False`` trains on the evaluation transform); evaluation uses timm's own transform for the
backbone.

:class:`FeatureDataModule` is the same for a frozen backbone: the photos of a GeoDataModule's train and
validation sets embedded once (:class:`~geoloc.data.features.FeatureCache`), batches of ``features``
instead of ``image``, the photos left out of the caches reported as ``skipped``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from geoloc.data.features import FeatureCache, FeatureStore
from geoloc.data.images import ImageError
from geoloc.data.readers import GeoDataset
from geoloc.data.transforms import bad_sample, decode_sample, eval_transform, is_bad_sample, train_transform
from geoloc.geo.cells import Geocells


def table_evidence_labels(ds: GeoDataset, heads: Sequence[str]) -> dict[str, np.ndarray]:
    """Every row's label for each evidence head, in one vectorized pass over the table.

    The scene comes from the table's ``S3_Label`` column (masked where it has none).

    Returns:
        ``{head: (N,) int16}``, -1 where masked.
    """
    from geoloc.evidence.labels import evidence_labels

    if not heads:
        return {}
    scene = ds.table["S3_Label"].to_numpy() if "S3_Label" in ds.table.columns else None
    table = evidence_labels(ds.latlng, scene=scene)
    return {head: table[head].to_numpy(np.int16) for head in heads}


class _Photos(Dataset):
    """Map-style view of a GeoDataset: the samples of :func:`~geoloc.data.transforms.decode_sample`, or a
    :func:`~geoloc.data.transforms.bad_sample` marker for a photo that does not decode.

    Index ``k`` means photo ``k % N`` in epoch ``k // N`` (see :class:`EpochSampler`); its random
    augmentation is seeded by ``(seed, k)``, so a resumed run sees exactly the same pixels.

    Args:
        ds: the table.
        transform: applied to each decoded image.
        seed: augmentation seed.
        labels: ``{head: (N,) labels}`` of every row (:func:`table_evidence_labels`).
    """

    def __init__(self, ds: GeoDataset, transform, seed: int = 0, labels: dict[str, np.ndarray] | None = None):
        self.paths = ds.table["path"].to_numpy()
        self.latlng = ds.latlng.astype(np.float32)
        self.keys = ds.table["key"].to_numpy()
        self.labels = dict(labels or {})
        self.transform = transform
        self.max_pixels = ds.max_pixels
        self.seed = seed

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, k: int) -> dict:
        i = k % len(self.keys)
        key = str(self.keys[i])
        try:
            return decode_sample(self.paths[i], key=key, latlng=self.latlng[i],
                                 labels={head: int(v[i]) for head, v in self.labels.items()},
                                 transform=self.transform, max_pixels=self.max_pixels,
                                 seed=self.seed * 1_000_003 + k)
        except ImageError as e:
            return bad_sample(key, e.reason)


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
    """Stacks decoded samples into a batch and drops the bad ones.

    Batch keys: ``image [B, 3, H, W]``, ``latlng [B, 2]``, ``cell [B]`` (assigned through the cells),
    ``key`` (B image ids), ``evidence/<head> [B]`` for each evidence head (the samples' own labels, -1
    where masked) and ``skipped`` (``[(key, reason)]`` of the dropped photos). Dropped photos are also
    counted in ``skipped``; the batch's list lets a training run report them even when the collate runs
    in a worker process.

    Args:
        cells: the geocells.
        evidence_heads: the heads whose labels each sample carries.
    """

    def __init__(self, cells: Geocells, evidence_heads: Sequence[str] = ()):
        self.cells = cells
        self.evidence_heads = tuple(evidence_heads)
        self.skipped: Counter = Counter()

    def __call__(self, samples: list) -> dict:
        good = [s for s in samples if not is_bad_sample(s)]
        bad = [(str(s["key"]), str(s["bad"])) if s is not None else ("?", "unusable")
               for s in samples if is_bad_sample(s)]
        for _, reason in bad:
            self.skipped[reason] += 1
        if not good:
            return {"image": torch.zeros(0), "latlng": torch.zeros(0, 2), "cell": torch.zeros(0, dtype=torch.long),
                    "key": [], "skipped": bad,
                    **{f"evidence/{h}": torch.zeros(0, dtype=torch.long) for h in self.evidence_heads}}
        latlng = torch.stack([s["latlng"] for s in good])  # [B, 2]
        cell = self.cells.assign(latlng.numpy().astype(np.float64))
        batch = {"image": torch.stack([s["image"] for s in good]), "latlng": latlng, "cell": torch.from_numpy(cell),
                 "key": [s["key"] for s in good], "skipped": bad}
        for head in self.evidence_heads:
            try:
                batch[f"evidence/{head}"] = torch.tensor([s["labels"][head] for s in good], dtype=torch.long)
            except KeyError as e:
                key = next(s["key"] for s in good if head not in s.get("labels", {}))
                raise ValueError(f"sample {key!r} carries no label for the evidence head {head!r}; its dataset "
                                 "must give every head's label (GeoDataModule.set_evidence_heads)") from e
        return batch


class GeoDataModule(pl.LightningDataModule):
    """Train and validation photos for a geolocator.

    Args:
        train: a GeoDataset or ShardDataset.
        val: a GeoDataset or ShardDataset.
        cells: the geocells (labels are assigned through them).
        batch_size: per process.
        num_workers: DataLoader workers per process.
        shuffle_buffer: samples shuffled in memory when streaming shards.
        epoch_size: samples per epoch per worker when streaming shards (keeps DDP ranks in step);
            None streams each worker's shards once.
        seed: shuffling seed.
        augment: GeoCLIP-style augmentation of the training photos; False gives them the evaluation transform.
    """

    def __init__(self, train, val, cells: Geocells, batch_size: int = 64, num_workers: int = 0,
                 shuffle_buffer: int = 1000, epoch_size: int | None = None, seed: int = 0, augment: bool = True):
        super().__init__()
        self.train_source, self.val_source = train, val
        self.cells = cells
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.epoch_size, self.seed = shuffle_buffer, epoch_size, seed
        self.augment = bool(augment)
        self.data_config: dict | None = None
        self.evidence_heads: tuple[str, ...] = ()
        self._labels: dict[str, dict[str, np.ndarray]] = {}

    def set_data_config(self, data_config: dict) -> None:
        """The backbone's preprocessing (input size, mean, std): set before the loaders are made."""
        self.data_config = dict(data_config)

    def set_evidence_heads(self, heads: Sequence[str]) -> None:
        """The evidence heads whose labels each batch carries."""
        self.evidence_heads = tuple(heads)
        self._labels.clear()

    def setup(self, stage: str | None = None) -> None:
        """Looks up the evidence labels of every table-backed split once, for all its rows."""
        for split in ("train", "val"):
            self._table_labels(split)

    def _table_labels(self, split: str) -> dict[str, np.ndarray]:
        source = self.train_source if split == "train" else self.val_source
        if split not in self._labels and isinstance(source, GeoDataset):
            self._labels[split] = table_evidence_labels(source, self.evidence_heads)
        return self._labels.get(split, {})

    def _loader(self, split: str) -> DataLoader:
        if self.data_config is None:
            raise RuntimeError("GeoDataModule.set_data_config(backbone.data_config) must be called first")
        train = split == "train"
        source = self.train_source if train else self.val_source
        transform = (train_transform(self.data_config) if train and self.augment
                     else eval_transform(self.data_config))
        common = dict(batch_size=self.batch_size, num_workers=self.num_workers,
                      collate_fn=Collate(self.cells, self.evidence_heads), persistent_workers=self.num_workers > 0)
        if isinstance(source, GeoDataset):
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            sampler = EpochSampler(len(source), seed=self.seed, shuffle=train, rank=rank, world_size=world)
            photos = _Photos(source, transform, seed=self.seed, labels=self._table_labels(split))
            return DataLoader(photos, sampler=sampler, drop_last=train, **common)
        from geoloc.data.shards import make_webdataset

        stream = make_webdataset(source.shards, shuffle=self.shuffle_buffer if train else 0, seed=self.seed,
                                 transform=transform, epoch_size=self.epoch_size if train else None,
                                 evidence_heads=self.evidence_heads, mark_bad=True)
        return DataLoader(stream, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")


class _Features(Dataset):
    """Map-style view of a :class:`~geoloc.data.features.FeatureCache`, fetched a batch at a time.

    Index ``k`` means row ``k % N`` (see :class:`EpochSampler`). The DataLoader calls :meth:`__getitems__` with
    a batch's indices, so a batch is a few tensor gathers, not a Python loop over photos.

    Args:
        cache: the features.
        cells: the geocells (every row's cell is assigned once, here).
        heads: the evidence heads whose labels the batches carry.
    """

    def __init__(self, cache: FeatureCache, cells: Geocells, heads: Sequence[str] = ()):
        missing = [h for h in heads if h not in cache.labels]
        if missing:
            raise ValueError(f"{cache.source}: holds no labels for the evidence head(s) {missing}; rebuild it")
        self.features = torch.from_numpy(np.ascontiguousarray(cache.features))  # [N, D]
        self.latlng = torch.from_numpy(cache.latlng.astype(np.float32))  # [N, 2]
        self.cell = torch.from_numpy(cells.assign(cache.latlng).astype(np.int64))  # [N]
        self.keys = np.asarray(cache.keys)
        self.labels = {h: torch.from_numpy(cache.labels[h].astype(np.int64)) for h in heads}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitems__(self, ks: list[int]) -> dict:
        i = torch.as_tensor(ks, dtype=torch.long) % len(self.keys)
        return {"features": self.features[i].float(), "latlng": self.latlng[i], "cell": self.cell[i],
                "key": [str(k) for k in self.keys[i.numpy()]],
                **{f"evidence/{h}": v[i] for h, v in self.labels.items()}}

    def __getitem__(self, k: int) -> dict:
        batch = self.__getitems__([k])
        return {name: v[0] for name, v in batch.items()}


class _FeatureCollate:
    """Passes a :class:`_Features` batch on, adding ``skipped``: the photos its cache left out, in the first
    batch only (:class:`~geoloc.training.callbacks.SkipRecorder` lists each photo once anyway)."""

    def __init__(self, skipped: Sequence[tuple[str, str]]):
        self.pending = [(str(k), str(r)) for k, r in skipped]

    def __call__(self, batch: dict) -> dict:
        batch["skipped"], self.pending = self.pending, []
        return batch


class FeatureDataModule(pl.LightningDataModule):
    """Cached backbone features of the train and validation photos, for training heads on a frozen backbone.

    Batches: ``features [B, D]`` float32, ``latlng [B, 2]``, ``cell [B]``, ``key`` (B image ids),
    ``evidence/<head> [B]`` (-1 where masked) and ``skipped`` (``[(key, reason)]`` of the photos the caches
    left out). Training batches come from the same seeded :class:`EpochSampler` as photos (split by rank).

    Args:
        train: the training set's features.
        val: the validation set's features.
        cells: the geocells (labels are assigned through them).
        batch_size: per process.
        seed: shuffling seed.
    """

    def __init__(self, train: FeatureCache, val: FeatureCache, cells: Geocells, batch_size: int = 64, seed: int = 0):
        super().__init__()
        if train.dim != val.dim or train.fingerprint != val.fingerprint:
            raise ValueError(f"{train.source} and {val.source}: made by different backbones; train and validation "
                             "features must come from the same one")
        self.train_source, self.val_source = train, val
        self.cells = cells
        self.batch_size, self.seed = batch_size, seed
        self.evidence_heads: tuple[str, ...] = ()

    @classmethod
    def from_datamodule(cls, photos: GeoDataModule, encoder: torch.nn.Module, store: FeatureStore) -> FeatureDataModule:
        """The features of ``photos``' train and validation sets by ``encoder``, read from ``store`` or built there.

        Keeps ``photos``' cells, batch size and seed.
        """
        caches = {split: store.get(source, encoder) for split, source in
                  (("train", photos.train_source), ("val", photos.val_source))}
        return cls(caches["train"], caches["val"], photos.cells, batch_size=photos.batch_size, seed=photos.seed)

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the backbone weights the features were made with."""
        return self.train_source.fingerprint

    def set_evidence_heads(self, heads: Sequence[str]) -> None:
        """The evidence heads whose labels each batch carries."""
        self.evidence_heads = tuple(heads)

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        cache = self.train_source if train else self.val_source
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = EpochSampler(len(cache), seed=self.seed, shuffle=train, rank=rank, world_size=world)
        return DataLoader(_Features(cache, self.cells, self.evidence_heads), sampler=sampler,
                          batch_size=self.batch_size, drop_last=train,
                          collate_fn=_FeatureCollate([(k, r) for k, r, _ in cache.skipped]))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")
