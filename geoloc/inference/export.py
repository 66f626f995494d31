"""Export a trained geolocator as one TorchScript file that others embed without geoloc.

    python -m geoloc export ckpt=RUN/checkpoints/best.ckpt out=model.pt [topk=5] [refine=prototypes+evidence]
    python -m geoloc export ckpt=... out=model.pt prototypes=true index=DIR      # the older spelling

Using it needs only torch::

    import torch
    model = torch.jit.load("model.pt")
    out = model(images)   # images: uint8 (B, 3, H, W), RGB, any H and W

``out`` is a dict of tensors: ``latlng`` (B, 2) float32 degrees ``[lat, lng]``, ``topk_cells`` (B, k) int64
geocell ids, ``topk_prob`` (B, k) their probabilities, ``cell_prob`` (B, C) every cell's probability
(calibrated: ``softmax(cell_logits / T)``), ``cell_logits`` (B, C) the cell head's logits before
calibration, ``embedding`` (B, D) the L2-normalized image embedding (for your own retrieval) and, for a
model trained with evidence heads, ``evidence/<head>`` (B, K) their class probabilities (classes in
``geoloc.json``); for a model with a text decoder, ``text_tokens`` (B, T) int64, the chain it writes (greedy,
``<bos>`` first, ``<pad>`` after ``<eos>``; the vocabulary in ``geoloc.json``) and ``text_probs`` (B, T) each
token's probability under the decoder.

The file holds the preprocessing (timm's evaluation transform in tensor ops: resize the short side to
``input_size / crop_pct``, centre crop, scale, normalize), the image encoder, the cell head, the cell
centroids and the exportable part of each scorer of the predictor it is made from
(:func:`exported_from_predictor`; :mod:`geoloc.retrieval.scorers`): the location-cluster prototypes of an
index (``prototypes``), the cells' evidence distributions (``evidence``) and the GPS gallery's embeddings
(``gallery``). The top cells are reranked by the same :func:`geoloc.retrieval.rerank.rerank` as
:class:`~geoloc.inference.predictor.ModelPredictor`, with the same fusion weights, temperatures and
evidence weights, so the two agree. It carries the predictor's calibration temperature (the cell
probabilities of a calibrated run are calibrated here too: :mod:`geoloc.inference.calibration`) and its
``decode``: with ``geoscore``, ``distance`` or ``acc@<km>`` the answer is chosen among the candidates' points
by the same :func:`geoloc.retrieval.decode.choose_answer`. With prototypes, the exported answer is the best
cluster's representative coordinate (the file carries no per-photo references); the predictor gives the
same answer with ``prototype_answer=representative``.

``geoloc.json`` inside the file (``torch.jit.load(path, _extra_files={"geoloc.json": ""})``) describes inputs,
outputs, the refinement (``refine``, ``weights``, ``scorers``), the answer rule (``decode``), the calibration
(``cell_temperature``, ``calibration``: the file's fit report) and each cell's country and region names,
the fingerprint of the cells (:meth:`geoloc.geo.cells.Geocells.fingerprint`) and, for a model with evidence
heads, each cell's evidence counts, so that ``geoloc-predict --model model.pt --explain`` can check the
reasoning chain without the cells file (:class:`geoloc.inference.exported.ExportedPredictor`).

An exported file is TorchScript: code, by nature. Load only files you trust (see the README's "Trust and
safety").

**ONNX** (:func:`export_onnx`; ``python -m geoloc export ... format=onnx|both``): the same module, inputs and
outputs (text decoder aside: its decoding loop stays TorchScript's), batch, height and width dynamic, through
PyTorch's ``torch.export``-based exporter at opset 18 (``Resize`` with antialiasing, as the preprocessing
needs). ``geoloc.json`` is the model's ``geoloc.json`` metadata property, with the cells' centroids added, so
onnxruntime alone runs it and names its cells::

    import json, onnxruntime as ort
    s = ort.InferenceSession("model.onnx")
    meta = json.loads(s.get_modelmeta().custom_metadata_map["geoloc.json"])
    out = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"images": images_uint8})))
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from geoloc.artifacts import atomic_path
from geoloc.retrieval.decode import choose_answer, decode_name, parse_decode
from geoloc.retrieval.rerank import rerank, top_candidates

EXPORT_FORMAT_VERSION = 1
#: Cell attributes carried in ``geoloc.json`` (names for answers, continents for the reasoning chain).
CELL_NAME_COLUMNS = ("country", "adm0_a3", "admin1_name", "continent")


class _Backbone(nn.Module):
    """Encoder, cell head and projection into the location encoder's space: what gets traced."""

    def __init__(self, net, precision: str = "32"):
        super().__init__()
        parts = (net.image_encoder, net.cell_head, net.image_proj)
        self.bf16 = precision == "bf16"
        if self.bf16:  # a bfloat16 copy of the weights (the network itself is left as it is)
            import copy

            parts = tuple(copy.deepcopy(p).to(torch.bfloat16) for p in parts)
        self.image_encoder, self.cell_head, self.image_proj = parts
        self.cell_input = getattr(net, "cell_input", "features")  # fixed when traced

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.bf16:
            x = x.to(torch.bfloat16)
        features = self.image_encoder(x)
        image_emb = self.image_proj(features)
        logits = self.cell_head(image_emb if self.cell_input == "image_emb" else features)
        return features.float(), logits.float(), image_emb.float()  # float32 from here on


