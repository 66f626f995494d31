"""Export a trained geolocator as one TorchScript file that others embed without geoloc.

    python -m geoloc export ckpt=RUN/checkpoints/best.ckpt out=model.pt [topk=5] [prototypes=true index=DIR]

Using it needs only torch::

    import torch
    model = torch.jit.load("model.pt")
    out = model(images)   # images: uint8 (B, 3, H, W), RGB, any H and W

``out`` is a dict of tensors: ``latlng`` (B, 2) float32 degrees ``[lat, lng]``, ``topk_cells`` (B, k) int64
geocell ids, ``topk_prob`` (B, k) their probabilities, ``cell_prob`` (B, C) every cell's probability,
``embedding`` (B, D) the L2-normalized image embedding (for your own retrieval) and, for a model trained
with evidence heads, ``evidence/<head>`` (B, K) their class probabilities (classes in ``geoloc.json``).
The file holds the preprocessing (timm's evaluation transform in tensor ops: resize the short side to
``input_size / crop_pct``, centre crop, scale, normalize), the image encoder, the cell head and the
cell centroids; with ``prototypes=true`` also the location-cluster prototypes of an index
(:mod:`geoloc.retrieval.index`), which rerank the top cells as ``refine=prototypes`` does and answer the
representative coordinate of the best cluster (the exported file carries no per-photo references, so
it cannot return the nearest reference photo as the Python predictor does). ``geoloc.json`` inside the
file (``torch.jit.load(path, _extra_files={"geoloc.json": ""})``) describes inputs, outputs and each
cell's country and region names, the fingerprint of the cells (:meth:`geoloc.geo.cells.Geocells.fingerprint`)
and, for a model with evidence heads, each cell's evidence counts, so that ``geoloc-predict --model model.pt
--explain`` can check the reasoning chain without the cells file
(:class:`geoloc.inference.exported.ExportedPredictor`).

An exported file is TorchScript: code, by nature. Load only files you trust (see the README's "Trust and
safety").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from geoloc.artifacts import atomic_path

EXPORT_FORMAT_VERSION = 1
#: Cell attributes carried in ``geoloc.json`` (names for answers, continents for the reasoning chain).
CELL_NAME_COLUMNS = ("country", "adm0_a3", "admin1_name", "continent")


class _Backbone(nn.Module):
    """Encoder + cell head on a preprocessed batch: what gets traced."""

    def __init__(self, net):
        super().__init__()
        self.image_encoder, self.cell_head = net.image_encoder, net.cell_head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.image_encoder(x)
        return features, self.cell_head(features)


class ExportedGeolocator(nn.Module):
    """uint8 images in, coordinates and ranked geocells out (see the module docstring).

    Args:
        net: a trained :class:`~geoloc.models.geolocator.GeoLocator` (eval mode).
        data_config: timm preprocessing (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``).
        centroids: ``(C, 2)`` cell centroids ``[lat, lng]``.
        topk: ranked cells returned.
        prototypes: optional ``(cluster_cell (M,), cluster_proto (M, D), cluster_latlng (M, 2))``.
        candidates: cells reranked by the prototypes.
        temperature: ``T`` of ``softmax(prototype score / T)``.
    """

    def __init__(self, net, data_config: dict, centroids, *, topk: int = 5, prototypes=None, candidates: int = 10,
                 temperature: float = 0.05):
        super().__init__()
        self.backbone = _Backbone(net)
        self.evidence = net.evidence  # evidence heads (issue 6): probabilities on the same features
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
        self.temperature = float(temperature)
        self.use_prototypes = prototypes is not None
        cell, proto, latlng = prototypes if prototypes is not None else (
            torch.zeros(0, dtype=torch.long), torch.zeros(0, 1), torch.zeros(0, 2))
        self.register_buffer("cluster_cell", torch.as_tensor(cell, dtype=torch.long))
        self.register_buffer("cluster_proto", torch.as_tensor(proto, dtype=torch.float32))
        self.register_buffer("cluster_latlng", torch.as_tensor(latlng, dtype=torch.float32))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> normalized float ``(B, 3, h, w)`` (timm's eval transform)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("expected uint8 images of shape (B, 3, H, W)")
        x = images.to(torch.float32) / 255.0
        h, w = int(x.shape[2]), int(x.shape[3])
        if h <= w:
            nh, nw = self.scale_size, int(self.scale_size * w / h)
        else:
            nh, nw = int(self.scale_size * h / w), self.scale_size
        x = F.interpolate(x, size=[nh, nw], mode=self.mode, align_corners=False, antialias=True)
        top = int(round((nh - self.crop_h) / 2.0))
        left = int(round((nw - self.crop_w) / 2.0))
        x = x[:, :, top:top + self.crop_h, left:left + self.crop_w].clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features, logits = self.backbone(self.preprocess(images))
        prob = logits.float().softmax(-1)
        emb = F.normalize(features.float(), dim=-1)
        p_cand, cand = prob.topk(self.candidates, dim=1)
        latlng = self.centroids[cand[:, 0]]
        if self.use_prototypes:
            sims = emb @ self.cluster_proto.t()  # (B, M)
            b = sims.shape[0]
            best = torch.full((b, self.num_cells), float("-inf"), dtype=sims.dtype, device=sims.device)
            best = best.scatter_reduce(1, self.cluster_cell.unsqueeze(0).expand(b, -1), sims, "amax")
            s = best.gather(1, cand) / self.temperature  # (B, K); -inf: no reference in that cell
            finite = torch.isfinite(s)
            low = torch.where(finite, s, torch.full_like(s, float("inf"))).min(dim=1, keepdim=True).values
            low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
            s = torch.where(finite, s, low.expand_as(s))
            fused = torch.log(p_cand.clamp_min(1e-12)) + torch.log_softmax(s, dim=1)
            post = torch.softmax(fused, dim=1) * p_cand.sum(dim=1, keepdim=True)
            post, order = post.sort(dim=1, descending=True)
            cand, p_cand = cand.gather(1, order), post
            chosen = cand[:, 0]
            in_cell = self.cluster_cell.unsqueeze(0) == chosen.unsqueeze(1)  # (B, M)
            masked = torch.where(in_cell, sims, torch.full_like(sims, float("-inf")))
            j = masked.argmax(dim=1)
            has = in_cell.any(dim=1)
            latlng = torch.where(has.unsqueeze(1), self.cluster_latlng[j], self.centroids[chosen])
        out = {"latlng": latlng, "topk_cells": cand[:, :self.topk], "topk_prob": p_cand[:, :self.topk],
               "cell_prob": prob, "embedding": emb}
        for head, layer in self.evidence.items():
            out["evidence/" + head] = layer(features).float().softmax(-1)
        return out


def build_exported(ckpt: str | Path, *, topk: int = 5, prototypes: bool = False, index: str | Path | None = None,
                   candidates: int = 10, temperature: float = 0.05) -> tuple[ExportedGeolocator, dict]:
    """The eager export module for a checkpoint, and its metadata."""
    from geoloc.evidence.labels import HEADS
    from geoloc.models.loading import load_checkpoint

    model = load_checkpoint(ckpt)
    protos = None
    if prototypes:
        from geoloc.retrieval.index import RetrievalIndex, default_index_dir

        idx = RetrievalIndex.load(index or default_index_dir(ckpt), net=model.net)
        if idx.meta.get("embedding", "features") != "features":
            raise ValueError(f"{index}: the exported model scores prototypes of backbone features; this index "
                             f"holds {idx.meta.get('embedding')!r} embeddings")
        protos = (torch.from_numpy(idx.cluster_cell), torch.from_numpy(idx.cluster_proto),
                  torch.from_numpy(idx.cluster_latlng.astype("float32")))
    module = ExportedGeolocator(model.net, model.data_config, model.cells.centroids, topk=topk, prototypes=protos,
                               candidates=candidates, temperature=temperature).eval()
    t = model.cells.table
    names = {c: t[c].fillna("").astype(str).tolist() for c in CELL_NAME_COLUMNS if c in t.columns}
    cell_evidence = {h: [[int(v) for v in row] for row in t[f"evidence_{h}"]]
                     for h in model.net.evidence if f"evidence_{h}" in t.columns}
    meta = {
        "format_version": EXPORT_FORMAT_VERSION, "geoloc_ckpt": str(model.ckpt),
        "backbone": model.net.image_encoder.name, "num_cells": len(model.cells), "topk": module.topk,
        "cells_fingerprint": model.cells.fingerprint(),
        "input": "uint8 tensor (B, 3, H, W), RGB, any H and W",
        "outputs": {"latlng": "(B, 2) float32 [lat, lng] degrees", "topk_cells": "(B, k) int64 geocell ids",
                    "topk_prob": "(B, k) float32", "cell_prob": "(B, C) float32",
                    "embedding": "(B, D) float32, L2-normalized"},
        "preprocess": {"input_size": list(model.data_config["input_size"]), "resize_short_side": module.scale_size,
                       "interpolation": module.mode, "mean": list(model.data_config["mean"]),
                       "std": list(model.data_config["std"])},
        "prototypes": bool(prototypes), "cells": names,
        "evidence": {h: list(HEADS[h]) for h in model.net.evidence},
        "cell_evidence": cell_evidence,  # per head, each cell's training photos over its classes (the checks)
    }
    return module, meta


def script(module: ExportedGeolocator) -> torch.jit.ScriptModule:
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


def export(ckpt: str | Path, out: str | Path, **kwargs) -> tuple[Path, dict]:
    """Writes the TorchScript file atomically; returns its path and metadata."""
    module, meta = build_exported(ckpt, **kwargs)
    import warnings

    scripted = script(module)
    with atomic_path(out, suffix=".pt") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks torch.jit deprecated; see script()
        torch.jit.save(scripted, str(tmp), _extra_files={"geoloc.json": json.dumps(meta)})
    return Path(out), meta
