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
