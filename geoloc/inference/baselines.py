"""Baselines: predictors that ignore the photo, the floor of every benchmark table.

* :class:`ConstantPredictor` always answers the medoid of the training coordinates (the training
  location with the smallest summed great-circle distance to all others).
* :class:`PriorPredictor` answers a random training location, i.e. a sample from the training density.
  The draw is seeded per image id, so a resumed run gives the same answers.
"""

from __future__ import annotations

import hashlib

import numpy as np

from geoloc.geo import EARTH_RADIUS_KM, haversine_km, latlng_to_xyz, validate_latlng
from geoloc.inference.base import Prediction


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
