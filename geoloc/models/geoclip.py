"""GeoCLIP's released model, whole, as a geoloc network.

GeoCLIP (Vivanco Cepeda et al., NeurIPS 2023) is CLIP ViT-L/14's image tower with its 768-d projection,
followed by a small MLP (Linear 768->768, ReLU, Linear 768->512) into the space of its GPS encoder, and a
logit scale; it answers the best of a gallery of 100K MP-16 coordinates under
``softmax(exp(logit_scale) * cos(image, gps))``. In geoloc terms that is a
:class:`~geoloc.models.geolocator.GeoLocator` whose

* image encoder is timm's ``vit_large_patch14_clip_quickgelu_224`` keeping the projection
  (``num_classes=768``), with CLIP weights from any format (:mod:`geoloc.models.clip`) and Hugging Face's
  CLIP preprocessing (``preprocess="clip"``),
* ``image_proj`` is GeoCLIP's MLP and the location encoder GeoCLIP's (both from the installed ``geoclip``
  wheel, read with ``weights_only=True`` and without importing ``geoclip``),
* cell head is :class:`GallerySumHead`: the gallery's softmax mass summed per geocell, so every cell-level
  feature of geoloc (top cells, Recall-vs-Area, calibration, admin-1 accuracy, refinement, the reasoning
  chain, export) works for GeoCLIP as for a trained geoloc model.

The gallery's embeddings are computed once by GeoCLIP's location encoder and cached
(``$GEOLOC_CACHE/geoclip/gallery_v1.npz``, with the encoder's fingerprint). The default cells are those built
from the same 100K coordinates (``geocells/data/mp16_gallery_cells_v1.parquet``).

Without CLIP weights on the machine the error says what to download; ``random_clip=True`` builds the
architecture with random weights, which is only for tests and benchmarks of the code path: its answers
are not GeoCLIP's and say nothing about accuracy.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geoloc.models.clip import CLIP_L14_TIMM
from geoloc.models.image_encoder import ImageEncoder

#: GeoCLIP's MLP output and the width of its location encoder.
GEOCLIP_EMBED_DIM = 512
#: CLIP ViT-L/14's image projection, what GeoCLIP's MLP takes.
CLIP_PROJECTION_DIM = 768
DEFAULT_CELLS = Path(__file__).resolve().parents[2] / "geocells" / "data" / "mp16_gallery_cells_v1.parquet"


def geoclip_weights_file(name: str) -> Path:
    """A file of the installed geoclip wheel's ``model/weights/`` folder (found, not imported)."""
    from geoloc.data.packages import package_path

    return package_path("geoclip", "model", "weights", name, purpose="GeoCLIP's released weights")


def load_geoclip_image_mlp(mlp: nn.Module) -> nn.Module:
    """Loads GeoCLIP's image MLP (``image_encoder_mlp_weights.pth``) into ``Sequential(Linear, ReLU, Linear)``."""
    state = torch.load(geoclip_weights_file("image_encoder_mlp_weights.pth"), map_location="cpu", weights_only=True)
    mlp.load_state_dict(state)
    return mlp


def geoclip_logit_scale() -> float:
    """GeoCLIP's learned logit scale (its log): probabilities are ``softmax(exp(scale) * cosine)``."""
    return float(torch.load(geoclip_weights_file("logit_scale_weights.pth"), map_location="cpu", weights_only=True))


def geoclip_temperature() -> float:
    """``T = 1 / exp(logit_scale)``: GeoCLIP's gallery softmax as geoloc's ``softmax(cosine / T)``."""
    return 1.0 / math.exp(geoclip_logit_scale())


class GallerySumHead(nn.Module):
    """Cell log-probabilities from a GPS gallery: ``log sum_{g in cell} softmax_g(scale * cos(emb, gallery_g))``.

    The softmax over the gallery is GeoCLIP's; summing its mass per geocell gives a distribution over cells
    (cells without a gallery point get ``log 1e-30``). Its outputs are log-probabilities, so
    ``softmax(cell_logits)`` is exactly that distribution.

    Args:
        gallery_emb: ``(N, E)`` the gallery's location embeddings (normalized here).
        gallery_cell: ``(N,)`` each gallery point's cell.
        num_cells: C.
        logit_scale: GeoCLIP's logit scale (its log).
    """

    def __init__(self, gallery_emb: torch.Tensor, gallery_cell: torch.Tensor, num_cells: int, logit_scale: float):
        super().__init__()
        self.register_buffer("gallery_emb", F.normalize(torch.as_tensor(gallery_emb, dtype=torch.float32), dim=-1))
        self.register_buffer("gallery_cell", torch.as_tensor(gallery_cell, dtype=torch.long))
        self.num_cells = int(num_cells)
        self.scale = float(math.exp(logit_scale))
        self.out_features = self.num_cells

    def forward(self, image_emb: torch.Tensor) -> torch.Tensor:
        """Args: ``image_emb [B, E]`` (unnormalized). Returns ``[B, C]`` log-probabilities."""
        logits = self.scale * F.normalize(image_emb.float(), dim=-1) @ self.gallery_emb.t()  # (B, N)
        p = logits.softmax(dim=-1)
        cell_p = torch.zeros(p.shape[0], self.num_cells, dtype=p.dtype, device=p.device)
        cell_p = cell_p.index_add(1, self.gallery_cell, p)
        return torch.log(cell_p.clamp_min(1e-30))


