"""Predictors: anything that turns a batch of photos into coordinates.

:mod:`evaluate` only needs the :class:`Predictor` protocol. The baselines here give the benchmark
table a floor before any model exists:

* :class:`ConstantPredictor` always answers the medoid of the training coordinates (the training
  location with the smallest summed great-circle distance to all others).
* :class:`PriorPredictor` answers a random training location, i.e. a sample from the training density.
  The draw is seeded per image id, so a resumed run gives the same answers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from geoloc.geo import EARTH_RADIUS_KM, haversine_km, latlng_to_xyz, validate_latlng


@dataclass
class Prediction:
    """A batch of answers.

    Attributes:
        latlng: ``(B, 2)`` predicted ``[lat, lng]`` in degrees.
        topk_latlng: optional ``(B, K, 2)`` ranked alternatives (e.g. top cells' centres).
        topk_prob: optional ``(B, K)`` their probabilities.
        topk_cells: optional ``(B, K)`` int64 geocell ids of the alternatives (models only).
        cell_prob: optional ``(B, C)`` float32 probability of every geocell (the classifier's softmax), for
            the cell-level metrics (Recall-vs-Area, calibration); the predictor's ``cells`` says which cells.
    """

    latlng: np.ndarray
    topk_latlng: np.ndarray | None = None
    topk_prob: np.ndarray | None = None
    topk_cells: np.ndarray | None = None
    cell_prob: np.ndarray | None = None


class Predictor(Protocol):
    """What :mod:`evaluate` calls.

    Attributes:
        name: short name used in reports.
        needs_images: False for predictors that ignore the photo (baselines); they can then run on
            coordinate-only benchmark files.
    """

    name: str
    needs_images: bool

    def predict(self, images: list[Image.Image | None], keys: list[str]) -> Prediction: ...

    def describe(self) -> dict: ...


def summed_distance_km(candidates: np.ndarray, points: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Sum of great-circle distances from each candidate to all points.

    Args:
        candidates: ``(C, 2)`` ``[lat, lng]`` degrees.
        points: ``(N, 2)`` ``[lat, lng]`` degrees.
        chunk: candidates per block (bounds memory at ``chunk * N`` floats).

    Returns:
        ``(C,)`` sums in km.
    """
    p = latlng_to_xyz(points)  # (N, 3)
    out = np.empty(len(candidates))
    for s in range(0, len(candidates), chunk):
        c = latlng_to_xyz(candidates[s:s + chunk])  # (c, 3)
        # chord length -> central angle: stable for small distances, unlike arccos of a dot product
        chord = np.sqrt(np.clip(2.0 - 2.0 * (c @ p.T), 0.0, 4.0))  # (c, N)
        out[s:s + chunk] = (2.0 * EARTH_RADIUS_KM * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))).sum(axis=1)
    return out


def geodesic_medoid(latlng: np.ndarray, *, max_candidates: int = 1024, refine: int = 512,
                    seed: int = 0) -> np.ndarray:
    """The training location with the smallest summed great-circle distance to all training locations.

    Exact when ``N <= max_candidates``. Otherwise the search runs in two steps, both scored against all
    N points: a seeded random subset of ``max_candidates`` locations, then the ``refine`` locations
    nearest to the best of those (the medoid lies where the data are dense, so it is among them in
    practice).

    Args:
        latlng: ``(N, 2)`` ``[lat, lng]`` degrees.

    Returns:
        ``(2,)`` ``[lat, lng]`` of the medoid.
    """
    latlng = validate_latlng(latlng, what="reference coordinates")
    if len(latlng) == 0:
        raise ValueError("reference coordinates are empty: the constant baseline needs training locations")
    if len(latlng) <= max_candidates:
        return latlng[int(np.argmin(summed_distance_km(latlng, latlng)))]
    rng = np.random.default_rng(seed)
    cand = latlng[rng.choice(len(latlng), size=max_candidates, replace=False)]
    best = cand[int(np.argmin(summed_distance_km(cand, latlng)))]
    near = latlng[np.argsort(haversine_km(latlng, best[None, :]), kind="stable")[:refine]]
    return near[int(np.argmin(summed_distance_km(near, latlng)))]


