"""The training stream over shards: webdataset, split by node and worker, shuffled, decoded."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from geoloc.data.images import DEFAULT_MAX_PIXELS, ImageError
from geoloc.data.shards.reader import parse_record, resolve_shards
from geoloc.data.transforms import bad_sample, decode_sample

# ---------------------------------------------------------------------------------------------- training


def scene_label(value) -> int:
    """A Places365 ``S3_Label`` value (0 indoor, 1 natural, 2 urban) as an int; -1 when missing or invalid."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return -1
    return int(v) if v in (0.0, 1.0, 2.0) else -1


def _check_labels(labels: dict, n_classes: dict[str, int], where: str) -> dict[str, int] | None:
    """A record's stored labels for the heads of ``n_classes`` (``{head: number of classes}``); None when it
    lacks one of them."""
    out = {}
    for head, n in n_classes.items():
        value = labels.get(head)
        if value is None:
            return None
        if not -1 <= value < n:
            raise ValueError(f"{where}.json: labels.{head} is {value!r}; expected -1 (masked) or a class index "
                             f"below {n}")
        out[head] = value
    return out


class _DecodeSample:
    """Webdataset map stage: a raw sample (its ``jpg`` and ``json`` members) to the sample dict of
    :func:`~geoloc.data.transforms.decode_sample`.

    The evidence labels of ``evidence_heads`` come from the record's ``labels`` (written at sharding time);
    records without them (shards written before records carried labels, or labelled by another evidence
    version) get them computed here from the record's coordinates and ``S3_Label``, one point at a time
    (slower: write the shards again to store them). With ``mark_bad`` a sample whose record or photo is
    unusable becomes a :func:`~geoloc.data.transforms.bad_sample` marker (what the training collate counts
    and reports) instead of an exception for the handler.
    """

    def __init__(self, transform: Callable | None, max_pixels: int, evidence_heads: Sequence[str] = (),
                 mark_bad: bool = False):
        self.transform = transform
        self.max_pixels = max_pixels
        self.evidence_heads = tuple(evidence_heads)
        self.mark_bad = mark_bad
        self.n_classes = {}
        if self.evidence_heads:
            from geoloc.evidence.labels import HEADS

            self.n_classes = {head: len(HEADS[head]) for head in self.evidence_heads}

    def __call__(self, sample: dict):
        if not self.mark_bad:
            return self._decode(sample)
        try:
            return self._decode(sample)
        except (ImageError, ValueError) as e:
            try:
                key = str(json.loads(sample["json"])["key"])
            except (KeyError, TypeError, ValueError):
                key = f"{sample.get('__url__', '?')}/{sample.get('__key__', '?')}"
            return bad_sample(key, e.reason if isinstance(e, ImageError) else "bad_record")

    def _decode(self, sample: dict) -> dict:
        where = f"{sample.get('__url__', '?')}/{sample.get('__key__', '?')}"
        record = parse_record(sample.get("json"), where)
        if "jpg" not in sample:
            raise ValueError(f"{where}: no .jpg member")
        labels = self._labels(record, where) if self.evidence_heads else {}
        return decode_sample(sample["jpg"], key=record["key"], latlng=record["latlng"], labels=labels,
                             transform=self.transform, max_pixels=self.max_pixels, name=f"{where}.jpg")

    def _labels(self, record: dict, where: str) -> dict[str, int]:
        stored = record["labels"]
        labels = _check_labels(stored, self.n_classes, where) if stored is not None else None
        if labels is not None:
            return labels
        import numpy as np

        from geoloc.evidence.labels import evidence_labels

        scene = scene_label(record["meta"].get("S3_Label"))
        table = evidence_labels(np.array([record["latlng"]]), scene=[scene])
        return {head: int(table[head].iloc[0]) for head in self.evidence_heads}


class SkipCounter:
    """A webdataset ``handler`` that counts and warns about a bad sample or shard, then continues.

    Unlike ``webdataset.warn_and_continue`` it does not sleep half a second per error. Counts are per
    process: with DataLoader workers each worker counts (and warns about) its own skips.

    Attributes:
        counts: skips by reason (an :class:`ImageError` reason, or the exception's type name).
    """

    def __init__(self, warn: bool = True):
        self.counts: Counter = Counter()
        self.warn = warn

    def __call__(self, exn: Exception) -> bool:
        reason = exn.reason if isinstance(exn, ImageError) else type(exn).__name__
        self.counts[reason] += 1
        if self.warn:
            warnings.warn(f"skipped a shard sample ({reason}): {exn}", stacklevel=2)
        return True


