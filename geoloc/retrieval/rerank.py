"""Score fusion over the candidate cells: the one implementation the predictor and the exported model share.

The classifier proposes its ``K`` most probable cells (:func:`top_candidates`); every scorer
(:mod:`geoloc.retrieval.scorers`) adds a ``(B, K)`` log-score term; :func:`rerank` fuses them,

    fused = cell_weight * log p(cell) + sum_s weight_s * term_s
    post = softmax(fused) * sum_k p(cell_k)

(the posterior over the candidates, on the classifier's scale: the candidates keep their total mass)
and sorts the candidates by it; which of them to answer is :mod:`geoloc.retrieval.decode`'s choice.
Every function here is plain torch and TorchScript-scriptable, so that
:class:`geoloc.inference.predictor.ModelPredictor` and the file written by :mod:`geoloc.inference.export`
rank cells by exactly the same arithmetic with the same weights.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_candidates(prob: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` most probable cells per row, most probable first.

    Args:
        prob: ``(B, C)`` cell probabilities.
        k: candidates (at most ``C``).

    Returns:
        ``(p_cand (B, k), cand (B, k) int64)``.
    """
    k = min(k, prob.shape[1])
    return prob.topk(k, dim=1)


def masked_log_softmax(scores: Tensor, temperature: float) -> Tensor:
    """Row-wise ``log softmax(scores / T)`` over the finite entries.

    A candidate without a score (``-inf``: no reference in that cell) gets the row's lowest finite score
    instead of being ruled out, so missing retrieval data neither vetoes nor favours a cell. A row with no
    finite score contributes zeros (no evidence either way).

    Args:
        scores: ``(B, K)`` similarities, ``-inf`` where a candidate has none.
        temperature: ``T > 0``.

    Returns:
        ``(B, K)`` float32 log-probabilities (zeros in rows without scores).
    """
    s = scores.to(torch.float32) / temperature
    finite = torch.isfinite(s)
    low = torch.where(finite, s, torch.full_like(s, float("inf"))).amin(dim=1, keepdim=True)
    low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
    s = torch.where(finite, s, low.expand_as(s))
    has = finite.any(dim=1, keepdim=True)
    return torch.where(has, torch.log_softmax(s, dim=1), torch.zeros_like(s))


def rerank(p_cand: Tensor, terms: list[Tensor], weights: list[float], cell_weight: float) -> tuple[Tensor, Tensor]:
    """Fuses the classifier with the scorers' terms and ranks the candidates.

    Args:
        p_cand: ``(B, K)`` the candidates' classifier probabilities.
        terms: ``(B, K)`` log-score terms, one per scorer.
        weights: one weight per term.
        cell_weight: the weight of ``log p(cell)``.

    Returns:
        ``(post (B, K) float32, order (B, K) int64)``: the fused probabilities sorted descending (stable:
        ties keep the candidates' order) and, per rank, the candidate's column in ``p_cand``.
    """
    if len(terms) != len(weights):
        raise ValueError("rerank needs one weight per term")
    p = p_cand.to(torch.float32)
    fused = cell_weight * torch.log(p.clamp_min(1e-12))
    for i in range(len(terms)):
        fused = fused + weights[i] * terms[i].to(torch.float32)
    post = torch.softmax(fused, dim=1) * p.sum(dim=1, keepdim=True)
    post, order = torch.sort(post, dim=1, descending=True, stable=True)
    return post, order
