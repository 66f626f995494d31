"""The trained geolocator as a predictor, with retrieval refinement inside its top cells."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from geoloc.inference.base import Prediction

REFINE_CHOICES = ("none", "prototypes", "gallery", "both", "evidence", "prototypes+evidence", "gallery+evidence",
                  "both+evidence")


def _refine_parts(refine: str) -> set[str]:
    if refine not in REFINE_CHOICES:
        raise ValueError(f"refine must be one of {REFINE_CHOICES}, got {refine!r}")
    parts = set(refine.split("+")) - {"none"}
    return (parts - {"both"}) | ({"prototypes", "gallery"} if "both" in parts else set())


def _refine_name(parts: set[str]) -> str:
    base = {frozenset(): "none", frozenset({"prototypes"}): "prototypes", frozenset({"gallery"}): "gallery",
            frozenset({"prototypes", "gallery"}): "both"}[frozenset(parts - {"evidence"})]
    if "evidence" not in parts:
        return base
    return "evidence" if base == "none" else f"{base}+evidence"


def _log_softmax_masked(scores: np.ndarray, temperature: float) -> np.ndarray | None:
    """Row-wise ``log softmax(scores / T)`` over the finite entries.

    Candidates without a score (``-inf``: no reference in that cell) get the row's lowest finite score
    instead of being ruled out, so missing retrieval data neither vetoes nor favours a cell. Rows with
    no finite score get zeros (no evidence either way).
    """
    s = np.asarray(scores, dtype=np.float64) / temperature
    finite = np.isfinite(s)
    if not finite.any():
        return None
    low = np.where(finite, s, np.inf).min(axis=1, keepdims=True)
    s = np.where(finite, s, np.where(np.isfinite(low), low, 0.0))
    s = s - s.max(axis=1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


class ModelPredictor:
    """A trained geolocator, with optional retrieval refinement inside its top cells.

    The classifier gives a probability for every geocell. Refinement (PIGEON, GeoCLIP) reranks the
    ``candidates`` most probable cells with retrieval scores and picks a coordinate inside the winner:

    * ``refine="none"``: the most probable cell's centroid (its answer point, a training photo's location).
    * ``"prototypes"``: each candidate cell is scored by its best location-cluster prototype (cosine
      similarity to the image embedding, :mod:`geoloc.retrieval.index`); the fused score is
      ``w_cells * log p(cell) + w_prototypes * log softmax(score / T)`` over the candidates; the answer is
      the coordinate of the *nearest* (most similar) reference image in the winning cell's best cluster.
    * ``"gallery"``: each candidate cell is scored by its best GPS-gallery point (GeoCLIP: cosine
      similarity between the image's projection and the cached location embeddings, :mod:`geoloc.retrieval.gallery`),
      fused the same way; the answer is that gallery point. ``gallery_restrict=False`` instead answers
      the best gallery point anywhere (GeoCLIP's own prediction).
    * ``"both"``: both terms in the fusion; the coordinate comes from the prototypes (the gallery point
      when the winning cell has no reference image).
    * ``"evidence"`` (alone or ``+evidence`` after any of the above; issue 6): a product of experts with
      the model's evidence heads: each candidate cell gains ``w_h log sum_k q_h(k) P_cell,h(k)``, where
      ``q_h`` is head ``h``'s predicted distribution and ``P_cell,h`` the distribution of the cell's own
      photos over that head's classes (the cells file's ``evidence_<head>`` columns). Needs a model
      trained with evidence heads and cells built with ``evidence=true``.

    Without an index (``refine`` asks for prototypes but none was built) it falls back to cell
    centroids and says so in :meth:`describe`.

    Args:
        ckpt: a Lightning checkpoint written by ``train.py`` (``RUN/checkpoints/*.ckpt``).
        cells: the geocells file; None uses the one the run was trained with.
        refine: ``none``, ``prototypes``, ``gallery`` or ``both``.
        index: the index folder (``python -m geoloc index``); None: ``RUN/index_v1`` when it exists.
        gallery: the GPS-gallery cache (``.npz``); None: ``RUN/gallery_v1.npz``, built from
            ``gallery_source`` with the run's location encoder on first use and cached.
        gallery_source: coordinates of the gallery when it has to be built (``mp16_gallery``: the 100K
            MP-16 coordinates shipped with geoclip; or a CSV path with lat/lng columns).
        gallery_restrict: search the gallery only inside the candidate cells.
        gallery_backend: ``blas`` (exact, one matrix product; faster on CPU) or ``faiss`` (its flat index:
            GPU or approximate indexes for larger galleries) for the unrestricted search.
        topk: ranked cells reported per photo.
        candidates: cells reranked by refinement (at least ``topk``).
        temperature: ``T`` of the prototype scores.
        gallery_temperature: ``T`` of the gallery scores.
        weights: fusion weights ``{"cells", "prototypes", "gallery"}``.
        evidence_weights: per evidence head, its weight in the evidence reranking, or the path of a file
            written by ``python -m geoloc tune`` (weights chosen on validation photos); None: 1
            for every head the model has.
        batch_size: photos per forward pass.
        device: ``cpu`` or ``cuda``.
        compile: run the network through ``torch.compile`` (slower first batch, faster after).
        explain: attach a reasoning chain to every answer (``Prediction.explanations``): scene, environment
            cues and region, each claim with the probability a head of the model gave it, checked against
            the top cells (:mod:`geoloc.evidence.verbalize`).
        ocr: also read text in the photo and name its script (:mod:`geoloc.evidence.ocr`; needs
            ``rapidocr-onnxruntime``); only used with ``explain``.
        name: report name.
    """

    needs_images = True

    def __init__(self, ckpt: str, *, cells: str | None = None, refine: str = "none", index: str | None = None,
                 gallery: str | None = None, gallery_source: str = "mp16_gallery", gallery_restrict: bool = True,
                 gallery_backend: str = "blas", topk: int = 5, candidates: int = 10, temperature: float = 0.05,
                 gallery_temperature: float = 0.05, weights: dict | None = None,
                 evidence_weights: dict | str | None = None, batch_size: int = 64, device: str = "cpu",
                 compile: bool = False, explain: bool = False, ocr: bool = False, name: str = "model"):
        import torch

        from geoloc.data.transforms import eval_transform
        from geoloc.models.loading import load_checkpoint

        parts = _refine_parts(refine)
        for what, v in (("topk", topk), ("candidates", candidates), ("batch_size", batch_size)):
            if int(v) < 1:
                raise ValueError(f"{what} must be at least 1, got {v}")
        self.name, self.topk, self.batch_size, self.device = name, int(topk), int(batch_size), device
        self.candidates = max(int(candidates), self.topk)
        self.temperature, self.gallery_temperature = float(temperature), float(gallery_temperature)
        self.weights = {"cells": 1.0, "prototypes": 1.0, "gallery": 1.0, **{k: float(v) for k, v in
                                                                          (weights or {}).items()}}
        self.model = load_checkpoint(ckpt, cells=cells, device=device)
        self.ckpt, self.cells, self.cells_path = self.model.ckpt, self.model.cells, self.model.cells_path
        self.net = self.model.net
        self._forward = torch.compile(self.net) if compile else self.net
        self.compiled = bool(compile)
        self.transform = eval_transform(self.model.data_config)
        self.centroids = self.cells.centroids
        self.refine_requested = refine
        self.index = self._load_index(index) if "prototypes" in parts else None
        self.gallery = self._load_gallery(gallery, gallery_source) if "gallery" in parts else None
        self._cell_evidence: dict[str, np.ndarray] = {}  # head -> (C, K), filled when refine uses evidence
        self.evidence_weights_path: str | None = None
        self.evidence = self._load_evidence(evidence_weights) if "evidence" in parts else {}
        self.gallery_restrict = bool(gallery_restrict)
        if gallery_backend not in ("blas", "faiss"):
            raise ValueError(f"gallery_backend must be 'blas' or 'faiss', got {gallery_backend!r}")
        self.gallery_backend = gallery_backend
        self.gallery_source = gallery_source
        self.explain = bool(explain)
        self.ocr = None
        if ocr:
            from geoloc.evidence.ocr import TextReader

            self.ocr = TextReader()
        self.refine = _refine_name({n for n, on in (("prototypes", self.index is not None),
                                                     ("gallery", self.gallery is not None),
                                                     ("evidence", bool(self.evidence_heads_available)))
                                    if on})

    def _load_evidence(self, weights: dict | str | None) -> dict[str, tuple[float, np.ndarray]]:
        """Per head: its weight and the cells' ``(C, K)`` distributions over its classes."""
        heads = list(self.net.evidence)
        if not heads:
            raise ValueError(f"{self.ckpt}: refine with evidence needs a model trained with evidence heads "
                             "(train.py model.evidence={head: weight})")
        if isinstance(weights, str | Path):
            from geoloc.evidence.tune import load_weights

            self.evidence_weights_path = str(weights)
            weights = load_weights(weights)
        weights = {h: 1.0 for h in heads} if weights is None else {str(h): float(w) for h, w in weights.items()}
        unknown = sorted(set(weights) - set(heads))
        if unknown:
            raise ValueError(f"evidence_weights names {unknown}, but the model's evidence heads are {heads}")
        self._cell_evidence = {h: self.cells.evidence(h) for h in heads}
        return {h: (w, self._cell_evidence[h]) for h, w in weights.items() if w > 0}

    @property
    def evidence_heads_available(self) -> list[str]:
        """The evidence heads the reranking can weigh (empty unless ``refine`` includes evidence)."""
        return list(self._cell_evidence)

    def set_evidence_weights(self, weights: dict[str, float]) -> None:
        """New per-head weights for the evidence reranking (heads left out get 0)."""
        unknown = sorted(set(weights) - set(self.evidence_heads_available))
        if unknown:
            raise ValueError(f"evidence weights name {unknown}; the reranking has {self.evidence_heads_available}")
        self.evidence = {h: (float(w), self._cell_evidence[h]) for h, w in weights.items() if float(w) > 0}

    def _load_index(self, index: str | None):
        from geoloc.retrieval.index import RetrievalIndex, default_index_dir

        folder = Path(index) if index else default_index_dir(self.ckpt)
        if not folder.exists():
            if index:
                raise FileNotFoundError(f"{folder}: no retrieval index (python -m geoloc index ckpt=... builds one)")
            warnings.warn(f"refine asks for prototypes but {folder} does not exist (python -m geoloc index "
                          f"ckpt={self.ckpt} builds it): falling back to cell centroids", stacklevel=3)
            return None
        self.index_path = folder
        return RetrievalIndex.load(folder, net=self.net)

    def _load_gallery(self, gallery: str | None, source: str):
        from geoloc.retrieval.gallery import GPSGallery

        path = Path(gallery) if gallery else self.ckpt.parent.parent / "gallery_v1.npz"
        enc = self.net.location_encoder
        g = None
        if path.is_file():
            try:
                g = GPSGallery.load(path, encoder=enc)
            except ValueError as e:
                if gallery:  # a cache the user named: theirs to fix
                    raise
                warnings.warn(f"{e}: rebuilding it", stacklevel=3)  # the run's own cache: rebuilt in place
        elif gallery:
            raise FileNotFoundError(f"{path}: no gallery cache (None builds RUN/gallery_v1.npz on first use)")
        if g is None:
            from geoloc.data.readers import load_reference_latlng

            latlng = (load_reference_latlng("mp16_gallery") if source == "mp16_gallery"
                      else load_reference_latlng("csv", csv=source))
            g = GPSGallery.build(enc, latlng)
            g.save(path)
        g.assign_cells(self.cells.assign(g.latlng))
        self.gallery_path = path
        return g

    def forward(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        """The network on a list of photos.

        Returns:
            ``cell_prob (B, C)`` float32, ``features (B, D)``, ``image_emb (B, E)`` (unnormalized) and
            ``evidence/<head> (B, K)`` probabilities of the model's evidence heads.
        """
        import torch

        outs = []
        with torch.inference_mode():
            for s in range(0, len(images), self.batch_size):
                x = torch.stack([self.transform(im) for im in images[s:s + self.batch_size]]).to(self.device)
                o = self._forward(x)
                outs.append({"cell_prob": o["cell_logits"].float().softmax(-1).cpu(),
                             "features": o["features"].float().cpu(), "image_emb": o["image_emb"].float().cpu(),
                             **{f"evidence/{h}": o[f"evidence/{h}"].float().softmax(-1).cpu()
                                for h in self.net.evidence}})
        return {k: torch.cat([o[k] for o in outs]).numpy() for k in outs[0]} if outs else {}

    def refine_batch(self, out: dict[str, np.ndarray]) -> Prediction:
        """Cell ranking, retrieval refinement and the final coordinate from :meth:`forward`'s outputs."""
        prob = out["cell_prob"]
        n, k = len(prob), min(self.candidates, prob.shape[1])
        cand = np.argpartition(-prob, k - 1, axis=1)[:, :k] if k < prob.shape[1] else np.tile(
            np.arange(prob.shape[1]), (n, 1))
        p_cand = np.take_along_axis(prob, cand, axis=1)
        order = np.argsort(-p_cand, axis=1, kind="stable")
        cand, p_cand = np.take_along_axis(cand, order, axis=1), np.take_along_axis(p_cand, order, axis=1)
        fused = self.weights["cells"] * np.log(np.maximum(p_cand, 1e-12))
        best_cluster = gallery_idx = None
        if self.index is not None:
            q = out[self.index.meta.get("embedding", "features")]
            proto_s, best_cluster = self.index.score_cells(q, cand)
            term = _log_softmax_masked(proto_s, self.temperature)
            if term is not None:
                fused = fused + self.weights["prototypes"] * term
        if self.gallery is not None:
            gal_s, gallery_idx = self.gallery.score_cells(out["image_emb"], cand)
            term = _log_softmax_masked(gal_s, self.gallery_temperature)
            if term is not None:
                fused = fused + self.weights["gallery"] * term
        for head, (w, dist) in self.evidence.items():
            # how well each candidate cell's photos explain the predicted evidence (product of experts)
            agree = np.einsum("bk,bck->bc", out[f"evidence/{head}"], dist[cand])  # (B, K candidates)
            fused = fused + w * np.log(np.maximum(agree, 1e-12))
        # fused probabilities over the candidates, on the scale of the classifier's (same total mass)
        post = np.exp(fused - fused.max(axis=1, keepdims=True))
        post = post / post.sum(axis=1, keepdims=True) * p_cand.sum(axis=1, keepdims=True)
        rank = np.argsort(-post, axis=1, kind="stable")
        cand, post = np.take_along_axis(cand, rank, axis=1), np.take_along_axis(post, rank, axis=1)
        rows = np.arange(n)
        latlng = self.centroids[cand[:, 0]].copy()
        if self.gallery is not None:
            if self.gallery_restrict:
                g = np.take_along_axis(gallery_idx, rank, axis=1)[:, 0]
            else:
                g = self.gallery.search(out["image_emb"], k=1, backend=self.gallery_backend)[1][:, 0]
            ok = g >= 0
            latlng[ok] = self.gallery.latlng[g[ok]]
        if best_cluster is not None:
            cl = np.take_along_axis(best_cluster, rank, axis=1)[:, 0]
            q = out[self.index.meta.get("embedding", "features")]
            ref_latlng, _ = self.index.nearest_in_cluster(q, cl)
            ok = (cl >= 0) & np.isfinite(ref_latlng).all(axis=1)
            latlng[ok] = ref_latlng[ok]
        t = min(self.topk, k)
        return Prediction(latlng[rows], self.centroids[cand[:, :t]], post[:, :t].astype(np.float64),
                          cand[:, :t].astype(np.int64), prob.astype(np.float32))

    def predict(self, images, keys) -> Prediction:
        out = self.forward(images)
        pred = self.refine_batch(out)
        if self.explain:
            pred.explanations = self.explain_batch(out, pred, images)
        return pred

    def explain_batch(self, out: dict[str, np.ndarray], pred: Prediction, images=None) -> list[dict]:
        """A reasoning chain per photo from :meth:`forward`'s outputs and the answer :meth:`refine_batch` gave."""
        from geoloc.evidence.verbalize import explain

        text = [self.ocr.text_evidence(im) for im in images] if self.ocr is not None and images is not None else None
        return explain(out, pred, self.cells, ocr=text, refine=self.refine)

    def describe(self) -> dict:
        d = {"name": self.name, "kind": "model", "ckpt": str(self.ckpt), "cells": str(self.cells_path),
             "n_cells": len(self.cells), "backbone": self.net.image_encoder.name, "refine": self.refine,
             "topk": self.topk, "compiled": self.compiled, "explain": self.explain, "ocr": self.ocr is not None}
        if self.refine_requested != self.refine:
            d["refine_requested"] = self.refine_requested
        if self.refine != "none":
            d.update(candidates=self.candidates, weights=self.weights)
        if self.index is not None:
            d.update(index=str(self.index_path), temperature=self.temperature)
        if self.evidence_heads_available:
            d.update(evidence_weights={h: w for h, (w, _) in self.evidence.items()})
            if self.evidence_weights_path:
                d.update(evidence_weights_file=self.evidence_weights_path)
        if self.gallery is not None:
            d.update(gallery=str(self.gallery_path), gallery_n=len(self.gallery),
                     gallery_temperature=self.gallery_temperature, gallery_restrict=self.gallery_restrict,
                     gallery_backend=self.gallery_backend)
        return d
