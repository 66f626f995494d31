"""GPS-gallery query speed: cached embeddings + FAISS vs GeoCLIP's predict path.

    .venv/bin/python bench/bench_gallery.py

The gallery is the 100K MP-16 coordinates shipped in the geoclip package, encoded with GeoCLIP's
released location-encoder weights. Ours: embeddings computed once (timed, then cached), each query
batch of 64 image embeddings searched exactly (BLAS; FAISS's flat index timed beside it). GeoCLIP's
``predict`` re-encodes the whole gallery with its
``LocationEncoder`` on every call, then takes the similarities: timed here with geoclip's own class on
the same batch (its CLIP image tower is left out of both sides). Target: <= 1 ms per image at batch 64.
Writes bench/results/gallery.json.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from geoloc.artifacts import atomic_write_json
from geoloc.data.geography import mp16_gallery_latlng
from geoloc.models.location_encoder import LocationEncoder
from geoloc.retrieval.gallery import GPSGallery

HERE = Path(__file__).resolve().parent


def main() -> None:
    latlng = mp16_gallery_latlng()
    enc = LocationEncoder.from_geoclip().eval()
    t = time.perf_counter()
    gallery = GPSGallery.build(enc, latlng)
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    batch = 64
    queries = [rng.normal(size=(batch, enc.out_features)).astype(np.float32) for _ in range(20)]
    gallery.search(queries[0], k=5, backend="faiss")  # builds the index

    def per_batch(backend):
        t = time.perf_counter()
        for q in queries:
            gallery.search(q, k=5, backend=backend)
        return (time.perf_counter() - t) / len(queries)

    ours_s = per_batch("blas")
    faiss_s = per_batch("faiss")

    # GeoCLIP's predict path: LocationEncoder(gps_gallery) on every call, then logits and top-k
    from geoclip.model.location_encoder import LocationEncoder as GeoCLIPLocationEncoder

    theirs = GeoCLIPLocationEncoder()  # loads the released weights from the package
    gps = torch.tensor(latlng, dtype=torch.float32)
    img = torch.from_numpy(queries[0])
    times = []
    for _ in range(2):
        t = time.perf_counter()
        with torch.no_grad():
            g = torch.nn.functional.normalize(theirs(gps), dim=1)
            torch.topk(torch.nn.functional.normalize(img, dim=1) @ g.T, 5, dim=1)
        times.append(time.perf_counter() - t)
    theirs_s = min(times)
    # same answers: our cached embeddings equal theirs
    max_diff = float(np.abs(gallery.embeddings - g.numpy()).max())

    res = {"machine": {"cores": os.cpu_count(), "arch": platform.machine()}, "gallery_size": len(gallery),
           "batch": batch, "cache_build_s": round(build_s, 2), "ours_ms_per_batch": round(ours_s * 1e3, 2),
           "ours_ms_per_image": round(ours_s * 1e3 / batch, 4),
           "faiss_flat_ms_per_image": round(faiss_s * 1e3 / batch, 4),
           "geoclip_predict_path_s_per_call": round(theirs_s, 2),
           "speedup_per_batch": round(theirs_s / ours_s, 1),
           "max_abs_diff_cached_vs_geoclip_embeddings": max_diff, "target_ms_per_image": 1.0}
    atomic_write_json(HERE / "results" / "gallery.json", res)
    for k, v in res.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
