"""GeoCLIP-style GPS encoder: Equal Earth projection -> random Fourier features -> one MLP per scale.

Our own implementation of the location encoder of GeoCLIP (Vivanco Cepeda et al., NeurIPS 2023),
numerically equal to it so that its released weights load (:func:`load_geoclip_weights`):

    latlng [N, 2] degrees
      -> equal_earth             [N, 2]         x in [-1, 1], y in about [-0.49, 0.49]
      -> for each sigma:
           RandomFourierFeatures [N, 2F]        fixed B ~ N(0, sigma^2), F = n_frequencies
           MLP                   [N, hidden]    depth x (Linear + ReLU)
           head                  [N, dim]       Linear
      -> sum over scales         [N, dim]

A small sigma gives smooth, continent-scale features; a large one resolves cities.

Nothing is read at import or construction: the released weights are read only by
:func:`load_geoclip_weights` / :meth:`LocationEncoder.from_geoclip`, from the files of the installed
``geoclip`` package, which is located but never imported (its ``__init__`` imports ``transformers``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "GEOCLIP_CONFIG",
    "LocationCapsule",
    "LocationEncoder",
    "RandomFourierFeatures",
    "equal_earth",
    "geoclip_key_map",
    "geoclip_weights_path",
    "load_geoclip_weights",
]

# Equal Earth polynomial coefficients (Šavrič, Patterson & Jenny 2018).
A1, A2, A3, A4 = 1.340264, -0.081106, 0.000893, 0.003796
# GeoCLIP's scale: with it, x spans exactly [-1, 1] along the equator after the division by 180.
SF = 66.50336

# The architecture of GeoCLIP's released location encoder (location_encoder_weights.pth).
GEOCLIP_CONFIG = {"sigmas": (2**0, 2**4, 2**8), "n_frequencies": 256, "hidden": 1024, "depth": 3, "dim": 512}


def equal_earth(latlng: Tensor) -> Tensor:
    """Equal Earth projection, scaled as GeoCLIP scales it (``* SF / 180``).

    Args:
        latlng: ``[N, 2]`` degrees, ``[lat, lng]``, lat in [-90, 90], lng in [-180, 180]
            (longitudes are not wrapped: GeoCLIP does not wrap them either).

    Returns:
        ``[N, 2]`` projected ``[x, y]``, same dtype: x in [-1, 1], y in about [-0.487, 0.487].
    """
    lat = torch.deg2rad(latlng[:, 0])  # [N]
    lng = torch.deg2rad(latlng[:, 1])  # [N]
    # GeoCLIP's operations in GeoCLIP's order, not a tidier Horner form: its sigma=256 capsule multiplies
    # the projection by up to ~2 pi * 1000 inside sin/cos, so a single float32 rounding difference here
    # moves the embeddings by up to ~3e-5 (measured); in this order they match GeoCLIP's bit for bit.
    sqrt3 = math.sqrt(3.0)
    theta = torch.asin(sqrt3 / 2 * torch.sin(lat))  # parametric latitude
    # x divides by dy/dtheta, which is what makes the projection equal-area.
    dy_dtheta = 9 * A4 * theta**8 + 7 * A3 * theta**6 + 3 * A2 * theta**2 + A1
    x = 2 * sqrt3 * lng * torch.cos(theta) / (3 * dy_dtheta)
    y = A4 * theta**9 + A3 * theta**7 + A2 * theta**3 + A1 * theta
    return torch.stack((x, y), dim=1) * SF / 180  # [N, 2]


class RandomFourierFeatures(nn.Module):
    """Gaussian random Fourier features (Tancik et al. 2020): ``[cos(2 pi v B^T), sin(2 pi v B^T)]``.

    ``B`` is fixed: a buffer named ``b`` of shape ``[n_frequencies, in_features]`` (GeoCLIP's name and
    layout), saved in the state dict and moved by ``.to()``, but not a parameter, so no optimizer sees it.

    Args:
        sigma: standard deviation of the entries of ``B``; larger sigma, finer detail.
        in_features: width of the input.
        n_frequencies: rows of ``B``; the output has twice as many features.
        generator: random source for ``B`` (None: torch's global generator).
    """

    b: Tensor

    def __init__(self, sigma: float, in_features: int = 2, n_frequencies: int = 256,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.sigma = float(sigma)
        self.in_features = in_features
        self.out_features = 2 * n_frequencies
        self.register_buffer("b", torch.randn(n_frequencies, in_features, generator=generator) * self.sigma)

    def forward(self, v: Tensor) -> Tensor:
        """Args: v ``[N, in_features]``. Returns ``[N, 2 * n_frequencies]``: all cosines, then all sines."""
        vp = (2 * math.pi * v) @ self.b.T  # [N, F]; the same operation order as GeoCLIP
        return torch.cat((torch.cos(vp), torch.sin(vp)), dim=-1)  # [N, 2F]

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:g}, in_features={self.in_features}, n_frequencies={self.b.shape[0]}"


class LocationCapsule(nn.Module):
    """One scale of the encoder: Fourier features, ``depth`` x (Linear + ReLU), then a linear head.

    Args:
        sigma: scale of the Fourier features.
        n_frequencies: Fourier frequencies (the MLP input is twice this).
        hidden: width of the MLP.
        depth: number of Linear + ReLU layers (at least 1).
        dim: output width.
        generator: random source for ``B`` and the initial weights (None: torch's global generator).
    """

    def __init__(self, sigma: float, n_frequencies: int, hidden: int, depth: int, dim: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.rff = RandomFourierFeatures(sigma, in_features=2, n_frequencies=n_frequencies, generator=generator)
        layers: list[nn.Module] = []
        width = self.rff.out_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.mlp = nn.Sequential(*layers)  # Linear at even indices, ReLU at odd ones
        self.head = nn.Linear(hidden, dim)
        if generator is not None:
            for layer in (*self.mlp[::2], self.head):
                _reset_linear_(layer, generator)

    def forward(self, xy: Tensor) -> Tensor:
        """Args: xy ``[N, 2]`` projected coordinates. Returns ``[N, dim]``."""
        return self.head(self.mlp(self.rff(xy)))


def _reset_linear_(layer: nn.Linear, generator: torch.Generator) -> None:
    """``nn.Linear``'s default initialization, drawn from ``generator``."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(layer.in_features)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


class LocationEncoder(nn.Module):
    """GPS encoder: Equal Earth projection, then one :class:`LocationCapsule` per scale, outputs summed.

    The defaults are GeoCLIP's architecture; :meth:`from_geoclip` builds it with GeoCLIP's weights.

    Args:
        sigmas: one Fourier-feature scale per capsule.
        n_frequencies: Fourier frequencies per capsule.
        hidden: MLP width.
        depth: Linear + ReLU layers per capsule before the head.
        dim: embedding width (``out_features``).
        seed: seeds all of the initialization (every ``B`` and every weight), so the same seed builds the
            same encoder whatever the state of torch's global generator.

    Attributes:
        out_features: embedding width, ``dim``.
    """

    def __init__(self, sigmas: Sequence[float] = (2**0, 2**4, 2**8), n_frequencies: int = 256,
                 hidden: int = 1024, depth: int = 3, dim: int = 512, seed: int = 0):
        super().__init__()
        if len(sigmas) == 0:
            raise ValueError("sigmas must hold at least one scale")
        self.sigmas = tuple(float(s) for s in sigmas)
        self.depth = depth
        self.out_features = dim
        generator = torch.Generator().manual_seed(seed)
        self.capsules = nn.ModuleList(
            LocationCapsule(s, n_frequencies, hidden, depth, dim, generator=generator) for s in self.sigmas
        )

    def forward(self, latlng: Tensor) -> Tensor:
        """Embeds coordinates.

        Args:
            latlng: ``[N, 2]`` degrees, ``[lat, lng]``, lng in [-180, 180].

        Returns:
            ``[N, dim]`` embeddings (not normalized), in the dtype of the weights.
        """
        if latlng.ndim != 2 or latlng.shape[1] != 2:
            raise ValueError(f"latlng must have shape (N, 2) [lat, lng] in degrees, got {tuple(latlng.shape)}")
        dtype = self.capsules[0].head.weight.dtype
        # Project in at least the weights' precision (float64 coordinates stay float64 until here).
        xy = equal_earth(latlng.to(torch.promote_types(latlng.dtype, dtype))).to(dtype)  # [N, 2]
        out = self.capsules[0](xy)  # [N, dim]
        for capsule in self.capsules[1:]:
            out = out + capsule(xy)
        return out

    @classmethod
    def from_geoclip(cls, path: str | Path | None = None) -> LocationEncoder:
        """GeoCLIP's architecture with its released weights: what ``model/location_encoder=geoclip`` trains from.

        A run trained from it is rebuilt with the plain architecture (``LocationEncoder(**GEOCLIP_CONFIG)``):
        its checkpoint holds the weights, and loading it never reads this file.

        Args:
            path: a GeoCLIP location-encoder state dict; None: the one shipped in the ``geoclip`` package.

        Raises:
            ModuleNotFoundError: ``path`` is None and ``geoclip`` is not installed.
        """
        return load_geoclip_weights(cls(**GEOCLIP_CONFIG), path)


def geoclip_key_map(encoder: LocationEncoder) -> dict[str, str]:
    """Maps each key of a GeoCLIP location-encoder state dict to ours, for ``encoder``'s shape.

    GeoCLIP's capsule ``i`` is ``LocEnc{i}``, with ``capsule = Sequential(rff, Linear, ReLU, Linear, ...)``
    and ``head = Sequential(Linear)``; ours is ``capsules.{i}`` with ``rff``, ``mlp`` (the Linear/ReLU
    pairs) and ``head``. For GeoCLIP's three capsules of depth 3 this gives 27 keys, e.g.::

        LocEnc0.capsule.0.b       -> capsules.0.rff.b
        LocEnc0.capsule.1.weight  -> capsules.0.mlp.0.weight
        LocEnc0.capsule.3.bias    -> capsules.0.mlp.2.bias
        LocEnc0.head.0.weight     -> capsules.0.head.weight

    Returns:
        ``{geoclip_key: our_key}``.
    """
    key_map: dict[str, str] = {}
    for i in range(len(encoder.capsules)):
        key_map[f"LocEnc{i}.capsule.0.b"] = f"capsules.{i}.rff.b"
        for j in range(encoder.depth):
            for p in ("weight", "bias"):
                # GeoCLIP's Sequential starts with the Fourier features, shifting every index by one.
                key_map[f"LocEnc{i}.capsule.{2 * j + 1}.{p}"] = f"capsules.{i}.mlp.{2 * j}.{p}"
        for p in ("weight", "bias"):
            key_map[f"LocEnc{i}.head.0.{p}"] = f"capsules.{i}.head.{p}"
    return key_map


def geoclip_weights_path() -> Path:
    """Path of ``location_encoder_weights.pth`` in the installed ``geoclip`` package (not imported).

    Raises:
        ModuleNotFoundError: ``geoclip`` is not installed.
        FileNotFoundError: it is installed but lacks the file.
    """
    from geoloc.data.packages import package_path

    return package_path("geoclip", "model", "weights", "location_encoder_weights.pth",
                        purpose="GeoCLIP's location-encoder weights (or pass path= to a .pth file)")


def load_geoclip_weights(encoder: LocationEncoder, path: str | Path | None = None) -> LocationEncoder:
    """Loads a GeoCLIP location-encoder state dict into ``encoder``, strictly, through :func:`geoclip_key_map`.

    Args:
        encoder: built with GeoCLIP's architecture (:data:`GEOCLIP_CONFIG`).
        path: GeoCLIP state dict; None: the one shipped in the ``geoclip`` package.

    Returns:
        ``encoder``, loaded in place.

    Raises:
        ModuleNotFoundError: ``path`` is None and ``geoclip`` is not installed.
        ValueError: the file's keys or shapes do not fit ``encoder`` (every missing key, unexpected key and
            shape mismatch is listed, with the file's name).
    """
    path = Path(path) if path is not None else geoclip_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    key_map = geoclip_key_map(encoder)
    ours = encoder.state_dict()
    problems = [f"missing key {k!r} (for {v})" for k, v in key_map.items() if k not in state]
    problems += [f"unexpected key {k!r}" for k in state if k not in key_map]
    problems += [
        f"shape of {k!r} is {tuple(state[k].shape)}, expected {tuple(ours[v].shape)} (for {v})"
        for k, v in key_map.items()
        if k in state and state[k].shape != ours[v].shape
    ]
    if problems:
        raise ValueError(
            f"{path} does not fit this LocationEncoder (sigmas={encoder.sigmas}, depth={encoder.depth}, "
            f"out_features={encoder.out_features}; GeoCLIP's is {GEOCLIP_CONFIG}):\n  " + "\n  ".join(problems)
        )
    encoder.load_state_dict({v: state[k] for k, v in key_map.items()}, strict=True)
    return encoder
