"""Shared test fixtures. Tests are offline and CPU-only; the ones that read ../shared/data skip
cleanly when it is absent (a user's fresh machine does not have it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GEOLOC_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or $GEOLOC_SHARED_DATA); skips when absent."""
    if not (SHARED_DATA / "im2gps3k-dev" / "im2gps3k_places365.csv").is_file():
        pytest.skip(f"real benchmark data not found at {SHARED_DATA} (set GEOLOC_SHARED_DATA)")
    return SHARED_DATA


#: Overrides that make train.py tiny: the test ViT and a small GPS encoder.
TINY_TRAIN = ["backbone=test_vit", "model.location_encoder.hidden=32", "model.location_encoder.dim=16",
              "model.location_encoder.sigmas=[1,16]", "model.location_encoder.n_frequencies=16",
              "model.module.queue_size=64", "num_workers=0", "batch_size=16", "trainer.enable_progress_bar=false"]


def _train_tiny(root: Path, *extra: str, evidence_cells: bool = False) -> dict:
    """A real (tiny) train.py run on a 240-image embedded sample; returns its files."""
    from hydra import compose, initialize_config_dir

    from geocells.boundaries import load_boundaries
    from geocells.build import add_cell_evidence, build_geocells, write_geocells
    from geoloc.data.readers import read_sample
    from geoloc.data.sample import ensure_sample
    from train import train

    folder = ensure_sample(root / "sample", n_images=240)
    points = read_sample(folder, split="train", n_images=240).latlng
    cells, _ = build_geocells(points, load_boundaries(), min_points=5, max_points=40)
    if evidence_cells:
        cells = add_cell_evidence(cells, points)
    cells_path = write_geocells(cells, root / "cells.parquet", meta={"scheme": "semantic"})
    run = root / "run"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            *TINY_TRAIN, f"cells={cells_path}", f"data.root={folder}", "data.n_images=240", f"output_dir={run}",
            "trainer.max_steps=6", "+trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "logger=none",
            *extra])
    _, objects = train(cfg)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return {"sample": folder, "cells": Path(cells_path), "ckpt": ckpt, "run": run, "objects": objects}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """A real (tiny) train.py run on a 240-image embedded sample, for everything that needs a checkpoint.

    Returns ``{"sample": folder, "cells": cells.parquet, "ckpt": RUN/checkpoints/last.ckpt, "run": RUN, "objects":
    what train.py built}``.
    Trained for 6 steps: the weights are not good, but every file a real run writes is there.
    """
    return _train_tiny(tmp_path_factory.mktemp("tiny_run"))


EVIDENCE_HEADS = ("scene", "land", "land_cover", "koppen_group", "hemisphere", "continent", "driving_side", "script")


@pytest.fixture(scope="session")
def tiny_evidence_run(tmp_path_factory) -> dict:
    """Like :func:`tiny_run`, with evidence heads and cell evidence (the sample has no scene column, so the
    scene head's loss is masked out: it exists but is untrained)."""
    return _train_tiny(tmp_path_factory.mktemp("tiny_evidence_run"),
                       f"model.evidence={{{', '.join(f'{h}: 1.0' for h in EVIDENCE_HEADS)}}}", evidence_cells=True)


#: A text decoder small enough for tests.
TINY_TEXT_DECODER = "model.text_decoder={width: 32, layers: 1, heads: 2, memory_tokens: 2}"


@pytest.fixture(scope="session")
def tiny_text_run(tmp_path_factory) -> dict:
    """Like :func:`tiny_evidence_run`, with a text decoder (the reasoning head that writes the chain)."""
    return _train_tiny(tmp_path_factory.mktemp("tiny_text_run"),
                       f"model.evidence={{{', '.join(f'{h}: 1.0' for h in EVIDENCE_HEADS)}}}", TINY_TEXT_DECODER,
                       evidence_cells=True)
