"""Calibrated cell probabilities: one temperature per run, fitted on validation photos.

A geocell classifier trained on few photos is overconfident: its top cell's probability is far above how
often that cell is right, and every decision that weighs cells by their probability (the reranking, an
answer chosen for the metric: :mod:`geoloc.retrieval.decode`) inherits the error. Temperature scaling
(Guo et al., 2017) fixes the scale without changing the ranking:

    p_T(cell) = softmax(log p(cell) / T)

with the one ``T`` that minimizes the negative log-likelihood of the true cells of validation photos,
``NLL(T) = mean_i [logsumexp_c(z_ic / T) - z_i,y_i / T]`` (``z`` the cell logits, ``y`` the cell each
photo's true location falls in). In ``b = 1 / T`` this is a sum of log-sum-exps of linear functions, so it
is convex; :func:`fit_temperature` solves it exactly with safeguarded Newton steps on ``b`` (the gradient
and the curvature are the mean and variance of ``z`` under ``p_T``, minus the true cell's).

``python -m geoloc calibrate`` (:mod:`geoloc.prepare.calibrate`) runs the network once over the photos and
writes ``RUN/calibration_v1.json`` (format below); :func:`resolve_calibration` is what predictors use to find
and check it (``build_predictor(..., calibration="auto" | PATH | None)``). A file is bound to the network
weights it was fitted for (:func:`network_fingerprint`): one fitted for ``best.ckpt`` is refused for
``last.ckpt`` of the same run.

``calibration_v1.json``::

    {"kind": "calibration", "format_version": 1, "fingerprint": "<network weights>", "created": "...",
     "temperature": 1.83, "nll_before": 4.12, "nll_after": 3.05, "ece_before": 0.31, "ece_after": 0.04,
     "acc_cell_top1": 21.5, "n": 300, "n_skipped": 0, "skipped_by_reason": {}, "dataset": "...",
     "source": "...", "ckpt": "/abs/RUN/checkpoints/best.ckpt", "cells_fingerprint": "...",
     "bounds": [0.01, 100.0]}

(NLL in nats per photo, ECE of the top-1 cell probability over 15 equal-width bins, accuracy in percent.)
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CALIBRATION_FORMAT_VERSION = 1
#: The temperatures :func:`fit_temperature` searches between (a wider range means a broken model).
DEFAULT_BOUNDS = (0.01, 100.0)


def default_calibration_path(ckpt: str | Path) -> Path:
    """``RUN/calibration_v1.json`` for ``RUN/checkpoints/x.ckpt``."""
    return Path(ckpt).parent.parent / f"calibration_v{CALIBRATION_FORMAT_VERSION}.json"


def network_fingerprint(net) -> str:
    """A short hash of the network's weights (and buffers): what a calibration was fitted for."""
    from geoloc.retrieval.gallery import encoder_fingerprint

    return encoder_fingerprint(net)


@dataclass(frozen=True)
class Calibration:
    """The temperature of a predictor's cell probabilities, and where it came from.

    Attributes:
        temperature: ``T > 0``; the cell probabilities are ``softmax(log p / T)`` (1: unchanged).
        source: the file it was read from (None: given directly).
        fingerprint: the network weights it was fitted for.
        report: what the file says about the fit (``nll_before``, ``ece_after``, ``n``, ``dataset``, ...).
    """

    temperature: float
    source: str | None = None
    fingerprint: str | None = None
    report: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        t = float(self.temperature)
        if not (np.isfinite(t) and t > 0):
            raise ValueError(f"a calibration temperature must be a positive number, got {self.temperature!r}")
        object.__setattr__(self, "temperature", t)

    def describe(self) -> dict:
        """The predictor's ``describe()`` keys: ``cell_temperature`` and ``calibration`` (the file)."""
        return {"cell_temperature": self.temperature, "calibration": self.source}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def temperature_nll(logits, true_cell, temperature: float) -> float:
    """Mean negative log-likelihood (nats) of the true cells under ``softmax(logits / T)``.

    Args:
        logits: ``(N, C)`` cell logits (or log-probabilities: the same up to a constant per row).
        true_cell: ``(N,)`` int the cell of each photo's true location.
        temperature: ``T > 0``.
    """
    z = np.asarray(logits, np.float64) / float(temperature)
    y = np.asarray(true_cell, np.int64)
    return float(-_log_softmax(z)[np.arange(len(y)), y].mean())


