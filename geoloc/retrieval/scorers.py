"""Retrieval scorers: what reranks the classifier's candidate cells, and where inside the chosen cell to answer.

A scorer turns the network's outputs into one ``(B, K)`` log-score term over the ``K`` candidate cells;
:func:`geoloc.retrieval.rerank.rerank` fuses the terms with the classifier's ``log p(cell)``, one
weight per scorer. The :class:`Scorer` protocol:

* ``name``: the scorer's name, also its key in the predictor's fusion ``weights``;
* ``log_term(outputs, candidates) -> (B, K)`` float32 tensor, already temperature-scaled, masked and
  log-softmaxed where that applies (``outputs``: :meth:`geoloc.inference.predictor.ModelPredictor.forward`'s
  dict of numpy arrays; ``candidates``: ``(B, K)`` int64 cell ids);
* ``describe() -> dict``: its settings for reports (keys of the predictor's ``describe``);
* optionally ``place(outputs, cells (B,)) -> (latlng (B, 2), ok (B,))``: a coordinate inside the chosen
  cell; the first scorer in the list that places an answer gives it, else the cell's centroid;
* optionally ``export(num_cells) -> nn.Module``: its TorchScript-able part for
  :mod:`geoloc.inference.export` (``forward(outputs: Dict[str, Tensor], candidates) -> (B, K)`` and an
  exported ``place(outputs, chosen) -> (latlng, ok)``), computing the same term with the same functions;
* optionally ``from_run(model, **settings)``: a classmethod that loads its artifacts for a
  :class:`~geoloc.models.loading.LoadedModel` (what ``conf/predictor/model.yaml``'s ``scorers`` list names,
  as ``_partial_: true`` nodes).

The three here:

* :class:`PrototypeScorer` (PIGEON): each candidate cell's best location-cluster prototype in the
  retrieval index (:mod:`geoloc.retrieval.index`), ``log softmax(cosine / T)``; answers the most similar
  reference photo of that cluster (``answer="nearest"``) or the cluster's representative coordinate
  (``answer="representative"``, what an exported model can carry).
* :class:`GalleryScorer` (GeoCLIP): each candidate cell's best point of the cached GPS gallery
  (:mod:`geoloc.retrieval.gallery`); answers that point, or with ``restrict=False`` the best gallery
  point anywhere (GeoCLIP's own prediction).
* :class:`EvidenceScorer`: a product of experts with the model's evidence heads, per head ``h``
  ``w_h log sum_k q_h(k) P_cell,h(k)``: how well each cell's own photos explain what the head predicted.

A new scorer (a whole-gallery GeoCLIP scorer, an answer rule chosen for a metric, ...) is a class with
these attributes; it plugs into the predictor's ``scorers`` list, and into the exported model if it has
``export``, the same way.
"""

import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from geoloc.retrieval.rerank import masked_log_softmax
from geoloc.retrieval.table import CellTable, dense_best_in_cells, normalize, top_k_inner


@runtime_checkable
class Scorer(Protocol):
    """One log-score term over the candidate cells (see the module docstring for the optional parts)."""

    name: str

    def log_term(self, outputs: dict, candidates: Tensor) -> Tensor: ...

    def describe(self) -> dict: ...


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _tensor(x) -> Tensor:
    return x.detach().to(torch.float32) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, np.float32))


def evidence_log_term(probs: list[Tensor], dists: list[Tensor], candidates: Tensor, weights: list[float]) -> Tensor:
    """``sum_h w_h log sum_k q_h(k) P_cell,h(k)`` over the candidate cells (TorchScript-able).

    Args:
        probs: per head, ``(B, K_h)`` its predicted class probabilities ``q_h``.
        dists: per head, ``(C, K_h)`` each cell's distribution ``P_cell,h`` over its classes.
        candidates: ``(B, K)`` cell ids.
        weights: per head, ``w_h``.

    Returns:
        ``(B, K)`` float32.
    """
    term = torch.zeros(candidates.shape, dtype=torch.float32, device=candidates.device)
    for i in range(len(probs)):
        agree = (dists[i][candidates] * probs[i].unsqueeze(1)).sum(dim=-1)  # (B, K, K_h) -> (B, K)
        term = term + weights[i] * torch.log(agree.clamp_min(1e-12))
    return term


