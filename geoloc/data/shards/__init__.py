"""Webdataset shards: the offline artifact that training streams and evaluation can read.

A shard directory written by :func:`write_shards` holds, for one ``split``:

* ``{split}-000000.tar``, ``{split}-000001.tar``, ...: webdataset tar shards (written by webdataset's
  ``ShardWriter``). Each sample is two members, ``KEY.jpg`` (the photo as an upright RGB JPEG) and
  ``KEY.json`` ``{"key": IMG_ID, "latlng": [lat, lng], "meta": {...}, "labels": {head: int},
  "evidence_version": int}``. ``KEY`` is :func:`safe_key` of the image id (webdataset splits member
  names at the first dot, so keys carry no dots or slashes); the original ``IMG_ID`` is the ``key`` in
  the json. ``labels`` are the evidence labels of every head of :data:`geoloc.evidence.labels.HEADS`
  (class indices, ``-1`` where masked; the scene from the row's ``S3_Label``), computed once here so
  that training only stacks them. Shards are byte-for-byte reproducible (fixed member mtime, mode and
  owner), so their sha256 compare across runs.
* ``{split}-manifest.json``: counts, per-shard ``n_samples``, ``bytes`` and ``sha256``, every skipped
  photo with its reason, the source's name, ``synthetic`` flag and notes, and what the labels mean
  (``evidence_labels``: version and each head's classes).
* ``{split}-progress.jsonl``: the journal (:class:`geoloc.artifacts.Journal`) a killed or extended run
  continues from: a header line, then one line per finished shard with the image ids it holds and the
  photos skipped before it.

Folders written before records carried labels (format 1: no ``labels``, no ``evidence_version``) read
as before; the writer does not extend them (``resume=false`` rewrites them).

Readers: :class:`ShardDataset` (an :class:`~geoloc.data.readers.ItemSource`, deterministic order, for
evaluation) and :func:`make_webdataset` (the shuffled, node- and worker-split training stream);
:func:`parse_record` checks one sample's json for either.
"""

from geoloc.data.shards.reader import ShardDataset, parse_record, resolve_shards
from geoloc.data.shards.stream import SkipCounter, make_webdataset, scene_label
from geoloc.data.shards.writer import MANIFEST_VERSION, MAX_KEY_LEN, safe_key, write_shards

__all__ = ["MANIFEST_VERSION", "MAX_KEY_LEN", "ShardDataset", "SkipCounter", "make_webdataset", "parse_record",
           "resolve_shards", "safe_key", "scene_label", "write_shards"]
