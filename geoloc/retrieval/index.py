"""Retrieval index: reference photos embedded once, clustered by location inside each geocell.

    python -m geoloc index ckpt=RUN/checkpoints/best.ckpt data=shards data.dir=SHARDS data.split=train
    python -m geoloc index ckpt=... data=sample data.split=train
    python -m geoloc index ckpt=... data=im2gps3k data.root=DIR data.folds=5 data.fold=[0,1,2]

PIGEON refines a geocell prediction with the training photos: inside each candidate cell it clusters
the photos' locations, represents each cluster by the mean embedding of its photos (a prototype), picks
the cluster whose prototype is most similar to the query, and answers a location inside it. This module
builds that index; :class:`geoloc.retrieval.scorers.PrototypeScorer` uses it (``refine=prototypes``): it
ranks the top cells with :meth:`RetrievalIndex.score_cells` and answers the coordinate of the most similar
reference photo of the winning cluster (:meth:`RetrievalIndex.nearest_in_cluster`; PIGEON's released
code takes the *least* similar one there, which we do not copy). Prototypes sorted by cell and
references sorted by cluster are both :class:`~geoloc.retrieval.table.CellTable` s, so both questions
("best prototype of each candidate cell", "best reference of a cluster") are the same range search.

**Clustering** (:class:`Clustering`, ``cluster.*`` in ``conf/index.yaml``). PIGEON's released code runs
OPTICS (``min_samples=3, xi=0.15``) on a precomputed haversine matrix of each cell's photos, makes cells
with fewer than ``min_samples`` photos one cluster and drops the noise. Our default is **HDBSCAN** with
``min_samples = min_cluster_size = 3``: it extracts clusters from the same density hierarchy (mutual
reachability) as OPTICS, so it adapts to scale the same way (landmarks inside a city cell, towns inside
a rural one), and on 100K MP-16 coordinates it finds about as many clusters as OPTICS in a fraction of
the time, with ``O(n)`` memory per cell.
``method=optics`` reproduces PIGEON's choice (``xi``); ``method=dbscan`` uses one fixed radius
``eps_km`` for every cell (coarse: at 25 km a whole city cell is one cluster). For HDBSCAN, a positive
``eps_km`` keeps clusters closer than that together (``cluster_selection_epsilon``).

Distances are great-circle distances, computed as chords between unit vectors (``2 R sin(d / 2R)``):
the chord is a monotone function of the haversine distance, so DBSCAN (radius converted exactly) and
the density hierarchy are the same as with ``metric="haversine"`` (on 80 MP-16 cells all three methods
gave the same labels both ways), the antimeridian and the poles need no care, and scikit-learn's
KD-tree (Euclidean) is much faster than its haversine ball tree.

**Noise.** Points no cluster claims join the cluster of their nearest clustered neighbour
(``noise=nearest``, the default); if a cell has no cluster at all it is one cluster, and so is a cell
with fewer than ``min_samples`` photos. Dropping noise (PIGEON) would make those photos unreachable;
keeping each as a singleton (``noise=singleton``) makes a cell's best-prototype score a maximum over
many single photos, which inflates the scores of cells with much noise against cells with real
clusters. Attached, an isolated photo is still returned by :meth:`RetrievalIndex.nearest_in_cluster`
when it is the best match. A cell with more than ``max_points`` references is clustered on a seeded
sample of that size and the others join their nearest sampled point's cluster (HDBSCAN is quadratic in
time per cell).

**Files** (``RUN/index_v1/`` beside ``RUN/checkpoints/``; the version is in the folder name and in
``meta.json``): ``index.npz`` (reference coordinates, keys, cell and cluster of each reference, sorted
by cluster; per cluster its cell, prototype and representative coordinate), ``ref_emb.npy`` (the
L2-normalized reference embeddings, apart so that loading maps them instead of reading them: at MP-16
scale they are gigabytes and refinement touches only the winning clusters), ``refs.faiss`` (a FAISS
inner-product index of them, read on first use) and ``meta.json`` (an
:class:`~geoloc.artifacts.ArtifactMeta` of kind ``index``: format version, a fingerprint of the network
weights, and as settings the embedding kind, clustering, counts, the reference source, the checkpoint,
skipped photos; the flat ``meta.json`` of earlier versions still loads). The folder is written by
:func:`geoloc.artifacts.atomic_dir`, so a reader never sees half an index.
"""

