"""Webdataset shards: the offline artifact that training streams and evaluation can read.

A shard directory written by :func:`write_shards` holds, for one ``split``:

* ``{split}-000000.tar``, ``{split}-000001.tar``, ...: webdataset tar shards. Each sample is two members,
  ``KEY.jpg`` (the photo as an upright RGB JPEG) and ``KEY.json``
  ``{"key": IMG_ID, "latlng": [lat, lng], "meta": {...}}``. ``KEY`` is :func:`safe_key` of the image id
  (webdataset splits member names at the first dot, so keys carry no dots or slashes); the original
  ``IMG_ID`` is the ``key`` in the json. Shards are byte-for-byte reproducible (fixed mtime and owner).
* ``{split}-manifest.json``: counts, per-shard ``n_samples`` and ``sha256``, every skipped photo with its
  reason, the source's name, ``synthetic`` flag and notes.
* ``{split}-progress.jsonl``: the journal a killed or extended run continues from: a header line, then one
  line per finished shard with the image ids it holds and the photos skipped before it.

Readers: :class:`ShardDataset` (an :class:`~geoloc.data.readers.ItemSource`, deterministic order, for
evaluation) and :func:`make_webdataset` (the shuffled, node- and worker-split training stream).
"""

from geoloc.data.shards.reader import ShardDataset, resolve_shards
from geoloc.data.shards.stream import SkipCounter, make_webdataset, scene_label
from geoloc.data.shards.writer import MANIFEST_VERSION, MAX_KEY_LEN, safe_key, write_shards

__all__ = ["MANIFEST_VERSION", "MAX_KEY_LEN", "ShardDataset", "SkipCounter", "make_webdataset", "resolve_shards",
           "safe_key", "scene_label", "write_shards"]
