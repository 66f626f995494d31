"""Image encoder: any timm backbone by name, pooled features out."""

from __future__ import annotations

import torch
from torch import nn


class ImageEncoder(nn.Module):
    """A timm backbone without its classifier.

    Args:
        name: timm model name (``vit_small_patch16_224``, ``vit_large_patch14_clip_224.openai``, ...).
        pretrained: load timm's pretrained weights (needs them cached or downloadable).
        trainable_blocks: train only the last N transformer blocks (and the final norm); None trains
            everything, 0 freezes the whole backbone.
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``drop_path_rate``, ...).

    Attributes:
        num_features: width of the pooled features (sizes the heads).
        data_config: timm's preprocessing settings (input size, mean, std, interpolation).
    """

    def __init__(self, name: str, pretrained: bool = False, trainable_blocks: int | None = None, **timm_kwargs):
        super().__init__()
        import timm

        self.name = name
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
        self.num_features = int(self.model.num_features)
        self.data_config = timm.data.resolve_model_data_config(self.model)
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
