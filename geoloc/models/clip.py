"""CLIP image-tower weights from any of the formats they are shared in, as timm's ViT state dict.

GeoCLIP fine-tunes on top of OpenAI's CLIP ViT-L/14 (``openai/clip-vit-large-patch14`` on the Hugging Face
hub, read by ``transformers``); timm ships the same weights as ``vit_large_patch14_clip_224.openai`` (in
OpenAI's own layout, ``visual.*``). :func:`load_clip_weights` takes a local copy of either and gives the
state dict of timm's ``vit_large_patch14_clip_quickgelu_224`` (OpenAI's CLIP uses QuickGELU; timm's
``vit_large_patch14_clip_224`` uses GELU and is *not* the original network) with the 768-d image
projection as its ``head``:

* a Hugging Face ``CLIPModel`` or ``CLIPVisionModelWithProjection`` state dict (``vision_model.*``,
  ``visual_projection.weight``): converted by :func:`hf_clip_vision_to_timm`;
* OpenAI / open_clip layout (``visual.*``, what timm's hub file holds): converted by timm's own filter;
* timm's layout (``cls_token``, ``blocks.*``): as it is.

A path may be a file (``.safetensors``, or ``.bin``/``.pt``/``.pth`` read with ``torch.load(weights_only=True)``)
or a folder holding ``model.safetensors`` / ``pytorch_model.bin`` / ``open_clip_pytorch_model.bin`` (a
downloaded hub snapshot). A hub name (``openai/clip-vit-large-patch14``, ``timm/vit_large_patch14_clip_224.openai``)
is fetched with ``huggingface_hub`` where there is a network; where there is none the error says exactly
what to download and where to put it, and nothing waits on a connection (``HF_HUB_OFFLINE=1`` is honoured).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

#: timm architecture of OpenAI's CLIP ViT-L/14 image tower (QuickGELU, 768-d projection as ``head``).
CLIP_L14_TIMM = "vit_large_patch14_clip_quickgelu_224"
#: Where the weights GeoCLIP uses can be downloaded, for the error message.
DOWNLOAD_HELP = (
    "CLIP ViT-L/14 weights are needed. On a machine with internet, download one of\n"
    "  - https://huggingface.co/openai/clip-vit-large-patch14 (model.safetensors or pytorch_model.bin: the copy "
    "GeoCLIP uses), or\n"
    "  - https://huggingface.co/timm/vit_large_patch14_clip_224.openai (open_clip_pytorch_model.bin or "
    "model.safetensors)\n"
    "put the file (or the whole downloaded folder) on this machine and pass its path: "
    "clip_weights=/path/to/model.safetensors (geoloc-predict --clip-weights PATH)")
_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def hf_clip_vision_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP vision tower (``CLIPModel`` or ``CLIPVisionModelWithProjection``) in timm's layout.

    Args:
        state: the Hugging Face state dict (text tower keys, if any, are ignored).

    Returns:
        timm ``VisionTransformer`` keys: ``cls_token (1, 1, D)``, ``pos_embed (1, T, D)``,
        ``patch_embed.proj.weight``, ``norm_pre``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
        mlp.fc2}``, ``norm``, and ``head.weight (P, D)`` / ``head.bias`` (zeros: CLIP's projection has none).

    Raises:
        ValueError: no CLIP vision tower in ``state``.
    """
    prefix = "vision_model."
    if not any(k.startswith(prefix) for k in state):
        raise ValueError("not a Hugging Face CLIP state dict: no vision_model.* keys")
    v = {k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)}
    out = {
        "cls_token": v["embeddings.class_embedding"].reshape(1, 1, -1),
        "pos_embed": v["embeddings.position_embedding.weight"].unsqueeze(0),
        "patch_embed.proj.weight": v["embeddings.patch_embedding.weight"],
        "norm_pre.weight": v["pre_layrnorm.weight"], "norm_pre.bias": v["pre_layrnorm.bias"],
        "norm.weight": v["post_layernorm.weight"], "norm.bias": v["post_layernorm.bias"],
    }
    n_layers = 1 + max(int(k.split(".")[2]) for k in v if k.startswith("encoder.layers."))
    for i in range(n_layers):
        a, b = f"encoder.layers.{i}.", f"blocks.{i}."
        q, k_, val = (v[f"{a}self_attn.{n}_proj.weight"] for n in ("q", "k", "v"))
        out[b + "attn.qkv.weight"] = torch.cat([q, k_, val], 0)
        out[b + "attn.qkv.bias"] = torch.cat([v[f"{a}self_attn.{n}_proj.bias"] for n in ("q", "k", "v")], 0)
        out[b + "attn.proj.weight"], out[b + "attn.proj.bias"] = (v[f"{a}self_attn.out_proj.weight"],
                                                                  v[f"{a}self_attn.out_proj.bias"])
        for hf, tm in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                       ("mlp.fc2", "mlp.fc2")):
            out[f"{b}{tm}.weight"], out[f"{b}{tm}.bias"] = v[f"{a}{hf}.weight"], v[f"{a}{hf}.bias"]
    proj = state.get("visual_projection.weight")
    if proj is not None:
        out["head.weight"] = proj
        out["head.bias"] = torch.zeros(proj.shape[0], dtype=proj.dtype)
    return out


