"""The embedded synthetic sample (generated once, then reused from its folder).

    python -m geoloc sample                               # $GEOLOC_CACHE (default ~/.cache/geoloc)
    python -m geoloc sample out=DIR n_images=3000 seed=0 image_size=64

See :mod:`geoloc.data.sample` for what it holds (and why it is synthetic).
"""

from __future__ import annotations

import time
from pathlib import Path

from geoloc.cli import run_step
from geoloc.data.sample import ensure_sample


def main(cfg) -> Path:
    """Generates the sample unless ``out`` already holds one with these settings."""
    started = time.perf_counter()
    root = ensure_sample(cfg.out, n_images=cfg.n_images, seed=cfg.seed, image_size=cfg.image_size)
    print(f"sample of {cfg.n_images} synthetic images at {root} ({time.perf_counter() - started:.1f} s)")
    return root


def run():
    return run_step("sample", main, "geoloc sample")


if __name__ == "__main__":
    run()
