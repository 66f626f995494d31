"""Baselines: predictors that ignore the photo, the floor of every benchmark table.

* :class:`ConstantPredictor` always answers the medoid of the training coordinates (the training
  location with the smallest summed great-circle distance to all others).
* :class:`PriorPredictor` answers a random training location, i.e. a sample from the training density.
  The draw is seeded per image id, so a resumed run gives the same answers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

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


class FilePredictor:
    """Another system's answers, read from a file: how GeoCLIP's, PIGEON's or an LVLM pipeline's predictions
    are scored beside geoloc's own rows (``evaluate.py predictor=file predictor.path=CSV``).

    Args:
        answers: ``{image id: (lat, lng)}``; NaN coordinates mean "no answer".
        source: the file they came from (reports).
        unanswered: ``fail`` (default): a photo without an answer is scored as a failure (the largest possible
            error); ``skip``: it is left out and counted in ``skipped.csv`` (reason ``unanswered``).
        name: report name.
    """

    needs_images = False

    def __init__(self, answers: dict[str, tuple[float, float]], *, source: str = "<memory>", unanswered: str = "fail",
                 name: str = "file"):
        if unanswered not in ("fail", "skip"):
            raise ValueError(f"unanswered must be 'fail' or 'skip', got {unanswered!r}")
        self.answers, self.source, self.unanswered, self.name = dict(answers), str(source), unanswered, name
        self.n_asked = 0
        self.n_missing = 0

    def predict(self, images, keys) -> Prediction:
        nan = (float("nan"), float("nan"))
        got = [self.answers.get(str(k), nan) for k in keys]
        self.n_asked += len(keys)
        self.n_missing += sum(1 for g in got if not np.isfinite(g).all())
        return Prediction(np.array(got, dtype=np.float64).reshape(len(keys), 2))

    def describe(self) -> dict:
        return {"name": self.name, "kind": "file", "path": self.source, "n_answers": len(self.answers),
                "unanswered": self.unanswered}


def read_predictions_file(path: str | Path, *, id_column: str = "IMG_ID", lat_column: str = "lat",
                          lng_column: str = "lng", unanswered: str = "fail", name: str = "file") -> FilePredictor:
    """A :class:`FilePredictor` from a CSV of one answer per image (``IMG_ID,lat,lng`` by default).

    An empty latitude or longitude is "no answer". Column names are matched exactly, then case-insensitively.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column, a repeated image id, or a coordinate out of range (the message names the
            file line).
    """
    import pandas as pd

    from geoloc.data.readers import _read_csv  # the readers' CSV checks (empty, header only, not CSV)

    path = Path(path)
    df = _read_csv(path)
    cols = {str(c).strip().lower(): c for c in df.columns}

    def column(want: str) -> str:
        if want in df.columns:
            return want
        if want.lower() in cols:
            return cols[want.lower()]
        raise ValueError(f"{path}: no column {want!r} (found {list(df.columns)[:12]}); name it with "
                         f"predictor.id_column / lat_column / lng_column")

    idc, latc, lngc = column(id_column), column(lat_column), column(lng_column)
    keys = df[idc].astype(str)
    dup = keys[keys.duplicated(keep=False)]
    if len(dup):
        raise ValueError(f"{path}: image id {dup.iloc[0]!r} is answered on several lines "
                         f"{[int(i) for i in keys.index[keys == dup.iloc[0]]][:5]}; keep one answer per image")
    latlng = np.stack([pd.to_numeric(df[latc], errors="coerce").to_numpy(np.float64),
                       pd.to_numeric(df[lngc], errors="coerce").to_numpy(np.float64)], axis=1)
    given = ~(df[latc].isna().to_numpy() | df[lngc].isna().to_numpy())
    labels = [f"{line} ({k})" for line, k in zip(df.index, keys)]
    checked = validate_latlng(latlng[given], what=f"{path} (row = file line)",
                              row_labels=[lbl for lbl, g in zip(labels, given) if g])
    latlng[given] = checked
    return FilePredictor({k: (float(a), float(b)) for k, (a, b) in zip(keys, latlng)}, source=str(path),
                         unanswered=unanswered, name=name)
