"""Predict throughput end to end against the bare timm forward of the same backbone and batch.

    .venv/bin/python bench/bench_predict.py [--backbone vit_small] [--batch 32] [--repeats 3]

End to end means what ``evaluate.py`` and ``geoloc-predict`` do per batch: decode the JPEG files,
preprocess (timm's eval transform), the image encoder, the cell head, softmax, top-K and the
refinement (``none``, ``prototypes`` with an index of reference images, ``gallery`` with the 100K MP-16
GPS gallery, cached; and ``none`` through ``torch.compile``, in bf16 autocast, and both). The fp32 and bf16
matmul peaks of this CPU are measured in the same run: the bf16 forward is set against the bf16 peak.
The bare reference is ``timm.create_model(name, num_classes=0)`` on an already preprocessed float batch:
no decoding, no head. Target: end to end >= 0.8x the bare forward. Both run
with random weights (nothing can be downloaded here); speed does not depend on the weights. Timings
alternate between the two sides in each repeat and the median is kept (the machine is shared).

Photos: the real Im2GPS3k dev photos in ../shared/data when present (JPEG, short side <= 256 px),
else the embedded sample. Writes bench/results/predict.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("GEOLOC_SHARED_DATA", REPO.parent / "shared" / "data"))


def _photos(n: int) -> list[Path]:
    folder = SHARED / "im2gps3k-dev" / "images"
    if folder.is_dir():
        return sorted(folder.glob("*.jpg"))[:n]
    from geoloc.data.readers import read_sample

    return [Path(p) for p in read_sample(split="test").table["path"][:n]]


def _fake_run(tmp: Path, backbone: str) -> tuple[Path, object]:
    """A train.py-shaped run folder (config.yaml + checkpoint) with random weights."""
    import hydra

    from geocells.boundaries import load_boundaries
    from geocells.build import build_geocells, write_geocells
    from geoloc.data.readers import read_sample
    from geoloc.geo.cells import Geocells
    from geoloc.models.geolocator import GeoLocator

    cells_gdf, _ = build_geocells(read_sample(split="train").latlng, load_boundaries(), min_points=25,
                                  max_points=200)
    cells_path = write_geocells(cells_gdf, tmp / "cells.parquet", meta={"scheme": "semantic"})
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"backbone={backbone}", "backbone.pretrained=false",
                                                      f"cells={cells_path}", f"output_dir={tmp / 'run'}"])
    net = GeoLocator(hydra.utils.instantiate(cfg.backbone), hydra.utils.instantiate(cfg.model.location_encoder),
                     num_cells=len(Geocells.load(cells_path)))
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    (tmp / "run" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    return ckpt, cfg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="vit_small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--references", type=int, default=256, help="reference photos in the prototype index")
    args = parser.parse_args()
    torch.manual_seed(0)
    import timm

    from geoloc.data.images import decode_image
    from geoloc.data.readers import read_sample
    from geoloc.inference.predictor import build_predictor

    tmp = Path(tempfile.mkdtemp(prefix="bench_predict."))
    ckpt, cfg = _fake_run(tmp, args.backbone)
    paths = _photos(args.batch)
    name = cfg.backbone.name
    bare = timm.create_model(name, pretrained=False, num_classes=0).eval()
    predictors = {"none": build_predictor(str(ckpt), batch_size=args.batch)}
    x = torch.stack([predictors["none"].transform(decode_image(p)) for p in paths])
    try:
        from geoloc.retrieval.index import RetrievalIndex

        net = predictors["none"].net
        refs = read_sample(split="train")
        refs = refs.subset(np.arange(len(refs)) < args.references)
        t = time.perf_counter()
        index, _ = RetrievalIndex.build(net, refs, predictors["none"].cells, predictors["none"].transform,
                                        batch_size=args.batch)
        index_build_s = time.perf_counter() - t
        index.save(tmp / "run" / "index_v1")
        predictors["prototypes"] = build_predictor(str(ckpt), refine="prototypes", batch_size=args.batch)
    except ImportError:
        index_build_s = None
    from geoloc.prepare.gallery import build as build_gallery

    build_gallery(ckpt)  # the 100K MP-16 gallery, embedded once (python -m geoloc gallery)
    predictors["gallery"] = build_predictor(str(ckpt), refine="gallery", batch_size=args.batch)
    predictors["none_compiled"] = build_predictor(str(ckpt), batch_size=args.batch, compile=True)
    predictors["none_bf16"] = build_predictor(str(ckpt), batch_size=args.batch, precision="bf16")
    predictors["none_bf16_compiled"] = build_predictor(str(ckpt), batch_size=args.batch, precision="bf16",
                                                       compile=True)

    def time_bare() -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            bare(x)
            return time.perf_counter() - t

    def time_e2e(pred) -> float:
        t = time.perf_counter()
        images = [decode_image(p) for p in paths]
        pred.predict(images, [p.name for p in paths])
        return time.perf_counter() - t

    time_bare()
    compile_s = time_e2e(predictors["none_compiled"])  # the first call compiles
    compile_bf16_s = time_e2e(predictors["none_bf16_compiled"])
    for p in predictors.values():
        time_e2e(p)  # warm-up
    times: dict[str, list[float]] = {"bare": [], **{k: [] for k in predictors}}
    for _ in range(args.repeats):
        times["bare"].append(time_bare())
        for k, p in predictors.items():
            times[k].append(time_e2e(p))
    med = {k: statistics.median(v) for k, v in times.items()}
    # how close the bare forward comes to this CPU's fp32 matmul peak
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        bare(x)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(10):
        torch.mm(a, b)
    peak_gflops = 2 * 2048 ** 3 * 10 / (time.perf_counter() - t) / 1e9
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)  # the bf16 peak (AMX), the new limit
    torch.mm(a16, b16)
    t = time.perf_counter()
    for _ in range(10):
        torch.mm(a16, b16)
    peak_bf16_gflops = 2 * 2048 ** 3 * 10 / (time.perf_counter() - t) / 1e9
    # the bf16 forward's share of the bf16 peak: the backbone's flops over the time of its bf16 forward
    bf16_net = predictors["none_bf16_compiled"]
    xb = x.to(bf16_net.device)
    with torch.inference_mode():
        bf16_times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            bf16_net.forward_batch(xb)
            bf16_times.append(time.perf_counter() - t)
    bf16_forward_gflops = fc.get_total_flops() / statistics.median(bf16_times) / 1e9
    bare_gflops = fc.get_total_flops() / med["bare"] / 1e9
    result = {
        "backbone": name, "batch": args.batch, "photos": str(paths[0].parent), "repeats": args.repeats,
        "images_per_s": {k: round(args.batch / v, 2) for k, v in med.items()},
        "ratio_vs_bare": {k: round(med["bare"] / v, 3) for k, v in med.items() if k != "bare"},
        "target_ratio": 0.8, "compile_first_call_s": round(compile_s, 1),
        "compile_bf16_first_call_s": round(compile_bf16_s, 1),
        "e2e_over_fp32_e2e": {k: round(med["none"] / med[k], 3) for k in
                              ("none_compiled", "none_bf16", "none_bf16_compiled")},
        "matmul_peak_gflops": round(peak_gflops, 1), "bare_forward_gflops": round(bare_gflops, 1),
        "matmul_peak_bf16_gflops": round(peak_bf16_gflops, 1),
        "bf16_compiled_forward_gflops": round(bf16_forward_gflops, 1),
        "bf16_compiled_forward_share_of_bf16_peak": round(bf16_forward_gflops / peak_bf16_gflops, 3),
        "bare_forward_share_of_peak": round(bare_gflops / peak_gflops, 3),
        "index_references": args.references if index_build_s is not None else None,
        "index_build_s": None if index_build_s is None else round(index_build_s, 2),
        "gallery_size": len(predictors["gallery"].scorer("gallery").table),
        "torch": str(torch.__version__), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(yaml.safe_dump(result, sort_keys=False))
    from geoloc.artifacts import atomic_write_json

    atomic_write_json(HERE / "results" / "predict.json", result)


if __name__ == "__main__":
    main()