from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from geoloc.artifacts import ArtifactMeta, atomic_dir
from geoloc.data.images import SkipReport
from geoloc.geo import EARTH_RADIUS_KM, latlng_to_xyz, validate_latlng
from geoloc.geo.cells import Geocells
from geoloc.retrieval.gallery import encoder_fingerprint
from geoloc.retrieval.table import CellTable, top_k_inner
from geoloc.retrieval.table import normalize as _normalize

INDEX_FORMAT_VERSION = 1
EMBEDDINGS = ("features", "image_emb")
METHODS = ("hdbscan", "optics", "dbscan")
NOISE = ("nearest", "singleton")
#: How an index is rebuilt, for messages.
REBUILD = "python -m geoloc index ckpt=RUN/checkpoints/best.ckpt data=..."
_ARRAYS = ("ref_latlng", "ref_emb", "ref_cell", "ref_cluster", "ref_keys", "cluster_cell", "cluster_proto",
           "cluster_latlng")


def default_index_dir(ckpt: str | Path) -> Path:
    """``RUN/index_v1`` for ``RUN/checkpoints/x.ckpt``."""
    return Path(ckpt).parent.parent / f"index_v{INDEX_FORMAT_VERSION}"


def _as_numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@torch.no_grad()
def embed_images(net, images: list, transform, *, embedding: str = "features", batch_size: int = 64,
                 device: str = "cpu", precision: str = "32") -> np.ndarray:
    """Embeds PIL images with a :class:`~geoloc.models.geolocator.GeoLocator`.

    Args:
        net: the network (put in eval mode for the call).
        images: ``B`` PIL images.
        transform: its evaluation transform (PIL -> ``[3, H, W]``).
        embedding: ``features`` (the backbone's pooled features, ``net(x)["features"]``) or ``image_emb``
            (the projection into the location encoder's space, ``net(x)["image_emb"]``).
        precision: ``32``, ``bf16``, ``16`` or ``auto`` (:mod:`geoloc.precision`): the forward pass under
            autocast; the embeddings are normalized in float32.

    Returns:
        ``(B, D)`` float32, L2-normalized.
    """
    from geoloc.precision import autocast, resolve_precision

    precision = resolve_precision(precision, device)
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode(), autocast(precision, device):
            out = [net(torch.stack([transform(im) for im in images[s:s + batch_size]]).to(device))[embedding]
                   .float().cpu() for s in range(0, len(images), batch_size)]
    finally:
        net.train(was_training)
    return _normalize(torch.cat(out).numpy()) if out else np.zeros((0, 0), np.float32)


def _chord(km: float) -> float:
    """Straight-line distance between unit vectors ``km`` apart on the sphere."""
    return 2.0 * float(np.sin(min(km / (2.0 * EARTH_RADIUS_KM), np.pi / 2)))


def _density_labels(xyz: np.ndarray, method: str, min_samples: int, eps_km: float, xi: float) -> np.ndarray:
    """scikit-learn's labels (-1: noise) for points given as ``(n, 3)`` unit vectors."""
    if method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        return HDBSCAN(min_cluster_size=min_samples, min_samples=min_samples, cluster_selection_epsilon=_chord(eps_km),
                       algorithm="kd_tree", copy=True).fit_predict(xyz)
    if method == "optics":
        from sklearn.cluster import OPTICS

        return OPTICS(min_samples=min_samples, xi=xi, algorithm="kd_tree").fit_predict(xyz)
    from sklearn.cluster import DBSCAN

    # photos often share coordinates: cluster the distinct ones, weighted (same result, less memory)
    uniq, inverse, counts = np.unique(xyz, axis=0, return_inverse=True, return_counts=True)
    labels = DBSCAN(eps=_chord(eps_km), min_samples=min_samples, algorithm="kd_tree").fit_predict(
        uniq, sample_weight=counts)
    return labels[inverse.reshape(-1)]


