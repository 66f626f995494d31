"""Image encoder: any timm backbone by name, pooled features (or a kept projection head) out."""

from __future__ import annotations

import torch
from torch import nn

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
        trainable_blocks: train only the last N transformer blocks (and the final norm); None trains
            everything, 0 freezes the whole backbone.
        num_classes: 0 gives the pooled features; a width keeps the model's head of that width (CLIP's
            768-d image projection for ``vit_large_patch14_clip_*``), whose output is then the features.
        weights: load these weights after building (``pretrained`` is then not needed): a file, folder or hub
            name of CLIP image-tower weights in the Hugging Face, OpenAI or timm layout
            (:func:`geoloc.models.clip.load_clip_weights`).
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
        if weights is not None:  # found (or refused) before the model is built
            from geoloc.models.clip import load_clip_weights, locate_weights

            weights = locate_weights(weights)
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=int(num_classes), **timm_kwargs)
        if weights is not None:
            load_clip_weights(self.model, weights)
        self.num_features = int(num_classes) if num_classes else int(self.model.num_features)
        self.data_config = timm.data.resolve_model_data_config(self.model)
        if preprocess == "clip":
            self.data_config = dict(CLIP_DATA_CONFIG)
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if img_size is not None:  # a model built at another size than its pretrained config
            self.data_config["input_size"] = (3, *tuple(img_size))
        if trainable_blocks is not None:
            self.freeze_all_but(trainable_blocks)

    def freeze_all_but(self, n_blocks: int) -> None:
        """Freezes the backbone except its last ``n_blocks`` blocks and the final norm."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        blocks = getattr(self.model, "blocks", None) or getattr(self.model, "stages", None)
        if blocks is None:
            raise ValueError(f"{self.name}: no .blocks or .stages to unfreeze; use trainable_blocks=None")
        for block in list(blocks)[len(blocks) - n_blocks:] if n_blocks > 0 else []:
            for p in block.parameters():
                p.requires_grad_(True)
        if n_blocks > 0:
            for name in ("norm", "fc_norm", "head_norm"):
                mod = getattr(self.model, name, None)
                if isinstance(mod, nn.Module):
                    for p in mod.parameters():
                        p.requires_grad_(True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images ``[B, 3, H, W]`` normalized. Returns ``[B, num_features]``."""
        return self.model(images)
