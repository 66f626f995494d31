"""One precision setting for every path that runs a network: prediction, evaluation, index building, export.

``precision`` is ``32`` (float32), ``bf16`` (bfloat16 autocast), ``16`` (float16 autocast, CUDA only) or
``auto``: bf16 where the device computes it natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU that
supports it), else float32. Lightning's spellings (``32-true``, ``bf16-mixed``, ``16-mixed``) are accepted
too, so a trainer's value can be passed on as it is.

Autocast runs the matmuls and convolutions of the backbone and the heads in the low precision and keeps
what it would hurt in float32: the predictor takes the cell logits, softmaxes, reranking, expected scores
and haversine distances out of autocast as float32 or wider (a softmax over thousands of cells, and
great-circle distances, lose kilometres in bf16); the losses do the same in training
(:mod:`geoloc.losses`); the GPS gallery is embedded in float32 (the location encoder's random Fourier
features at sigma 2^8 have phases of thousands of radians, far beyond bf16's 8 bits of mantissa).
"""

from __future__ import annotations

import contextlib

#: accepted spellings -> the canonical name
_NAMES = {"32": "32", "32-true": "32", "fp32": "32", "float32": "32",
          "bf16": "bf16", "bf16-mixed": "bf16", "bfloat16": "bf16",
          "16": "16", "16-mixed": "16", "fp16": "16", "float16": "16", "auto": "auto"}
_DTYPES = {"bf16": "bfloat16", "16": "float16"}  # torch dtypes by name: torch is imported only when used


def bf16_supported(device="cpu") -> bool:
    """The device computes bfloat16 natively: AVX512-BF16 or AMX on a CPU, ``is_bf16_supported`` on CUDA."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def resolve_precision(precision: str | int | None, device="cpu") -> str:
    """The canonical precision for ``device``: ``32``, ``bf16`` or ``16`` (``auto`` decided here).

    Raises:
        ValueError: an unknown name, or ``16`` (float16) off CUDA, where autocast has no float16 kernels
            worth having.
    """
    name = _NAMES.get(str(precision if precision is not None else "32").strip().lower())
    if name is None:
        raise ValueError(f"precision must be 32, bf16, 16 or auto (or 32-true, bf16-mixed, 16-mixed), got "
                         f"{precision!r}")
    kind = str(device).split(":")[0]
    if name == "auto":
        return "bf16" if bf16_supported(device) else "32"
    if name == "16" and kind != "cuda":
        raise ValueError(f"precision=16 (float16) needs a CUDA device, not {device}; use bf16 on a CPU")
    return name


def lightning_precision(precision: str | int | None, accelerator: str = "cpu") -> str:
    """A trainer's ``precision`` with ``auto`` resolved: ``bf16-mixed`` where the accelerator supports
    bfloat16, else ``32-true`` (other values are passed on unchanged for Lightning to check)."""
    if str(precision).strip().lower() != "auto":
        return str(precision)
    device = "cuda" if str(accelerator) in ("gpu", "cuda") else "cpu"
    if str(accelerator) == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16-mixed" if bf16_supported(device) else "32-true"


def autocast(precision: str, device="cpu"):
    """A context that runs the block in ``precision`` (canonical, from :func:`resolve_precision`)."""
    dtype = _DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=str(device).split(":")[0], dtype=getattr(torch, dtype))


def training_attention(model, precision: str | int | None, device="cpu") -> list:
    """Choose how the attention layers of ``model`` (timm's, with a ``fused_attn`` switch) compute when trained
    in ``precision`` on ``device``; returns the layers switched to the explicit form (set their ``fused_attn``
    back to True to undo).

    On a CPU in bfloat16, PyTorch's fused scaled-dot-product attention has a slow backward (its flash-attention
    kernel's gradient runs several times slower than in float32, and slower than the rest of a small ViT's
    step together), while the explicit ``softmax(q k^T) v`` runs its two matmuls on the bf16 units and its
    softmax in float32 under autocast. Anywhere else (float32, GPUs) the fused kernel is kept. The choice is
    an attribute, not a weight: checkpoints are unchanged.
    """
    name = _NAMES.get(str(precision if precision is not None else "32").strip().lower())
    if name != "bf16" or str(device).split(":")[0] != "cpu":
        return []
    switched = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in switched:
        m.fused_attn = False
    return switched
