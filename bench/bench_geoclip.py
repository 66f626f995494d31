"""GeoCLIP's own ``predict`` against geoloc's GeoCLIP model: the same answers, and time per photo.

    .venv/bin/python bench/bench_geoclip.py [--photos 64] [--shared ../shared/data]

Both sides get the same full-size CLIP ViT-L/14 with *random* weights (no CLIP weights can be downloaded here:
GeoCLIP's own class builds it offline with ``GeoCLIP(from_pretrained=True, clip_pretrained=False)``, which
loads the released MLP, GPS encoder and logit scale), geoloc reading the tower from a safetensors file of it.
On real Im2GPS3k photos it reports whether the best gallery point and its probability agree for every
photo, and seconds per photo: the geoclip package re-encodes its 100K gallery on every ``predict`` call,
geoloc embeds it once (cached) and predicts in batches. It also measures how far timm's evaluation
transform for CLIP is from the CLIP image processor GeoCLIP uses (geoloc uses the latter for GeoCLIP).
These answers come from random weights: they are not GeoCLIP's accuracy.

Writes ``bench/results/geoclip.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    from geoclip import GeoCLIP
    from PIL import Image
    from safetensors.torch import save_file

    from geoloc.artifacts import atomic_write_json
    from geoloc.data.transforms import eval_transform
    from geoloc.inference.geoclip import build_geoclip_predictor
    from geoloc.models.image_encoder import CLIP_DATA_CONFIG

    paths = sorted((Path(args.shared) / "im2gps3k-dev" / "images").glob("*.jpg"))[:args.photos]
    if not paths:
        raise SystemExit(f"no photos under {args.shared}/im2gps3k-dev/images")
    torch.manual_seed(0)
    t = time.perf_counter()
    theirs = GeoCLIP(from_pretrained=True, clip_pretrained=False).eval()
    build_theirs_s = time.perf_counter() - t
    tmp = Path(tempfile.mkdtemp(prefix="bench_geoclip."))
    clip_file = tmp / "model.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.image_encoder.CLIP.state_dict().items()}, str(clip_file))
    t = time.perf_counter()
    ours = build_geoclip_predictor(clip_file, gallery_cache=tmp / "gallery.npz", batch_size=args.batch)
    build_ours_s = time.perf_counter() - t  # includes embedding the 100K gallery once

    theirs_gps, theirs_prob, theirs_times = [], [], []
    for p in paths:
        t = time.perf_counter()
        gps, prob = theirs.predict(str(p), top_k=1)
        theirs_times.append(time.perf_counter() - t)
        theirs_gps.append(gps[0].numpy())
        theirs_prob.append(float(prob[0]))
    images = [Image.open(p).convert("RGB") for p in paths]
    ours.predict(images[:2], ["w1", "w2"])  # warm-up
    t = time.perf_counter()
    pred = ours.predict(images, [p.name for p in paths])
    ours_s = time.perf_counter() - t
    theirs_gps = np.array(theirs_gps)
    same = np.abs(pred.latlng - theirs_gps).max(axis=1) <= 1e-4
    # our probability of the answered gallery point, recomputed from the network outputs
    out = ours.forward(images)
    scorer = ours.scorer("gallery")
    emb = torch.nn.functional.normalize(torch.from_numpy(out["image_emb"]), dim=-1).numpy()
    p_ours = torch.from_numpy(emb @ ours.model.gallery.embeddings.T / scorer.temperature).double().softmax(-1).numpy()
    prob_diff = float(np.abs(p_ours.max(axis=1) - np.array(theirs_prob)).max())

    timm_t = eval_transform({k: v for k, v in CLIP_DATA_CONFIG.items() if k != "preprocess"})
    diffs = np.array([(timm_t(im) - ours.transform(im)).abs().numpy() for im in images], dtype=object)
    max_abs = [float(d.max()) for d in diffs]
    mean_abs = [float(d.mean()) for d in diffs]
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cores": os.cpu_count(), "photos": len(paths),
        "weights": "random CLIP ViT-L/14 (GeoCLIP(from_pretrained=True, clip_pretrained=False), seed 0) + released "
                   "GeoCLIP MLP, GPS encoder and logit scale; answers are NOT GeoCLIP's accuracy",
        "same_best_gallery_point": int(same.sum()), "max_prob_diff_of_best_point": prob_diff,
        "geoclip_predict_s_per_photo": round(float(np.median(theirs_times)), 3),
        "geoloc_s_per_photo": round(ours_s / len(paths), 3), "geoloc_batch": args.batch,
        "speedup": round(float(np.median(theirs_times)) / (ours_s / len(paths)), 1),
        "build_s": {"geoclip": round(build_theirs_s, 1), "geoloc_first_time": round(build_ours_s, 1)},
        "timm_transform_vs_clip_processor": {
            "mean_abs_per_photo_median": round(float(np.median(mean_abs)), 5),
            "max_abs_per_photo_median": round(float(np.median(max_abs)), 4),
            "max_abs_worst_photo": round(float(np.max(max_abs)), 4),
            "unit": "normalized pixel values (CLIP mean/std)"},
    }
    atomic_write_json(HERE / "results" / "geoclip.json", result)
    for k, v in result.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
