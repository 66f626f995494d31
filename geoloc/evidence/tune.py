"""Per-head weights of the evidence reranking, chosen on validation photos.

The reranking (:class:`~geoloc.retrieval.scorers.EvidenceScorer`, ``refine=evidence``) adds
``w_h log sum_k q_h(k) P_cell,h(k)`` per evidence head ``h`` to each candidate cell's log probability.
:func:`tune_evidence_weights` picks the ``w_h`` by coordinate ascent over a grid on photos the model
was not trained on: the network runs once over them, then every setting only reranks the cached
outputs, with a predictor made by ``predictor.with_weights(evidence=...)`` (the given predictor is left
as it was). The objective is the mean GeoScore of the answers (higher is better), so a head that does
not help gets weight 0.

    python -m geoloc tune ckpt=RUN/checkpoints/last.ckpt data=im2gps3k data.root=DIR data.fold=3 \\
        data.folds=5 [refine=evidence] [out=RUN/evidence_weights_v1.json]

writes ``{"weights": {head: w}, "geoscore": ..., "geoscore_without": ..., ...}``; give the file to the
predictor as ``predictor.evidence_weights=RUN/evidence_weights_v1.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from geoloc.evaluation.metrics import geoscore
from geoloc.geo import haversine_km

GRID = (0.0, 0.25, 0.5, 1.0, 2.0)


def _mean_geoscore(predictor, out: dict, true_latlng: np.ndarray) -> float:
    return float(geoscore(haversine_km(predictor.refine_batch(out).latlng, true_latlng)).mean())


def tune_evidence_weights(predictor, out: dict, true_latlng, *, grid=GRID, rounds: int = 2) -> dict:
    """Coordinate ascent of the per-head weights on cached network outputs.

    Args:
        predictor: a :class:`~geoloc.inference.predictor.ModelPredictor` with an evidence scorer (not changed).
        out: its :meth:`~geoloc.inference.predictor.ModelPredictor.forward` outputs on the validation photos.
        true_latlng: ``(N, 2)`` their true coordinates.
        grid: the weights tried for each head.
        rounds: passes over the heads (stops early when a pass changes nothing).

    Returns:
        ``{"weights", "geoscore" (with them), "geoscore_without" (all 0), "geoscore_uniform" (all 1),
        "n", "grid", "history": [[head, weight, geoscore], ...]}``.
    """
    true_latlng = np.asarray(true_latlng, np.float64)
    heads = list(predictor.evidence_heads_available)
    if not heads:
        raise ValueError("the predictor has no evidence heads to weigh (refine=evidence on a model with heads)")

    def score(w: dict) -> float:
        return _mean_geoscore(predictor.with_weights(evidence=w), out, true_latlng)

    without = score({h: 0.0 for h in heads})
    uniform = score({h: 1.0 for h in heads})
    best_w, best = ({h: 1.0 for h in heads}, uniform) if uniform > without else ({h: 0.0 for h in heads}, without)
    history = []
    for _ in range(rounds):
        changed = False
        for h in heads:
            for w in grid:
                if w == best_w[h]:
                    continue
                s = score({**best_w, h: float(w)})
                history.append([h, float(w), s])
                if s > best + 1e-9:
                    best_w, best, changed = {**best_w, h: float(w)}, s, True
        if not changed:
            break
    return {"weights": best_w, "geoscore": best, "geoscore_without": without, "geoscore_uniform": uniform,
            "n": int(len(true_latlng)), "grid": [float(g) for g in grid], "history": history}


def load_weights(path: str | Path) -> dict[str, float]:
    """The ``weights`` of a file written by ``python -m geoloc tune`` (or a plain ``{head: w}`` JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no evidence weights file (python -m geoloc tune writes one)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e}); write it again with python -m geoloc tune") from e
    weights = data.get("weights", data) if isinstance(data, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, int | float) for v in weights.values()):
        raise ValueError(f"{path}: expected {{'weights': {{head: number}}}}, got {str(data)[:200]}")
    return {str(k): float(v) for k, v in weights.items()}
