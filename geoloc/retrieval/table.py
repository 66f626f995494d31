"""Rows sorted by cell, and the best row inside each candidate cell: what every retrieval scorer asks.

The index keeps its location-cluster prototypes sorted by cell, and the GPS gallery its points; the
index also keeps its reference photos sorted by cluster. Each is a :class:`CellTable`: L2-normalized
rows, the key (cell, or cluster) of each row in non-decreasing order, optionally each row's ``[lat,
lng]``. Because a key's rows are contiguous, "the most similar row inside cell ``c``" is one
matrix-vector product on a view of the table (:meth:`CellTable.best_in_cells`), with no gather and no
copy (gathering every candidate's rows for one batched product is much slower: it copies them).

:func:`dense_best_in_cells` is the same answer in torch for a model exported to TorchScript: one matrix
product against every row and a ``scatter_reduce("amax")`` per cell (the table of an exported model is
small enough, and TorchScript has no cheap per-range loop). ``tests/test_retrieval.py`` checks that the two
agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def normalize(x) -> np.ndarray:
    """Rows scaled to unit length (float32; a zero row stays zero)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def top_k_inner(q: np.ndarray, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with one matrix product (BLAS).

    Args:
        q: ``(B, D)`` queries; emb: ``(N, D)`` database; k: ``<= N``.

    Returns:
        ``(scores (B, k) float32, indices (B, k) int64)``, best first, ties by index.
    """
    n = emb.shape[0]
    if k < n and emb.flags.writeable and q.flags.writeable:  # torch's top-k runs on every core
        import torch

        top_s, top = (torch.from_numpy(np.ascontiguousarray(q)) @ torch.from_numpy(emb).T).topk(k, dim=1)
        top_s, top = top_s.numpy(), top.numpy()
    else:  # read-only (memory-mapped) tables stay in numpy
        sims = q @ emb.T  # (B, N)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(q), 1))
        top_s = np.take_along_axis(sims, top, axis=1)
    order = np.lexsort((top, -top_s), axis=1)
    return np.take_along_axis(top_s, order, axis=1), np.take_along_axis(top, order, axis=1).astype(np.int64)


class CellTable:
    """L2-normalized rows grouped by a key (a geocell, or a cluster), each group contiguous.

    Args:
        emb: ``(N, D)`` rows, L2-normalized (a memory-mapped array stays mapped: nothing is copied).
        cell: ``(N,)`` int64 key of each row, non-decreasing.
        latlng: optional ``(N, 2)`` ``[lat, lng]`` degrees of each row.
        ids: optional ``(N,)`` int64 the caller's id of each row (e.g. its gallery index before sorting);
            None: the row number.

    Use :meth:`sorted` for rows that are not yet sorted by key.
    """

    def __init__(self, emb: np.ndarray, cell: np.ndarray, latlng: np.ndarray | None = None,
                 ids: np.ndarray | None = None):
        self.emb = emb if isinstance(emb, np.memmap) else np.ascontiguousarray(emb, np.float32)
        self.cell = np.asarray(cell, np.int64).reshape(-1)
        self.latlng = None if latlng is None else np.asarray(latlng, np.float64)
        self.ids = None if ids is None else np.asarray(ids, np.int64)
        n = len(self.cell)
        if self.emb.ndim != 2 or len(self.emb) != n:
            raise ValueError(f"a cell table needs one (D,) row per key: {n} keys, rows of shape {self.emb.shape}")
        if self.latlng is not None and self.latlng.shape != (n, 2):
            raise ValueError(f"a cell table needs one [lat, lng] per row ({n}), got shape {self.latlng.shape}")
        if self.ids is not None and self.ids.shape != (n,):
            raise ValueError(f"a cell table needs one id per row ({n}), got shape {self.ids.shape}")
        if n and np.any(np.diff(self.cell) < 0):
            raise ValueError("cell table rows must be sorted by cell (CellTable.sorted sorts them)")

    @classmethod
    def sorted(cls, emb: np.ndarray, cell: np.ndarray, latlng: np.ndarray | None = None) -> CellTable:
        """A table of rows in any order: sorted by cell (stable), ``ids`` giving each row's input index."""
        cell = np.asarray(cell, np.int64).reshape(-1)
        order = np.argsort(cell, kind="stable")
        return cls(np.asarray(emb)[order], cell[order], None if latlng is None else np.asarray(latlng)[order],
                   ids=order)

    def __len__(self) -> int:
        return len(self.cell)

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def row_ids(self, row: np.ndarray) -> np.ndarray:
        """The caller's ids of table rows (``-1`` stays ``-1``)."""
        row = np.asarray(row, np.int64)
        if self.ids is None:
            return row
        return np.where(row >= 0, self.ids[np.maximum(row, 0)], -1) if len(self.ids) else np.full_like(row, -1)

    def best_in_cells(self, q, candidates) -> tuple[np.ndarray, np.ndarray]:
        """The row of each candidate cell most similar to the query.

        One matrix-vector product per (query, candidate) on the candidate's contiguous rows.

        Args:
            q: ``(B, D)`` queries (normalized here).
            candidates: ``(B, K)`` cell ids per query.

        Returns:
            ``(scores (B, K) float32, row (B, K) int64)``: the highest cosine similarity and its table row;
            ``-inf`` and ``-1`` for a cell without rows. Ties go to the lower row.
        """
        q = normalize(q)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got shape {q.shape}")
        cand = np.asarray(candidates.cpu() if isinstance(candidates, torch.Tensor) else candidates, np.int64)
        cand = cand.reshape(len(q), -1)
        lo = np.searchsorted(self.cell, cand, "left").ravel()
        hi = np.searchsorted(self.cell, cand, "right").ravel()
        scores = np.full(lo.shape, -np.inf, np.float32)
        best = np.full(lo.shape, -1, np.int64)
        todo = np.flatnonzero(hi > lo)
        rows = todo // cand.shape[1]
        for s, r, a, b in zip(todo.tolist(), rows.tolist(), lo[todo].tolist(), hi[todo].tolist()):
            sims = self.emb[a:b] @ q[r]
            j = int(np.argmax(sims))
            scores[s], best[s] = sims[j], a + j
        return scores.reshape(cand.shape), best.reshape(cand.shape)


def dense_best_in_cells(q: Tensor, emb: Tensor, cell: Tensor, candidates: Tensor,
                        num_cells: int) -> tuple[Tensor, Tensor]:
    """:meth:`CellTable.best_in_cells` in torch, over every row at once (TorchScript-able).

    Args:
        q: ``(B, D)`` normalized queries.
        emb: ``(N, D)`` normalized rows; cell: ``(N,)`` int64 their cells (any order).
        candidates: ``(B, K)`` int64 cell ids in ``0..num_cells-1``.
        num_cells: how many cells there are.

    Returns:
        ``(scores (B, K), row (B, K) int64)``: ``-inf`` and ``-1`` for a cell without rows; ties go to the
        lower row.
    """
    sims = q @ emb.t()  # (B, N)
    b, n = sims.shape[0], sims.shape[1]
    keys = cell.unsqueeze(0).expand(b, n)
    best = torch.full((b, num_cells), float("-inf"), dtype=sims.dtype, device=sims.device)
    best = best.scatter_reduce(1, keys, sims, "amax")
    rows = torch.arange(n, device=sims.device).unsqueeze(0).expand(b, n)
    is_best = sims == best.gather(1, keys)
    first = torch.full((b, num_cells), n, dtype=torch.long, device=sims.device)
    first = first.scatter_reduce(1, keys, torch.where(is_best, rows, torch.full_like(rows, n)), "amin")
    row = first.gather(1, candidates)
    return best.gather(1, candidates), torch.where(row == n, torch.full_like(row, -1), row)
