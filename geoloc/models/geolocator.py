"""The geolocator: a shared image embedding feeding a geocell classifier and a GPS-aligned projection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
        cell_head: another cell head than the trained linear one (GeoCLIP's gallery mass per cell,
            :class:`geoloc.models.geoclip.GallerySumHead`).
        cell_input: what the cell head reads: ``features`` (the backbone's) or ``image_emb`` (the projection
            into the location encoder's space).
        text_decoder: the reasoning head that writes the chain from the same features
            (:class:`~geoloc.models.text_decoder.TextDecoder`); run by the training loss and by generation, not
            by :meth:`forward`.
    """

    def __init__(self, image_encoder: ImageEncoder, location_encoder: nn.Module, num_cells: int,
                 dropout: float = 0.0, evidence_heads: dict[str, int] | None = None, cell_head: nn.Module | None = None,
                 cell_input: str = "features", text_decoder: nn.Module | None = None):
        super().__init__()
        if cell_input not in ("features", "image_emb"):
            raise ValueError(f"cell_input must be 'features' or 'image_emb', got {cell_input!r}")
        self.image_encoder = image_encoder
        self.location_encoder = location_encoder
        d = image_encoder.num_features
        if cell_head is None:
            cell_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d, num_cells))
        self.cell_head = cell_head
        self.cell_input = cell_input
        self.image_proj = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, location_encoder.out_features))
        self.num_cells = num_cells
        self.evidence = nn.ModuleDict({h: nn.Linear(d, int(k)) for h, k in (evidence_heads or {}).items()})
        self.text_decoder = text_decoder

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: images ``[B, 3, H, W]``.

        Returns:
            ``features [B, D]``, ``cell_logits [B, C]``, ``image_emb [B, E]`` (unnormalized) and, per
            evidence head, ``evidence/<head> [B, K]`` logits.
        """
        return self.heads(self.image_encoder(images))

    def heads(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything after the backbone, on its features: what :meth:`forward` runs on the image encoder's
        output, and what training on cached features (:mod:`geoloc.data.features`) runs alone.

        Args: features ``[B, D]``. Returns: as :meth:`forward`.
        """
        image_emb = self.image_proj(features)
        out = {"features": features, "image_emb": image_emb,
               "cell_logits": self.cell_head(image_emb if self.cell_input == "image_emb" else features)}
        for head, layer in self.evidence.items():
            out[f"evidence/{head}"] = layer(features)
        return out

    def encode_gps(self, latlng: torch.Tensor) -> torch.Tensor:
        """Args: latlng ``[N, 2]`` degrees. Returns ``[N, E]``."""
        return self.location_encoder(latlng)


def build_geolocator(backbone: ImageEncoder, location_encoder: nn.Module, num_cells: int, dropout: float = 0.0,
                     evidence_heads: Mapping[str, float] | Sequence[str] | None = None,
                     image_proj: str | None = None, text_decoder: Mapping | None = None) -> GeoLocator:
    """The network a config describes (``model.net``), and what :func:`~geoloc.models.loading.load_checkpoint`
    rebuilds from a run's saved config.

    Args:
        backbone: the image encoder.
        location_encoder: the GPS encoder.
        num_cells: number of geocells: ``len(cells)`` of the cells file, given by train.py and by loading.
        dropout: before the cell head.
        evidence_heads: the evidence heads to add, by name (:data:`geoloc.evidence.labels.HEADS` sizes them):
            a list of names, or the loss weights ``{head: w}`` of ``model.evidence``, where a head with
            ``w > 0`` gets a head.
        image_proj: ``geoclip`` starts the projection into the location encoder's space from GeoCLIP's
            released image MLP (needs a backbone with CLIP's 768-d projection); None: random.
        text_decoder: the text decoder's settings (:func:`~geoloc.models.text_decoder.build_text_decoder`:
            ``width``, ``layers``, ``heads``, ``mlp_ratio``, ``dropout``, ``memory_tokens``); None: no decoder.

    Raises:
        ValueError: an unknown evidence head, or an unknown ``image_proj``.
    """
    sizes = {}
    if evidence_heads:
        from geoloc.evidence.labels import evidence_head_sizes

        if isinstance(evidence_heads, str):
            evidence_heads = [evidence_heads]
        weights = (dict(evidence_heads) if isinstance(evidence_heads, Mapping)
                   else dict.fromkeys(evidence_heads, 1.0))
        sizes = evidence_head_sizes(weights)
    from geoloc.models.text_decoder import build_text_decoder

    decoder = build_text_decoder(backbone.num_features, dict(text_decoder) if text_decoder else None)
    net = GeoLocator(backbone, location_encoder, num_cells=num_cells, dropout=dropout, evidence_heads=sizes,
                     text_decoder=decoder)
    if image_proj == "geoclip":
        from geoloc.models.geoclip import load_geoclip_image_mlp

        load_geoclip_image_mlp(net.image_proj)
    elif image_proj is not None:
        raise ValueError(f"image_proj must be null or 'geoclip', got {image_proj!r}")
    return net