def to_timm_layout(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Any supported CLIP layout (see the module docstring) as ``model``'s (a timm ``VisionTransformer``)."""
    if any(k.startswith("vision_model.") for k in state):
        return hf_clip_vision_to_timm(state)
    if any(k.startswith("visual.") for k in state):
        from timm.models.vision_transformer import checkpoint_filter_fn

        return checkpoint_filter_fn(state, model)
    if "cls_token" in state and any(k.startswith("blocks.") for k in state):
        return dict(state)
    raise ValueError(f"not CLIP image-tower weights in a known layout (keys start {sorted(state)[:3]}); expected "
                     "Hugging Face (vision_model.*), OpenAI/open_clip (visual.*) or timm (cls_token, blocks.*)")


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file (read as data, ``weights_only``),
    unwrapped from a checkpoint's ``state_dict`` / ``model`` key.

    Raises:
        ValueError: the file cannot be read as weights or holds no state dict.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch and safetensors raise many kinds on foreign files
        raise ValueError(f"{path}: cannot be read as weights ({type(e).__name__}: {str(e)[:200]})") from e
    for key in ("state_dict", "model"):  # checkpoints that wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds no state dict")
    return state


def _from_hub(name: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise FileNotFoundError(f"{name}: not a local file or folder, and HF_HUB_OFFLINE is set.\n{DOWNLOAD_HELP}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:  # a quick look before huggingface_hub, which retries a missing network for minutes
        import socket

        socket.create_connection((host, int(port or 443)), timeout=3).close()
    except OSError as e:
        raise FileNotFoundError(f"{name}: not a local file or folder, and {host} cannot be reached from this machine "
                                f"({type(e).__name__}).\n{DOWNLOAD_HELP}") from e
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise FileNotFoundError(f"{name}: not a local file or folder (huggingface_hub is not installed to fetch "
                                f"it).\n{DOWNLOAD_HELP}") from e
    errors = []
    for file in _FILES:
        try:
            return Path(hf_hub_download(name, file, etag_timeout=5))
        except Exception as e:  # noqa: BLE001 - no network, no such repo or no such file: try the next name
            errors.append(f"{file}: {type(e).__name__}")
            if "EntryNotFound" not in type(e).__name__ and "404" not in str(e):
                break  # no network or no such repository: the other files will not come either
    raise FileNotFoundError(f"{name}: could not be fetched from the Hugging Face hub ({'; '.join(errors)}).\n"
                            f"{DOWNLOAD_HELP}")


def locate_weights(spec: str | Path) -> Path:
    """A weights file for ``spec``: a file, a folder holding one of the usual file names, or a hub name."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        for name in _FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: a folder without {' or '.join(_FILES)}.\n{DOWNLOAD_HELP}")
    if str(spec).count("/") == 1 and not str(spec).startswith((".", "/", "~")):
        return _from_hub(str(spec))
    raise FileNotFoundError(f"{spec}: no such file or folder.\n{DOWNLOAD_HELP}")


def load_clip_weights(model, spec: str | Path) -> None:
    """Loads CLIP image-tower weights from ``spec`` (file, folder or hub name) into a timm ViT, strictly.

    Raises:
        FileNotFoundError: nothing at ``spec`` (the message says what to download and where to put it).
        ValueError: an unreadable file, an unknown layout, or weights of another shape.
    """
    path = locate_weights(spec)
    state = to_timm_layout(read_weights_file(path), model)
    if "head.weight" not in state and getattr(model, "num_classes", 0):
        raise ValueError(f"{path}: has no image projection (visual_projection / proj), which the model keeps")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: does not fit {type(model).__name__} ({str(e).splitlines()[0][:300]})") from e
