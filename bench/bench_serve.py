"""geoloc-serve under load, and the page's screenshot for the README.

    .venv/bin/python bench/bench_serve.py [--model outputs/demo/train/checkpoints/best.ckpt] [--requests 64]

Starts the service on localhost with ``--model`` (make demo's by default) and sends ``--requests`` real photos
(the Im2GPS3k dev photos in ../shared/data, else the embedded sample) at concurrency 1 and at 8, with the
reasoning chain (``?explain=1``) and without: requests per second and p50 / p95 latency of each. Every answer is
checked against geoloc-predict's for the same photo. With Chromium installed (``sudo make browser``) it also
drops one real photo on the page in headless Chromium and saves ``docs/serve.png``.

Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_predict import _photos  # noqa: E402  (the real dev photos, else the embedded sample)


def _post(url: str, photo: Path) -> tuple[float, dict]:
    req = urllib.request.Request(url, data=photo.read_bytes(), method="POST",
                                 headers={"Content-Type": "image/jpeg", "X-Filename": photo.name})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        body = json.loads(r.read())
    return time.perf_counter() - t, body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(REPO / "outputs" / "demo" / "train" / "checkpoints" / "best.ckpt"))
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args()
    os.environ["GEOLOC_SERVE_QUIET"] = "1"
    from geoloc.inference.cli import load_predictor, predict_files
    from geoloc.inference.serve import GeolocService, make_server

    predictor = load_predictor(args.model, topk=5, explain=True)
    service = GeolocService(predictor)
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    photos = _photos(args.requests)
    ref = {p.name: r for p, r in zip(photos, predict_files([str(p) for p in photos], predictor, batch_size=1))}
    rows, mismatches = {}, 0
    for explain in (False, True):
        url = base + "/predict" + ("?explain=1" if explain else "")
        _post(url, photos[0])  # warm
        for conc in (1, 8):
            t = time.perf_counter()
            with ThreadPoolExecutor(max_workers=conc) as pool:
                done = list(pool.map(lambda p, u=url: (p.name, *_post(u, p)), photos))
            wall = time.perf_counter() - t
            lat = sorted(d for _, d, _ in done)
            for name, _, body in done:
                mismatches += body["top_cells"] != ref[name]["top_cells"] or body["latlng"] != ref[name]["latlng"]
            rows[f"concurrency {conc}{', explain' if explain else ''}"] = {
                "requests": len(done), "requests_per_second": round(len(done) / wall, 2),
                "p50_ms": round(1000 * statistics.median(lat), 1),
                "p95_ms": round(1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1)}
    screenshot = None
    from geoloc.inference.webdriver import Chromium, find_chromium

    if not isinstance(find_chromium(), str):
        with Chromium(width=1400, height=1150) as browser:
            browser.get(base + "/")
            browser.wait_for("svg#map[data-ready='1']")
            browser.find("#file").send_keys(str(photos[0]))
            browser.wait_for("body[data-state='answered']", timeout=120)
            screenshot = str(browser.screenshot(REPO / "docs" / "serve.png").relative_to(REPO))
    server.shutdown()
    kind = "real Im2GPS3k" if "im2gps" in str(photos[0]) else "sample"
    result = {"model": args.model, "photos": f"{len(photos)} {kind} JPEGs", "rows": rows,
              "answers_differing_from_geoloc_predict": int(mismatches),
              "screenshot": screenshot, "cores": os.cpu_count(), "machine": platform.machine(),
              "note": "predictions run one at a time under a lock (the network uses every core); concurrency "
                      "overlaps upload, decoding and JSON with the network"}
    from geoloc.artifacts import atomic_write_json

    atomic_write_json(HERE / "results" / "serve.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
