"""The geolocator: a shared image embedding feeding a geocell classifier and a GPS-aligned projection."""

from __future__ import annotations

import torch
from torch import nn

from geoloc.models.image_encoder import ImageEncoder


class GeoLocator(nn.Module):
    """Image encoder + geocell head + projection into the location encoder's space.

    Args:
        image_encoder: the backbone (its ``num_features`` sizes the heads).
        location_encoder: GPS encoder (``out_features`` sizes the projection); trained jointly.
        num_cells: number of geocells (from the cells file, never typed in a config).
        dropout: before the cell head.
        evidence_heads: ``{head: number of classes}`` of evidence heads (:mod:`geoloc.evidence.labels`)
            on the same features; none by default.
    """

    def __init__(self, image_encoder: ImageEncoder, location_encoder: nn.Module, num_cells: int,
                 dropout: float = 0.0, evidence_heads: dict[str, int] | None = None):
        super().__init__()
        self.image_encoder = image_encoder
        self.location_encoder = location_encoder
        d = image_encoder.num_features
        self.cell_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d, num_cells))
        self.image_proj = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, location_encoder.out_features))
        self.num_cells = num_cells
        self.evidence = nn.ModuleDict({h: nn.Linear(d, int(k)) for h, k in (evidence_heads or {}).items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: images ``[B, 3, H, W]``.

        Returns:
            ``features [B, D]``, ``cell_logits [B, C]``, ``image_emb [B, E]`` (unnormalized) and, per
            evidence head, ``evidence/<head> [B, K]`` logits.
        """
        features = self.image_encoder(images)
        out = {"features": features, "cell_logits": self.cell_head(features), "image_emb": self.image_proj(features)}
        for head, layer in self.evidence.items():
            out[f"evidence/{head}"] = layer(features)
        return out

    def encode_gps(self, latlng: torch.Tensor) -> torch.Tensor:
        """Args: latlng ``[N, 2]`` degrees. Returns ``[N, E]``."""
        return self.location_encoder(latlng)
