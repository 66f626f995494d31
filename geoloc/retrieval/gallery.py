"""A GPS gallery scored with cached embeddings (GeoCLIP's gallery, encoded once instead of every call).

GeoCLIP predicts by encoding a gallery of GPS coordinates (100K MP-16 locations) with its location
encoder and ranking them by similarity to the image embedding; its released ``predict`` re-encodes the
whole gallery on every call. Here the gallery embeddings are computed once by an offline step,

    python -m geoloc gallery ckpt=RUN/checkpoints/best.ckpt [source=mp16_gallery|PATH.csv] [out=...]

(:mod:`geoloc.prepare.gallery`), saved next to the checkpoint (``RUN/gallery_v1.npz``, written
atomically, with its format version and a fingerprint of the location-encoder weights, so a cache made
with other weights is refused), and searched by inner product on L2-normalized vectors: exactly, with
one BLAS matrix product per query batch (``backend="blas"``, the default), or through a FAISS index
(``backend="faiss"``, for GPU or approximate indexes on larger galleries). Restricted to geocells (the
classifier's top cells), the points are a :class:`~geoloc.retrieval.table.CellTable` sorted by cell.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from geoloc.artifacts import ArtifactMeta, atomic_write_bytes
from geoloc.geo import validate_latlng
from geoloc.retrieval.table import CellTable, normalize, top_k_inner

GALLERY_FORMAT_VERSION = 1
#: How a gallery cache is rebuilt, for messages.
REBUILD = "python -m geoloc gallery ckpt=RUN/checkpoints/best.ckpt"


def default_gallery_path(ckpt: str | Path) -> Path:
    """``RUN/gallery_v1.npz`` for ``RUN/checkpoints/x.ckpt``."""
    return Path(ckpt).parent.parent / f"gallery_v{GALLERY_FORMAT_VERSION}.npz"


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """A short hash of the encoder's state dict: caches are only valid for the weights that made them."""
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class GPSGallery:
    """Gallery coordinates with their (normalized) location embeddings.

    Args:
        latlng: ``(N, 2)`` ``[lat, lng]`` degrees.
        embeddings: ``(N, D)`` location-encoder outputs (normalized here).
        fingerprint: the encoder fingerprint they were made with.
        normalized: the embeddings are already L2-normalized (a saved gallery).
        settings: how it was made (the coordinates' source, ...), saved in its meta.
    """

    def __init__(self, latlng: np.ndarray, embeddings: np.ndarray, fingerprint: str = "", normalized: bool = False,
                 settings: dict | None = None):
        self.latlng = validate_latlng(latlng, what="gallery coordinates")
        if len(embeddings) != len(self.latlng):
            raise ValueError(f"gallery: {len(self.latlng)} coordinates but {len(embeddings)} embeddings")
        self.embeddings = np.ascontiguousarray(embeddings, np.float32) if normalized else normalize(embeddings)
        self.fingerprint = fingerprint
        self.settings = dict(settings or {})
        self._index = None
        self._table: CellTable | None = None

    def __len__(self) -> int:
        return len(self.latlng)

    @classmethod
    @torch.no_grad()
    def build(cls, encoder: torch.nn.Module, latlng: np.ndarray, *, batch_size: int = 4096,
              settings: dict | None = None) -> GPSGallery:
        """Encodes the gallery once.

        Args:
            encoder: a location encoder, ``[N, 2] -> [N, D]``.
            latlng: ``(N, 2)`` gallery coordinates.
            batch_size: coordinates per encoder call.
            settings: recorded in the saved meta (e.g. ``{"source": ...}``).
        """
        latlng = validate_latlng(latlng, what="gallery coordinates")
        was_training = encoder.training
        encoder.eval()
        param = next(encoder.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = [encoder(torch.as_tensor(latlng[s:s + batch_size], dtype=torch.float32, device=device)).float().cpu()
               for s in range(0, len(latlng), batch_size)]
        encoder.train(was_training)
        return cls(latlng, torch.cat(out).numpy(), encoder_fingerprint(encoder), settings=settings)

    def artifact_meta(self) -> ArtifactMeta:
        """Kind ``gallery``, format version, the encoder fingerprint, and :attr:`settings` with the size."""
        return ArtifactMeta(kind="gallery", format_version=GALLERY_FORMAT_VERSION, fingerprint=self.fingerprint,
                            settings={**self.settings, "n": len(self), "dim": int(self.embeddings.shape[1])})

    def save(self, path: str | Path) -> Path:
        """Writes ``.npz`` atomically: coordinates, embeddings, fingerprint, format version and the meta JSON."""
        buf = io.BytesIO()
        np.savez(buf, latlng=self.latlng, embeddings=self.embeddings, fingerprint=np.array(self.fingerprint),
                 version=np.array(GALLERY_FORMAT_VERSION), meta=np.array(json.dumps(self.artifact_meta().to_dict())))
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, *, encoder: torch.nn.Module | None = None, rebuild: str = REBUILD) -> GPSGallery:
        """Reads a saved gallery; with ``encoder``, refuses one made with other weights.

        Args:
            path: a file written by :meth:`save` (``python -m geoloc gallery``).
            encoder: the location encoder the gallery must have been made with.
            rebuild: the command that rebuilds it, named in errors.

        Raises:
            FileNotFoundError: no such file.
            ValueError: a damaged file, another format version, or other encoder weights.
        """
        path = Path(path)
        how = f"; build it with {rebuild}"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no gallery cache{how}")
        try:
            with np.load(path, allow_pickle=False) as z:
                version = int(z["version"])
                if version != GALLERY_FORMAT_VERSION:
                    raise ValueError(f"{path}: gallery format {version}, this geoloc reads {GALLERY_FORMAT_VERSION}"
                                     f"; rebuild it with {rebuild}")
                settings = {}
                if "meta" in z.files:  # (files written before the meta have none)
                    settings = ArtifactMeta.from_dict(json.loads(str(z["meta"])), source=path, kind="gallery",
                                                      format_version=GALLERY_FORMAT_VERSION, rebuild=rebuild).settings
                gallery = cls(z["latlng"], z["embeddings"], str(z["fingerprint"]), normalized=True,
                              settings={k: v for k, v in settings.items() if k not in ("n", "dim")})
        except ValueError as e:
            if str(e).startswith(str(path)):
                raise
            raise ValueError(f"{path}: not a readable gallery cache ({e}); rebuild it with {rebuild}") from e
        except (OSError, EOFError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable gallery cache ({type(e).__name__}: {e}); rebuild it with "
                             f"{rebuild}") from e
        if encoder is not None and gallery.fingerprint != encoder_fingerprint(encoder):
            raise ValueError(f"{path}: made with other location-encoder weights (fingerprint "
                             f"{gallery.fingerprint}, the checkpoint's is {encoder_fingerprint(encoder)}); rebuild "
                             f"it with {rebuild}")
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
        q = normalize(query)
        k = min(k, len(self))
        if backend == "faiss":
            return self.index.search(q, k)
        if backend != "blas":
            raise ValueError(f"backend must be 'blas' or 'faiss', got {backend!r}")
        return top_k_inner(q, self.embeddings, k)

    def cell_table(self, cell_of_point: np.ndarray) -> CellTable:
        """The gallery as a :class:`CellTable` sorted by cell (a copy of the embeddings; ``ids`` are gallery
        indices).

        Args:
            cell_of_point: ``(N,)`` each gallery point's geocell (``Geocells.assign(gallery.latlng)``).
        """
        cell_of_point = np.asarray(cell_of_point, dtype=np.int64)
        if cell_of_point.shape != (len(self),):
            raise ValueError(f"need one cell per gallery point ({len(self)}), got shape {cell_of_point.shape}")
        return CellTable.sorted(self.embeddings, cell_of_point, self.latlng)

    def assign_cells(self, cell_of_point: np.ndarray) -> None:
        """Records each gallery point's geocell (from ``Geocells.assign``), for :meth:`score_cells`."""
        self._table = self.cell_table(cell_of_point)

    def score_cells(self, query: np.ndarray | torch.Tensor, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The best gallery point inside each candidate cell, per query (after :meth:`assign_cells`).

        Args:
            query: ``(B, D)`` image embeddings.
            cells: ``(B, K)`` candidate cell ids per query (e.g. the classifier's top K).

        Returns:
            ``(scores (B, K), indices (B, K))``: cosine similarity of the best gallery point in each
            candidate cell and its gallery index; ``-inf`` and ``-1`` where a cell holds no gallery point.
        """
        if self._table is None:
            raise RuntimeError("call assign_cells(geocells.assign(gallery.latlng)) before a restricted search")
        scores, row = self._table.best_in_cells(query, cells)
        return scores, self._table.row_ids(row)

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