def _nearest(points: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of the nearest of ``points (m, 3)`` for each of ``queries (q, 3)`` (unit vectors)."""
    from scipy.spatial import cKDTree

    return cKDTree(points).query(queries, k=1)[1]


def cluster_cell_points(latlng: np.ndarray, *, method: str = "hdbscan", min_samples: int = 3, eps_km: float = 0.0,
                        xi: float = 0.15, noise: str = "nearest", max_points: int = 20000,
                        seed: int = 0) -> np.ndarray:
    """Location clusters of one cell's photos, by density on great-circle distance (see the module doc).

    Args:
        latlng: ``(n, 2)`` ``[lat, lng]`` degrees.
        method: ``hdbscan``, ``optics`` (PIGEON) or ``dbscan``.
        min_samples: neighbours (itself included) that make a core point, and the smallest cluster
            (hdbscan); cells with fewer photos are one cluster.
        eps_km: dbscan: the neighbourhood radius (needed); hdbscan: clusters closer than this are not
            split (0: off); optics: unused.
        xi: optics: the steepness that ends a cluster.
        noise: ``nearest`` (join the nearest clustered photo's cluster) or ``singleton`` (one cluster each).
        max_points: larger cells are clustered on a seeded sample of this size; the rest join the
            cluster of their nearest sampled photo.
        seed: for that sample.

    Returns:
        ``(n,)`` int64 labels ``0..m-1``; every photo belongs to a cluster.
    """
    Clustering(method, min_samples, eps_km, xi, noise, max_points, seed)  # validates the settings
    latlng = np.asarray(latlng, np.float64).reshape(-1, 2)
    n = len(latlng)
    if n < min_samples:
        return np.zeros(n, np.int64)
    xyz = latlng_to_xyz(latlng)
    sample = None
    if n > max_points:
        sample = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    fit = xyz if sample is None else xyz[sample]
    labels = np.asarray(_density_labels(fit, method, min_samples, eps_km, xi), np.int64)
    is_noise = labels < 0
    if is_noise.all():
        labels[:] = 0  # no structure found: the cell is one place
    elif is_noise.any():
        if noise == "singleton":
            labels[is_noise] = labels.max() + 1 + np.arange(is_noise.sum())
        else:
            labels[is_noise] = labels[~is_noise][_nearest(fit[~is_noise], fit[is_noise])]
    if sample is not None:
        full = np.empty(n, np.int64)
        full[sample] = labels
        rest = np.ones(n, bool)
        rest[sample] = False
        full[rest] = labels[_nearest(fit, xyz[rest])]
        labels = full
    return np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)


@dataclass(frozen=True)
class Clustering:
    """How :func:`cluster_cell_points` groups each cell's references (``cluster`` in ``conf/index.yaml``)."""

    method: str = "hdbscan"
    min_samples: int = 3
    eps_km: float = 0.0
    xi: float = 0.15
    noise: str = "nearest"
    max_points: int = 20000
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"clustering method must be one of {METHODS}, got {self.method!r}")
        if self.noise not in NOISE:
            raise ValueError(f"noise must be one of {NOISE}, got {self.noise!r}")
        if int(self.min_samples) < 2:
            raise ValueError(f"min_samples must be at least 2, got {self.min_samples}")
        if self.eps_km < 0 or (self.method == "dbscan" and self.eps_km <= 0):
            raise ValueError(f"eps_km must be >= 0 (and > 0 for dbscan, its radius), got {self.eps_km} "
                             f"with method={self.method}")
        if not 0 < self.xi < 1:
            raise ValueError(f"xi must lie in (0, 1), got {self.xi}")
        if int(self.max_points) < int(self.min_samples):
            raise ValueError(f"max_points ({self.max_points}) must be at least min_samples ({self.min_samples})")

    def labels(self, latlng: np.ndarray) -> np.ndarray:
        """:func:`cluster_cell_points` with these settings."""
        return cluster_cell_points(latlng, **asdict(self))


def _segments(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For runs of the given lengths laid end to end: each run's start and each element's run."""
    starts = np.cumsum(lengths) - lengths
    return starts, np.repeat(np.arange(len(lengths)), lengths)


class RetrievalIndex:
    """Reference embeddings, their location clusters per cell, and cluster prototypes.

    References are stored sorted by cluster and clusters sorted by cell, so a cluster's members and a
    cell's prototypes are contiguous; reference indices (:meth:`search`, :meth:`nearest_in_cluster`)
    refer to this order (``ref_keys`` names them).

    Attributes:
        ref_latlng: ``(N, 2)`` float64 reference coordinates, ``[lat, lng]`` degrees.
        ref_emb: ``(N, D)`` float32 L2-normalized embeddings.
        ref_cell: ``(N,)`` int64 geocell of each reference.
        ref_cluster: ``(N,)`` int64 global cluster id (non-decreasing).
        ref_keys: ``(N,)`` str reference ids.
        cluster_cell: ``(M,)`` int64 cell of each cluster (non-decreasing).
        cluster_proto: ``(M, D)`` float32 L2-normalized mean embedding of each cluster's members.
        cluster_latlng: ``(M, 2)`` float64 the member nearest to the members' mean location.
        meta: format version, embedding kind, network fingerprint, clustering settings, counts, source.
    """

    def __init__(self, *, ref_latlng, ref_emb, ref_cell, ref_cluster, ref_keys, cluster_cell, cluster_proto,
                 cluster_latlng, meta: dict, source: str = "<memory>"):
        # no copies of arrays that already have the right type (a memory-mapped ref_emb stays mapped)
        self.ref_latlng = np.asarray(ref_latlng, np.float64)
        self.ref_emb = ref_emb if isinstance(ref_emb, np.memmap) else np.ascontiguousarray(ref_emb, np.float32)
        self.ref_cell = np.asarray(ref_cell, np.int64)
        self.ref_cluster = np.asarray(ref_cluster, np.int64)
        self.ref_keys = np.asarray(ref_keys)
        if self.ref_keys.dtype.kind != "U":
            self.ref_keys = self.ref_keys.astype(str)
        self.cluster_cell = np.asarray(cluster_cell, np.int64)
        self.cluster_proto = np.ascontiguousarray(cluster_proto, np.float32)
        self.cluster_latlng = np.asarray(cluster_latlng, np.float64)
        self.meta = dict(meta)
        self.source = source
        self._check()
        #: the prototypes, keyed by cell, and the references, keyed by cluster (both already sorted)
        self.prototypes = CellTable(self.cluster_proto, self.cluster_cell, self.cluster_latlng)
        self.references = CellTable(self.ref_emb, self.ref_cluster, self.ref_latlng)
        self._faiss = None
        self._faiss_path: Path | None = None

    def _check(self) -> None:
        source, n, m = self.source, len(self.ref_cluster), len(self.cluster_cell)
        d = self.ref_emb.shape[1] if self.ref_emb.ndim == 2 else -1
        shapes = {"ref_latlng": (n, 2), "ref_emb": (n, d), "ref_cell": (n,), "ref_cluster": (n,), "ref_keys": (n,),
                  "cluster_cell": (m,), "cluster_proto": (m, d), "cluster_latlng": (m, 2)}
        for name, want in shapes.items():
            if getattr(self, name).shape != want:
                raise ValueError(f"{source}: {name} has shape {getattr(self, name).shape}, expected {want} "
                                 f"({n} references, {m} clusters)")
        if np.any(np.diff(self.cluster_cell) < 0) or np.any(np.diff(self.ref_cluster) < 0):
            raise ValueError(f"{source}: references must be sorted by cluster and clusters by cell "
                             "(RetrievalIndex.from_embeddings makes them so)")
        if n and (self.ref_cluster[0] < 0 or self.ref_cluster[-1] >= m):
            raise ValueError(f"{source}: reference cluster ids must lie in 0..{m - 1}, found "
                             f"{self.ref_cluster[0]}..{self.ref_cluster[-1]}")
        if n and not np.array_equal(self.cluster_cell[self.ref_cluster], self.ref_cell):
            bad = int(np.flatnonzero(self.cluster_cell[self.ref_cluster] != self.ref_cell)[0])
            raise ValueError(f"{source}: reference {str(self.ref_keys[bad])!r} is in cell {self.ref_cell[bad]} but "
                             f"its cluster {self.ref_cluster[bad]} is in cell "
                             f"{self.cluster_cell[self.ref_cluster[bad]]}")

    def __len__(self) -> int:
        return len(self.ref_latlng)

    def __repr__(self) -> str:
        return (f"RetrievalIndex({len(self)} references, {len(self.cluster_cell)} clusters in "
                f"{len(np.unique(self.cluster_cell))} cells, embedding={self.meta.get('embedding')!r})")

    # -- building --------------------------------------------------------------------------------------
    @classmethod
    def from_embeddings(cls, latlng: np.ndarray, emb: np.ndarray, cell: np.ndarray, *, keys=None,
                        clustering: Clustering | None = None, meta: dict | None = None) -> RetrievalIndex:
        """Clusters given reference embeddings by location inside each cell and makes prototypes.

        Args:
            latlng: ``(N, 2)`` reference coordinates.
            emb: ``(N, D)`` their embeddings (normalized here).
            cell: ``(N,)`` their geocells (``Geocells.assign(latlng)``).
            keys: ``(N,)`` reference ids; None numbers them.
            clustering: the settings; None: :class:`Clustering` defaults.
            meta: merged into the index's ``meta``.
        """
        clustering = clustering or Clustering()
        latlng = validate_latlng(latlng, what="reference coordinates")
        emb = _normalize(emb)
        cell = np.asarray(cell, np.int64).reshape(-1)
        keys = np.arange(len(latlng)).astype(str) if keys is None else np.asarray(keys).astype(str)
        if not (len(emb) == len(cell) == len(keys) == len(latlng)):
            raise ValueError(f"references: {len(latlng)} coordinates, {len(emb)} embeddings, {len(cell)} cells, "
                             f"{len(keys)} keys; need one of each per reference")
        by_cell = np.argsort(cell, kind="stable")
        cell_starts, _ = _segments(np.unique(cell, return_counts=True)[1])
        cluster = np.empty(len(cell), np.int64)
        cluster_cell = []
        for s, e in zip(cell_starts, [*cell_starts[1:], len(cell)]):  # cells in increasing order
            members = by_cell[s:e]
            labels = clustering.labels(latlng[members])
            cluster[members] = len(cluster_cell) + labels
            cluster_cell.extend([cell[members[0]]] * (int(labels.max()) + 1))
        # members of a cluster are contiguous once sorted by cluster: sums per cluster by reduceat
        order = np.argsort(cluster, kind="stable")
        cluster, latlng, emb, cell, keys = cluster[order], latlng[order], emb[order], cell[order], keys[order]
        sizes = np.bincount(cluster, minlength=len(cluster_cell))
        starts, run = _segments(sizes)
        protos = _normalize(np.add.reduceat(emb, starts, axis=0)) if len(emb) else emb
        xyz = latlng_to_xyz(latlng)
        centre = np.add.reduceat(xyz, starts, axis=0) if len(xyz) else xyz
        closeness = np.einsum("ij,ij->i", xyz, centre[run])
        representative = np.lexsort((-closeness, run))[starts]  # the member nearest the mean direction
        meta = {"format_version": INDEX_FORMAT_VERSION, "clustering": asdict(clustering),
                "n_references": int(len(latlng)), "n_clusters": len(cluster_cell),
                "n_cells_with_references": int(len(cell_starts)), **(meta or {})}
        return cls(ref_latlng=latlng, ref_emb=emb, ref_cell=cell, ref_cluster=cluster, ref_keys=keys,
                   cluster_cell=np.asarray(cluster_cell, np.int64), cluster_proto=protos,
                   cluster_latlng=latlng[representative], meta=meta)

    @classmethod
    def build(cls, net, source, cells: Geocells, transform, *, embedding: str = "features", batch_size: int = 64,
              clustering: Clustering | None = None, device: str = "cpu", precision: str = "32",
              progress: bool = False) -> tuple[RetrievalIndex, SkipReport]:
        """Embeds every readable photo of ``source`` and indexes it.

        Args:
            net: a trained :class:`~geoloc.models.geolocator.GeoLocator`.
            source: the reference photos (an :class:`~geoloc.data.readers.ItemSource`: any reader's
                dataset, or :class:`~geoloc.data.shards.ShardDataset`).
            cells: the geocells the network classifies into.
            transform: the network's evaluation transform.
            embedding: ``features`` or ``image_emb``.
            batch_size: photos per forward pass.
            clustering: the clustering settings; None: :class:`Clustering` defaults.
            device: where the network is.
            precision: of the forward pass (:func:`embed_images`); recorded in the index's meta.
            progress: show a progress bar.

        Returns:
            ``(index, skipped)``: photos that cannot be decoded are skipped and counted, not fatal.
        """
        from geoloc.precision import resolve_precision

        clustering = clustering or Clustering()
        name = getattr(source, "name", type(source).__name__)
        skipped = SkipReport()
        latlng, keys, embs, batch = [], [], [], []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(source), desc="embedding references", unit="img")

        def flush():
            if batch:
                embs.append(embed_images(net, [it.image for it in batch], transform, embedding=embedding,
                                         batch_size=batch_size, device=device, precision=precision))
                latlng.extend(it.latlng for it in batch)
                keys.extend(it.key for it in batch)
                if bar is not None:
                    bar.update(len(batch))
                batch.clear()

        for item in source.iter_items(skipped):
            if item.image is None:
                raise ValueError(f"{name}: reference {item.key!r} has no photo; the index embeds photos "
                                 "(read the source with its images)")
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        flush()
        if bar is not None:
            bar.close()
        index = cls.from_references(net, source, cells, latlng, np.concatenate(embs) if embs else None, keys, skipped,
                                    embedding=embedding, clustering=clustering,
                                    precision=resolve_precision(precision, device))
        return index, skipped

    @classmethod
    def from_references(cls, net, source, cells: Geocells, latlng, emb: np.ndarray | None, keys, skipped: SkipReport, *,
                        embedding: str = "features", clustering: Clustering | None = None, precision: str = "32",
                        **meta_extra) -> RetrievalIndex:
        """The index of reference photos already embedded by ``net`` (L2-normalized, in the source's order):
        what :meth:`build` computes in one process, and an embedding pass over several
        (:func:`geoloc.training.embedding.run_embedding_pass`).

        Args:
            meta_extra: more entries for the index's meta (how the pass ran).

        Raises:
            ValueError: no reference photo.
        """
        name = getattr(source, "name", type(source).__name__)
        if emb is None or not len(latlng):
            raise ValueError(f"{name}: no readable reference photo ({len(skipped)} skipped: {dict(skipped.counts)})")
        latlng = np.asarray(latlng, np.float64)
        meta = {"embedding": embedding, "fingerprint": encoder_fingerprint(net), "n_cells": len(cells),
                "precision": precision,
                "cells": str(cells.source), "source": str(getattr(source, "source", name)), "dataset": name,
                "notes": list(getattr(source, "notes", [])), "skipped": skipped.to_dict(max_items=20), **meta_extra}
        return cls.from_embeddings(latlng, np.asarray(emb, np.float32), cells.assign(latlng), keys=np.asarray(keys),
                                   clustering=clustering or Clustering(), meta=meta)

    # -- files -----------------------------------------------------------------------------------------
    def artifact_meta(self) -> ArtifactMeta:
        """What :meth:`save` writes as ``meta.json``: kind ``index``, format version, network fingerprint and,
        as settings, everything else of :attr:`meta`."""
        settings = {k: v for k, v in self.meta.items() if k not in ("kind", "format_version", "fingerprint",
                                                                     "created")}
        return ArtifactMeta(kind="index", format_version=INDEX_FORMAT_VERSION, fingerprint=self.meta.get("fingerprint"),
                            settings=settings)

    def save(self, folder: str | Path) -> Path:
        """Writes the index folder atomically (:func:`geoloc.artifacts.atomic_dir`).

        An existing index at ``folder`` is replaced whole.

        Returns:
            ``folder``, holding ``index.npz``, ``ref_emb.npy``, ``refs.faiss`` and ``meta.json``.
        """
        import faiss

        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            np.savez_compressed(tmp / "index.npz", **{k: getattr(self, k) for k in _ARRAYS if k != "ref_emb"})
            np.save(tmp / "ref_emb.npy", self.ref_emb)
            faiss.write_index(self.faiss_index, str(tmp / "refs.faiss"))
            self.artifact_meta().write(tmp / "meta.json")
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, net=None, mmap: bool = True, rebuild: str = REBUILD) -> RetrievalIndex:
        """Reads an index folder.

        Args:
            folder: written by :meth:`save` (``python -m geoloc index``).
            net: if given, an index built with other weights is refused.
            mmap: map the reference embeddings instead of reading them (the largest array; refinement
                touches only the members of the winning clusters). ``refs.faiss`` is read on first use.
            rebuild: the command that rebuilds it, for messages.

        Raises:
            FileNotFoundError: not an index folder.
            ValueError: another format version, other weights, or inconsistent arrays.
        """
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder}: not a retrieval index (no meta.json; {rebuild} builds one)")
        fingerprint = encoder_fingerprint(net) if net is not None else None
        stored = ArtifactMeta.read(meta_path, kind="index", format_version=INDEX_FORMAT_VERSION,
                                   fingerprint=fingerprint, rebuild=rebuild)
        meta = {"format_version": stored.format_version, "fingerprint": stored.fingerprint, **stored.settings}
        for name in ("index.npz", "ref_emb.npy"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: missing from the index folder; rebuild it ({rebuild})")
        try:
            with np.load(folder / "index.npz", allow_pickle=False) as z:
                missing = [k for k in _ARRAYS if k != "ref_emb" and k not in z.files]
                if missing:
                    raise ValueError(f"{folder / 'index.npz'}: missing array(s) {missing}; rebuild it ({rebuild})")
                arrays = {k: z[k] for k in _ARRAYS if k != "ref_emb"}
            arrays["ref_emb"] = np.load(folder / "ref_emb.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise ValueError(f"{folder}: an index file cannot be read ({type(e).__name__}: {e}); the index is "
                             f"damaged: rebuild it ({rebuild})") from e
        index = cls(**arrays, meta=meta, source=str(folder))
        index._faiss_path = folder / "refs.faiss"
        return index

    # -- queries ---------------------------------------------------------------------------------------
    @property
    def faiss_index(self):
        """FAISS inner-product index over the reference embeddings (cosine: they are normalized).

        A loaded index reads its ``refs.faiss``; otherwise (or if that file does not match) it is built
        from ``ref_emb``.
        """
        if self._faiss is None:
            import faiss

            d = self.ref_emb.shape[1]
            path = self._faiss_path
            if path is not None and path.is_file():
                stored = faiss.read_index(str(path))
                if stored.ntotal == len(self) and stored.d == d:
                    self._faiss = stored
            if self._faiss is None:
                self._faiss = faiss.IndexFlatIP(d)
                self._faiss.add(np.ascontiguousarray(self.ref_emb, np.float32))
        return self._faiss

    def _queries(self, query) -> np.ndarray:
        q = _as_numpy(query)
        if q.ndim != 2 or q.shape[1] != self.ref_emb.shape[1]:
            raise ValueError(f"queries must be (B, {self.ref_emb.shape[1]}) {self.meta.get('embedding')!r} "
                             f"embeddings, got shape {q.shape}")
        return _normalize(q)

    def search(self, query, k: int = 1, backend: str = "blas") -> tuple[np.ndarray, np.ndarray]:
        """Top-k references over the whole index (exact).

        Args:
            query: ``(B, D)`` embeddings of the kind ``meta["embedding"]``.
            k: how many.
            backend: ``blas`` (one exact matrix product; the faster on CPU) or ``faiss``
                (:attr:`faiss_index`, the saved ``refs.faiss``).

        Returns:
            ``(scores (B, k) float32, indices (B, k) int64)``: cosine similarities, best first.
        """
        q = self._queries(query)
        k = min(k, len(self))
        if backend == "faiss":
            return self.faiss_index.search(q, k)
        if backend != "blas":
            raise ValueError(f"backend must be 'blas' or 'faiss', got {backend!r}")
        return top_k_inner(q, self.ref_emb, k)

    def score_cells(self, query, cand_cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best prototype of each candidate cell (:meth:`CellTable.best_in_cells` on :attr:`prototypes`).

        Args:
            query: ``(B, D)`` embeddings of the kind ``meta["embedding"]`` (normalized here).
            cand_cells: ``(B, K)`` candidate cell ids.

        Returns:
            ``(scores (B, K) float32, clusters (B, K) int64)``: the highest cosine similarity between the
            query and a prototype of that cell, and that cluster; ``-inf`` and ``-1`` for a cell without
            references.
        """
        q = self._queries(query)
        return self.prototypes.best_in_cells(q, np.asarray(cand_cells, np.int64).reshape(len(q), -1))

    def nearest_in_cluster(self, query, cluster: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The reference of each query's cluster whose embedding is most similar to the query.

        Args:
            query: ``(B, D)`` embeddings.
            cluster: ``(B,)`` cluster ids (-1: none).

        Returns:
            ``(latlng (B, 2) float64, index (B,) int64)``: that reference's coordinate and index; NaN and
            -1 where ``cluster`` is -1.
        """
        q = self._queries(query)
        cluster = np.asarray(cluster, np.int64).reshape(-1)
        if len(cluster) != len(q):
            raise ValueError(f"need one cluster per query: {len(q)} queries, {len(cluster)} clusters")
        if np.any(cluster >= len(self.cluster_cell)) or np.any(cluster < -1):
            raise IndexError(f"cluster ids must lie in -1..{len(self.cluster_cell) - 1}, got "
                             f"{cluster.min()}..{cluster.max()}")
        _, idx = self.references.best_in_cells(q, cluster[:, None])
        idx = idx[:, 0]
        latlng = np.full((len(q), 2), np.nan)
        latlng[idx >= 0] = self.ref_latlng[idx[idx >= 0]]
        return latlng, idx
