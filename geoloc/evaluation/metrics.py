"""Geolocation metrics, one convention for the whole project.

* Distances are haversine great-circle distances in km on a sphere of radius 6371.0088 km
  (:data:`geoloc.geo.EARTH_RADIUS_KM`).
* A prediction is a hit at threshold ``t`` when ``distance_km <= t``. The standard thresholds are
  1 km (street), 25 km (city), 200 km (region), 750 km (country) and 2500 km (continent).
* Accuracies are percentages in ``[0, 100]``.
* GeoScore is the GeoGuessr-style score ``mean(5000 * exp(-distance_km / 1492.7))``, in ``[0, 5000]``.
* Country accuracy counts only the rows where both the true and the predicted country are known
  (non-empty codes); ``n_country`` says how many that was.

Everything is vectorized over the batch; torch tensors are accepted and converted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from geoloc.geo import haversine_km

THRESHOLDS_KM: tuple[int, ...] = (1, 25, 200, 750, 2500)
GEOSCORE_SCALE_KM = 1492.7
GEOSCORE_MAX = 5000.0

#: Keys of :func:`distance_metrics`, in table order.
METRIC_KEYS: tuple[str, ...] = (
    *(f"acc_{t}km" for t in THRESHOLDS_KM),
    "median_km",
    "mean_km",
    "geoscore",
)


def _numpy(x) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _codes(codes) -> np.ndarray:
    """Country codes as a string array, unknown (None, NaN) as ``""``."""
    return pd.Series(np.asarray(codes, dtype=object)).fillna("").astype(str).to_numpy()


def geoscore(distance_km) -> np.ndarray:
    """Per-prediction GeoScore.

    Args:
        distance_km: ``(N,)`` errors in km.

    Returns:
        ``(N,)`` scores in ``[0, 5000]``.
    """
    return GEOSCORE_MAX * np.exp(-_numpy(distance_km) / GEOSCORE_SCALE_KM)


def distance_metrics(distance_km, thresholds_km=THRESHOLDS_KM) -> dict[str, float]:
    """Standard metrics from errors.

    Args:
        distance_km: ``(N,)`` errors in km.
        thresholds_km: thresholds for the ``acc_{t}km`` keys.

    Returns:
        ``{"n", "acc_<t>km" (percent), "median_km", "mean_km", "geoscore"}``; NaN metrics when ``N == 0``.
    """
    d = _numpy(distance_km).reshape(-1)
    if np.isnan(d).any():
        raise ValueError(f"distance_km holds {int(np.isnan(d).sum())} NaN value(s); drop or fix those rows first")
    out: dict[str, float] = {"n": int(d.size)}
    empty = d.size == 0
    for t in thresholds_km:
        out[f"acc_{t:g}km"] = float("nan") if empty else float(100.0 * np.mean(d <= t))
    out["median_km"] = float("nan") if empty else float(np.median(d))
    out["mean_km"] = float("nan") if empty else float(np.mean(d))
    out["geoscore"] = float("nan") if empty else float(np.mean(geoscore(d)))
    return out


def country_accuracy(true_country, pred_country) -> dict[str, float]:
    """Share of rows whose predicted country equals the true one, where both are known.

    Args:
        true_country: ``(N,)`` country codes; ``""`` or None where unknown.
        pred_country: ``(N,)`` country codes; ``""`` or None where unknown.

    Returns:
        ``{"acc_country": percent, "n_country": rows counted}``.
    """
    t = _codes(true_country)
    p = _codes(pred_country)
    if t.shape != p.shape:
        raise ValueError(f"true_country has shape {t.shape} but pred_country has shape {p.shape}")
    known = (t != "") & (p != "")
    n = int(known.sum())
    acc = float(100.0 * np.mean(t[known] == p[known])) if n else float("nan")
    return {"acc_country": acc, "n_country": n}


def geolocation_metrics(pred_latlng, true_latlng, thresholds_km=THRESHOLDS_KM) -> dict[str, float]:
    """Standard metrics from predicted and true coordinates.

    Args:
        pred_latlng: ``(N, 2)`` predicted ``[lat, lng]`` in degrees.
        true_latlng: ``(N, 2)`` true ``[lat, lng]`` in degrees.
        thresholds_km: thresholds for the ``acc_{t}km`` keys.

    Returns:
        See :func:`distance_metrics`.
    """
    return distance_metrics(haversine_km(_numpy(pred_latlng), _numpy(true_latlng)), thresholds_km)


#: Earth's surface on the metric sphere (4 pi R^2), km².
EARTH_AREA_KM2 = 4.0 * np.pi * 6371.0088 ** 2


def admin1_accuracy(true_admin1, pred_admin1) -> dict[str, float]:
    """Like :func:`country_accuracy`, for admin-1 codes (``"FR-75"``): ``{"acc_admin1", "n_admin1"}``."""
    out = country_accuracy(true_admin1, pred_admin1)
    return {"acc_admin1": out["acc_country"], "n_admin1": out["n_country"]}


def cell_ranking(cell_prob, true_cell, cell_area_km2) -> dict[str, np.ndarray]:
    """Where the true cell sits in each photo's ranking of geocells.

    Args:
        cell_prob: ``(B, C)`` probability of every cell.
        true_cell: ``(B,)`` the cell the photo lies in.
        cell_area_km2: ``(C,)`` cell areas.

    Returns:
        ``true_rank (B,)`` (1 = the most probable cell; ties count in the photo's favour),
        ``area_to_cover_km2 (B,)``: the summed area of all cells at least as probable as the true one,
        i.e. the area one must search, most probable cells first, until the truth is covered;
        ``top1_cell (B,)`` and ``top1_prob (B,)``.
    """
    p = _numpy(cell_prob)
    t = np.asarray(true_cell, dtype=np.int64)
    p_true = np.take_along_axis(p, t[:, None], axis=1)  # (B, 1)
    covered = p >= p_true  # (B, C)
    return {"true_rank": (p > p_true).sum(axis=1) + 1,
            "area_to_cover_km2": covered.astype(np.float64) @ _numpy(cell_area_km2),
            "top1_cell": p.argmax(axis=1), "top1_prob": p.max(axis=1)}


def recall_vs_area(area_to_cover_km2, areas_km2=None) -> tuple[np.ndarray, np.ndarray]:
    """Recall-vs-Area curve: the share of photos whose truth is covered within a searched area.

    Args:
        area_to_cover_km2: ``(N,)`` from :func:`cell_ranking`.
        areas_km2: the area grid; default 200 log-spaced points from 1 km² to Earth's surface.

    Returns:
        ``(areas_km2 (G,), recall (G,))``, recall in ``[0, 1]``.
    """
    a = np.sort(_numpy(area_to_cover_km2))
    grid = np.logspace(0, np.log10(EARTH_AREA_KM2), 200) if areas_km2 is None else _numpy(areas_km2)
    recall = np.searchsorted(a, grid, side="right") / max(len(a), 1)
    return grid, recall


def recall_area_auc(area_to_cover_km2) -> float:
    """Area under the Recall-vs-Area curve on a log-area axis, normalized to ``[0, 1]``.

    The mean recall over 200 log-spaced areas from 1 km² to Earth's surface: 1 means every truth lies
    in a top cell of at most 1 km², 0.5 roughly means the truth is found after searching ~22,600 km²
    (the geometric middle of the axis) for a typical photo; a predictor that must search the whole
    Earth scores about 0.
    """
    if len(_numpy(area_to_cover_km2)) == 0:
        return float("nan")
    return float(recall_vs_area(area_to_cover_km2)[1].mean())


def expected_calibration_error(confidence, correct, n_bins: int = 15) -> dict:
    """Expected calibration error of a confidence (e.g. the top-1 cell probability).

    Equal-width bins over ``[0, 1]`` (the last one closed); ECE is the count-weighted mean of
    ``|accuracy - mean confidence|`` over non-empty bins.

    Args:
        confidence: ``(N,)`` in ``[0, 1]``.
        correct: ``(N,)`` bool, whether the top-1 answer was right.
        n_bins: number of bins.

    Returns:
        ``{"ece": float, "bins": [{"lo", "hi", "n", "confidence", "accuracy"}, ...]}`` (empty bins
        have ``n = 0`` and NaN means).
    """
    c = _numpy(confidence).reshape(-1)
    y = np.asarray(correct, dtype=np.float64).reshape(-1)
    if c.shape != y.shape:
        raise ValueError(f"confidence has shape {c.shape} but correct has shape {y.shape}")
    if c.size and (c.min() < 0 or c.max() > 1):
        raise ValueError(f"confidence must lie in [0, 1]; got values from {c.min()} to {c.max()}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, n_bins - 1)
    n = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=c, minlength=n_bins)
    acc_sum = np.bincount(which, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf, acc = conf_sum / n, acc_sum / n
    ece = float(np.sum(n[n > 0] * np.abs(acc[n > 0] - conf[n > 0])) / c.size) if c.size else float("nan")
    bins = [{"lo": float(edges[i]), "hi": float(edges[i + 1]), "n": int(n[i]), "confidence": float(conf[i]),
             "accuracy": float(acc[i])} for i in range(n_bins)]
    return {"ece": ece, "bins": bins}
