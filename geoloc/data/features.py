"""The feature cache: a dataset embedded once by a frozen backbone, so heads train on it for many epochs.

A frozen backbone in eval mode gives every photo the same features in every epoch, so they are computed
once and stored (:class:`FeatureCache`); training on them (``train.py features.enabled=true``) then runs
only the heads. A cache is valid for exactly what made it, and its folder name is a hash of all of it:

* the backbone: its name, the fingerprint of its weights (:func:`module_fingerprint`, the same hash as
  :func:`geoloc.retrieval.gallery.encoder_fingerprint`, BatchNorm statistics included) and its width;
* the preprocessing: the backbone's ``data_config``, turned into the evaluation transform
  (:func:`~geoloc.data.transforms.eval_transform`) that prediction also uses, so cached features equal
  what a trained run computes from the same photo;
* the dataset (:func:`dataset_identity`): a table's source file and a hash of its ids, coordinates, image
  paths and scene column; shards by their files (the manifest's sha256, else size and mtime);
* the evidence-label version and the stored dtype.

Layout (``$GEOLOC_CACHE/features/<dataset name>-<16 hex of that hash>/``, written with
:func:`~geoloc.artifacts.atomic_dir`, so a reader sees a whole cache or none)::

    features.npy   (N, D) float32 (or float16), one row per photo that could be used
    rows.npz       key (N,) image ids, latlng (N, 2) [lat, lng] degrees,
                   label_<head> (N,) int16 for every head of geoloc.evidence.labels.HEADS (-1 masked)
    meta.json      ArtifactMeta kind "features": the weights fingerprint, and as settings the backbone,
                   data_config, dataset identity, evidence version, dtype, n, dim, the photos skipped
                   with their reasons, and the sha256 of the two files above

Photos that cannot be used (missing, unreadable, truncated, ...) are skipped, counted and listed in the
meta, never fatal. :class:`FeatureStore` finds the cache of a (dataset, backbone) pair or builds it.
Because the folder is named by what made it, another backbone, transform or dataset simply has another
cache. A cache whose files do not match its meta (damaged), or whose meta does not match what it should
have been made from (stale), is refused with the folder and how to rebuild it (``rebuild=true``); it is
never replaced silently, since that would hide a disk or copying fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from geoloc.artifacts import ArtifactMeta, atomic_dir, to_jsonable
from geoloc.data.images import SkipReport

FEATURES_FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
#: How a cache is rebuilt, for messages.
REBUILD = ("rebuild=true on `python -m geoloc features backbone=... data=...`, or features.store.rebuild=true "
           "on train.py")
_FILES = ("features.npy", "rows.npz")


def default_features_root() -> Path:
    """``$GEOLOC_CACHE/features`` (``GEOLOC_CACHE`` defaults to ``~/.cache/geoloc``)."""
    return Path(os.environ.get("GEOLOC_CACHE") or "~/.cache/geoloc").expanduser() / "features"


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A short hash of a state dict (names and values, in name order): caches are valid only for these weights.

    The same hash as :func:`geoloc.retrieval.gallery.encoder_fingerprint` of the module, so a state dict read
    from a checkpoint (prefix stripped) and the live module agree.
    """
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the same bits
            t = t.view(torch.int16)
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def module_fingerprint(module: torch.nn.Module) -> str:
    """:func:`state_fingerprint` of a module's state dict (weights and buffers such as BatchNorm statistics)."""
    return state_fingerprint(module.state_dict())


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def dataset_identity(source) -> dict:
    """What identifies a dataset's photos without decoding them: ``{"type", "name", "source", "n", "hash"}``.

    Args:
        source: a :class:`~geoloc.data.readers.GeoDataset` (hash of its ids, coordinates, image paths and
            ``S3_Label`` scene column, which the scene label comes from) or a
            :class:`~geoloc.data.shards.ShardDataset` (hash of its shard files: name, size, and the sha256 the
            manifest records, else the modification time).

    Raises:
        ValueError: another kind of source (its photos could change without the cache noticing).
    """
    from geoloc.data.readers import GeoDataset

    h = hashlib.sha256()
    if isinstance(source, GeoDataset):
        table = source.table
        h.update("\n".join(table["key"].astype(str)).encode())
        h.update(np.ascontiguousarray(source.latlng, np.float64).tobytes())
        h.update("\n".join(map(str, table["path"].to_numpy())).encode())
        if "S3_Label" in table.columns:
            h.update(repr(list(map(str, table["S3_Label"].to_numpy()))).encode())
        return {"type": "table", "name": source.name, "source": str(source.source), "n": len(source),
                "hash": h.hexdigest()[:24]}
    from geoloc.data.shards import ShardDataset

    if isinstance(source, ShardDataset):
        recorded = {s["name"]: s.get("sha256") for s in (source.manifest or {}).get("shards", [])}
        for p in source.shards:
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{recorded.get(p.name) or st.st_mtime_ns}\n".encode())
        return {"type": "shards", "name": source.name, "source": str(source.source), "split": source.split,
                "n_shards": len(source.shards), "hash": h.hexdigest()[:24]}
    raise ValueError(f"{source!r}: feature caches are made of a GeoDataset (any reader) or a ShardDataset, whose "
                     "photos can be identified without decoding them")


