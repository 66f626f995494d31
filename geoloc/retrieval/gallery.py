"""A GPS gallery scored with cached embeddings (GeoCLIP's gallery, done once instead of every call).

GeoCLIP predicts by encoding a gallery of GPS coordinates (100K MP-16 locations) with its location
encoder and ranking them by similarity to the image embedding; its released ``predict`` re-encodes the
whole gallery on every call. Here the gallery embeddings are computed once, saved next to the
checkpoint (``gallery_v1.npz``, written atomically, with a fingerprint of the encoder weights so a
stale cache is refused) and searched by inner product on L2-normalized vectors: exactly, with one BLAS
matrix product per query batch (``backend="blas"``, the default: 4x faster than FAISS's flat index on
this 2-core CPU for 100K x 512), or through a FAISS index (``backend="faiss"``, for GPU or approximate
indexes on larger galleries). A search can be restricted to the gallery points inside given geocells
(the top cells of the classifier).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import torch

from geoloc.artifacts import atomic_write_bytes
from geoloc.geo import validate_latlng

GALLERY_FORMAT_VERSION = 1


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """A short hash of the encoder's state dict: caches are only valid for the weights that made them."""
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def top_k_inner(q: np.ndarray, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with one matrix product (BLAS).

    Args:
        q: ``(B, D)`` queries; emb: ``(N, D)`` database; k: ``<= N``.

    Returns:
        ``(scores (B, k) float32, indices (B, k) int64)``, best first, ties by index.
    """
    sims = q @ emb.T  # (B, N)
    n = emb.shape[0]
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(q), 1))
    top_s = np.take_along_axis(sims, top, axis=1)
    order = np.lexsort((top, -top_s), axis=1)
    return np.take_along_axis(top_s, order, axis=1), np.take_along_axis(top, order, axis=1).astype(np.int64)


class GPSGallery:
    """Gallery coordinates with their (normalized) location embeddings and a FAISS index.

    Args:
        latlng: ``(N, 2)`` ``[lat, lng]`` degrees.
        embeddings: ``(N, D)`` location-encoder outputs (normalized here).
        fingerprint: the encoder fingerprint they were made with.
        normalized: the embeddings are already L2-normalized (a saved gallery).
    """

    def __init__(self, latlng: np.ndarray, embeddings: np.ndarray, fingerprint: str = "", normalized: bool = False):
        self.latlng = validate_latlng(latlng, what="gallery coordinates")
        if len(embeddings) != len(self.latlng):
            raise ValueError(f"gallery: {len(self.latlng)} coordinates but {len(embeddings)} embeddings")
        self.embeddings = np.ascontiguousarray(embeddings, np.float32) if normalized else _normalize(embeddings)
        self.fingerprint = fingerprint
        self._index = None
        self._cells_of: np.ndarray | None = None
        self._cell_order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.latlng)

    @classmethod
    @torch.no_grad()
    def build(cls, encoder: torch.nn.Module, latlng: np.ndarray, *, batch_size: int = 4096) -> GPSGallery:
        """Encodes the gallery once.

        Args:
            encoder: a location encoder, ``[N, 2] -> [N, D]``.
            latlng: ``(N, 2)`` gallery coordinates.
        """
        latlng = validate_latlng(latlng, what="gallery coordinates")
        was_training = encoder.training
        encoder.eval()
        param = next(encoder.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = [encoder(torch.as_tensor(latlng[s:s + batch_size], dtype=torch.float32, device=device)).float().cpu()
               for s in range(0, len(latlng), batch_size)]
        encoder.train(was_training)
        return cls(latlng, torch.cat(out).numpy(), encoder_fingerprint(encoder))

    def save(self, path: str | Path) -> Path:
        """Writes ``.npz`` atomically (coordinates, embeddings, fingerprint, format version)."""
        buf = io.BytesIO()
        np.savez(buf, latlng=self.latlng, embeddings=self.embeddings, fingerprint=np.array(self.fingerprint),
                 version=np.array(GALLERY_FORMAT_VERSION))
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, *, encoder: torch.nn.Module | None = None) -> GPSGallery:
        """Reads a saved gallery; with ``encoder``, refuses one made with other weights."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no gallery cache (GPSGallery.build(...).save(path) makes one)")
        try:
            with np.load(path, allow_pickle=False) as z:
                version = int(z["version"])
                if version != GALLERY_FORMAT_VERSION:
                    raise ValueError(f"{path}: gallery format {version}, this geoloc reads {GALLERY_FORMAT_VERSION}")
                gallery = cls(z["latlng"], z["embeddings"], str(z["fingerprint"]), normalized=True)
        except ValueError as e:
            if str(e).startswith(str(path)):
                raise
            raise ValueError(f"{path}: not a readable gallery cache ({e}); delete it to rebuild it") from e
        except (OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not a readable gallery cache ({type(e).__name__}: {e}); delete it to "
                             "rebuild it") from e
        if encoder is not None and gallery.fingerprint != encoder_fingerprint(encoder):
            raise ValueError(f"{path}: made with other location-encoder weights (fingerprint "
                             f"{gallery.fingerprint}); rebuild it for this checkpoint")
        return gallery

    @property
    def index(self):
        """A FAISS inner-product index over the embeddings (built on first use)."""
        if self._index is None:
            import faiss

            self._index = faiss.IndexFlatIP(self.embeddings.shape[1])
            self._index.add(self.embeddings)
        return self._index

    def search(self, query: np.ndarray | torch.Tensor, k: int = 1,
               backend: str = "blas") -> tuple[np.ndarray, np.ndarray]:
        """Top-k gallery points for each query embedding.

        Args:
            query: ``(B, D)`` image embeddings in the location encoder's space.
            k: how many to return.
            backend: ``blas`` (exact, one matrix product) or ``faiss`` (:attr:`index`).

        Returns:
            ``(scores (B, k), indices (B, k))``; cosine similarities, best first.
        """
        if isinstance(query, torch.Tensor):
            query = query.detach().float().cpu().numpy()
        q = _normalize(query)
        k = min(k, len(self))
        if backend == "faiss":
            return self.index.search(q, k)
        if backend != "blas":
            raise ValueError(f"backend must be 'blas' or 'faiss', got {backend!r}")
        return top_k_inner(q, self.embeddings, k)

    def assign_cells(self, cell_of_point: np.ndarray) -> None:
        """Records each gallery point's geocell (from ``Geocells.assign``), for restricted searches."""
        cell_of_point = np.asarray(cell_of_point, dtype=np.int64)
        if cell_of_point.shape != (len(self),):
            raise ValueError(f"need one cell per gallery point ({len(self)}), got shape {cell_of_point.shape}")
        self._cells_of = cell_of_point
        self._cell_order = None

    def _cell_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        if self._cells_of is None:
            raise RuntimeError("call assign_cells(geocells.assign(gallery.latlng)) before a restricted search")
        if self._cell_order is None:
            self._cell_order = np.argsort(self._cells_of, kind="stable")
        return self._cell_order, self._cells_of[self._cell_order]

    def score_cells(self, query: np.ndarray | torch.Tensor, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The best gallery point inside each candidate cell, per query.

        Args:
            query: ``(B, D)`` image embeddings.
            cells: ``(B, K)`` candidate cell ids per query (e.g. the classifier's top K).

        Returns:
            ``(scores (B, K), indices (B, K))``: cosine similarity of the best gallery point in each
            candidate cell and its gallery index; ``-inf`` and ``-1`` where a cell holds no gallery point.
        """
        if isinstance(query, torch.Tensor):
            query = query.detach().float().cpu().numpy()
        q = _normalize(query)
        cells = np.asarray(cells, dtype=np.int64).reshape(len(q), -1)
        order, sorted_cells = self._cell_ranges()
        lo = np.searchsorted(sorted_cells, cells, "left")  # (B, K): each cell's run in the sorted order
        hi = np.searchsorted(sorted_cells, cells, "right")
        best_s = np.full(cells.shape, -np.inf, dtype=np.float32)
        best_i = np.full(cells.shape, -1, dtype=np.int64)
        for b in range(len(q)):  # candidates differ per query: one small matrix-vector product per cell
            for j in range(cells.shape[1]):
                if hi[b, j] > lo[b, j]:
                    cand = order[lo[b, j]:hi[b, j]]
                    sims = self.embeddings[cand] @ q[b]
                    m = int(np.argmax(sims))
                    best_s[b, j], best_i[b, j] = sims[m], cand[m]
        return best_s, best_i

    def search_in_cells(self, query: np.ndarray | torch.Tensor, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The best gallery point inside each query's allowed cells (e.g. the classifier's top K).

        Args:
            query: ``(B, D)`` image embeddings.
            cells: ``(B, K)`` allowed cell ids per query.

        Returns:
            ``(scores (B,), indices (B,))``; index -1 and score -inf where no gallery point lies in the
            allowed cells.
        """
        scores, idx = self.score_cells(query, cells)
        if scores.shape[1] == 0:
            return np.full(len(scores), -np.inf, np.float32), np.full(len(scores), -1, np.int64)
        j = np.argmax(scores, axis=1)
        rows = np.arange(len(scores))
        return scores[rows, j], idx[rows, j]
