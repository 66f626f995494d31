"""The trained geolocator as a predictor: the classifier's top cells, reranked by retrieval scorers.

:class:`ModelPredictor` is small: a loaded model, a list of scorers (:mod:`geoloc.retrieval.scorers`) and
plain settings; it reads no file. :func:`build_predictor` is what loads: the checkpoint
(:func:`geoloc.models.loading.load_checkpoint`) and each scorer's artifacts (the retrieval index, the
gallery cache, the cells' evidence). It is the ``_target_`` of ``conf/predictor/model.yaml``.

The scorers are a list; the names ``refine`` accepts are shorthands for the usual lists:

============================  ==========================================
``refine``                    scorers
============================  ==========================================
``none``                      (none: the top cell's centroid)
``prototypes``                prototypes
``gallery``                   gallery
``both``                      prototypes, gallery
``evidence``                  evidence
``prototypes+evidence``       prototypes, evidence
``gallery+evidence``          gallery, evidence
``both+evidence``             prototypes, gallery, evidence
============================  ==========================================

Two more settings shape the answer. ``calibration`` divides the classifier's log-probabilities by a
temperature fitted on validation photos (:mod:`geoloc.inference.calibration`; ``"auto"``:
``RUN/calibration_v1.json`` when ``python -m geoloc calibrate`` wrote one), so that every probability the
predictor reports and every decision that weighs them starts from calibrated cells. ``decode`` says which
candidate to answer (:mod:`geoloc.retrieval.decode`): the most probable (``argmax``), or the one with the
best expected score under the reranked distribution (``geoscore``, ``distance``, ``acc@<km>``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from geoloc.inference.base import Prediction
from geoloc.precision import autocast, resolve_precision

#: The ``refine`` shorthands and the scorers each stands for, in placing order.
REFINE_SCORERS = {
    "none": (), "prototypes": ("prototypes",), "gallery": ("gallery",), "both": ("prototypes", "gallery"),
    "evidence": ("evidence",), "prototypes+evidence": ("prototypes", "evidence"),
    "gallery+evidence": ("gallery", "evidence"), "both+evidence": ("prototypes", "gallery", "evidence"),
}
REFINE_CHOICES = tuple(REFINE_SCORERS)


def refine_scorers(refine: str) -> tuple[str, ...]:
    """The scorer names a ``refine`` shorthand stands for."""
    if refine not in REFINE_SCORERS:
        raise ValueError(f"refine must be one of {REFINE_CHOICES}, got {refine!r}")
    return REFINE_SCORERS[refine]


def refine_name(names: Sequence[str]) -> str:
    """The ``refine`` shorthand for a list of scorer names, or the names joined by ``+``."""
    names = tuple(names)
    for short, expanded in REFINE_SCORERS.items():
        if expanded == names:
            return short
    return "+".join(names)


def compiled_forward(net, precision: str, device: str) -> Callable:
    """``net``'s forward through ``torch.compile``.

    In bf16 on a CPU it compiles a bfloat16 copy of the network with Inductor's freezing (the weights become
    constants, prepacked once for oneDNN's AMX kernels), which autocast cannot do: it converts the weights on
    every call and keeps its float32 casts (layer norms, softmax) in the graph. Inputs are cast to bfloat16;
    the outputs are bfloat16 for the caller to cast back (:meth:`ModelPredictor._outputs`). Elsewhere: the
    network itself, compiled.
    """
    import torch

    if precision == "bf16" and torch.device(device).type == "cpu":
        low = copy.deepcopy(net).to(torch.bfloat16).eval()
        for p in low.parameters():
            p.requires_grad_(False)
        compiled = torch.compile(low)
        from torch._inductor import config as inductor

        def forward(x):
            # freezing for this graph only (it compiles on the first call); the copy is bfloat16 through, and
            # autocast would add its casts to the graph
            with torch.autocast("cpu", enabled=False), inductor.patch(freezing=True):
                return compiled(x.to(torch.bfloat16))

        return forward
    return torch.compile(net)


class ModelPredictor:
    """A trained geolocator whose top cells are reranked by scorers.

    The classifier gives a probability for every geocell (``softmax(logits / T)``, ``T`` the calibration's
    temperature, 1 without one); its ``candidates`` most probable cells are reranked by
    :func:`geoloc.retrieval.rerank.rerank`: ``weights["cells"] * log p(cell) + sum over scorers of
    weights[scorer.name] * scorer.log_term(...)``. Each candidate's point is the first placing scorer's
    coordinate inside it (prototypes: the nearest reference photo; gallery: the best gallery point), else its
    centroid. With ``decode="argmax"`` the answer is the winning cell's point; otherwise it is the
    candidate point with the best expected score under the reranked distribution
    (:func:`geoloc.retrieval.decode.choose_answer`; a scorer that places anywhere, not inside the cell, such
    as an unrestricted gallery, then places nothing). The ranked cells are the same either way.

    Args:
        model: a :class:`~geoloc.models.loading.LoadedModel` (:func:`~geoloc.models.loading.load_checkpoint`).
        scorers: the :class:`~geoloc.retrieval.scorers.Scorer` s, in placing order.
        topk: ranked cells reported per photo.
        candidates: cells reranked (at least ``topk``, at most every cell).
        weights: fusion weights, ``{"cells": w, <scorer name>: w}``; 1 for any left out.
        batch_size: photos per forward pass.
        device: where inputs go; None: where the model is.
        compile: run the network through ``torch.compile`` (slower first batch, faster after).
        explain: attach a reasoning chain to every answer (``Prediction.explanations``): ``template``
            (:mod:`geoloc.evidence.verbalize`), ``generated`` (the text decoder's, every claim checked:
            :mod:`geoloc.evidence.claims`), ``both``, or True (both for a model with a text decoder, else
            the template).
        explain_beams: beams of the text decoder's search (1: greedy).
        vlm: with ``explain``, also ask a local vision-language model for the chain, checked the same way
            (:class:`geoloc.evidence.vlm.VLMExplainer`, or the folder of a saved model; optional, GPU-sized).
        ocr: with ``explain``, also read text in the photo (:mod:`geoloc.evidence.ocr`): True (a reader is
            made on first use) or a :class:`~geoloc.evidence.ocr.TextReader`.
        name: report name.
        refine_requested: the ``refine`` asked for, when a scorer could not be made (reports say so).
        decode: ``argmax``, ``geoscore``, ``distance`` or ``acc@<km>`` (:mod:`geoloc.retrieval.decode`).
        calibration: a :class:`~geoloc.inference.calibration.Calibration` (its temperature divides the cell
            logits), or None.
        precision: the forward pass's precision: ``32``, ``bf16``, ``16`` (CUDA) or ``auto``
            (:func:`geoloc.precision.resolve_precision`; ``describe()`` says which was used).
    """

    needs_images = True

    def __init__(self, model, scorers: Sequence = (), *, topk: int = 5, candidates: int = 10,
                 weights: dict | None = None, batch_size: int = 64, device: str | None = None, compile: bool = False,
                 explain: bool | str = False, ocr=False, name: str = "model", refine_requested: str | None = None,
                 decode: str = "argmax", calibration=None, precision: str = "32", explain_beams: int = 1,
                 vlm=None):
        from geoloc.inference.calibration import Calibration
        from geoloc.retrieval.decode import decode_name, parse_decode

        if isinstance(model, str | Path) or model is None:
            raise TypeError(f"ModelPredictor takes a loaded model; for a checkpoint path ({model!r}) use "
                            "geoloc.inference.predictor.build_predictor(ckpt, ...)")
        for what, v in (("topk", topk), ("candidates", candidates), ("batch_size", batch_size)):
            if int(v) < 1:
                raise ValueError(f"{what} must be at least 1, got {v}")
        self.model = model
        self.scorers = list(scorers)
        names = [s.name for s in self.scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"each scorer may appear once, got {names}")
        self.name, self.topk, self.batch_size = name, int(topk), int(batch_size)
        self.candidates = min(max(int(candidates), self.topk), len(model.cells))  # more than every cell is every cell
        self.weights = {"cells": 1.0, **{n: 1.0 for n in names},
                        **{str(k): float(v) for k, v in (weights or {}).items()}}
        self.device = device or str(next(model.net.parameters()).device)
        self.precision = resolve_precision(precision, self.device)
        self.compiled = bool(compile)
        self._forward = compiled_forward(model.net, self.precision, self.device) if compile else model.net
        from geoloc.evidence.claims import resolve_explain

        self.explain_mode = resolve_explain(explain, model.net.text_decoder is not None, what=str(model.ckpt))
        self.explain = self.explain_mode is not None
        self.explain_beams = int(explain_beams)
        if vlm is not None and not hasattr(vlm, "explain"):
            from geoloc.evidence.vlm import VLMExplainer

            vlm = VLMExplainer(vlm, device=self.device)
        self.vlm = vlm
        self._ocr = ocr if ocr not in (None, False) else None
        self.refine = refine_name(names)
        self.refine_requested = refine_requested or self.refine
        self.decode_kind, self.decode_radius_km = parse_decode(decode)
        self.decode = decode_name(self.decode_kind, self.decode_radius_km)
        if calibration is not None and not isinstance(calibration, Calibration):
            raise TypeError(f"calibration must be a geoloc.inference.calibration.Calibration or None, got "
                            f"{type(calibration).__name__} (build_predictor(ckpt, calibration=PATH) reads a file)")
        self.calibration = calibration
        self._transform = None

    # -- what came with the model ----------------------------------------------------------------------
    @property
    def net(self):
        return self.model.net

    @property
    def cells(self):
        return self.model.cells

    @property
    def cells_path(self) -> str:
        return self.model.cells_path

    @property
    def ckpt(self) -> Path:
        return self.model.ckpt

    @property
    def centroids(self) -> np.ndarray:
        return self.model.cells.centroids

    @property
    def temperature(self) -> float:
        """The calibration temperature of the cell probabilities (1: uncalibrated)."""
        return 1.0 if self.calibration is None else self.calibration.temperature

    @property
    def transform(self):
        """The network's evaluation transform (PIL -> ``[3, H, W]``)."""
        if self._transform is None:
            from geoloc.data.transforms import eval_transform

            self._transform = eval_transform(self.model.data_config)
        return self._transform

    @property
    def ocr(self):
        """The text reader (made on first use), or None without OCR."""
        if self._ocr is True or isinstance(self._ocr, str):
            from geoloc.evidence.ocr import make_reader

            self._ocr = make_reader(self._ocr)
        return self._ocr

    def scorer(self, name: str):
        """The scorer called ``name``, or None."""
        return next((s for s in self.scorers if s.name == name), None)

    @property
    def evidence_heads_available(self) -> list[str]:
        """The evidence heads the reranking can weigh (empty without an evidence scorer)."""
        s = self.scorer("evidence")
        return list(s.heads) if s is not None else []

    def with_weights(self, weights: dict | None = None, *, evidence: dict | None = None) -> ModelPredictor:
        """A new predictor with other fusion weights and/or per-head evidence weights, sharing the model and
        the other scorers (nothing is copied or reloaded; this predictor is unchanged).

        Args:
            weights: fusion weights merged over the current ones (``{"cells": w, <scorer>: w}``).
            evidence: the evidence scorer's per-head weights (heads left out get 0).
        """
        new = copy.copy(self)
        new.weights = {**self.weights, **{str(k): float(v) for k, v in (weights or {}).items()}}
        if evidence is not None:
            s = self.scorer("evidence")
            if s is None:
                raise ValueError("this predictor has no evidence scorer (refine=evidence) to weigh")
            new.scorers = [s.with_weights(evidence) if x is s else x for x in self.scorers]
        return new

    def with_decode(self, decode: str) -> ModelPredictor:
        """A new predictor that answers by another ``decode`` (the model and scorers shared; this one unchanged).

        The network's outputs do not depend on it, so one :meth:`forward` serves every decode.
        """
        from geoloc.retrieval.decode import decode_name, parse_decode

        new = copy.copy(self)
        new.decode_kind, new.decode_radius_km = parse_decode(decode)
        new.decode = decode_name(new.decode_kind, new.decode_radius_km)
        return new

    # -- prediction ------------------------------------------------------------------------------------
    def forward_batch(self, x) -> dict[str, np.ndarray]:
        """The network on a preprocessed batch ``x [B, 3, H, W]`` (see :meth:`forward` for the outputs)."""
        import torch

        with torch.inference_mode():
            with autocast(self.precision, self.device):
                o = self._forward(x.to(self.device))
            return self._outputs(o)

    def forward_features(self, features) -> dict[str, np.ndarray]:
        """The network after its backbone, on backbone features ``(B, D)`` (a
        :class:`~geoloc.data.features.FeatureCache`'s rows, made by this network's backbone): the outputs
        of :meth:`forward`, for studies and tuning that score many settings on photos embedded once."""
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(features, np.float32), device=self.device)
            with autocast(self.precision, self.device):
                o = self.net.heads(x)
            return self._outputs(o)

    def _outputs(self, o: dict) -> dict[str, np.ndarray]:
        """The network's raw outputs as :meth:`forward` returns them (calibrated cells, evidence softmax),
        in float32 whatever the network ran in: the softmax over every cell is never taken in bf16."""
        logits = o["cell_logits"].float()
        out = {"cell_prob": (logits / self.temperature).softmax(-1), "cell_logits": logits,
               "features": o["features"].float(), "image_emb": o["image_emb"].float(),
               **{f"evidence/{h}": o[f"evidence/{h}"].float().softmax(-1) for h in self.net.evidence}}
        return {k: v.cpu().numpy() for k, v in out.items()}

    def forward(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        """The network on a list of photos.

        Returns:
            ``cell_prob (B, C)`` float32 (calibrated: ``softmax(cell_logits / T)``), ``cell_logits (B, C)`` (the
            cell head's, before calibration), ``features (B, D)``, ``image_emb (B, E)`` (unnormalized) and
            ``evidence/<head> (B, K)`` probabilities of the model's evidence heads.
        """
        import torch

        outs = [self.forward_batch(torch.stack([self.transform(im) for im in images[s:s + self.batch_size]]))
                for s in range(0, len(images), self.batch_size)]
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]} if outs else {}

    def refine_batch(self, out: dict[str, np.ndarray]) -> Prediction:
        """Cell ranking, reranking by the scorers and the answer coordinate, from :meth:`forward`'s outputs
        (``cell_prob`` is taken as calibrated already; ``cell_logits``, when there, gives the uncalibrated
        probabilities of a calibrated predictor)."""
        import torch

        from geoloc.retrieval.decode import choose_answer
        from geoloc.retrieval.rerank import rerank, top_candidates

        prob = np.asarray(out["cell_prob"], np.float32)
        p_cand, cand = top_candidates(torch.from_numpy(prob), self.candidates)
        terms = [s.log_term(out, cand) for s in self.scorers]
        post, order = rerank(p_cand, terms, [self.weights[s.name] for s in self.scorers], self.weights["cells"])
        cand = cand.gather(1, order).numpy()
        rows = np.arange(len(cand))
        pick = np.zeros(len(cand), np.int64)
        if self.decode_kind == "argmax":
            latlng = self._place(out, cand[:, 0], restricted_only=False)
        else:
            b, k = cand.shape
            points = self._place(_RepeatedRows(out, k), cand.reshape(-1), restricted_only=True).reshape(b, k, 2)
            # chosen on float32 points, as the exported model does, so that the two break near-ties alike
            pick = choose_answer(torch.from_numpy(points.astype(np.float32)), post, self.decode_kind,
                                 self.decode_radius_km).numpy()
            latlng = points[rows, pick]
        t = min(self.topk, cand.shape[1])
        raw = None
        if self.calibration is not None and "cell_logits" in out:
            raw = torch.from_numpy(np.asarray(out["cell_logits"], np.float32)).softmax(-1).numpy()
        post = post.numpy().astype(np.float64)
        return Prediction(latlng, self.centroids[cand[:, :t]], post[:, :t], cand[:, :t].astype(np.int64), prob,
                          cell_prob_uncalibrated=raw, answer_cell=cand[rows, pick].astype(np.int64),
                          answer_prob=post[rows, pick])

    def _place(self, out, cells: np.ndarray, *, restricted_only: bool) -> np.ndarray:
        """``(N, 2)`` the answer point inside each of ``cells (N,)``: the first placing scorer's, else the centroid.

        ``out`` has one row per cell. ``restricted_only`` leaves out scorers that place anywhere
        (``restrict=False``): their point is not inside the cell it would stand for.
        """
        latlng = self.centroids[cells].copy()
        placed = np.zeros(len(cells), bool)
        for s in self.scorers:
            if hasattr(s, "place") and (not restricted_only or getattr(s, "restrict", True)):
                where, ok = s.place(out, cells)
                ok = np.asarray(ok, bool) & ~placed
                latlng[ok] = where[ok]
                placed |= ok
        return latlng

    def predict(self, images, keys) -> Prediction:
        out = self.forward(images)
        pred = self.refine_batch(out)
        if self.explain:
            pred.explanations = self.explain_batch(out, pred, images)
        return pred

    def explain_batch(self, out: dict[str, np.ndarray], pred: Prediction, images=None) -> list[dict]:
        """A reasoning chain per photo from :meth:`forward`'s outputs and the answer :meth:`refine_batch` gave:
        the template chain, the text decoder's checked chain, or both (``explain``)."""
        from geoloc.evidence.claims import combine_chains
        from geoloc.evidence.verbalize import explain

        template = generated = None
        if self.explain_mode in ("template", "both") or (self.vlm is not None and images is not None):
            reader = self.ocr
            text = [reader.text_evidence(im) for im in images] if reader is not None and images is not None else None
            how = self.refine if self.decode == "argmax" else f"{self.refine}, decode={self.decode}"
            template = explain(out, pred, self.cells, ocr=text, refine=how)
        if self.explain_mode in ("generated", "both"):
            generated = self.generate_chains(out)
        chains = combine_chains(template, generated, self.explain_mode)
        if self.vlm is not None and images is not None:  # the VLM sees the photo and the model's own claims
            for chain, v in zip(chains, self.vlm.explain(images, template, out, self.cells)):
                chain["vlm"] = v
                chain["text"] = (f"{chain['text']}\nWritten by {v['source']}, checked against the model:\n"
                                 f"{v['text'] or '   (no claim backed)'}")
        return chains

    def generate_texts(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The text decoder's tokens and their probabilities ``(B, T)`` for backbone features ``(B, D)``."""
        import torch

        dec = self.net.text_decoder
        f = torch.from_numpy(np.asarray(features, np.float32)).to(self.device)
        with torch.inference_mode():
            tokens, probs = dec.beam_search(f, beams=self.explain_beams) if self.explain_beams > 1 else dec.generate(f)
        return tokens.cpu().numpy(), probs.float().cpu().numpy()

    def generate_chains(self, out: dict[str, np.ndarray]) -> list[dict]:
        """The text decoder's chain per photo, every claim checked against ``out`` (:mod:`geoloc.evidence.claims`)."""
        from geoloc.evidence.claims import decoder_chains

        tokens, probs = self.generate_texts(out["features"])
        return decoder_chains(tokens, probs, out, self.cells)

    def describe(self) -> dict:
        run = self.model.run_config or {}
        d = {"name": self.name, "kind": "geoclip" if run.get("model") == "geoclip" else "model",
             "ckpt": str(self.ckpt), "cells": str(self.cells_path),
             "n_cells": len(self.cells), "backbone": self.net.image_encoder.name, "refine": self.refine,
             "topk": self.topk, "compiled": self.compiled, "explain": (True if self.explain_mode == "template"
                                                                              else self.explain_mode or False),
             "ocr": self._ocr is not None, **({"vlm": self.vlm.name} if self.vlm is not None else {}),
             "decode": self.decode, "cell_temperature": self.temperature, "precision": self.precision,
             "calibration": None if self.calibration is None else self.calibration.source}
        if self.refine_requested != self.refine:
            d["refine_requested"] = self.refine_requested
        if self.scorers or self.decode != "argmax":
            d["candidates"] = self.candidates
        if self.scorers:
            d["weights"] = dict(self.weights)
        for s in self.scorers:
            d.update(s.describe())
        if d["kind"] == "geoclip":
            d.update(clip_weights=run.get("clip_weights"), random_clip=bool(run.get("random_clip")))
        return d


class PrecomputedPredictor:
    """A :class:`ModelPredictor` whose network already ran: it answers from the raw network outputs of each
    photo (an embedding pass over several processes, :func:`geoloc.training.embedding.run_embedding_pass`),
    with the predictor's own calibration, reranking, answer rule and reasoning chains, so that its
    predictions are the predictor's. Photos are looked up by key; it needs no image (no OCR).

    Args:
        predictor: the predictor whose network made the outputs.
        keys: ``(N,)`` the photos' keys.
        outputs: ``{name: (N, ...)}``: the network's raw outputs (``cell_logits``, ``features``, ``image_emb``,
            ``evidence/<head>`` logits), as ``predictor``'s network returns them.
    """

    needs_images = False

    def __init__(self, predictor: ModelPredictor, keys, outputs: Mapping[str, np.ndarray]):
        self.check(predictor)
        self.predictor = predictor
        self.outputs = {k: np.asarray(v) for k, v in outputs.items()}
        self.row = {str(k): i for i, k in enumerate(keys)}

    @staticmethod
    def check(predictor) -> None:
        """Raises ValueError, before any network runs, when ``predictor`` cannot answer from outputs alone."""
        if not isinstance(predictor, ModelPredictor):
            raise ValueError(f"trainer= spreads a network's forward pass; predictor {predictor.name!r} has none "
                             "(run it without a trainer)")
        if predictor._ocr is not None:
            raise ValueError("OCR reads the photos themselves: it cannot run on outputs computed beforehand; "
                             "predict in one process (no trainer) or set predictor.ocr=false")

    def __getattr__(self, name):  # name, cells, explain, topk, ...: the predictor's
        if name == "predictor":
            raise AttributeError(name)
        return getattr(self.predictor, name)

    def describe(self) -> dict:
        return self.predictor.describe()

    def predict(self, images, keys) -> Prediction:
        import torch

        try:
            rows = np.array([self.row[str(k)] for k in keys], dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"no network outputs for photo {e.args[0]!r}: the pass and the evaluation read "
                             "different photos") from None
        p = self.predictor
        out = p._outputs({k: torch.from_numpy(v[rows]) for k, v in self.outputs.items()})
        pred = p.refine_batch(out)
        if p.explain:
            pred.explanations = p.explain_batch(out, pred, None)
        return pred


def build_predictor(ckpt: str | Path, *, refine: str = "none", scorers: Sequence | None = None,
                    cells: str | None = None, index: str | None = None, temperature: float = 0.05,
                    prototype_answer: str = "nearest", gallery: str | None = None, gallery_source: str | None = None,
                    gallery_restrict: bool = True, gallery_backend: str = "blas", gallery_temperature: float = 0.05,
                    evidence_weights: dict | str | None = None, topk: int = 5, candidates: int = 10,
                    weights: dict | None = None, batch_size: int = 64, device: str = "cpu", compile: bool = False,
                    explain: bool | str = False, ocr: bool = False, name: str = "model", decode: str = "argmax",
                    calibration="auto", precision: str = "32", explain_beams: int = 1, vlm=None) -> ModelPredictor:
    """Loads a checkpoint and its scorers' artifacts into a :class:`ModelPredictor`.

    Args:
        ckpt: a checkpoint written by ``train.py`` (``RUN/checkpoints/*.ckpt``).
        refine: a shorthand for the scorers (module docstring); used when ``scorers`` is None.
        scorers: the scorers, each a :class:`~geoloc.retrieval.scorers.Scorer` or a callable
            ``f(model) -> Scorer | None`` (a Hydra ``_partial_: true`` node of e.g.
            ``geoloc.retrieval.scorers.PrototypeScorer.from_run``); None: from ``refine``.
        cells: the geocells file; None: the one the run was trained with.
        index: the retrieval index folder (``python -m geoloc index``); None: ``RUN/index_v1`` when it
            exists (else centroids, with a warning).
        temperature: ``T`` of the prototype scores.
        prototype_answer: ``nearest`` (reference photo) or ``representative`` (cluster representative).
        gallery: the GPS-gallery cache; None: ``RUN/gallery_v1.npz`` (``python -m geoloc gallery`` builds it).
        gallery_source: the coordinates the gallery is built from, named in the message when the cache
            is missing (``python -m geoloc gallery source=...``).
        gallery_restrict: answer inside the chosen cell (False: GeoCLIP's best point anywhere).
        gallery_backend: ``blas`` or ``faiss`` for the unrestricted search.
        gallery_temperature: ``T`` of the gallery scores.
        evidence_weights: per-head weights of the evidence scorer, or the file ``python -m geoloc tune``
            wrote; None: 1 for every head.
        topk, candidates, weights, batch_size, compile, explain, explain_beams, vlm, name: see
            :class:`ModelPredictor`.
        device: ``cpu`` or ``cuda``.
        ocr: with ``explain``, read text in the photo (needs ``rapidocr-onnxruntime``).
        decode: ``argmax`` (the most probable candidate), ``geoscore``, ``distance`` or ``acc@<km>`` (the
            candidate with the best expected score: :mod:`geoloc.retrieval.decode`).
        calibration: ``auto`` (``RUN/calibration_v1.json`` when ``python -m geoloc calibrate`` wrote one for
            these weights), the path of a calibration file, a temperature, or None (uncalibrated); see
            :func:`geoloc.inference.calibration.resolve_calibration`.
        precision: ``32``, ``bf16``, ``16`` (CUDA) or ``auto`` (bf16 where the device supports it): the
            network's forward pass under autocast; everything after the logits stays float32
            (:mod:`geoloc.precision`).

    Raises:
        ValueError, FileNotFoundError: a missing or damaged checkpoint or artifact; the message says how to
            make it.
    """
    from geoloc.inference.calibration import resolve_calibration
    from geoloc.models.loading import load_checkpoint
    from geoloc.retrieval.decode import parse_decode
    from geoloc.retrieval.scorers import EvidenceScorer, GalleryScorer, PrototypeScorer

    if scorers is None:
        names = refine_scorers(refine)
    elif refine not in ("none", None):
        raise ValueError(f"give either refine ({refine!r}) or scorers, not both")
    else:
        names = None
    parse_decode(decode)  # a bad decode fails before the checkpoint is read
    model = load_checkpoint(ckpt, cells=cells, device=device)
    cal = resolve_calibration(calibration, ckpt=ckpt, net=model.net)
    loaders: dict[str, Callable] = {
        "prototypes": lambda m: PrototypeScorer.from_run(m, index=index, temperature=temperature,
                                                         answer=prototype_answer),
        "gallery": lambda m: GalleryScorer.from_run(m, gallery=gallery, temperature=gallery_temperature,
                                                    restrict=gallery_restrict, backend=gallery_backend,
                                                    source=gallery_source),
        "evidence": lambda m: EvidenceScorer.from_run(m, weights=evidence_weights),
    }
    specs = [loaders[n] for n in names] if names is not None else list(scorers)
    made, requested = [], []
    for i, spec in enumerate(specs):
        s = spec if hasattr(spec, "log_term") else spec(model)
        requested.append(s.name if s is not None else _spec_name(spec, names, i))
        if s is not None:  # (None: an optional artifact is absent, and the scorer said so)
            made.append(s)
    reader = None
    if ocr and explain:
        from geoloc.evidence.ocr import make_reader

        reader = make_reader(ocr)
    return ModelPredictor(model, made, topk=topk, candidates=candidates, weights=weights, batch_size=batch_size,
                          device=device, compile=compile, explain=explain, ocr=reader, name=name,
                          refine_requested=refine_name(requested), decode=decode, calibration=cal,
                          precision=precision, explain_beams=explain_beams, vlm=vlm if explain else None)


class _RepeatedRows(Mapping):
    """The network outputs with each photo's row repeated ``k`` times (row ``i * k + j`` is photo ``i``), made
    on first access: what placing every candidate cell (``k`` per photo) in one call needs."""

    def __init__(self, out: dict, k: int):
        self._out, self._k, self._made = out, int(k), {}
        first = out.get("cell_prob")
        self._rows = None if first is None else len(first)

    def __getitem__(self, key):
        if key not in self._made:
            v = self._out[key]
            rows = getattr(v, "shape", ())[:1]
            self._made[key] = np.repeat(np.asarray(v), self._k, axis=0) if rows and rows[0] == self._rows else v
        return self._made[key]

    def __iter__(self):
        return iter(self._out)

    def __len__(self) -> int:
        return len(self._out)


def _spec_name(spec, names, i: int) -> str:
    """The name of a scorer that could not be made, for ``refine_requested``."""
    if names is not None:
        return names[i]
    func = getattr(spec, "func", spec)
    owner = getattr(func, "__self__", None)
    return getattr(owner, "name", getattr(func, "__qualname__", "scorer"))