class ConstantPredictor:
    """Always predicts the geodesic medoid of the training coordinates.

    Args:
        reference_latlng: ``(N, 2)`` training coordinates.
        name: report name.
    """

    needs_images = False

    def __init__(self, reference_latlng, *, name: str = "constant", seed: int = 0):
        self.name = name
        self.n_reference = len(reference_latlng)
        self.medoid = geodesic_medoid(np.asarray(reference_latlng), seed=seed)

    def predict(self, images, keys) -> Prediction:
        return Prediction(np.repeat(self.medoid[None, :], len(keys), axis=0))

    def describe(self) -> dict:
        return {"name": self.name, "kind": "constant", "n_reference": self.n_reference,
                "medoid_latlng": [float(v) for v in self.medoid]}


def _key_seeds(keys: list[str], seed: int) -> np.ndarray:
    """A 64-bit seed per image id, stable across processes (unlike ``hash``)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest(), "little")
                     for k in keys], dtype=np.uint64)


class PriorPredictor:
    """Predicts a training location drawn at random: the training density as a guess.

    Args:
        reference_latlng: ``(N, 2)`` training coordinates.
        seed: the draw for an image depends only on ``seed`` and its id.
        name: report name.
    """

    needs_images = False

    def __init__(self, reference_latlng, *, seed: int = 0, name: str = "prior"):
        self.name = name
        self.seed = seed
        self.reference = validate_latlng(np.asarray(reference_latlng), what="reference coordinates")
        if len(self.reference) == 0:
            raise ValueError("reference coordinates are empty: the prior baseline needs training locations")

    def predict(self, images, keys) -> Prediction:
        idx = _key_seeds(keys, self.seed) % np.uint64(len(self.reference))
        return Prediction(self.reference[idx.astype(np.int64)])

    def describe(self) -> dict:
        return {"name": self.name, "kind": "prior", "n_reference": len(self.reference), "seed": self.seed}


class ModelPredictor:
    """A trained geolocator: the centroid of the most probable geocell (retrieval refinement: issue 5).

    Args:
        ckpt: a Lightning checkpoint written by ``train.py``; the run's ``config.yaml`` (two folders up,
            written by train.py) says how to rebuild the network.
        cells: the geocells file; None uses the one the run was trained with.
        topk: ranked cells reported per photo.
        batch_size: photos per forward pass.
        device: ``cpu`` or ``cuda``.
        name: report name.
    """

    needs_images = True

    def __init__(self, ckpt: str, *, cells: str | None = None, topk: int = 5, batch_size: int = 64,
                 device: str = "cpu", name: str = "model"):
        import hydra
        import torch
        import yaml

        from geoloc.cells import Geocells
        from geoloc.lightning.datamodule import eval_transform
        from geoloc.models.geolocator import GeoLocator

        self.name, self.topk, self.batch_size, self.device = name, topk, batch_size, device
        self.ckpt = Path(ckpt)
        run_cfg_path = self.ckpt.parent.parent / "config.yaml"
        if not self.ckpt.is_file():
            raise FileNotFoundError(f"{self.ckpt}: no such checkpoint")
        if not run_cfg_path.is_file():
            raise FileNotFoundError(f"{run_cfg_path}: the run's config (written by train.py) is needed to "
                                    "rebuild the network")
        run = yaml.safe_load(run_cfg_path.read_text())
        self.cells_path = cells or run["cells"]
        self.cells = Geocells.load(self.cells_path)
        backbone_cfg = {**run["backbone"], "pretrained": False}  # weights come from the checkpoint
        backbone = hydra.utils.instantiate(backbone_cfg)
        location_encoder = hydra.utils.instantiate(run["model"]["location_encoder"])
        self.net = GeoLocator(backbone, location_encoder, num_cells=len(self.cells), dropout=0.0)
        state = torch.load(self.ckpt, map_location="cpu", weights_only=True)["state_dict"]
        net_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        self.net.load_state_dict(net_state)
        self.net.eval().to(device)
        self.transform = eval_transform(backbone.data_config)
        self.centroids = self.cells.centroids

    def predict(self, images, keys) -> Prediction:
        import torch

        probs = []
        with torch.inference_mode():
            for s in range(0, len(images), self.batch_size):
                x = torch.stack([self.transform(im) for im in images[s:s + self.batch_size]]).to(self.device)
                probs.append(self.net(x)["cell_logits"].float().softmax(-1).cpu())
        prob = torch.cat(probs)
        p, idx = prob.topk(min(self.topk, prob.shape[1]), dim=1)
        idx_np = idx.numpy()
        return Prediction(self.centroids[idx_np[:, 0]], self.centroids[idx_np], p.numpy())

    def describe(self) -> dict:
        return {"name": self.name, "kind": "model", "ckpt": str(self.ckpt), "cells": str(self.cells_path),
                "n_cells": len(self.cells), "backbone": self.net.image_encoder.name}
