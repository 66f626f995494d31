"""Answers chosen for the metric: the candidate point with the best expected score.

The classifier and the scorers give a distribution over the ``K`` candidate cells (the posterior of
:func:`geoloc.retrieval.rerank.rerank`), and each candidate has an answer point (its centroid, or where a
scorer places the answer inside it). Answering the most probable candidate (``argmax``) ignores how far
wrong a wrong cell is: with the mass spread over distant cells, a point between them often scores more.
Here the answer is the candidate point ``a`` with the best expected score under that distribution,

    E[score(a)] = sum_k w_k score(d(a, x_k)),   w = post / sum(post),

the candidates' points ``x_k`` being both the answers considered and the support of the distribution, ``d``
the great-circle distance in km:

================  =================================  ============================================
``decode``        score(d)                           the answer
================  =================================  ============================================
``argmax``        (none)                             the most probable candidate's point
``geoscore``      ``5000 exp(-d / 1492.7 km)``       the highest expected GeoScore
``distance``      ``d``                              the lowest expected error (km)
``acc@<km>``      ``1 if d <= km else 0``            the most probability mass within ``km``
================  =================================  ============================================

Ties go to the more probable candidate (the candidates come sorted by probability), so a flat score (a
small ``acc@`` radius) falls back to the argmax. The argmax answer is one of the points considered, so
the chosen answer is never worse than it in expectation under the predicted distribution; whether it is
better on real photos depends on how well calibrated that distribution is
(:mod:`geoloc.inference.calibration`). The candidates must cover the probability mass for the
expectation to mean much: raise the predictor's ``candidates`` with a non-argmax decode.

Everything is ``(B, K, K)`` at most, plain torch and TorchScript-scriptable, so that
:class:`~geoloc.inference.predictor.ModelPredictor` and the exported model
(:mod:`geoloc.inference.export`) choose with the same arithmetic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: The scores :func:`choose_answer` knows, ``acc`` being ``acc@<km>``.
DECODE_KINDS = ("argmax", "geoscore", "distance", "acc")
#: GeoScore ``5000 exp(-d / 1492.7 km)`` and the Earth's radius (the values of
#: :mod:`geoloc.evaluation.metrics` and :data:`geoloc.geo.EARTH_RADIUS_KM`; written out in the functions
#: below as well, because TorchScript cannot read module globals; ``tests/test_decode.py`` checks they agree).
GEOSCORE_MAX = 5000.0
GEOSCORE_SCALE_KM = 1492.7
EARTH_RADIUS_KM = 6371.0088


def parse_decode(decode: str) -> tuple[str, float]:
    """``"argmax"``, ``"geoscore"``, ``"distance"`` or ``"acc@<km>"`` as ``(kind, radius_km)``.

    Raises:
        ValueError: anything else, or a radius that is not a positive number of km.
    """
    text = str(decode).strip().lower()
    if text.startswith("acc@"):
        value = text[4:].removesuffix("km")
        try:
            radius = float(value)
        except ValueError:
            radius = float("nan")
        if not (math.isfinite(radius) and radius > 0):
            raise ValueError(f"decode {decode!r}: acc@<km> needs a positive radius in km, e.g. acc@750")
        return "acc", radius
    if text not in DECODE_KINDS or text == "acc":
        raise ValueError(f"decode must be argmax, geoscore, distance or acc@<km> (e.g. acc@750), got {decode!r}")
    return text, 0.0


def decode_name(kind: str, radius_km: float = 0.0) -> str:
    """The canonical spelling of a decode (``acc@750``, not ``acc@750.0km``), for reports."""
    return f"acc@{radius_km:g}" if kind == "acc" else kind


def _unit(latlng: Tensor) -> Tensor:
    """``(..., 2)`` degrees -> ``(..., 3)`` unit vectors, float64."""
    rad = torch.deg2rad(latlng.to(torch.float64))
    lat, lng = rad[..., 0], rad[..., 1]
    return torch.stack([torch.cos(lat) * torch.cos(lng), torch.cos(lat) * torch.sin(lng), torch.sin(lat)], dim=-1)


def pairwise_distance_km(a: Tensor, b: Tensor) -> Tensor:
    """Great-circle distances between every answer and every support point, per row.

    Args:
        a: ``(B, M, 2)`` ``[lat, lng]`` degrees.
        b: ``(B, K, 2)`` ``[lat, lng]`` degrees.

    Returns:
        ``(B, M, K)`` float64 km (from the chord between unit vectors, which stays exact for near points,
        where ``arccos`` of a dot product does not).
    """
    diff = _unit(a).unsqueeze(2) - _unit(b).unsqueeze(1)  # (B, M, K, 3)
    chord = torch.sqrt((diff * diff).sum(dim=-1))
    return 2.0 * 6371.0088 * torch.asin((chord / 2.0).clamp(0.0, 1.0))


def expected_score(answers: Tensor, support: Tensor, weights: Tensor, kind: str, radius_km: float = 0.0) -> Tensor:
    """The expected score of each answer under a distribution over the support points.

    Args:
        answers: ``(B, M, 2)`` the points that may be answered.
        support: ``(B, K, 2)`` where the distribution puts its mass.
        weights: ``(B, K)`` non-negative (normalized here; a row of zeros counts as uniform).
        kind: ``geoscore`` (expected GeoScore), ``distance`` (expected error in km) or ``acc`` (the
            probability mass within ``radius_km``).
        radius_km: for ``acc``.

    Returns:
        ``(B, M)`` float64, in the score's own unit (for ``distance``, lower is better).
    """
    w = weights.to(torch.float64).clamp_min(0.0)
    total = w.sum(dim=1, keepdim=True)
    w = torch.where(total > 0, w / total.clamp_min(1e-300), torch.full_like(w, 1.0 / max(int(w.shape[1]), 1)))
    d = pairwise_distance_km(answers, support)  # (B, M, K)
    if kind == "geoscore":
        s = 5000.0 * torch.exp(-d / 1492.7)
    elif kind == "distance":
        s = d
    elif kind == "acc":
        s = (d <= radius_km).to(torch.float64)
    else:
        raise ValueError("expected_score: kind must be geoscore, distance or acc")
    return (s * w.unsqueeze(1)).sum(dim=2)


def choose_answer(points: Tensor, weights: Tensor, kind: str, radius_km: float = 0.0) -> Tensor:
    """Which candidate point to answer.

    Args:
        points: ``(B, K, 2)`` the candidates' points, most probable first.
        weights: ``(B, K)`` their probabilities.
        kind: ``argmax``, ``geoscore``, ``distance`` or ``acc`` (see the module docstring).
        radius_km: for ``acc``.

    Returns:
        ``(B,)`` int64 column of the answer in ``points``; ties go to the lower column.
    """
    if kind == "argmax":
        return torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    s = expected_score(points, points, weights, kind, radius_km)
    if kind == "distance":
        s = -s
    # argmax returns the first of equal maxima; rounding keeps float noise from breaking exact ties
    return torch.argmax(torch.round(s * 1e9) / 1e9, dim=1)