def _nll_derivatives(z: np.ndarray, zy: np.ndarray, b: float, chunk: int = 4096) -> tuple[float, float, float]:
    """``NLL(b)``, ``dNLL/db`` and ``d2NLL/db2`` at inverse temperature ``b`` (mean over rows)."""
    f = g = h = 0.0
    for s in range(0, len(z), chunk):
        x = z[s:s + chunk]  # (n, C)
        u = b * x
        m = u.max(axis=1, keepdims=True)
        e = np.exp(u - m)
        tot = e.sum(axis=1, keepdims=True)
        p = e / tot
        mean = (p * x).sum(axis=1)
        var = np.maximum((p * x * x).sum(axis=1) - mean ** 2, 0.0)
        f += float((m[:, 0] + np.log(tot[:, 0]) - b * zy[s:s + chunk]).sum())
        g += float((mean - zy[s:s + chunk]).sum())
        h += float(var.sum())
    n = len(z)
    return f / n, g / n, h / n


def fit_temperature(logits, true_cell, *, bounds: tuple[float, float] = DEFAULT_BOUNDS, tol: float = 1e-10,
                    max_iter: int = 100) -> dict:
    """The temperature that minimizes the NLL of the true cells (exact: convex in ``1 / T``).

    Newton steps on ``b = 1 / T`` inside a bracket ``[1 / T_max, 1 / T_min]`` that shrinks around the sign
    change of the gradient; a step that would leave the bracket is a bisection instead, so it converges
    for any data (a separable set, whose NLL keeps falling as ``T -> 0``, ends at the bound).

    Args:
        logits: ``(N, C)`` cell logits (or log-probabilities) of the validation photos, uncalibrated.
        true_cell: ``(N,)`` the cell of each photo's true location.
        bounds: ``(T_min, T_max)``.
        tol: stop when the gradient (nats per unit ``b``) is this small, or a step moves ``b`` by less than
            a relative ``1e-12``.
        max_iter: at most this many steps.

    Returns:
        ``{"temperature", "nll_before" (T = 1), "nll_after", "n", "iterations", "at_bound"}``.

    Raises:
        ValueError: no photos, mismatched shapes, cells out of range or non-finite logits.
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(true_cell, np.int64).reshape(-1)
    if z.ndim != 2 or len(z) != len(y):
        raise ValueError(f"fit_temperature needs (N, C) logits and (N,) cells, got {z.shape} and {y.shape}")
    if len(y) == 0:
        raise ValueError("fit_temperature needs at least one photo")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"true cells must lie in 0..{z.shape[1] - 1}, got {y.min()}..{y.max()}")
    if not np.isfinite(z).all():
        raise ValueError("cell logits hold non-finite values; the network's outputs are broken")
    t_min, t_max = (float(v) for v in bounds)
    if not 0 < t_min < 1 < t_max:
        raise ValueError(f"bounds must satisfy 0 < T_min < 1 < T_max, got {bounds}")
    zy = z[np.arange(len(y)), y]
    lo, hi = 1.0 / t_max, 1.0 / t_min  # b; NLL is convex in b
    iterations, at_bound = 0, True
    if _nll_derivatives(z, zy, lo)[1] >= 0:  # rising already at T_max: the optimum is there or beyond
        b = lo
    elif _nll_derivatives(z, zy, hi)[1] <= 0:  # still falling at T_min: separable data
        b = hi
    else:
        b, at_bound = 1.0, False
        for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is reported
            _, g, h = _nll_derivatives(z, zy, b)
            if abs(g) <= tol:
                break
            if g > 0:
                hi = b
            else:
                lo = b
            step = b - g / h if h > 0 else float("nan")
            new = step if lo < step < hi else 0.5 * (lo + hi)
            done = abs(new - b) <= 1e-12 * b
            b = new
            if done:
                break
    temperature = 1.0 / b
    return {"temperature": float(temperature), "nll_before": temperature_nll(z, y, 1.0),
            "nll_after": temperature_nll(z, y, temperature), "n": int(len(y)), "iterations": int(iterations),
            "at_bound": at_bound}


#: How a calibration is fitted, for messages.
REBUILD = "python -m geoloc calibrate ckpt=RUN/checkpoints/best.ckpt data=..."


def read_calibration(path: str | Path, *, fingerprint: str | None = None, rebuild: str = REBUILD) -> Calibration:
    """A ``calibration_v1.json``, checked (kind, format version and, given ``fingerprint``, the weights).

    Args:
        path: the file.
        fingerprint: the network weights it must have been fitted for (:func:`network_fingerprint`);
            None: not checked.
        rebuild: the command that fits it again, for messages.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a calibration file, another format version, fitted for other weights, or a bad
            temperature; the message names the file and says how to fit it again.
    """
    from geoloc.artifacts import ArtifactMeta

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give the calibration file ({rebuild} writes RUN/calibration_v1.json)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no calibration file; fit one with {rebuild}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e}); fit it again with {rebuild}") from e
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"{path}: not a calibration file; fit one with {rebuild}")
    if fingerprint is not None and d.get("fingerprint") != fingerprint:
        raise ValueError(f"{path}: fitted for other network weights (fingerprint {d.get('fingerprint')}, checkpoint "
                         f"{d.get('ckpt')}), not these ({fingerprint}); fit it for this checkpoint with {rebuild}, "
                         "or turn calibration off (predictor.calibration=null)")
    meta = ArtifactMeta.from_dict(d, source=path, kind="calibration", format_version=CALIBRATION_FORMAT_VERSION,
                                  rebuild=rebuild)
    report = dict(meta.settings)
    t = report.pop("temperature", None)
    if not isinstance(t, int | float) or isinstance(t, bool) or not (np.isfinite(t) and t > 0):
        raise ValueError(f"{path}: 'temperature' must be a positive number, got {t!r}; fit it again with {rebuild}")
    return Calibration(float(t), source=str(path), fingerprint=meta.fingerprint, report=report)


def resolve_calibration(calibration, *, ckpt: str | Path | None, net, rebuild: str | None = None) -> Calibration | None:
    """The calibration a predictor of ``net`` (from ``ckpt``) uses.

    Args:
        calibration: ``"auto"`` (``RUN/calibration_v1.json`` when it exists; one fitted for other weights, such
            as another checkpoint of the same run, is left out with a warning), a path (it must exist and fit
            these weights), a :class:`Calibration` or a temperature (used as given), or None / ``"none"`` (off).
        ckpt: the checkpoint (for ``"auto"``); None, or a name that is no file: ``"auto"`` finds nothing.
        net: the network (its fingerprint is checked against the file's).
        rebuild: the command that fits a calibration for it, for messages; None: ``python -m geoloc calibrate
            ckpt=CKPT data=...``.

    Raises:
        FileNotFoundError, ValueError: a named file that is missing, damaged or fitted for other weights.
    """
    if calibration is None or (isinstance(calibration, str) and calibration.lower() in ("none", "null", "off", "")):
        return None
    if isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, int | float) and not isinstance(calibration, bool):
        return Calibration(float(calibration))
    is_run = ckpt is not None and Path(ckpt).is_file()
    rebuild = rebuild or f"python -m geoloc calibrate ckpt={ckpt if is_run else 'RUN/checkpoints/best.ckpt'} data=..."
    if isinstance(calibration, str) and calibration.lower() == "auto":
        path = default_calibration_path(ckpt) if is_run else None
        if path is None or not path.is_file():
            return None
        try:
            return read_calibration(path, fingerprint=network_fingerprint(net), rebuild=rebuild)
        except ValueError as e:
            warnings.warn(f"{e}; predicting with uncalibrated cell probabilities", stacklevel=3)
            return None
    return read_calibration(calibration, fingerprint=network_fingerprint(net), rebuild=rebuild)