# --------------------------------------------------------------------------------------------- prototypes


class PrototypeScorer:
    """Each candidate cell scored by its best location-cluster prototype (``refine=prototypes``).

    Args:
        index: a :class:`~geoloc.retrieval.index.RetrievalIndex`.
        temperature: ``T`` of ``log softmax(cosine / T)``.
        answer: ``nearest`` (the most similar reference photo of the best cluster of the chosen cell) or
            ``representative`` (that cluster's representative coordinate: the exported model's rule).
        path: where the index was read from (reports).
    """

    name = "prototypes"
    ANSWERS = ("nearest", "representative")

    def __init__(self, index, *, temperature: float = 0.05, answer: str = "nearest", path: str | Path | None = None):
        if answer not in self.ANSWERS:
            raise ValueError(f"prototype answer must be one of {self.ANSWERS}, got {answer!r}")
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.index, self.temperature, self.answer = index, float(temperature), answer
        self.path = None if path is None else str(path)
        self.embedding = index.meta.get("embedding", "features")

    @classmethod
    def from_run(cls, model, *, index: str | Path | None = None, temperature: float = 0.05,
                 answer: str = "nearest") -> "PrototypeScorer | None":
        """The run's index (``RUN/index_v1`` when ``index`` is None), checked against the network weights.

        Returns None, with a warning, when no ``index`` was named and the run has none: the predictor then
        answers cell centroids and says so (``describe()["refine_requested"]``).

        Raises:
            FileNotFoundError: a named index folder does not exist.
            ValueError: the index is damaged or made with other weights.
        """
        from geoloc.retrieval.index import RetrievalIndex, default_index_dir

        rebuild = f"python -m geoloc index ckpt={model.ckpt} data=..."
        folder = Path(index) if index else default_index_dir(model.ckpt)
        if not folder.exists():
            if index:
                raise FileNotFoundError(f"{folder}: no retrieval index ({rebuild} builds one)")
            warnings.warn(f"refine asks for prototypes but {folder} does not exist ({rebuild} builds it): falling "
                          "back to cell centroids", stacklevel=3)
            return None
        return cls(RetrievalIndex.load(folder, net=model.net, rebuild=rebuild), temperature=temperature,
                   answer=answer, path=folder)

    def log_term(self, outputs: dict, candidates: Tensor) -> Tensor:
        scores, _ = self.index.score_cells(_numpy(outputs[self.embedding]), _numpy(candidates))
        return masked_log_softmax(torch.from_numpy(scores), self.temperature)

    def place(self, outputs: dict, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The answer inside each chosen cell: see ``answer``; ``ok`` is False for a cell without references."""
        q = _numpy(outputs[self.embedding])
        _, cluster = self.index.score_cells(q, np.asarray(cells, np.int64).reshape(-1, 1))
        cluster = cluster[:, 0]
        if self.answer == "representative":
            latlng = self.index.cluster_latlng[np.maximum(cluster, 0)] if len(self.index.cluster_cell) else \
                np.full((len(cluster), 2), np.nan)
            return latlng, cluster >= 0
        latlng, _ = self.index.nearest_in_cluster(q, cluster)
        return latlng, (cluster >= 0) & np.isfinite(latlng).all(axis=1)

    def describe(self) -> dict:
        return {"index": self.path, "temperature": self.temperature, "prototype_answer": self.answer}

    def export(self, num_cells: int) -> nn.Module:
        if self.answer != "representative":
            raise ValueError("an exported model carries no reference photos, only cluster representatives: "
                             "export with prototype_answer=representative")
        i = self.index
        return ExportedTableScorer(i.cluster_proto, i.cluster_cell, i.cluster_latlng, num_cells=num_cells,
                                   embedding=self.embedding, temperature=self.temperature, restrict=True)


# --------------------------------------------------------------------------------------------- gallery


class GalleryScorer:
    """Each candidate cell scored by its best point of the GPS gallery (``refine=gallery``).

    Args:
        table: the gallery as a :class:`~geoloc.retrieval.table.CellTable` sorted by cell, with ``latlng``
            (:meth:`geoloc.retrieval.gallery.GPSGallery.cell_table`).
        temperature: ``T`` of ``log softmax(cosine / T)``.
        restrict: answer the best gallery point of the chosen cell; False: the best gallery point anywhere
            (GeoCLIP's own prediction; the reranking term stays restricted to the candidates).
        backend: the unrestricted search, ``blas`` (exact, one matrix product) or ``faiss``.
        path: where the gallery was read from (reports).
    """

    name = "gallery"
    BACKENDS = ("blas", "faiss")

    def __init__(self, table: CellTable, *, temperature: float = 0.05, restrict: bool = True, backend: str = "blas",
                 path: str | Path | None = None):
        if backend not in self.BACKENDS:
            raise ValueError(f"gallery_backend must be 'blas' or 'faiss', got {backend!r}")
        if table.latlng is None:
            raise ValueError("a gallery table needs the points' coordinates")
        if not float(temperature) > 0:
            raise ValueError(f"gallery temperature must be > 0, got {temperature}")
        self.table, self.temperature, self.restrict, self.backend = table, float(temperature), bool(restrict), backend
        self.path = None if path is None else str(path)
        self._faiss = None

    @classmethod
    def from_run(cls, model, *, gallery: str | Path | None = None, temperature: float = 0.05, restrict: bool = True,
                 backend: str = "blas", source: str | None = None) -> "GalleryScorer":
        """The run's gallery cache (``RUN/gallery_v1.npz`` when ``gallery`` is None), its points assigned to
        the model's cells.

        Raises:
            FileNotFoundError: the cache does not exist (the message gives the command that builds it).
            ValueError: the cache is damaged or made with other location-encoder weights.
        """
        from geoloc.retrieval.gallery import GPSGallery, default_gallery_path

        path = Path(gallery) if gallery else default_gallery_path(model.ckpt)
        rebuild = f"python -m geoloc gallery ckpt={model.ckpt}" + (f" source={source}" if source else "") + \
            (f" out={path}" if gallery else "")
        g = GPSGallery.load(path, encoder=model.net.location_encoder, rebuild=rebuild)
        return cls(g.cell_table(model.cells.assign(g.latlng)), temperature=temperature, restrict=restrict,
                   backend=backend, path=path)

    def __len__(self) -> int:
        return len(self.table)

    def log_term(self, outputs: dict, candidates: Tensor) -> Tensor:
        scores, _ = self.table.best_in_cells(_numpy(outputs["image_emb"]), _numpy(candidates))
        return masked_log_softmax(torch.from_numpy(scores), self.temperature)

    def search(self, query, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top-k gallery points anywhere: ``(scores (B, k), table rows (B, k))``, best first."""
        q = normalize(query)
        k = min(k, len(self.table))
        if self.backend == "faiss":
            if self._faiss is None:
                import faiss

                self._faiss = faiss.IndexFlatIP(self.table.dim)
                self._faiss.add(np.ascontiguousarray(self.table.emb, np.float32))
            return self._faiss.search(q, k)
        return top_k_inner(q, self.table.emb, k)

    def place(self, outputs: dict, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The best gallery point of each chosen cell (or anywhere, unrestricted); ``ok`` False where none."""
        q = _numpy(outputs["image_emb"])
        if self.restrict:
            _, row = self.table.best_in_cells(q, np.asarray(cells, np.int64).reshape(-1, 1))
        else:
            _, row = self.search(q, k=1)
        row = np.asarray(row, np.int64)[:, 0]
        latlng = self.table.latlng[np.maximum(row, 0)] if len(self.table) else np.full((len(row), 2), np.nan)
        return latlng, row >= 0

    def describe(self) -> dict:
        return {"gallery": self.path, "gallery_n": len(self.table), "gallery_temperature": self.temperature,
                "gallery_restrict": self.restrict, "gallery_backend": self.backend}

    def export(self, num_cells: int) -> nn.Module:
        t = self.table
        return ExportedTableScorer(t.emb, t.cell, t.latlng, num_cells=num_cells, embedding="image_emb",
                                   temperature=self.temperature, restrict=self.restrict)


# --------------------------------------------------------------------------------------------- evidence


class EvidenceScorer:
    """A product of experts with the model's evidence heads (``refine=evidence``).

    Args:
        cell_evidence: per evidence head, ``(C, K_h)`` each cell's distribution over its classes
            (:meth:`geoloc.geo.cells.Geocells.evidence`).
        weights: per head, ``w_h`` (heads left out, or at 0, do not count); None: 1 for every head.
        weights_file: where ``weights`` were read from (reports).
    """

    name = "evidence"

    def __init__(self, cell_evidence: dict[str, np.ndarray], weights: dict[str, float] | None = None, *,
                 weights_file: str | Path | None = None):
        if not cell_evidence:
            raise ValueError("evidence reranking needs at least one evidence head")
        self.cell_evidence = {str(h): np.asarray(d, np.float64) for h, d in cell_evidence.items()}
        self._dists = {h: torch.as_tensor(d, dtype=torch.float32) for h, d in self.cell_evidence.items()}
        weights = {h: 1.0 for h in self.cell_evidence} if weights is None else {str(h): float(w)
                                                                                for h, w in weights.items()}
        unknown = sorted(set(weights) - set(self.cell_evidence))
        if unknown:
            raise ValueError(f"evidence_weights names {unknown}, but the model's evidence heads are "
                             f"{list(self.cell_evidence)}")
        self.weights = {h: w for h, w in weights.items() if w > 0}
        self.weights_file = None if weights_file is None else str(weights_file)

    @classmethod
    def from_run(cls, model, *, weights: dict | str | Path | None = None) -> "EvidenceScorer":
        """Every evidence head of the model, with the cells' distributions over its classes.

        Args:
            model: a :class:`~geoloc.models.loading.LoadedModel` trained with evidence heads.
            weights: ``{head: w}``, the path of a file written by ``python -m geoloc tune``, or None (1 each).

        Raises:
            ValueError: the model has no evidence heads, the cells no evidence columns, or ``weights`` names
                a head the model lacks.
        """
        heads = list(model.net.evidence)
        if not heads:
            raise ValueError(f"{model.ckpt}: refine with evidence needs a model trained with evidence heads "
                             "(train.py model.evidence={head: weight})")
        weights_file = None
        if isinstance(weights, str | Path):
            from geoloc.evidence.tune import load_weights

            weights_file, weights = weights, load_weights(weights)
        return cls({h: model.cells.evidence(h) for h in heads}, weights, weights_file=weights_file)

    @property
    def heads(self) -> list[str]:
        """Every head the scorer can weigh (whatever its weight)."""
        return list(self.cell_evidence)

    def with_weights(self, weights: dict[str, float]) -> "EvidenceScorer":
        """The same scorer with other per-head weights (heads left out get 0), sharing the distributions."""
        unknown = sorted(set(weights) - set(self.heads))
        if unknown:
            raise ValueError(f"evidence weights name {unknown}; the reranking has {self.heads}")
        new = object.__new__(EvidenceScorer)
        new.cell_evidence, new._dists, new.weights_file = self.cell_evidence, self._dists, None
        new.weights = {str(h): float(w) for h, w in weights.items() if float(w) > 0}
        return new

    def log_term(self, outputs: dict, candidates: Tensor) -> Tensor:
        heads = list(self.weights)
        return evidence_log_term([_tensor(outputs[f"evidence/{h}"]) for h in heads], [self._dists[h] for h in heads],
                                 candidates, [self.weights[h] for h in heads])

    def describe(self) -> dict:
        d = {"evidence_weights": dict(self.weights)}
        if self.weights_file:
            d["evidence_weights_file"] = self.weights_file
        return d

    def export(self, num_cells: int) -> nn.Module:
        return ExportedEvidence({h: self.cell_evidence[h] for h in self.weights}, dict(self.weights))


# --------------------------------------------------------------------------------------------- exported parts


class ExportedTableScorer(nn.Module):
    """A cell table inside an exported model: prototypes (``embedding="features"``) or the gallery
    (``"image_emb"``), scored by :func:`~geoloc.retrieval.table.dense_best_in_cells` and
    :func:`~geoloc.retrieval.rerank.masked_log_softmax`, answering the best row's coordinate.

    Args:
        emb: ``(N, D)`` normalized rows; cell: ``(N,)`` their cells; latlng: ``(N, 2)`` their coordinates.
        num_cells: how many cells the model has.
        embedding: which normalized network output is the query.
        temperature: ``T``.
        restrict: answer the best row of the chosen cell; False: the best row anywhere.
    """

    def __init__(self, emb, cell, latlng, *, num_cells: int, embedding: str, temperature: float, restrict: bool):
        super().__init__()
        self.register_buffer("emb", torch.tensor(np.asarray(emb, np.float32)))
        self.register_buffer("cell", torch.tensor(np.asarray(cell, np.int64)))
        self.register_buffer("latlng", torch.tensor(np.asarray(latlng, np.float32)).reshape(-1, 2))
        self.num_cells, self.embedding = int(num_cells), str(embedding)
        self.temperature, self.restrict = float(temperature), bool(restrict)

    def forward(self, outputs: dict[str, Tensor], candidates: Tensor) -> Tensor:
        scores, _ = dense_best_in_cells(outputs[self.embedding], self.emb, self.cell, candidates, self.num_cells)
        return masked_log_softmax(scores, self.temperature)

    @torch.jit.export
    def place(self, outputs: dict[str, Tensor], chosen: Tensor) -> tuple[Tensor, Tensor]:
        q = outputs[self.embedding]
        if self.restrict:
            _, row = dense_best_in_cells(q, self.emb, self.cell, chosen.unsqueeze(1), self.num_cells)
            row = row[:, 0]
        elif self.emb.shape[0] > 0:
            row = (q @ self.emb.t()).argmax(dim=1)
        else:
            row = torch.full(chosen.shape, -1, dtype=torch.long, device=chosen.device)
        ok = row >= 0
        if self.emb.shape[0] == 0:
            return torch.zeros((chosen.shape[0], 2), dtype=torch.float32, device=chosen.device), ok
        return self.latlng[row.clamp_min(0)], ok


class ExportedEvidence(nn.Module):
    """The evidence term inside an exported model: the cells' distributions as one buffer.

    Args:
        cell_evidence: per head, ``(C, K_h)``.
        weights: per head, ``w_h`` (the same heads).
    """

    heads: list[str]
    weights: list[float]
    offsets: list[int]

    def __init__(self, cell_evidence: dict[str, np.ndarray], weights: dict[str, float]):
        super().__init__()
        self.heads = list(cell_evidence)
        self.weights = [float(weights[h]) for h in self.heads]
        sizes = [int(np.asarray(cell_evidence[h]).shape[1]) for h in self.heads]
        self.offsets = [0, *np.cumsum(sizes).tolist()]
        dist = (np.concatenate([np.asarray(cell_evidence[h], np.float32) for h in self.heads], axis=1)
                if self.heads else np.zeros((0, 0), np.float32))
        self.register_buffer("dist", torch.tensor(dist))

    def forward(self, outputs: dict[str, Tensor], candidates: Tensor) -> Tensor:
        probs: list[Tensor] = []
        dists: list[Tensor] = []
        for i in range(len(self.heads)):
            probs.append(outputs["evidence/" + self.heads[i]])
            dists.append(self.dist[:, self.offsets[i]:self.offsets[i + 1]])
        return evidence_log_term(probs, dists, candidates, self.weights)

    @torch.jit.export
    def place(self, outputs: dict[str, Tensor], chosen: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.zeros((chosen.shape[0], 2), dtype=torch.float32, device=chosen.device),
                torch.zeros(chosen.shape, dtype=torch.bool, device=chosen.device))