def make_webdataset(urls: str | Path | Sequence[str | Path], *, split: str | None = None, shuffle: int = 1000,
                    seed: int = 0, resampled: bool = False, transform: Callable | None = None,
                    epoch_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                    handler: Callable[[Exception], bool] | None = None, empty_check: bool = True,
                    evidence_heads: Sequence[str] = (), mark_bad: bool = False):
    """The training stream over shards: a ``webdataset.WebDataset`` pipeline.

    Stages: shard list -> ``wds.split_by_node`` -> ``wds.split_by_worker`` -> seeded shard shuffle ->
    tar reading -> seeded sample shuffle buffer (``shuffle`` samples) -> decode. Each element is the dict of
    :func:`~geoloc.data.transforms.decode_sample`: ``image`` (the upright RGB ``PIL.Image``, or
    ``transform(image)``), ``latlng`` (a float32 tensor ``(2,)``, ``[lat, lng]`` degrees), ``key`` (the
    original image id) and ``labels`` (``{head: class index}`` for ``evidence_heads``, -1 where masked).
    Give a ``transform`` returning tensors to use torch's default collate.

    Splitting (webdataset 1.0.2): shards are dealt out *before* shuffling, in the order given: rank ``r``
    of ``W`` (``RANK``/``WORLD_SIZE`` from the environment if both are set, else ``torch.distributed`` if
    initialized) takes shards ``r, r+W, ...``; DataLoader worker ``w`` of ``K`` then takes every ``K``-th
    of those. So every (rank, worker) reads a fixed, disjoint set of shards every epoch, shuffled within
    itself; with ``resampled=True`` each worker instead draws shards at random with replacement (not
    reproducible: webdataset seeds it from the OS), an endless stream.

    Uneven splits: the stream length of a rank is the number of samples in its shards. When the shards do
    not divide evenly over ``W * K`` (or differ in size, the last one always does), ranks get different
    numbers of batches and DDP hangs or drops work at the end of an epoch; a (rank, worker) with no shard
    at all raises webdataset's ``ValueError: No samples found in dataset; perhaps you have fewer shards
    than workers`` (``empty_check=False`` makes it yield nothing instead). For DDP, give every worker the
    same fixed epoch: ``epoch_size = samples_per_epoch // (W * K)`` (samples per worker; the pipeline
    repeats its shards, or with ``resampled=True`` draws more, until it has yielded that many) and iterate
    a fixed number of batches per rank. Use ``persistent_workers=True`` in the DataLoader for a new
    shuffle order every epoch (non-persistent workers restart the seeded shuffles each epoch); or rebuild
    the stream with ``seed=base_seed + epoch``.

    Args:
        urls: as for :func:`resolve_shards` (a directory needs ``split``).
        split: the split to read from a directory.
        shuffle: sample shuffle buffer size; 0 keeps the stored order within a shard.
        seed: seed of the shard and sample shuffles (the same in every rank and worker, which read
            different shards).
        resampled: draw shards with replacement forever (then set ``epoch_size``).
        transform: applied to the PIL image in the worker.
        epoch_size: samples per worker per epoch (``with_epoch``); None ends after one pass.
        max_pixels: larger photos are skipped as decompression bombs.
        handler: called with each exception from a bad shard or sample; returns True to skip it. Defaults
            to a :class:`SkipCounter`, available as the returned pipeline's ``skip_counter``.
        empty_check: raise when a worker's stream turns out empty (webdataset's check).
        evidence_heads: the evidence heads whose labels each sample carries: the record's own ``labels``,
            or for shards written without them, computed from its coordinates and ``S3_Label``.
        mark_bad: yield a :func:`~geoloc.data.transforms.bad_sample` marker (``{"key", "bad": reason}``) for a
            sample whose record or photo is unusable, instead of passing it to ``handler`` (the training
            collate drops, counts and reports these).

    Returns:
        An iterable ``webdataset.WebDataset``, usable as a torch ``IterableDataset``.

    Raises:
        ValueError: a shard is named twice (see :func:`resolve_shards`). Image ids are not checked across
            shards here (:class:`ShardDataset` does, for evaluation).
    """
    import webdataset as wds

    paths = [str(p) for p in resolve_shards(urls, split)]
    if not paths:
        raise ValueError(f"{urls}: the manifest lists no shards (every photo was skipped); nothing to train on")
    counter = SkipCounter() if handler is None else None
    handler = handler or counter
    ds = wds.WebDataset(paths, handler=handler, resampled=resampled,
                        shardshuffle=False if resampled else len(paths), detshuffle=True, seed=seed,
                        nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                        empty_check=empty_check)
    if shuffle and shuffle > 1:
        ds = ds.compose(wds.detshuffle(int(shuffle), initial=min(int(shuffle), 100), seed=seed))
    ds = ds.map(_DecodeSample(transform, max_pixels, evidence_heads, mark_bad), handler=handler)
    if epoch_size is not None:
        ds = ds.with_epoch(int(epoch_size))
    ds.skip_counter = counter
    return ds
