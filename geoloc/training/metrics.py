"""Validation metrics aggregated over every process with torchmetrics (tensor-only; no Lightning).

:class:`DistanceMetrics` keeps each photo's great-circle error, so that under DDP the median and the
accuracies are those of all ranks' photos together (torchmetrics gathers the errors, ranks holding
different numbers of photos included), exactly as one process would score them.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from geoloc.evaluation.metrics import distance_metrics
from geoloc.geo import haversine_km


class DistanceMetrics(Metric):
    """Errors in km of predicted coordinates, and :func:`~geoloc.evaluation.metrics.distance_metrics` on them.

    ``update(pred_latlng [B, 2], true_latlng [B, 2])`` (degrees) appends the batch's errors; ``compute()``
    gathers them from every process and returns ``{"n", "acc_<t>km", "median_km", "mean_km", "geoscore"}``
    (NaN metrics when there are no photos). Errors are kept in float64, as the evaluation engine keeps them.
    """

    full_state_update = False
    distance_km: list[torch.Tensor]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("distance_km", default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)

    def update(self, pred_latlng: torch.Tensor, true_latlng: torch.Tensor) -> None:
        self.distance_km.append(haversine_km(pred_latlng.double(), true_latlng.double()))  # [B]

    def compute(self) -> dict[str, float]:
        d = dim_zero_cat(self.distance_km) if len(self.distance_km) else torch.zeros(0, dtype=torch.float64)
        return distance_metrics(d.cpu().numpy())
