"""Head training on cached features against training on photos through the frozen backbone.

    .venv/bin/python bench/bench_heads.py [--steps 20] [--batch 64]

The network of ``experiment=im2gps3k_features backbone=efficientnet_lite2`` (frozen EfficientNet-Lite2, 260 px;
geocell head, GPS projection, 10 evidence heads), trained by ``pl.Trainer`` on the same batch in two ways:

* on photos: the frozen backbone's forward pass, then the heads (what ``features.enabled=false`` runs);
* on cached features: the heads alone (``features.enabled=true``), with and without the contrastive GPS
  loss (its queue of GPS negatives is re-encoded by the location encoder every step);

plus the rate at which :class:`geoloc.data.features.FeatureCache` embeds photos (decode, resize, backbone), the
one-off cost per backbone and dataset. Photos per second, and their ratios measured in the same run. Uses the
embedded sample for cells and coordinates. Writes bench/results/heads.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_train import _lightning_step_s, sample_cells  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    import hydra

    from geoloc.data.features import FeatureCache
    from geoloc.data.readers import read_sample
    from geoloc.evidence.labels import HEADS
    from geoloc.geo.cells import Geocells

    tmp = Path(tempfile.mkdtemp(prefix="bench_heads."))
    train_ds, cells_path = sample_cells(tmp)
    cells = Geocells.load(cells_path)
    evidence = "++model.evidence={" + ", ".join(f"{h}: 0.1" for h in HEADS) + "}"
    b = args.batch

    def build(*overrides):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[
                "experiment=im2gps3k_features", "backbone=efficientnet_lite2", "cells=x", "data.root=x",
                "model/location_encoder=geoclip", evidence, *overrides])
        net = hydra.utils.instantiate(cfg.model.net, num_cells=len(cells))
        return hydra.utils.instantiate(cfg.model.module, model=net, cells=cells)

    module = build()
    encoder = module.model.image_encoder
    size = encoder.data_config["input_size"][-1]
    latlng = torch.tensor(train_ds.latlng[:b], dtype=torch.float32)
    labels = {f"evidence/{h}": torch.zeros(b, dtype=torch.long) for h in HEADS}
    common = {"latlng": latlng, "cell": torch.from_numpy(cells.assign(train_ds.latlng[:b])), **labels}
    images = torch.randn(b, 3, size, size)
    with torch.no_grad():
        features = encoder.eval()(images)

    photos_s = _lightning_step_s(module, {"image": images, **common}, args.steps, "32-true")
    features_s = _lightning_step_s(build(), {"features": features, **common}, args.steps, "32-true")
    no_gps_s = _lightning_step_s(build("model.module.loss_weights.gps=0"), {"features": features, **common},
                                 args.steps * 5, "32-true")

    sample = read_sample(split="train", n_images=256)
    t = time.perf_counter()
    cache = FeatureCache.build(sample, encoder, batch_size=b)
    embed_ips = len(cache) / (time.perf_counter() - t)

    res = {
        "machine": {"cores": os.cpu_count(), "arch": platform.machine(), "threads": torch.get_num_threads()},
        "model": {"backbone": encoder.name, "img_size": size, "batch": b, "n_cells": len(cells),
                  "trainable_params_m": round(sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6, 2),
                  "evidence_heads": len(HEADS)},
        "train_photos_per_s": {"photos_frozen_backbone": round(b / photos_s, 1),
                               "cached_features": round(b / features_s, 1),
                               "cached_features_no_gps_loss": round(b / no_gps_s, 1)},
        "cached_over_photos": round(photos_s / features_s, 2),
        "cached_no_gps_over_photos": round(photos_s / no_gps_s, 2),
        "embed_photos_per_s": round(embed_ips, 1), "embed_photos": len(cache),
    }
    from geoloc.artifacts import atomic_write_json

    atomic_write_json(HERE / "results" / "heads.json", res)
    for k, v in res.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