def _rows_hash(keys: np.ndarray, latlng: np.ndarray) -> str:
    h = hashlib.sha256("\n".join(map(str, keys)).encode())
    h.update(np.ascontiguousarray(latlng, np.float64).tobytes())
    return h.hexdigest()[:24]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "dataset"


def cache_settings(source, encoder: torch.nn.Module, *, dtype: str = "float32") -> tuple[str, dict]:
    """The weights fingerprint and the settings a cache of ``source`` by ``encoder`` must record.

    Args:
        source: the dataset (see :func:`dataset_identity`).
        encoder: the backbone: an :class:`~geoloc.models.image_encoder.ImageEncoder` or any module with
            ``data_config`` (and ``name``, ``num_features``).
        dtype: ``float32`` or ``float16``.

    Returns:
        ``(fingerprint, settings)``.
    """
    from geoloc.evidence.labels import EVIDENCE_VERSION

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    data_config = getattr(encoder, "data_config", None)
    if data_config is None:
        raise ValueError(f"{type(encoder).__name__}: has no data_config, so its preprocessing is unknown; give an "
                         "ImageEncoder")
    settings = {"backbone": str(getattr(encoder, "name", type(encoder).__name__)),
                "num_features": int(getattr(encoder, "num_features", 0)) or None,
                "data_config": to_jsonable(dict(data_config)), "transform": "eval_transform",
                "dataset": dataset_identity(source), "evidence_version": EVIDENCE_VERSION, "dtype": dtype}
    return module_fingerprint(encoder), settings


