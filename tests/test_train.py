"""Training: configs compose and build, a fast_dev_run, exact resume, and real DDP on 2 CPU processes."""

import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from geoloc.data.readers import read_sample
from geoloc.data.sample import ensure_sample
from geoloc.data.shards import write_shards

from .conftest import REPO

TINY = ["backbone=test_vit", "model.location_encoder.hidden=32", "model.location_encoder.dim=16",
        "model.location_encoder.sigmas=[1,16]", "model.location_encoder.n_frequencies=16",
        "model.module.queue_size=64", "num_workers=0", "batch_size=16", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A 240-image embedded sample and its geocells."""
    from geocells.boundaries import load_boundaries
    from geocells.build import build_geocells, write_geocells

    root = tmp_path_factory.mktemp("sample")
    folder = ensure_sample(root / "s", n_images=240)
    train = read_sample(folder, split="train", n_images=240)
    cells, _ = build_geocells(train.latlng, load_boundaries(), min_points=5, max_points=40)
    path = write_geocells(cells, root / "cells.parquet", meta={"scheme": "semantic"})
    return folder, path


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("backbone", ["vit_tiny_cpu", "test_vit", "vit_small", "vit_large_clip"])
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_cpu"])
@pytest.mark.parametrize("logger", ["csv", "wandb", "none"])
def test_configs_compose(backbone, trainer, logger):
    cfg = compose_train(f"backbone={backbone}", f"trainer={trainer}", f"logger={logger}", "cells=x.parquet")
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    assert cfg.backbone._target_ == "geoloc.models.image_encoder.ImageEncoder"
    if logger == "wandb":
        assert cfg.logger.wandb.offline is True  # offline unless the user says otherwise


@pytest.mark.parametrize("extra", [["trainer=cpu"], ["trainer=ddp_cpu"], ["logger=wandb"], ["experiment=demo"],
                                   ["data=shards", "data.dir=/x"]])
def test_configs_instantiate(extra, tmp_path):
    """Every CPU-buildable node builds: trainer, loggers, callbacks, backbone, encoder, datamodule."""
    cfg = compose_train(*TINY, f"output_dir={tmp_path}", "cells=x.parquet", *extra)
    hydra.utils.instantiate(cfg.backbone)
    hydra.utils.instantiate(cfg.model.location_encoder)
    for node in (cfg.logger or {}).values():
        hydra.utils.instantiate(node)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    assert trainer is not None
    assert cfg.data.datamodule._target_ == "geoloc.training.datamodule.GeoDataModule"


def test_fast_dev_run(sample, tmp_path):
    from train import train

    folder, cells = sample
    cfg = compose_train(*TINY, "debug=fdr", f"cells={cells}", f"data.root={folder}", "data.n_images=240",
                        f"output_dir={tmp_path}")
    metrics, objects = train(cfg)
    assert objects["model"].num_cells == len(objects["cells"])  # classes come from the cells file
    assert "train/loss" in metrics and "val/median_km" in metrics
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resume_continues_exactly(sample, tmp_path):
    from train import train

    folder, cells = sample
    common = [*TINY, f"cells={cells}", f"data.root={folder}", "data.n_images=240", "logger=none"]
    full_m, full = train(compose_train(*common, f"output_dir={tmp_path / 'full'}", "trainer.max_epochs=2"))
    # "killed" after the first epoch, then started again with ckpt_path=last
    train(compose_train(*common, f"output_dir={tmp_path / 'cut'}", "trainer.max_epochs=1"))
    assert (tmp_path / "cut" / "checkpoints" / "last.ckpt").is_file()
    res_m, res = train(compose_train(*common, f"output_dir={tmp_path / 'cut'}", "trainer.max_epochs=2",
                                     "ckpt_path=last"))
    assert res["trainer"].global_step == full["trainer"].global_step
    a, b = _state(full["module"]), _state(res["module"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    assert res_m["val/median_km"] == pytest.approx(full_m["val/median_km"])
    assert torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1

    # the checkpoint scores with evaluate's engine through the model predictor, agreeing with validation
    from geoloc.evaluation.engine import evaluate
    from geoloc.inference.predictor import ModelPredictor

    ckpt = tmp_path / "full" / "checkpoints" / "last.ckpt"
    assert (tmp_path / "full" / "checkpoints" / "best.ckpt").is_file()
    pred = ModelPredictor(str(ckpt))
    assert pred.describe()["n_cells"] == full["model"].num_cells
    val = read_sample(folder, split="val", n_images=240)
    m = evaluate(val, pred, tmp_path / "eval", progress=False)
    assert m["n"] == len(val) and m["median_km"] == pytest.approx(full_m["val/median_km"], rel=1e-3)


@pytest.mark.slow
def test_ddp_two_cpu_processes_see_disjoint_shards(sample, tmp_path):
    folder, cells = sample
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        write_shards(read_sample(folder, split=split, n_images=240), shards, split=split, max_count=12)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "train.py", *TINY, "trainer=ddp_cpu", "debug=keys", "logger=none", f"cells={cells}",
           "data=shards", f"data.dir={shards}", "trainer.max_epochs=1", f"output_dir={out}",
           "data.datamodule.epoch_size=48"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    k0 = Path(out / "keys_rank0.txt").read_text().split()
    k1 = Path(out / "keys_rank1.txt").read_text().split()
    assert len(k0) == len(k1) == 48  # epoch_size keeps the ranks in step
    assert not set(k0) & set(k1)  # each rank streams its own shards


def test_unreadable_photos_are_dropped_from_batches(sample, tmp_path):
    from geoloc.geo.cells import Geocells
    from geoloc.training.datamodule import Collate

    _, cells = sample
    collate = Collate(Geocells.load(cells))
    good = (torch.zeros(3, 8, 8), torch.tensor([48.8, 2.3]), "a")
    batch = collate([good, {"bad": "truncated", "key": "b"}])
    assert batch["image"].shape == (1, 3, 8, 8) and batch["key"] == ["a"] and batch["cell"].shape == (1,)
    empty = collate([{"bad": "missing", "key": "c"}])
    assert len(empty["latlng"]) == 0 and dict(collate.skipped) == {"truncated": 1, "missing": 1}


def test_last_checkpoint_follows_every_epoch_even_without_improvement(sample, tmp_path):
    """ckpt_path=last must resume from the latest epoch, not from the last time validation improved
    (Lightning's save_last only writes last.ckpt when best.ckpt changes)."""
    from train import train

    folder, cells = sample
    train(compose_train(*TINY, f"cells={cells}", f"data.root={folder}", "data.n_images=240", "logger=none",
                        f"output_dir={tmp_path}", "trainer.max_epochs=3", "model.module.optimizer.lr=0"))
    load = lambda name: torch.load(tmp_path / "checkpoints" / name, map_location="cpu", weights_only=False)  # noqa: E731
    assert load("best.ckpt")["epoch"] == 0  # lr 0: validation never improves after the first epoch
    assert load("last.ckpt")["epoch"] == 2


def test_evidence_heads_train_jointly_and_reload(sample, tmp_path):
    """Evidence heads (issue 6) on the shared features: labels from each photo's coordinates, their
    losses in the total, validation accuracy per head, and a checkpoint that rebuilds with them."""
    from geoloc.models.loading import load_checkpoint
    from train import train

    folder, cells = sample
    ev = "model.evidence={koppen_group: 0.5, land_cover: 0.5, hemisphere: 0.5}"
    metrics, objects = train(compose_train(*TINY, f"cells={cells}", f"data.root={folder}", "data.n_images=240",
                                           "logger=none", f"output_dir={tmp_path}", "trainer.max_epochs=1", ev))
    assert set(objects["model"].evidence) == {"koppen_group", "land_cover", "hemisphere"}
    for head in ("koppen_group", "land_cover", "hemisphere"):
        assert torch.isfinite(torch.tensor(metrics[f"train/loss_ev_{head}"]))
        assert 0 <= metrics[f"val/acc_ev_{head}"] <= 100
    model = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    out = model.net(torch.zeros(2, 3, *model.data_config["input_size"][1:]))
    assert out["evidence/land_cover"].shape == (2, 17) and out["evidence/koppen_group"].shape == (2, 5)
    with pytest.raises(ValueError, match="unknown evidence head"):
        train(compose_train(*TINY, f"cells={cells}", f"data.root={folder}", "data.n_images=240", "logger=none",
                            f"output_dir={tmp_path / 'x'}", "debug=fdr", "model.evidence={weather: 1}"))


def test_collate_carries_evidence_labels(sample):
    from geoloc.geo.cells import Geocells
    from geoloc.training.datamodule import Collate

    _, cells = sample
    collate = Collate(Geocells.load(cells), ("land", "hemisphere"))
    img = torch.zeros(3, 8, 8)
    batch = collate([(img, torch.tensor([48.85, 2.35]), "paris"), {"bad": "unreadable", "key": "x"},
                     (img, torch.tensor([-33.87, 151.21]), "sydney"), (img, torch.tensor([0.0, -30.0]), "sea")])
    assert batch["evidence/land"].tolist() == [1, 1, 0] and batch["evidence/hemisphere"].tolist() == [0, 1, 0]
    assert collate.skipped["unreadable"] == 1
    empty = collate([{"bad": "missing", "key": "y"}])
    assert empty["evidence/land"].shape == (0,)


def test_scene_labels_reach_the_batch_from_tables_and_shards(sample, tmp_path):
    """The scene head's label is the dataset's S3_Label (photos without one are masked)."""
    import numpy as np
    import pandas as pd

    from geoloc.data.shards import make_webdataset, write_shards
    from geoloc.geo.cells import Geocells
    from geoloc.training.datamodule import Collate, _Photos

    folder, cells = sample
    ds = read_sample(folder, split="train", n_images=240)
    ds = ds.subset(np.arange(len(ds)) < 6)
    ds.table["S3_Label"] = pd.Series([0, 1, 2, None, "x", 2.0], dtype=object)
    collate = Collate(Geocells.load(cells), ("scene", "land"))
    photos = _Photos(ds, lambda im: torch.zeros(3, 4, 4), scene=True)
    assert collate([photos[i] for i in range(6)])["evidence/scene"].tolist() == [0, 1, 2, -1, -1, 2]
    assert len(_Photos(ds, lambda im: torch.zeros(3, 4, 4))[0]) == 3  # without the scene head: as before
    write_shards(ds, tmp_path / "shards", split="train")
    stream = make_webdataset(tmp_path / "shards", split="train", shuffle=0, scene=True,
                             transform=lambda im: torch.zeros(3, 4, 4))
    batch = collate(list(stream))
    expect = dict(zip(ds.table["key"], [0, 1, 2, -1, -1, 2]))
    assert batch["evidence/scene"].tolist() == [expect[k] for k in batch["key"]]
