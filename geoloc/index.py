"""Retrieval index: reference photos embedded once, clustered by location inside each geocell.

    python -m geoloc.index ckpt=RUN/checkpoints/best.ckpt data=shards data.dir=SHARDS data.split=train
    python -m geoloc.index ckpt=... data=im2gps3k data.root=DIR data.folds=5 data.fold=[0,1,2]

PIGEON refines a geocell prediction with the training photos: within each candidate cell it clusters
the photos' locations, represents each cluster by the mean embedding of its photos (a prototype), and
answers a location inside the cluster whose prototype is most similar to the query. This module builds
that index; :class:`geoloc.predictors.ModelPredictor` uses it (``refine=prototypes``).

**Clustering.** PIGEON runs OPTICS on haversine distance per cell. We use DBSCAN on haversine distance
(scikit-learn, ball tree on radians) per cell: it finds the same density-connected groups as OPTICS
cut at one reachability distance, runs in ``O(n log n)`` instead of OPTICS's full reachability
ordering, and its one distance (``eps_km``) reads as "photos closer than this belong to one place".
Points DBSCAN calls noise become singleton clusters (an isolated photo is still a place someone
photographed; dropping it would make its location unreachable), and cells with fewer than
``min_samples`` photos are one cluster each.

Files (``RUN/index_v1/`` next to ``RUN/checkpoints/``; the version is in the folder name and in
``meta.json``): ``index.npz`` (reference coordinates, keys, L2-normalized embeddings, cell and cluster
of each reference; per cluster its cell, prototype and representative coordinate), ``refs.faiss`` (a
FAISS inner-product index of the reference embeddings) and ``meta.json`` (format version, embedding
kind, a fingerprint of the network weights, clustering settings, counts, the reference source). The
folder is written beside its final name and renamed into place, so a reader never sees half an index.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from geoloc.cells import Geocells
from geoloc.data.images import SkipReport
from geoloc.gallery import _normalize, encoder_fingerprint
from geoloc.geo import EARTH_RADIUS_KM, latlng_to_xyz, validate_latlng

INDEX_FORMAT_VERSION = 1
EMBEDDINGS = ("features", "image_emb")


def default_index_dir(ckpt: str | Path) -> Path:
    """``RUN/index_v1`` for ``RUN/checkpoints/x.ckpt``."""
    return Path(ckpt).parent.parent / f"index_v{INDEX_FORMAT_VERSION}"


@torch.no_grad()
def embed_images(net, images: list, transform, *, embedding: str = "features", batch_size: int = 64,
                 device: str = "cpu") -> np.ndarray:
    """Embeds PIL images with a :class:`~geoloc.models.geolocator.GeoLocator`.

    Args:
        net: the network (eval mode).
        images: PIL images.
        transform: its evaluation transform.
        embedding: ``features`` (the backbone's pooled features) or ``image_emb`` (the projection into
            the location encoder's space).

    Returns:
        ``(B, D)`` float32, L2-normalized.
    """
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.stack([transform(im) for im in images[s:s + batch_size]]).to(device)
        out.append(net(x)[embedding].float().cpu())
    return _normalize(torch.cat(out).numpy()) if out else np.zeros((0, 0), np.float32)


def cluster_cell_points(latlng: np.ndarray, *, eps_km: float = 25.0, min_samples: int = 3) -> np.ndarray:
    """Location clusters of one cell's photos (DBSCAN on haversine distance; noise -> singletons).

    Args:
        latlng: ``(n, 2)`` ``[lat, lng]`` degrees.
        eps_km: neighbourhood radius.
        min_samples: photos within ``eps_km`` (itself included) that make a core point.

    Returns:
        ``(n,)`` int64 labels ``0..m-1``; every point belongs to a cluster.
    """
    n = len(latlng)
    if n < max(min_samples, 2):
        return np.zeros(n, dtype=np.int64)
    from sklearn.cluster import DBSCAN

    labels = DBSCAN(eps=eps_km / EARTH_RADIUS_KM, min_samples=min_samples, metric="haversine",
                    algorithm="ball_tree").fit_predict(np.radians(latlng))
    noise = labels < 0
    labels[noise] = labels.max() + 1 + np.arange(noise.sum())
    _, labels = np.unique(labels, return_inverse=True)  # dense 0..m-1 in order of first label
    return labels.astype(np.int64)


def _representative(latlng: np.ndarray) -> np.ndarray:
    """The member nearest to the members' mean direction (a coordinate someone actually took a photo at)."""
    xyz = latlng_to_xyz(latlng)
    return latlng[int(np.argmax(xyz @ xyz.mean(axis=0)))]


class RetrievalIndex:
    """Reference embeddings, their location clusters per cell, and cluster prototypes.

    Attributes:
        ref_latlng: ``(N, 2)`` float64 reference coordinates.
        ref_emb: ``(N, D)`` float32 L2-normalized embeddings, sorted by cluster.
        ref_cell: ``(N,)`` int64 geocell of each reference.
        ref_cluster: ``(N,)`` int64 global cluster id (non-decreasing).
        ref_keys: ``(N,)`` reference ids.
        cluster_cell: ``(M,)`` int64 cell of each cluster (non-decreasing: a cell's clusters are contiguous).
        cluster_proto: ``(M, D)`` float32 L2-normalized mean embedding of each cluster.
        cluster_latlng: ``(M, 2)`` a representative member coordinate of each cluster.
        meta: format version, embedding kind, network fingerprint, clustering settings, counts, source.
    """

    def __init__(self, *, ref_latlng, ref_emb, ref_cell, ref_cluster, ref_keys, cluster_cell, cluster_proto,
                 cluster_latlng, meta: dict):
        order = np.lexsort((np.arange(len(ref_cluster)), ref_cluster))  # stable sort by cluster
        self.ref_latlng = np.asarray(ref_latlng, np.float64)[order]
        self.ref_emb = np.ascontiguousarray(np.asarray(ref_emb, np.float32)[order])
        self.ref_cell = np.asarray(ref_cell, np.int64)[order]
        self.ref_cluster = np.asarray(ref_cluster, np.int64)[order]
        self.ref_keys = np.asarray(ref_keys).astype(str)[order]
        self.cluster_cell = np.asarray(cluster_cell, np.int64)
        self.cluster_proto = np.ascontiguousarray(cluster_proto, np.float32)
        self.cluster_latlng = np.asarray(cluster_latlng, np.float64)
        self.meta = dict(meta)
        if np.any(np.diff(self.cluster_cell) < 0):
            raise ValueError("index: clusters must be sorted by cell")
        m = len(self.cluster_cell)
        self._cluster_lo = np.searchsorted(self.ref_cluster, np.arange(m), "left")
        self._cluster_hi = np.searchsorted(self.ref_cluster, np.arange(m), "right")
        self._faiss = None

    def __len__(self) -> int:
        return len(self.ref_latlng)

    def __repr__(self) -> str:
        return (f"RetrievalIndex({len(self)} references, {len(self.cluster_cell)} clusters in "
                f"{len(np.unique(self.cluster_cell))} cells, embedding={self.meta.get('embedding')!r})")

    @classmethod
    def from_embeddings(cls, latlng: np.ndarray, emb: np.ndarray, cell: np.ndarray, *, keys=None,
                        eps_km: float = 25.0, min_samples: int = 3, meta: dict | None = None) -> RetrievalIndex:
        """Clusters given reference embeddings by location inside each cell and makes prototypes."""
        latlng = validate_latlng(latlng, what="reference coordinates")
        emb, cell = _normalize(emb), np.asarray(cell, np.int64)
        cluster = np.empty(len(latlng), np.int64)
        cluster_cell, protos, reps = [], [], []
        for c in np.unique(cell):  # sorted: clusters come out grouped by cell
            members = np.flatnonzero(cell == c)
            labels = cluster_cell_points(latlng[members], eps_km=eps_km, min_samples=min_samples)
            for lab in range(labels.max() + 1):
                idx = members[labels == lab]
                cluster[idx] = len(cluster_cell)
                cluster_cell.append(c)
                protos.append(emb[idx].mean(axis=0))
                reps.append(_representative(latlng[idx]))
        d = emb.shape[1]
        meta = {"format_version": INDEX_FORMAT_VERSION, "eps_km": float(eps_km), "min_samples": int(min_samples),
                "n_references": int(len(latlng)), "n_clusters": len(cluster_cell),
                "n_cells_with_references": int(len(np.unique(cell))), **(meta or {})}
        return cls(ref_latlng=latlng, ref_emb=emb, ref_cell=cell, ref_cluster=cluster,
                   ref_keys=keys if keys is not None else np.arange(len(latlng)).astype(str),
                   cluster_cell=np.asarray(cluster_cell, np.int64),
                   cluster_proto=_normalize(np.asarray(protos, np.float32).reshape(-1, d)),
                   cluster_latlng=np.asarray(reps, np.float64).reshape(-1, 2), meta=meta)

    @classmethod
    def build(cls, net, source, cells: Geocells, transform, *, embedding: str = "features", batch_size: int = 64,
              eps_km: float = 25.0, min_samples: int = 3, device: str = "cpu",
              progress: bool = False) -> tuple[RetrievalIndex, SkipReport]:
        """Embeds every readable photo of ``source`` and indexes it.

        Args:
            net: a trained :class:`~geoloc.models.geolocator.GeoLocator` (eval mode).
            source: the reference photos (any reader's dataset or shards: an ``ItemSource``).
            cells: the geocells the network classifies into.
            transform: the network's evaluation transform.
            embedding: ``features`` or ``image_emb``.

        Returns:
            ``(index, skipped)``: photos that could not be decoded are skipped and counted.
        """
        skipped = SkipReport()
        latlng, keys, embs, batch = [], [], [], []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(source), desc="embedding references", unit="img")

        def flush():
            if batch:
                embs.append(embed_images(net, [it.image for it in batch], transform, embedding=embedding,
                                         batch_size=batch_size, device=device))
                latlng.extend(it.latlng for it in batch)
                keys.extend(it.key for it in batch)
                if bar is not None:
                    bar.update(len(batch))
                batch.clear()

        for item in source.iter_items(skipped):
            if item.image is None:
                raise ValueError(f"{getattr(source, 'name', source)}: the index needs photos (read without images?)")
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        flush()
        if bar is not None:
            bar.close()
        if not latlng:
            raise ValueError(f"{getattr(source, 'name', source)}: no readable reference photo "
                             f"({len(skipped)} skipped: {dict(skipped.counts)})")
        latlng = np.asarray(latlng, np.float64)
        meta = {"embedding": embedding, "fingerprint": encoder_fingerprint(net), "n_cells": len(cells),
                "source": str(getattr(source, "source", getattr(source, "name", ""))),
                "n_skipped": len(skipped), "skipped_by_reason": dict(skipped.counts)}
        index = cls.from_embeddings(latlng, np.concatenate(embs), cells.assign(latlng), keys=np.asarray(keys),
                                    eps_km=eps_km, min_samples=min_samples, meta=meta)
        return index, skipped

    # -- files -----------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Writes ``index.npz``, ``refs.faiss`` and ``meta.json`` into a temporary folder, then renames it."""
        import faiss

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            np.savez(tmp / "index.npz", ref_latlng=self.ref_latlng, ref_emb=self.ref_emb, ref_cell=self.ref_cell,
                     ref_cluster=self.ref_cluster, ref_keys=self.ref_keys, cluster_cell=self.cluster_cell,
                     cluster_proto=self.cluster_proto, cluster_latlng=self.cluster_latlng)
            faiss.write_index(self.faiss_index, str(tmp / "refs.faiss"))
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2, sort_keys=True))
            os.chmod(tmp, 0o755)
            old = None
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old.{os.getpid()}")
                os.replace(folder, old)
            os.replace(tmp, folder)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, net=None) -> RetrievalIndex:
        """Reads an index folder; with ``net``, refuses one built with other weights."""
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder}: not a retrieval index (no meta.json; python -m geoloc.index "
                                    "builds one)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise ValueError(f"{folder}: index format {meta.get('format_version')}, this geoloc reads "
                             f"{INDEX_FORMAT_VERSION}; rebuild it with python -m geoloc.index")
        if net is not None and meta.get("fingerprint") != encoder_fingerprint(net):
            raise ValueError(f"{folder}: built with other network weights (fingerprint {meta.get('fingerprint')}); "
                             "rebuild it for this checkpoint")
        with np.load(folder / "index.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        index = cls(**arrays, meta=meta)
        faiss_path = folder / "refs.faiss"
        if faiss_path.is_file():
            import faiss

            index._faiss = faiss.read_index(str(faiss_path))
        return index

    # -- queries ---------------------------------------------------------------------------------------
    @property
    def faiss_index(self):
        """FAISS inner-product index over the reference embeddings (cosine: they are normalized)."""
        if self._faiss is None:
            import faiss

            self._faiss = faiss.IndexFlatIP(self.ref_emb.shape[1])
            self._faiss.add(self.ref_emb)
        return self._faiss

    def search(self, query, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top-k references over the whole index: ``(scores (B, k), indices (B, k))``, best first."""
        q = _normalize(query.detach().float().cpu().numpy() if isinstance(query, torch.Tensor) else query)
        return self.faiss_index.search(q, min(k, len(self)))

    def score_cells(self, query, cand_cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best prototype of each candidate cell.

        Args:
            query: ``(B, D)`` embeddings of the kind ``meta["embedding"]``.
            cand_cells: ``(B, K)`` candidate cell ids.

        Returns:
            ``(scores (B, K) float32, clusters (B, K) int64)``: the highest cosine similarity between the
            query and a prototype of that cell, and that cluster; ``-inf`` and ``-1`` for a cell without
            references.
        """
        q = _normalize(query.detach().float().cpu().numpy() if isinstance(query, torch.Tensor) else query)
        cand = np.asarray(cand_cells, np.int64).reshape(len(q), -1)
        lo = np.searchsorted(self.cluster_cell, cand, "left")
        hi = np.searchsorted(self.cluster_cell, cand, "right")
        scores = np.full(cand.shape, -np.inf, np.float32)
        best = np.full(cand.shape, -1, np.int64)
        for b in range(len(q)):  # each query meets only its candidates' prototypes: one small product
            n = hi[b] - lo[b]
            if not n.any():
                continue
            ids = np.concatenate([np.arange(x, y) for x, y in zip(lo[b], hi[b])])
            sims = self.cluster_proto[ids] @ q[b]
            start = np.concatenate([[0], np.cumsum(n)[:-1]])
            for k in np.flatnonzero(n):
                j = int(np.argmax(sims[start[k]:start[k] + n[k]]))
                scores[b, k], best[b, k] = sims[start[k] + j], ids[start[k] + j]
        return scores, best.astype(np.int64)

    def nearest_in_cluster(self, query, cluster: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The reference in each query's cluster whose embedding is most similar to the query.

        PIGEON's released code returns the *farthest* member here; the nearest is what its paper means.

        Args:
            query: ``(B, D)`` embeddings.
            cluster: ``(B,)`` cluster ids (-1: none).

        Returns:
            ``(latlng (B, 2), index (B,))``: NaN and -1 where ``cluster`` is -1.
        """
        q = _normalize(query.detach().float().cpu().numpy() if isinstance(query, torch.Tensor) else query)
        cluster = np.asarray(cluster, np.int64)
        latlng = np.full((len(q), 2), np.nan)
        idx = np.full(len(q), -1, np.int64)
        for b in np.flatnonzero(cluster >= 0):  # one small matrix-vector product per query
            lo, hi = self._cluster_lo[cluster[b]], self._cluster_hi[cluster[b]]
            i = lo + int(np.argmax(self.ref_emb[lo:hi] @ q[b]))
            latlng[b], idx[b] = self.ref_latlng[i], i
        return latlng, idx


def main(cfg) -> RetrievalIndex:
    """``python -m geoloc.index``: embeds ``data.dataset`` with the checkpoint and writes the index."""
    import hydra

    from geoloc.lightning.datamodule import eval_transform
    from geoloc.models.loading import load_checkpoint

    started = time.perf_counter()
    model = load_checkpoint(cfg.ckpt, cells=cfg.cells, device=cfg.device)
    source = hydra.utils.instantiate(cfg.data.dataset)
    index, skipped = RetrievalIndex.build(model.net, source, model.cells, eval_transform(model.data_config),
                                          embedding=cfg.embedding, batch_size=cfg.batch_size, eps_km=cfg.eps_km,
                                          min_samples=cfg.min_samples, device=cfg.device, progress=cfg.progress)
    out = Path(cfg.out) if cfg.out else default_index_dir(cfg.ckpt)
    index.save(out)
    m = index.meta
    print(f"indexed {m['n_references']} reference photos of {m['source']}: {m['n_clusters']} location clusters in "
          f"{m['n_cells_with_references']} of {len(model.cells)} cells, skipped {len(skipped)}"
          + (f" ({dict(skipped.counts)})" if len(skipped) else "")
          + f", {time.perf_counter() - started:.1f} s -> {out}")
    return index


if __name__ == "__main__":
    import hydra as _hydra

    _hydra.main(version_base="1.3", config_path="../conf", config_name="index")(main)()