def cache_key(fingerprint: str, settings: dict) -> str:
    """16 hex digits of a hash of the format version, the weights fingerprint and the identity settings."""
    text = json.dumps({"format_version": FEATURES_FORMAT_VERSION, "fingerprint": fingerprint, **settings},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FeatureCache:
    """Backbone features of a dataset's usable photos, with their ids, coordinates and evidence labels.

    Args:
        features: ``(N, D)`` float32 or float16.
        keys: ``(N,)`` image ids.
        latlng: ``(N, 2)`` ``[lat, lng]`` degrees.
        labels: ``{head: (N,) int16}`` for every evidence head (-1 where masked).
        meta: what made it (kind ``features``).
        folder: where it is stored (None before :meth:`save`).

    Attributes:
        status: ``"built"`` or ``"reused"`` when it came from :class:`FeatureStore`.
    """

    def __init__(self, features: np.ndarray, keys: np.ndarray, latlng: np.ndarray, labels: dict[str, np.ndarray],
                 meta: ArtifactMeta, folder: Path | None = None):
        n = len(features)
        if features.ndim != 2 or len(keys) != n or latlng.shape != (n, 2) or any(len(v) != n for v in labels.values()):
            raise ValueError(f"feature cache: features {features.shape}, {len(keys)} keys, latlng {latlng.shape} and "
                             f"labels {[len(v) for v in labels.values()][:3]} must all have one row per photo")
        self.features, self.keys, self.latlng, self.labels = features, keys, latlng, labels
        self.meta = meta
        self.folder = folder
        self.status = ""

    def __len__(self) -> int:
        return len(self.features)

    def __repr__(self) -> str:
        return f"FeatureCache({self.name!r}, n={len(self)}, dim={self.dim}, folder={str(self.folder)!r})"

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def name(self) -> str:
        return str(self.meta.settings["dataset"]["name"])

    @property
    def source(self) -> str:
        """The dataset it was made from and where the cache is, for messages."""
        return f"{self.meta.settings['dataset']['source']} (features {self.folder})"

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the backbone weights that made it."""
        return str(self.meta.fingerprint)

    @property
    def skipped(self) -> list[tuple[str, str, str]]:
        """``(key, reason, detail)`` of every photo left out when it was built."""
        return [(e["key"], e["reason"], e.get("detail", "")) for e in self.meta.settings["skipped"]["examples"]]

    # -- building --------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(cls, source, encoder: torch.nn.Module, *, dtype: str = "float32", batch_size: int = 64,
              device: str = "cpu", progress: bool = False) -> FeatureCache:
        """Embeds every usable photo of ``source`` with ``encoder`` in eval mode (not saved; see :meth:`save`).

        Args:
            source: the dataset (see :func:`dataset_identity`).
            encoder: the frozen backbone; its ``data_config`` gives the evaluation transform.
            dtype: how the features are stored.
            batch_size: photos per backbone call.
            device: where the backbone runs (it is put back where it was).
            progress: show a progress bar.

        Raises:
            ValueError: no photo of ``source`` could be used.
        """
        from geoloc.data.transforms import eval_transform

        started = time.perf_counter()
        transform = eval_transform(encoder.data_config)
        skipped = SkipReport()
        keys, latlng, scene, feats, batch = [], [], [], [], []
        was_training = encoder.training
        param = next(encoder.parameters(), None)
        home = param.device if param is not None else torch.device("cpu")
        encoder.eval().to(device)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(source), desc=f"embedding {getattr(source, 'name', 'photos')}", unit="img")

        def flush():
            if batch:
                feats.append(encoder(torch.stack(batch).to(device)).float().cpu().numpy())  # [B, D]
                if bar is not None:
                    bar.update(len(batch))
                batch.clear()

        try:
            for item in source.iter_items(skipped):
                if item.image is None:
                    skipped.add(item.key, "no_image", "the dataset gives no photo for this row")
                    continue
                batch.append(transform(item.image))
                keys.append(item.key)
                latlng.append(item.latlng)
                scene.append(item.meta.get("S3_Label"))
                if len(batch) == batch_size:
                    flush()
            flush()
        finally:
            encoder.train(was_training).to(home)
            if bar is not None:
                bar.close()
        features = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
        return cls.from_embeddings(source, encoder, features, keys, latlng, scene, skipped, dtype=dtype,
                                   seconds=time.perf_counter() - started)

    @classmethod
    def from_embeddings(cls, source, encoder: torch.nn.Module, features: np.ndarray, keys, latlng, scene,
                        skipped: SkipReport, *, dtype: str = "float32", seconds: float = 0.0,
                        **settings_extra) -> FeatureCache:
        """A cache from features already computed by ``encoder`` over ``source``'s usable photos, in the
        source's order (what :meth:`build` computes in one process, and an embedding pass over several:
        :func:`geoloc.training.embedding.run_embedding_pass`).

        Args:
            features: ``(N, D)``; keys, latlng, scene: per photo (``scene``: the ``S3_Label`` column or None).
            skipped: the photos that could not be used.
            settings_extra: more settings recorded in the meta (how the pass ran); not part of the cache's name.

        Raises:
            ValueError: no feature, or features that are not pooled ``(N, D)``.
        """
        from geoloc.evidence.labels import HEADS, evidence_labels

        fingerprint, settings = cache_settings(source, encoder, dtype=dtype)
        name = settings["dataset"]["name"]
        features = np.asarray(features)
        if len(features) == 0:
            raise ValueError(f"{settings['dataset']['source']}: no usable photo in {name} ({len(skipped)} skipped: "
                             f"{dict(skipped.counts)}); nothing to cache")
        if features.ndim != 2:
            raise ValueError(f"{settings['backbone']}: gives features of shape {tuple(features.shape[1:])}; a "
                             "feature cache needs pooled [B, D] features")
        features = features.astype(dtype)
        keys = np.asarray(keys, dtype=str)
        latlng = np.asarray(latlng, np.float64)
        scene = list(scene)
        table = evidence_labels(latlng, scene=scene if any(s is not None for s in scene) else None)
        labels = {head: table[head].to_numpy(np.int16) for head in HEADS}
        settings.update(n=len(features), dim=int(features.shape[1]), rows_hash=_rows_hash(keys, latlng),
                        synthetic=bool(getattr(source, "synthetic", False)),
                        notes=[str(n) for n in getattr(source, "notes", [])],
                        skipped=skipped.to_dict(max_items=len(skipped)),
                        seconds=round(float(seconds), 2), **settings_extra)
        meta = ArtifactMeta(kind="features", format_version=FEATURES_FORMAT_VERSION, fingerprint=fingerprint,
                            settings=settings)
        return cls(features, keys, latlng, labels, meta)

    # -- files -----------------------------------------------------------------------------------------
    def save(self, folder: str | Path, *, replace: bool = False) -> Path:
        """Writes the cache folder atomically (see the module docstring for the layout).

        Args:
            folder: the cache folder.
            replace: replace an existing folder whole; False raises FileExistsError when one exists.
        """
        folder = Path(folder)
        with atomic_dir(folder, replace=replace) as tmp:
            np.save(tmp / "features.npy", np.ascontiguousarray(self.features))
            np.savez(tmp / "rows.npz", key=self.keys, latlng=self.latlng,
                     **{f"label_{h}": v for h, v in self.labels.items()})
            self.meta.settings["files"] = {f: _sha256_file(tmp / f) for f in _FILES}
            self.meta.write(tmp / "meta.json")
        self.folder = folder
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, fingerprint: str | None = None, settings: dict | None = None,
             verify: bool = True) -> FeatureCache:
        """Reads a cache folder and checks it.

        Args:
            folder: written by :meth:`save`.
            fingerprint: the backbone weights it must have been made with.
            settings: the identity settings it must record (:func:`cache_settings`): backbone, data_config,
                dataset, evidence version, dtype.
            verify: check the files' sha256 against the meta (a damaged copy is refused).

        Raises:
            FileNotFoundError: no cache there.
            ValueError: a damaged cache (files that do not match the meta) or a stale one (made from another
                backbone, transform or dataset, or by another format version); the message says how to rebuild.
        """
        folder = Path(folder)
        how = f"delete {folder}, or rebuild it ({REBUILD})"
        meta = ArtifactMeta.read(folder / "meta.json", kind="features", format_version=FEATURES_FORMAT_VERSION,
                                 rebuild=how)
        if fingerprint is not None and meta.fingerprint != fingerprint:
            raise ValueError(f"{folder}: made with other backbone weights (fingerprint {meta.fingerprint}, these are "
                             f"{fingerprint}); {how}")
        for key, want in (settings or {}).items():
            have = meta.settings.get(key)
            if to_jsonable(have) != to_jsonable(want):
                raise ValueError(f"{folder}: stale: made with {key} {json.dumps(to_jsonable(have))[:300]}, expected "
                                 f"{json.dumps(to_jsonable(want))[:300]}; {how}")
        recorded = meta.settings.get("files") or {}
        for name in _FILES:
            path = folder / name
            if not path.is_file():
                raise ValueError(f"{path}: missing from the feature cache (damaged); {how}")
            if verify and recorded.get(name) != _sha256_file(path):
                raise ValueError(f"{path}: its contents do not match the sha256 its meta.json records (damaged); {how}")
        try:
            features = np.load(folder / "features.npy", allow_pickle=False)
            with np.load(folder / "rows.npz", allow_pickle=False) as z:
                keys, latlng = z["key"], z["latlng"]
                labels = {k[len("label_"):]: z[k] for k in z.files if k.startswith("label_")}
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise ValueError(f"{folder}: not a readable feature cache ({type(e).__name__}: {e}); {how}") from e
        n, dim = meta.settings.get("n"), meta.settings.get("dim")
        if features.shape != (n, dim) or str(features.dtype) != meta.settings.get("dtype"):
            raise ValueError(f"{folder}/features.npy: {features.dtype} {features.shape}, its meta says "
                             f"{meta.settings.get('dtype')} ({n}, {dim}) (damaged); {how}")
        try:
            return cls(features, keys, latlng, labels, meta, folder=folder)
        except ValueError as e:
            raise ValueError(f"{folder}: {e} (damaged); {how}") from e


class FeatureStore:
    """Where feature caches live, and how a missing one is made: what training and the ``features`` step share.

    Args:
        root: the folder of caches; None: ``$GEOLOC_CACHE/features``.
        dtype: ``float32`` or ``float16`` (half the size; the cached values are rounded to 11 significant bits).
        batch_size: photos per backbone call while building.
        device: where the backbone runs while building.
        rebuild: embed again and replace the cache even when a valid (or a damaged) one exists.
        progress: show a progress bar while building.
    """

    def __init__(self, root: str | Path | None = None, dtype: str = "float32", batch_size: int = 64,
                 device: str = "cpu", rebuild: bool = False, progress: bool = False):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.root = Path(root).expanduser() if root else default_features_root()
        self.dtype, self.batch_size, self.device = dtype, int(batch_size), str(device)
        self.rebuild, self.progress = bool(rebuild), bool(progress)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r}, dtype={self.dtype!r})"

    def folder(self, source, encoder: torch.nn.Module) -> Path:
        """The cache folder of ``source`` embedded by ``encoder`` (whether it exists or not)."""
        fingerprint, settings = cache_settings(source, encoder, dtype=self.dtype)
        return self._folder(fingerprint, settings)

    def _folder(self, fingerprint: str, settings: dict) -> Path:
        return self.root / f"{_safe_name(settings['dataset']['name'])}-{cache_key(fingerprint, settings)}"

    def get(self, source, encoder: torch.nn.Module, builder=None) -> FeatureCache | None:
        """The cache of ``source`` by ``encoder``: read when it exists and is valid, else built and saved.

        Args:
            builder: ``(source, encoder) -> FeatureCache`` that embeds (None: :meth:`FeatureCache.build` in this
                process); a builder that returns None (a process of a multi-process pass other than the first)
                makes this return None: that process saves nothing.

        Raises:
            ValueError: the cache there is damaged or stale (with ``rebuild=False``), or no photo is usable.
        """
        fingerprint, settings = cache_settings(source, encoder, dtype=self.dtype)
        folder = self._folder(fingerprint, settings)
        if folder.exists() and not self.rebuild:
            cache = FeatureCache.load(folder, fingerprint=fingerprint, settings=settings)
            cache.status = "reused"
            return cache
        if builder is None:
            cache = FeatureCache.build(source, encoder, dtype=self.dtype, batch_size=self.batch_size,
                                       device=self.device, progress=self.progress)
        else:
            cache = builder(source, encoder)
            if cache is None:
                return None
        try:
            cache.save(folder, replace=self.rebuild)
        except FileExistsError:  # another process (a DDP rank) published the same cache meanwhile
            cache = FeatureCache.load(folder, fingerprint=fingerprint, settings=settings)
            cache.status = "reused"
            return cache
        cache.status = "built"
        return cache
