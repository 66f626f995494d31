"""Rebuilding a trained geolocator from a checkpoint written by ``train.py``.

A run folder holds ``config.yaml`` (written by train.py, resolved) and ``checkpoints/*.ckpt``. The
network is rebuilt from the run's backbone and location-encoder config (``pretrained=False``: the
weights come from the checkpoint) and sized by the run's cells file. Everything that turns a trained
model into answers (the predictor, the index builder, the exporter) starts here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from geoloc.cells import Geocells
from geoloc.models.geolocator import GeoLocator


@dataclass
class LoadedModel:
    """A trained geolocator and what came with it.

    Attributes:
        net: the network, in eval mode.
        cells: the geocells its head classifies into.
        cells_path: where they were read from.
        data_config: timm preprocessing (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``).
        run_config: the run's resolved config (plain dict).
        ckpt: the checkpoint path.
    """

    net: GeoLocator
    cells: Geocells
    cells_path: str
    data_config: dict
    run_config: dict
    ckpt: Path


def run_config_path(ckpt: str | Path) -> Path:
    """``RUN/config.yaml`` for ``RUN/checkpoints/x.ckpt``."""
    return Path(ckpt).parent.parent / "config.yaml"


def resolve_run_path(path: str | Path, run_dir: Path) -> Path:
    """A path from a run's config: as written (absolute, or relative to the current folder), else relative
    to a folder above the run (train.py records paths relative to where it was started, e.g. the repo
    root for ``outputs/demo/cells.parquet``), so a run can be used from any folder."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    for base in Path(run_dir).resolve().parents:
        if (base / path).exists():
            return base / path
    return path


def load_checkpoint(ckpt: str | Path, *, cells: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Rebuilds the network of a ``train.py`` run and loads a checkpoint's weights.

    Args:
        ckpt: ``RUN/checkpoints/*.ckpt``; ``RUN/config.yaml`` says how to rebuild the network.
        cells: the geocells file; None uses the one the run was trained with.
        device: where to put the network.

    Raises:
        FileNotFoundError: the checkpoint, the run config or the cells file is missing.
        ValueError: the cells file does not match the checkpoint's head.
    """
    import hydra
    import yaml

    ckpt = Path(ckpt)
    cfg_path = run_config_path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: the run's config (written by train.py) is needed to rebuild the "
                                "network")
    run = yaml.safe_load(cfg_path.read_text())
    cells_path = str(cells) if cells else str(resolve_run_path(run["cells"], cfg_path.parent))
    geocells = Geocells.load(cells_path)
    backbone = hydra.utils.instantiate({**run["backbone"], "pretrained": False})
    location_encoder = hydra.utils.instantiate(run["model"]["location_encoder"])
    from geoloc.evidence.labels import evidence_head_sizes

    heads = evidence_head_sizes(run["model"].get("evidence"))
    net = GeoLocator(backbone, location_encoder, num_cells=len(geocells), dropout=0.0, evidence_heads=heads)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    net_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    head = net_state.get("cell_head.1.weight")
    if head is not None and head.shape[0] != len(geocells):
        raise ValueError(f"{cells_path}: {len(geocells)} cells, but {ckpt} classifies into {head.shape[0]}")
    net.load_state_dict(net_state)
    net.eval().to(device)
    return LoadedModel(net, geocells, cells_path, dict(backbone.data_config), run, ckpt)
