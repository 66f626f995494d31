"""Figures of an evaluation (PNG, matplotlib's Agg backend, written atomically).

* :func:`error_cdf`: the share of photos within each error, log km axis, the 1/25/200/750/2500 km
  thresholds marked; several runs on one figure.
* :func:`error_map`: true locations coloured by error (log scale), thin lines to a subset of the
  predictions, over country outlines (plate carrée: x = longitude, y = latitude).
* :func:`reliability_diagram`: accuracy against confidence of the top-1 cell, per bin, with counts.
* :func:`recall_area_curve`: Recall-vs-Area.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.artifacts import atomic_path
from geoloc.evaluation.metrics import THRESHOLDS_KM, recall_vs_area


def _figure(width: float = 7.0, height: float = 4.5):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), dpi=110)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def error_cdf(runs: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Cumulative error distribution.

    Args:
        runs: name -> ``(N,)`` errors in km.
        path: the PNG to write.
    """
    plt, fig, ax = _figure()
    for name, d in runs.items():
        d = np.sort(np.asarray(d, dtype=np.float64))
        if len(d):
            ax.step(np.maximum(d, 0.1), np.arange(1, len(d) + 1) / len(d), where="post", label=f"{name} (n={len(d)})")
    for t in THRESHOLDS_KM:
        ax.axvline(t, color="0.8", lw=0.8, zorder=0)
        ax.text(t, 1.01, f"{t} km", ha="center", va="bottom", fontsize=7, color="0.4")
    ax.set(xscale="log", xlim=(0.1, 20038), ylim=(0, 1), xlabel="great-circle error (km)",
           ylabel="share of photos within")
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9, pad=14)
    return _save(plt, fig, path)


@functools.lru_cache(maxsize=2)
def _country_outlines(boundaries: str | None):
    """Country borders (admin-1 regions dissolved by country), read and dissolved once per process."""
    import geopandas as gpd

    from geoloc.geo.countries import admin_boundaries_path

    gdf = gpd.read_parquet(boundaries or admin_boundaries_path())
    return (gdf.dissolve("adm0_a3") if "adm0_a3" in gdf.columns else gdf).boundary


def _outlines(ax, boundaries: str | Path | None) -> None:
    try:
        _country_outlines(str(boundaries) if boundaries else None).plot(ax=ax, color="0.6", lw=0.3, zorder=1)
    except (ImportError, FileNotFoundError, ModuleNotFoundError):  # a map without outlines still shows errors
        pass


def error_map(predictions: pd.DataFrame, path: str | Path, *, n_lines: int = 300, boundaries=None,
              title: str = "", seed: int = 0) -> Path:
    """World map of true locations coloured by error, with lines to a random subset of predictions.

    Args:
        predictions: ``predictions.csv`` rows (``true_lat``, ``true_lng``, ``pred_lat``, ``pred_lng``,
            ``distance_km``).
        n_lines: how many true -> predicted lines to draw (a seeded random subset).
    """
    from matplotlib.colors import LogNorm

    plt, fig, ax = _figure(9.0, 4.8)
    _outlines(ax, boundaries)
    d = predictions["distance_km"].to_numpy(np.float64)
    if len(d):
        pick = np.random.default_rng(seed).permutation(len(d))[:n_lines]
        for i in pick:
            r = predictions.iloc[i]
            if abs(r.pred_lng - r.true_lng) <= 180:  # lines that would cross the antimeridian are left out
                ax.plot([r.true_lng, r.pred_lng], [r.true_lat, r.pred_lat], color="0.3", lw=0.3, alpha=0.5, zorder=2)
        ax.scatter(predictions["pred_lng"], predictions["pred_lat"], s=6, marker="x", color="black", lw=0.5,
                   zorder=3, label="prediction")
        sc = ax.scatter(predictions["true_lng"], predictions["true_lat"], c=np.maximum(d, 1.0), s=8,
                        cmap="plasma_r", norm=LogNorm(1, 20038), zorder=4, label="truth (colour: error)")
        fig.colorbar(sc, ax=ax, label="error (km)", fraction=0.025, pad=0.01)
        ax.legend(loc="lower left", fontsize=7)
    ax.set(xlim=(-180, 180), ylim=(-90, 90), xlabel="longitude", ylabel="latitude", aspect="equal")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(plt, fig, path)


def reliability_diagram(bins: list[dict], ece: float, path: str | Path, title: str = "") -> Path:
    """Accuracy against mean confidence per bin (from :func:`geoloc.evaluation.metrics.expected_calibration_error`)."""
    plt, fig, ax = _figure(5.0, 4.5)
    lo = np.array([b["lo"] for b in bins])
    width = np.array([b["hi"] - b["lo"] for b in bins])
    acc = np.nan_to_num(np.array([b["accuracy"] for b in bins]))
    n = np.array([b["n"] for b in bins])
    ax.bar(lo, acc, width=width, align="edge", edgecolor="black", lw=0.5, label="accuracy of top-1 cell")
    ax.plot([0, 1], [0, 1], "--", color="0.5", label="perfect calibration")
    for x, w, a, k in zip(lo, width, acc, n):
        if k:
            ax.text(x + w / 2, a + 0.01, str(k), ha="center", fontsize=6)
    ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="top-1 cell probability", ylabel="accuracy",
           title=(title + "\n" if title else "") + f"ECE = {ece:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    return _save(plt, fig, path)


def recall_area_curve(runs: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Recall-vs-Area curves.

    Args:
        runs: name -> ``(N,)`` area to cover (km², ``area_to_cover_km2``).
    """
    plt, fig, ax = _figure()
    for name, a in runs.items():
        grid, recall = recall_vs_area(a)
        ax.plot(grid, recall, label=name)
    ax.set(xscale="log", ylim=(0, 1), xlabel="area searched, most probable cells first (km²)",
           ylabel="share of photos whose truth is covered")
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(plt, fig, path)


def evaluation_plots(output_dir: str | Path, metrics: dict) -> list[Path]:
    """Every figure for one ``evaluate`` folder; returns the files written."""
    out = Path(output_dir)
    df = pd.read_csv(out / "predictions.csv", dtype={"IMG_ID": str})
    title = f"{metrics['predictor']['name']} on {metrics['dataset']['name']}" + (
        " (SYNTHETIC)" if metrics["dataset"].get("synthetic") else "")
    written = [error_cdf({metrics["predictor"]["name"]: df["distance_km"].to_numpy()}, out / "error_cdf.png", title),
               error_map(df, out / "error_map.png", title=title)]
    if "calibration_bins" in metrics:
        written.append(reliability_diagram(metrics["calibration_bins"], metrics["ece_top1"], out / "reliability.png",
                                           title))
        written.append(recall_area_curve({metrics["predictor"]["name"]: df["area_to_cover_km2"].to_numpy()},
                                         out / "recall_area.png", title))
    return written
