"""What every predictor returns and what :mod:`geoloc.evaluation` calls: :class:`Prediction`, :class:`Predictor`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image


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
        explanations: optional, one reasoning chain per photo (:func:`geoloc.evidence.verbalize.explain`).
        cell_prob_uncalibrated: optional ``(B, C)`` float32 the classifier's probabilities before its
            calibration temperature (:mod:`geoloc.inference.calibration`), so that reports can show the
            calibration's effect; None when the predictor is not calibrated (``cell_prob`` is both then).
        answer_cell: optional ``(B,)`` int64 the geocell whose point ``latlng`` is (the top cell with the argmax
            answer; the candidate chosen by expected score with another ``decode``), and ``answer_prob (B,)``
            its reranked probability: what a reasoning chain says of the answer.
    """

    latlng: np.ndarray
    topk_latlng: np.ndarray | None = None
    topk_prob: np.ndarray | None = None
    topk_cells: np.ndarray | None = None
    cell_prob: np.ndarray | None = None
    explanations: list[dict] | None = None
    cell_prob_uncalibrated: np.ndarray | None = None
    answer_cell: np.ndarray | None = None
    answer_prob: np.ndarray | None = None


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
