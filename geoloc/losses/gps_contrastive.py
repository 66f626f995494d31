"""Image-GPS contrastive loss (GeoCLIP) and the queue of GPS negatives it draws on.

GeoCLIP (Vivanco Cepeda et al., NeurIPS 2023) aligns image embeddings with embeddings of GPS coordinates:
each image's own GPS is its positive; the other GPS in the batch and a FIFO queue of recently seen GPS are
negatives. The queue stores *coordinates*, not embeddings: every step the caller re-encodes the queue with
the current location encoder, so negatives never go stale. Duplicate locations (two photos of one place) are
counted as negatives, as in GeoCLIP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gather_latlng(latlng: Tensor) -> Tensor:
    """All-gathers coordinates across ranks, for :meth:`GPSQueue.enqueue` under DDP.

    Every rank must call this (it is a collective). Ranks may hold different batch sizes (a partial last
    batch): sizes are exchanged first and the padding is dropped. No gradient flows through it.

    Args:
        latlng: ``[B, 2]`` ``[lat, lng]`` in degrees on this rank (on the device the backend expects:
            CUDA for NCCL).

    Returns:
        ``[sum of B over ranks, 2]`` in rank order; ``latlng`` itself when ``torch.distributed`` is not
        initialized or the world has one rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return latlng
    world = dist.get_world_size()
    latlng = latlng.detach().contiguous()
    n = torch.tensor([latlng.shape[0]], device=latlng.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_int = [int(s) for s in sizes]
    padded = latlng.new_zeros((max(sizes_int), *latlng.shape[1:]))
    padded[: latlng.shape[0]] = latlng
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes_int)])


class GPSQueue(nn.Module):
    """FIFO ring buffer of GPS coordinates (GeoCLIP's negative queue).

    State lives in buffers (``latlng [size, 2]``, ``ptr``, ``count``), so it is saved in ``state_dict`` and
    moves with ``.to()``. Under DDP every rank should hold the same queue: enqueue
    ``gather_latlng(batch_latlng)`` (all ranks' coordinates), not the local batch. The buffer is float32;
    keep it out of bf16 casts (``bf16-true``), which round coordinates by up to 0.5 degree.

    Args:
        size: capacity in coordinates; ``0`` gives a queue that stays empty.
    """

    def __init__(self, size: int):
        super().__init__()
        if int(size) < 0:
            raise ValueError(f"GPSQueue size must be >= 0, got {size!r}")
        self.size = int(size)
        self.register_buffer("latlng", torch.zeros(self.size, 2))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # filled slots, <= size

    def extra_repr(self) -> str:
        return f"size={self.size}"

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def enqueue(self, latlng: Tensor) -> None:
        """Appends coordinates, overwriting the oldest once full.

        Args:
            latlng: ``[B, 2]`` ``[lat, lng]`` in degrees, any ``B`` (0 is a no-op; beyond ``size`` only the last
                ``size`` rows are kept).
        """
        if latlng.ndim != 2 or latlng.shape[1] != 2:
            raise ValueError(f"GPSQueue.enqueue: expected shape (B, 2) as [lat, lng], got {tuple(latlng.shape)}")
        if self.size == 0 or latlng.shape[0] == 0:
            return
        latlng = latlng.detach()[-self.size :].to(self.latlng)
        n = latlng.shape[0]
        ptr = int(self.ptr)
        slots = (ptr + torch.arange(n, device=self.latlng.device)) % self.size
        self.latlng[slots] = latlng
        self.ptr.fill_((ptr + n) % self.size)
        self.count.fill_(min(int(self.count) + n, self.size))

    def get(self) -> Tensor:
        """The queued coordinates, oldest first.

        Returns:
            ``[n_filled, 2]`` ``[lat, lng]`` in degrees, a copy (later enqueues do not change it).
        """
        n = int(self.count)
        if n < self.size:  # not yet wrapped: slots 0..n-1 in order
            return self.latlng[:n].clone()
        ptr = int(self.ptr)
        return torch.cat([self.latlng[ptr:], self.latlng[:ptr]])


