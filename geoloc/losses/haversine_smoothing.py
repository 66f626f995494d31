"""Geocell classification against haversine-smoothed labels (PIGEON).

A photo taken at ``x`` is not only "in" its geocell: neighbouring cells are almost as right and far ones are
wrong. PIGEON (Haas et al., CVPR 2024) replaces the one-hot cell label with

    y_i = exp(-(d(c_i, x) - d(c_true, x)) / tau) / Z,

where ``c_i`` is the centroid of cell ``i``, ``d`` the haversine distance in km and ``tau`` (km) sets how fast
the weight falls with distance. The subtracted term only cancels in the normalization, so we subtract
``min_j d(c_j, x)`` instead: the largest term is then exactly ``exp(0) = 1`` and ``Z >= 1``, which cannot
underflow to ``0 / 0`` however far ``x`` lies from every centroid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geoloc.geo import haversine_matrix_km


def _check_latlng(x: Tensor, name: str) -> None:
    if x.ndim != 2 or x.shape[-1] != 2:
        raise ValueError(f"{name}: expected shape (N, 2) as [lat, lng] in degrees, got {tuple(x.shape)}")


def haversine_smoothed_targets(
    true_latlng: Tensor,
    cell_centroids: Tensor,
    tau_km: float = 65.0,
    top_k: int | None = None,
) -> Tensor:
    """PIGEON's haversine-smoothed cell labels.

    Distances are computed in float64 under ``no_grad`` (the targets are constants for the loss).

    Args:
        true_latlng: ``[B, 2]`` true ``[lat, lng]`` in degrees.
        cell_centroids: ``[C, 2]`` cell centroids ``[lat, lng]`` in degrees (moved to ``true_latlng``'s device).
        tau_km: smoothing temperature in km; larger spreads the label further. ``0`` gives the one-hot label of
            the nearest centroid (ties go to the lowest cell index).
        top_k: keep only the ``k`` cells with the nearest centroids per row (the rest are exactly 0) and
            renormalize. With ``tau_km`` of tens of km the tail beyond a few hundred km is below float32
            resolution anyway, so this changes the targets negligibly while making them exactly sparse
            (``B * k`` non-zeros) for the ``exp`` and for downstream sparse use. Note that the ``[B, C]``
            distance matrix is still built: at ``B = 256, C = 10^4`` that is ~20 MB in float64 per
            intermediate (roughly 6 live at the peak). ``None`` or ``k >= C`` keeps every cell.

    Returns:
        ``[B, C]`` non-negative weights, each row summing to 1, in ``true_latlng``'s floating dtype
        (float32 for integer input).

    Raises:
        ValueError: wrong shapes, a negative or non-finite ``tau_km`` or a ``top_k`` below 1.
    """
    _check_latlng(true_latlng, "true_latlng")
    _check_latlng(cell_centroids, "cell_centroids")
    tau_km = float(tau_km)
    if not (tau_km >= 0.0 and tau_km < float("inf")):
        raise ValueError(f"tau_km must be a finite number >= 0 (km), got {tau_km!r}")
    if top_k is not None and int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k!r}")
    num_cells = cell_centroids.shape[0]
    if num_cells == 0:
        raise ValueError("cell_centroids is empty: need at least one cell")
    out_dtype = true_latlng.dtype if true_latlng.is_floating_point() else torch.float32

    with torch.no_grad():
        dist_km = haversine_matrix_km(
            true_latlng.detach().to(torch.float64),
            cell_centroids.detach().to(device=true_latlng.device, dtype=torch.float64),
        )  # [B, C]
        excess_km = dist_km - dist_km.min(dim=1, keepdim=True).values  # >= 0, exactly 0 at the nearest cell
        if tau_km == 0.0:
            targets = F.one_hot(excess_km.argmin(dim=1), num_cells).to(torch.float64)
        elif top_k is not None and int(top_k) < num_cells:
            excess_k, idx = excess_km.topk(int(top_k), dim=1, largest=False)  # [B, k]
            w = torch.exp(-excess_k / tau_km)
            targets = torch.zeros_like(excess_km).scatter_(1, idx, w / w.sum(dim=1, keepdim=True))
        else:
            w = torch.exp(-excess_km / tau_km)
            targets = w / w.sum(dim=1, keepdim=True)
    return targets.to(out_dtype)


class HaversineSmoothingLoss(nn.Module):
    """Soft cross-entropy of cell logits against haversine-smoothed labels.

    ``loss = mean_b( -sum_i y[b, i] * log_softmax(logits[b])_i )`` with ``y`` from
    :func:`haversine_smoothed_targets`. The log-softmax runs in at least float32, so bf16/fp16 logits and
    logits of any magnitude are fine.

    The centroids are a *persistent* buffer (``cell_centroids``): they define what each logit means, so the
    checkpoint carries them with the head, ``.to(device)`` moves them and loading a checkpoint trained on a
    different number of cells fails loudly on the shape. Keep the module in float32 or float64: a bf16
    cast (``bf16-true`` precision) would round the centroids by up to 0.5 degree (~55 km).

    Args:
        cell_centroids: ``[C, 2]`` cell centroids ``[lat, lng]`` in degrees, in cell-id order.
        tau_km: smoothing temperature in km. ``0`` means hard labels: the given ``cell_ids`` if any, else the
            cell with the nearest centroid.
        top_k: see :func:`haversine_smoothed_targets`.
    """

    def __init__(self, cell_centroids: Tensor, tau_km: float = 65.0, top_k: int | None = None):
        super().__init__()
        centroids = torch.as_tensor(cell_centroids)
        _check_latlng(centroids, "cell_centroids")
        if len(centroids) == 0:
            raise ValueError("cell_centroids is empty: need at least one cell")
        if not centroids.is_floating_point():
            centroids = centroids.to(torch.float32)
        if not torch.isfinite(centroids).all():
            bad = torch.nonzero(~torch.isfinite(centroids).all(dim=1)).flatten()[:5].tolist()
            raise ValueError(f"cell_centroids: non-finite coordinates in rows {bad}")
        tau_km = float(tau_km)
        if not (tau_km >= 0.0 and tau_km < float("inf")):
            raise ValueError(f"tau_km must be a finite number >= 0 (km), got {tau_km!r}")
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k!r}")
        self.register_buffer("cell_centroids", centroids.detach().clone(), persistent=True)
        self.tau_km = tau_km
        self.top_k = None if top_k is None else int(top_k)

    @property
    def num_cells(self) -> int:
        return self.cell_centroids.shape[0]

    def extra_repr(self) -> str:
        return f"num_cells={self.num_cells}, tau_km={self.tau_km}, top_k={self.top_k}"

    def forward(self, logits: Tensor, true_latlng: Tensor, cell_ids: Tensor | None = None) -> dict[str, Tensor]:
        """Computes the loss.

        Args:
            logits: ``[B, C]`` unnormalized cell scores.
            true_latlng: ``[B, 2]`` true ``[lat, lng]`` in degrees.
            cell_ids: optional ``[B]`` integer labels in ``[0, C)``. Used only when ``tau_km == 0`` (plain
                cross-entropy on them); with ``tau_km > 0`` the labels follow from the distances alone, so
                they are ignored (the labelled cell's centroid is not always the nearest one, and the
                smoothing is by distance, as in PIGEON).

        Returns:
            ``loss``: scalar, mean over the batch (float32 or wider).
            ``targets``: ``[B, C]`` the label distribution used, detached.
        """
        if logits.ndim != 2 or logits.shape[1] != self.num_cells:
            raise ValueError(
                f"logits: expected shape (B, {self.num_cells}) for {self.num_cells} cells, got {tuple(logits.shape)}"
            )
        _check_latlng(true_latlng, "true_latlng")
        if true_latlng.shape[0] != logits.shape[0]:
            raise ValueError(f"batch mismatch: logits has {logits.shape[0]} rows, true_latlng {true_latlng.shape[0]}")

        logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        if self.tau_km == 0.0 and cell_ids is not None:
            cell_ids = cell_ids.reshape(-1).to(device=logits.device, dtype=torch.long)
            if cell_ids.shape[0] != logits.shape[0]:
                raise ValueError(f"cell_ids: expected {logits.shape[0]} labels, got {cell_ids.shape[0]}")
            loss = F.nll_loss(logp, cell_ids)
            targets = F.one_hot(cell_ids, self.num_cells).to(logp.dtype)
            return {"loss": loss, "targets": targets}

        targets = haversine_smoothed_targets(true_latlng, self.cell_centroids, self.tau_km, self.top_k).to(logp)
        # zero-weight cells contribute 0 even where a logit is -inf (masked), instead of 0 * -inf = nan
        loss = -torch.where(targets > 0, targets * logp, torch.zeros_like(logp)).sum(dim=-1).mean()
        return {"loss": loss, "targets": targets}