def clip_image_encoder(clip_weights: str | Path | None = None, *, random_clip: bool = False,
                       trainable_blocks: int | None = 0, **timm_kwargs) -> ImageEncoder:
    """CLIP ViT-L/14's image tower with its 768-d projection, preprocessing as Hugging Face's CLIP processor.

    Args:
        clip_weights: a file, folder or hub name of the CLIP weights (:func:`geoloc.models.clip.load_clip_weights`).
        random_clip: build it with random weights (tests and benchmarks of the code path only).
        trainable_blocks: blocks left trainable (0: frozen, as GeoCLIP trains it; None: all).
        **timm_kwargs: architecture overrides (``embed_dim``, ``depth``, ... for a small test tower).

    Raises:
        FileNotFoundError: no weights given or reachable (the message says what to download and where).
    """
    if clip_weights is None and not random_clip:
        from geoloc.models.clip import DOWNLOAD_HELP

        raise FileNotFoundError(f"GeoCLIP's image tower has no weights: no clip_weights given.\n{DOWNLOAD_HELP}")
    return ImageEncoder(CLIP_L14_TIMM, num_classes=CLIP_PROJECTION_DIM, weights=None if random_clip else clip_weights,
                        preprocess="clip", trainable_blocks=trainable_blocks, **timm_kwargs)


def default_gallery_cache() -> Path:
    return Path(os.environ.get("GEOLOC_CACHE", Path.home() / ".cache" / "geoloc")) / "geoclip" / "gallery_v1.npz"


def geoclip_gallery(location_encoder: nn.Module, latlng: np.ndarray | None = None, *, cache: str | Path | None = None):
    """The GPS gallery embedded by GeoCLIP's location encoder, from the cache when it holds these weights.

    Args:
        location_encoder: GeoCLIP's location encoder (its fingerprint keys the cache).
        latlng: the gallery's coordinates; None: the 100K MP-16 coordinates of the geoclip wheel.
        cache: where to keep it; None: :func:`default_gallery_cache` for the default gallery, no cache for
            another one.

    Returns:
        :class:`~geoloc.retrieval.gallery.GPSGallery`.
    """
    from geoloc.retrieval.gallery import GPSGallery, encoder_fingerprint

    default = latlng is None
    if default:
        from geoloc.data.geography import mp16_gallery_latlng

        latlng = mp16_gallery_latlng()
    path = Path(cache) if cache is not None else (default_gallery_cache() if default else None)
    if path is not None and path.is_file():
        try:
            g = GPSGallery.load(path, encoder=location_encoder)
            if len(g) == len(latlng) and encoder_fingerprint(location_encoder) == g.fingerprint:
                return g
        except ValueError as e:  # a cache of geoloc's own, in the user's cache folder: rebuilt
            warnings.warn(f"{e}: rebuilding it", stacklevel=2)
    g = GPSGallery.build(location_encoder, latlng, settings={"source": "mp16_gallery" if default else "given"})
    if path is not None:
        g.save(path)
    return g


def build_geoclip(clip_weights: str | Path | None = None, *, cells: str | Path | None = None, random_clip: bool = False,
                  gallery_latlng: np.ndarray | None = None, gallery_cache: str | Path | None = None,
                  device: str = "cpu", clip_kwargs: dict | None = None):
    """GeoCLIP's released model as a loaded geoloc model (:class:`~geoloc.models.loading.LoadedModel`).

    Args:
        clip_weights: CLIP ViT-L/14 weights (file, folder or hub name); see :func:`clip_image_encoder`.
        cells: the geocells the gallery mass is summed over; None: :data:`DEFAULT_CELLS`.
        random_clip: random CLIP weights (tests and benchmarks of the code path only, never accuracy).
        gallery_latlng: another gallery (default: GeoCLIP's 100K MP-16 coordinates).
        gallery_cache: where the gallery's embeddings are cached (see :func:`geoclip_gallery`).
        device: where to put the network.
        clip_kwargs: architecture overrides for a small random tower in tests.

    Returns:
        ``LoadedModel`` whose ``net`` answers like GeoCLIP and ranks cells by gallery mass; ``ckpt`` is
        ``"geoclip"``; ``gallery`` (an extra attribute) holds the embedded gallery for the predictor.
    """
    from geoloc.geo.cells import Geocells
    from geoloc.models.geolocator import GeoLocator
    from geoloc.models.loading import LoadedModel, resolve_device
    from geoloc.models.location_encoder import LocationEncoder

    dev = resolve_device(device)
    cells_path = Path(cells) if cells else DEFAULT_CELLS
    geocells = Geocells.load(cells_path)
    backbone = clip_image_encoder(clip_weights, random_clip=random_clip, **(clip_kwargs or {}))
    location_encoder = LocationEncoder.from_geoclip().eval()
    gallery = geoclip_gallery(location_encoder, gallery_latlng, cache=gallery_cache)
    head = GallerySumHead(torch.from_numpy(gallery.embeddings), torch.from_numpy(geocells.assign(gallery.latlng)),
                          len(geocells), geoclip_logit_scale())
    net = GeoLocator(backbone, location_encoder, num_cells=len(geocells), cell_head=head, cell_input="image_emb")
    load_geoclip_image_mlp(net.image_proj)
    net.eval().to(dev)
    model = LoadedModel(net, geocells, str(cells_path), dict(backbone.data_config),
                        {"model": "geoclip", "clip_weights": None if random_clip else str(clip_weights),
                         "random_clip": bool(random_clip)}, Path("geoclip"))
    model.gallery = gallery
    return model