class GPSContrastiveLoss(nn.Module):
    """GeoCLIP's image-to-GPS InfoNCE.

    With ``img`` and ``gps`` L2-normalized and ``s = exp(min(logit_scale, ln max_logit_scale))``::

        logits = s * img @ cat([gps_pos, gps_queue]).T    # [B, B + Q]
        loss   = cross_entropy(logits, arange(B))

    Row ``b``'s positive is column ``b`` (its own GPS); the other ``B - 1`` batch GPS and the ``Q`` queued GPS
    are negatives. ``B`` may change between steps and ``Q`` may be 0. The queue embeddings must be
    **re-encoded every step** with the current location encoder from the coordinates in
    :class:`GPSQueue` (GeoCLIP); that is the caller's job, the loss only sees embeddings. Under DDP each rank
    scores its own images against its own batch GPS plus the (gathered, shared) queue.

    The logits are computed in float32 or wider with autocast off: at scale 100, bf16 logits would be off by
    up to ~0.4.

    Args:
        init_temperature: initial softmax temperature ``T``; ``logit_scale`` starts at ``ln(1 / T)``.
        learnable: make ``logit_scale`` a parameter (else a buffer).
        max_logit_scale: cap on ``exp(logit_scale)``. The cap is applied in the forward pass (the gradient is
            0 beyond it), so no clamp after the optimizer step is needed.
    """

    def __init__(self, init_temperature: float = 0.07, learnable: bool = True, max_logit_scale: float = 100.0):
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature!r}")
        if not max_logit_scale > 0:
            raise ValueError(f"max_logit_scale must be > 0, got {max_logit_scale!r}")
        init = torch.tensor(math.log(1.0 / init_temperature))
        if learnable:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.max_log_scale = math.log(max_logit_scale)

    def extra_repr(self) -> str:
        learnable = isinstance(self.logit_scale, nn.Parameter)
        return f"max_logit_scale={math.exp(self.max_log_scale):g}, learnable={learnable}"

    def forward(self, image_emb: Tensor, gps_emb_pos: Tensor, gps_emb_queue: Tensor | None = None) -> dict[str, Tensor]:
        """Computes the loss.

        Args:
            image_emb: ``[B, D]`` image embeddings (any norm).
            gps_emb_pos: ``[B, D]`` embeddings of each image's own GPS.
            gps_emb_queue: ``[Q, D]`` embeddings of the queued GPS, or ``None`` (same as ``Q = 0``).

        Returns:
            ``loss``: scalar, mean over the ``B`` images.
            ``logit_scale``: the scale ``s`` used (``exp`` of the clamped parameter), detached.
            ``acc``: fraction in ``[0, 1]`` of images whose own GPS scores highest among the ``B + Q``, detached.
        """
        if image_emb.ndim != 2 or gps_emb_pos.shape != image_emb.shape:
            raise ValueError(
                "image_emb and gps_emb_pos must both be (B, D) with equal shapes, got "
                f"{tuple(image_emb.shape)} and {tuple(gps_emb_pos.shape)}"
            )
        gps = gps_emb_pos
        if gps_emb_queue is not None and gps_emb_queue.shape[0] > 0:
            if gps_emb_queue.ndim != 2 or gps_emb_queue.shape[1] != image_emb.shape[1]:
                raise ValueError(
                    f"gps_emb_queue: expected shape (Q, {image_emb.shape[1]}), got {tuple(gps_emb_queue.shape)}"
                )
            gps = torch.cat([gps_emb_pos, gps_emb_queue.to(gps_emb_pos.dtype)])
        dtype = torch.promote_types(torch.promote_types(image_emb.dtype, gps.dtype), torch.float32)

        with torch.autocast(device_type=image_emb.device.type, enabled=False):
            img = F.normalize(image_emb.to(dtype), dim=-1)
            gps = F.normalize(gps.to(dtype), dim=-1)
            scale = self.logit_scale.to(dtype).clamp(max=self.max_log_scale).exp()
            logits = scale * img @ gps.T  # [B, B + Q]
            target = torch.arange(image_emb.shape[0], device=image_emb.device)
            loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            acc = (logits.argmax(dim=-1) == target).to(dtype).mean()
        return {"loss": loss, "logit_scale": scale.detach(), "acc": acc}