class ExportedGeolocator(nn.Module):
    """uint8 images in, coordinates and ranked geocells out (see the module docstring).

    Args:
        net: a trained :class:`~geoloc.models.geolocator.GeoLocator` (eval mode).
        data_config: timm preprocessing (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``).
        centroids: ``(C, 2)`` cell centroids ``[lat, lng]``.
        topk: ranked cells returned.
        candidates: cells reranked.
        scorers: the scorers' exported parts (``scorer.export(num_cells)``), in placing order.
        weights: one fusion weight per scorer.
        cell_weight: the weight of ``log p(cell)``.
        temperature: the calibration temperature: ``cell_prob = softmax(cell_logits / T)``.
        decode: ``argmax``, ``geoscore``, ``distance`` or ``acc@<km>`` (:mod:`geoloc.retrieval.decode`).
        place_in_cell: per scorer, whether its placement lies inside the cell it is given (False: an
            unrestricted gallery, which places nothing when a non-argmax decode places every candidate);
            None: all True.
        precision: ``32`` or ``bf16``: the encoder, cell head and projection as a bfloat16 copy (its outputs
            cast to float32; the softmax, reranking and answer stay float32, the evidence heads too).
    """

    weights: list[float]
    place_in_cell: list[bool]

    def __init__(self, net, data_config: dict, centroids, *, topk: int = 5, candidates: int = 10,
                 scorers: list[nn.Module] | None = None, weights: list[float] | None = None, cell_weight: float = 1.0,
                 temperature: float = 1.0, decode: str = "argmax", place_in_cell: list[bool] | None = None,
                 precision: str = "32"):
        super().__init__()
        if precision not in ("32", "bf16"):
            raise ValueError(f"an exported model runs in precision 32 or bf16, not {precision!r}")
        self.precision = precision
        self.backbone = _Backbone(net, precision)
        self.evidence = net.evidence  # evidence heads: probabilities on the same features
        self.text_decoder = net.text_decoder  # None without one (TorchScript then leaves its branch out)
        _, h, w = data_config["input_size"]
        self.crop_h, self.crop_w = int(h), int(w)
        self.scale_size = int(math.floor(min(h, w) / float(data_config.get("crop_pct", 1.0))))
        interp = str(data_config.get("interpolation", "bilinear"))
        self.mode = "bicubic" if interp == "bicubic" else "bilinear"
        self.register_buffer("mean", torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1))
        # a copy: the centroids may come from a read-only array
        self.register_buffer("centroids", torch.tensor(centroids, dtype=torch.float32))
        self.num_cells = int(self.centroids.shape[0])
        self.topk = min(int(topk), self.num_cells)
        self.candidates = min(max(int(candidates), self.topk), self.num_cells)
        self.scorers = nn.ModuleList(list(scorers or []))
        self.weights = [float(x) for x in (weights or [])]
        if len(self.weights) != len(self.scorers):
            raise ValueError(f"need one fusion weight per scorer: {len(self.scorers)} scorers, "
                             f"{len(self.weights)} weights")
        self.cell_weight = float(cell_weight)
        if not (math.isfinite(float(temperature)) and float(temperature) > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature}")
        self.temperature = float(temperature)
        self.decode_kind, self.decode_radius_km = parse_decode(decode)
        self.decode = decode_name(self.decode_kind, self.decode_radius_km)
        self.place_in_cell = [True] * len(self.scorers) if place_in_cell is None else [bool(v) for v in place_in_cell]
        if len(self.place_in_cell) != len(self.scorers):
            raise ValueError("need one place_in_cell flag per scorer")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> normalized float ``(B, 3, h, w)`` (timm's eval transform)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("expected uint8 images of shape (B, 3, H, W)")
        x = images.to(torch.float32) / 255.0
        # integer arithmetic only, without branches, so that ONNX keeps H and W dynamic: the short side to
        # scale_size, the long one floor(scale_size * long / short); the centre crop's offset is
        # round((n - crop) / 2) with round-half-to-even, as torchvision's (d // 2, plus 1 when d % 4 == 3)
        h, w = x.shape[2], x.shape[3]
        short = min(h, w)
        nh, nw = self.scale_size * h // short, self.scale_size * w // short
        x = F.interpolate(x, size=[nh, nw], mode=self.mode, align_corners=False, antialias=True)
        dh, dw = nh - self.crop_h, nw - self.crop_w
        top, left = dh // 2 + (dh % 4) // 3, dw // 2 + (dw % 4) // 3
        return (self.crop(x, top, left).clamp(0.0, 1.0) - self.mean) / self.std

    def crop(self, x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        """The ``crop_h x crop_w`` window at ``(top, left)``."""
        return x.narrow(2, top, self.crop_h).narrow(3, left, self.crop_w)

    def rank(self, features: torch.Tensor, logits: torch.Tensor, image_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cell ranking, reranking and the answer from the network's outputs (what :meth:`forward` does
        after the backbone)."""
        logits = logits.float()
        prob = (logits / self.temperature).softmax(-1)
        emb = F.normalize(features.float(), dim=-1)
        outputs = {"features": emb, "image_emb": F.normalize(image_emb.float(), dim=-1), "cell_prob": prob}
        for head, layer in self.evidence.items():
            outputs["evidence/" + head] = layer(features).float().softmax(-1)
        p_cand, cand = top_candidates(prob, self.candidates)
        terms: list[torch.Tensor] = []
        for s in self.scorers:
            terms.append(s(outputs, cand))
        post, order = rerank(p_cand, terms, self.weights, self.cell_weight)
        cand = cand.gather(1, order)
        rows = torch.arange(cand.shape[0], device=cand.device)
        if self.decode_kind == "argmax":
            latlng = self.place(outputs, cand[:, 0], False)
            pick = torch.zeros_like(rows)
        else:
            b, k = cand.shape[0], cand.shape[1]
            repeated: dict[str, torch.Tensor] = {}  # row i * k + j: photo i, for its candidate j
            for key, value in outputs.items():
                if key != "cell_prob":  # (no scorer places by it, and it is the largest)
                    repeated[key] = value.repeat_interleave(k, dim=0)
            points = self.place(repeated, cand.reshape(-1), True).reshape(b, k, 2)
            pick = choose_answer(points, post, self.decode_kind, self.decode_radius_km)
            latlng = points[rows, pick]
        out = {"latlng": latlng, "answer_cell": cand[rows, pick], "answer_prob": post[rows, pick],
               "topk_cells": cand[:, :self.topk], "topk_prob": post[:, :self.topk],
               "cell_prob": prob, "cell_logits": logits, "embedding": emb}
        for key, value in outputs.items():
            if key.startswith("evidence/"):
                out[key] = value
        if self.text_decoder is not None:
            tokens, token_probs = self.text_decoder.generate(features.float())
            out["text_tokens"], out["text_probs"] = tokens, token_probs
        return out

    def place(self, outputs: dict[str, torch.Tensor], cells: torch.Tensor, in_cell_only: bool) -> torch.Tensor:
        """``(N, 2)`` the answer point inside each of ``cells (N,)`` (``outputs`` with one row per cell): the
        first placing scorer's, else the centroid; ``in_cell_only`` leaves out scorers that place anywhere."""
        latlng = self.centroids[cells]
        placed = torch.zeros(cells.shape, dtype=torch.bool, device=cells.device)
        for i, s in enumerate(self.scorers):  # (unrolled by TorchScript: no continue)
            if not in_cell_only or self.place_in_cell[i]:
                where, ok = s.place(outputs, cells)
                take = ok & ~placed
                latlng = torch.where(take.unsqueeze(1), where, latlng)
                placed = placed | ok
        return latlng

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features, logits, image_emb = self.backbone(self.preprocess(images))
        return self.rank(features, logits, image_emb)


def exported_from_predictor(predictor) -> "tuple[ExportedGeolocator, dict]":
    """The eager export module of a :class:`~geoloc.inference.predictor.ModelPredictor`, and its metadata.

    Every scorer of the predictor must have an exportable part (``scorer.export``); the module reranks
    with the predictor's fusion weights, temperatures and evidence weights.

    Raises:
        ValueError: a scorer the export cannot carry, or a refinement the predictor could not make (a
            missing index).
    """
    from geoloc.evidence.labels import HEADS

    if predictor.refine_requested != predictor.refine:
        raise ValueError(f"{predictor.ckpt}: the export asks for refine={predictor.refine_requested}, but the "
                         f"predictor could only make refine={predictor.refine} (build the missing index with "
                         f"python -m geoloc index ckpt={predictor.ckpt} data=...)")
    model = predictor.model
    parts = []
    for s in predictor.scorers:
        if not hasattr(s, "export"):
            raise ValueError(f"the {s.name!r} scorer has no exportable part; export without it")
        parts.append(s.export(len(model.cells)))
    module = ExportedGeolocator(model.net, model.data_config, model.cells.centroids, topk=predictor.topk,
                                candidates=predictor.candidates, scorers=parts,
                                weights=[predictor.weights[s.name] for s in predictor.scorers],
                                cell_weight=predictor.weights["cells"], temperature=predictor.temperature,
                                decode=predictor.decode, precision=predictor.precision,
                                place_in_cell=[bool(getattr(s, "restrict", True)) for s in predictor.scorers]).eval()
    t = model.cells.table
    names = {c: t[c].fillna("").astype(str).tolist() for c in CELL_NAME_COLUMNS if c in t.columns}
    # the heads' cell evidence (the template chain's checks); with a text decoder every part's it may be checked on
    checked = set(model.net.evidence)
    if model.net.text_decoder is not None:
        from geoloc.evidence.claims import HEAD_PARTS

        checked |= set(HEAD_PARTS)
    cell_evidence = {h: [[int(v) for v in row] for row in t[f"evidence_{h}"]]
                     for h in HEADS if h in checked and f"evidence_{h}" in t.columns}
    scorers = {s.name: {k: v for k, v in s.describe().items() if k not in ("index", "gallery")}
               for s in predictor.scorers}
    meta = {
        "format_version": EXPORT_FORMAT_VERSION, "geoloc_ckpt": str(model.ckpt),
        "backbone": model.net.image_encoder.name, "num_cells": len(model.cells), "topk": module.topk,
        "cells_fingerprint": model.cells.fingerprint(),
        "input": "uint8 tensor (B, 3, H, W), RGB, any H and W",
        "outputs": {"latlng": "(B, 2) float32 [lat, lng] degrees",
                    "answer_cell": "(B,) int64 the geocell whose point is the answer (the top cell with argmax)",
                    "answer_prob": "(B,) float32 its reranked probability", "topk_cells": "(B, k) int64 geocell ids",
                    "topk_prob": "(B, k) float32", "cell_prob": "(B, C) float32, calibrated",
                    "cell_logits": "(B, C) float32, the cell head's logits before calibration",
                    "embedding": "(B, D) float32, L2-normalized"},
        "preprocess": {"input_size": list(model.data_config["input_size"]), "resize_short_side": module.scale_size,
                       "interpolation": module.mode, "mean": list(model.data_config["mean"]),
                       "std": list(model.data_config["std"])},
        "prototypes": predictor.scorer("prototypes") is not None, "cells": names,
        "refine": predictor.refine, "candidates": module.candidates,
        "weights": {"cells": module.cell_weight, **{s.name: predictor.weights[s.name] for s in predictor.scorers}},
        "scorers": scorers, "decode": module.decode, "cell_temperature": module.temperature,
        "precision": module.precision,
        "calibration": None if predictor.calibration is None else {
            "file": predictor.calibration.source, "fingerprint": predictor.calibration.fingerprint,
            **predictor.calibration.report},
        "evidence": {h: list(HEADS[h]) for h in model.net.evidence},
        "cell_evidence": cell_evidence,  # per head, each cell's training photos over its classes (the checks)
    }
    if model.net.text_decoder is not None:
        from geoloc.evidence.captions import PARTS, caption_vocab

        vocab = caption_vocab()
        meta["outputs"].update(text_tokens="(B, T) int64 the text decoder's chain (greedy; text_vocab)",
                               text_probs="(B, T) float32 each token's probability under the decoder")
        # the closed vocabulary: CaptionVocab(values) rebuilds the same token ids (fingerprint to check)
        meta["text_vocab"] = {"fingerprint": vocab.fingerprint, "values": {p: vocab.values_of(p) for p in PARTS}}
    return module, meta


def build_exported(ckpt: str | Path, *, topk: int = 5, prototypes: bool = False, refine: str = "none",
                   index: str | Path | None = None, candidates: int = 10, temperature: float = 0.05,
                   **settings) -> "tuple[ExportedGeolocator, dict]":
    """The eager export module for a checkpoint, and its metadata.

    Args:
        ckpt: ``RUN/checkpoints/*.ckpt``.
        topk: ranked cells returned.
        prototypes: also rerank by the index's prototypes (adds ``prototypes`` to ``refine``).
        refine: the refinement, as for :func:`~geoloc.inference.predictor.build_predictor` (``none``,
            ``prototypes``, ``gallery``, ``evidence``, ``both``, ``...+evidence``).
        index: the index folder; None: ``RUN/index_v1``.
        candidates, temperature, **settings: the other settings of
            :func:`~geoloc.inference.predictor.build_predictor` (``weights``, ``evidence_weights``,
            ``gallery``, ``gallery_temperature``, ``decode``, ``calibration``, ...); ``prototype_answer`` is
            ``representative``.
    """
    from geoloc.inference.predictor import build_predictor, refine_name, refine_scorers
    from geoloc.retrieval.index import default_index_dir

    names = list(refine_scorers(refine))
    if prototypes and "prototypes" not in names:
        names.insert(0, "prototypes")
    refine = refine_name(names)  # (adding prototypes to a shorthand gives a shorthand)
    if "prototypes" in names and index is None:
        index = default_index_dir(ckpt)  # named, so that a missing index is an error, not a fall-back
    settings.setdefault("prototype_answer", "representative")
    predictor = build_predictor(ckpt, refine=refine, index=None if index is None else str(index), topk=topk,
                                candidates=candidates, temperature=temperature, **settings)
    return exported_from_predictor(predictor)


def script(module: "ExportedGeolocator") -> torch.jit.ScriptModule:
    """TorchScript: the encoder and head traced at the crop size (any batch), the rest scripted."""
    import warnings

    example = torch.zeros(2, 3, module.crop_h, module.crop_w)
    backbone = module.backbone
    with warnings.catch_warnings():
        # timm checks the input size with a Python assert: a constant here, as preprocessing always crops
        # to that size; torch 2.14 marks torch.jit as deprecated, but TorchScript is what embedders load
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            module.backbone = torch.jit.trace(backbone, example, check_trace=False)
        try:
            return torch.jit.script(module)
        finally:
            module.backbone = backbone


#: The ONNX opset: 18 is the first whose ``Resize`` antialiases (the preprocessing's resize does).
ONNX_OPSET = 18


class _OnnxExportedGeolocator(ExportedGeolocator):
    """The same module, cropping by gathering rows and columns (TorchScript never compiles this): the crop's
    size is then static by construction for ``torch.export``, so the network after it sees fixed shapes (a
    narrowed slice keeps a symbolic size, and its expressions follow it through every layer)."""

    def crop(self, x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        rows = torch.arange(self.crop_h, device=x.device) + top
        cols = torch.arange(self.crop_w, device=x.device) + left
        return x.index_select(2, rows).index_select(3, cols)


def _onnx_sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """``aten.sort(stable=True)`` as ONNX ``TopK`` over the whole axis (which breaks ties by the lower index,
    as a stable sort does)."""
    from onnxscript import opset18 as op

    k = op.Shape(self, start=dim, end=dim + 1) if dim != -1 else op.Shape(self, start=-1)  # the axis's length
    return op.TopK(self, k, axis=dim, largest=1 if descending else 0, sorted=1)


def _onnx_asin(self):
    """``asin`` for onnxruntime, whose CPU ``Asin`` (and ``Atan``) take float32 only while the decode's
    distances are float64: float32's ``asin`` refined by two Newton steps on ``sin(y) = x`` in the input's type
    (where ``cos(y)`` is not near 0, i.e. away from antipodal points)."""
    from onnxscript import opset18 as op

    y = op.CastLike(op.Asin(op.Cast(self, to=1)), self)  # to=1: FLOAT
    for _ in range(2):
        c = op.Cos(y)
        step = op.Div(op.Sub(op.Sin(y), self), c)
        y = op.Where(op.Greater(c, op.CastLike(1e-3, self)), op.Sub(y, step), y)
    return y


def export_onnx(ckpt, out: str | Path, **kwargs) -> tuple[Path, dict]:
    """Writes the ONNX file atomically; returns its path and metadata (``geoloc.json``, also inside the file).

    Args: as :func:`export`. The text decoder, when the model has one, is left out (``meta["text_decoder"]``
    says so): its generation loop is data-dependent, which the ONNX exporter does not take.

    Raises:
        ModuleNotFoundError: ``onnx`` or ``onnxscript`` is missing (``pip install -e '.[onnx]'``).
    """
    import warnings

    for package in ("onnx", "onnxscript"):
        import importlib.util

        if importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(f"ONNX export needs the '{package}' package; install it with "
                                      "`pip install -e '.[onnx]'`", name=package)
    import onnx

    module, meta = _module_and_meta(ckpt, kwargs)
    module.__class__ = _OnnxExportedGeolocator
    module.text_decoder = None
    if "text_vocab" in meta:
        meta.pop("text_vocab")
        for k in ("text_tokens", "text_probs"):
            meta["outputs"].pop(k, None)
        meta["text_decoder"] = "not in the ONNX file (its decoding loop); the TorchScript export has it"
    meta["format"] = "onnx"
    meta["centroids"] = module.centroids.tolist()
    h, w = module.crop_h, module.crop_w
    example = torch.randint(0, 256, (2, 3, h + 17, w + 5), dtype=torch.uint8)
    with torch.no_grad():
        names = list(module(example))
    meta["output_names"] = names
    dims = ({0: torch.export.Dim("batch", min=1, max=4096), 2: torch.export.Dim("height", min=16, max=16384),
             3: torch.export.Dim("width", min=16, max=16384)},)
    with atomic_path(out, suffix=".onnx") as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates its steps
            torch.onnx.export(module, (example,), str(tmp), input_names=["images"], output_names=names,
                              dynamic_shapes=dims, opset_version=ONNX_OPSET, dynamo=True, external_data=False,
                              custom_translation_table={torch.ops.aten.sort.stable: _onnx_sort_stable,
                                                        torch.ops.aten.asin.default: _onnx_asin})
        model = onnx.load(str(tmp))
        model.metadata_props.add(key="geoloc.json", value=json.dumps(meta))
        onnx.save(model, str(tmp))
    return Path(out), meta


def _module_and_meta(ckpt, kwargs: dict) -> "tuple[ExportedGeolocator, dict]":
    from geoloc.inference.predictor import ModelPredictor

    if isinstance(ckpt, ModelPredictor):
        if kwargs:
            raise ValueError(f"export(predictor, ...) takes its settings from the predictor, not {sorted(kwargs)}")
        return exported_from_predictor(ckpt)
    return build_exported(ckpt, **kwargs)


def export(ckpt, out: str | Path, **kwargs) -> tuple[Path, dict]:
    """Writes the TorchScript file atomically; returns its path and metadata.

    Args:
        ckpt: a checkpoint path (``kwargs`` as for :func:`build_exported`) or a
            :class:`~geoloc.inference.predictor.ModelPredictor` (no ``kwargs``).
        out: the ``.pt`` file.
    """
    module, meta = _module_and_meta(ckpt, kwargs)
    import warnings

    scripted = script(module)
    with atomic_path(out, suffix=".pt") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks torch.jit deprecated; see script()
        torch.jit.save(scripted, str(tmp), _extra_files={"geoloc.json": json.dumps(meta)})
    return Path(out), meta
