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

from .conftest import REPO, TINY_TEXT_DECODER

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


@pytest.mark.parametrize("backbone", ["vit_tiny_cpu", "test_vit", "vit_small", "vit_large_clip",
                                      "efficientnet_lite2", "efficientnet_lite0", "clip_vit_l14"])
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
def test_configs_instantiate(extra, sample, tmp_path):
    """Every CPU-buildable node builds: trainer, loggers, callbacks, the network (with its backbone and GPS
    encoder nested), the module, the datamodule."""
    from geoloc.geo.cells import Geocells
    from geoloc.models.geolocator import GeoLocator
    from train import instantiate_each

    cfg = compose_train(*TINY, f"output_dir={tmp_path}", "cells=x.parquet", *extra)
    net = hydra.utils.instantiate(cfg.model.net, num_cells=5)
    assert isinstance(net, GeoLocator) and net.num_cells == 5
    assert net.image_encoder.name == cfg.backbone.name  # the network node nests the backbone group ...
    assert net.location_encoder.out_features == cfg.model.location_encoder.dim  # ... and the GPS encoder group
    cells = Geocells.load(sample[1])
    module = hydra.utils.instantiate(cfg.model.module, model=net, cells=cells)
    assert module.cells_fingerprint == cells.fingerprint() and module.model is net
    instantiate_each(cfg.logger)
    from geoloc.precision import lightning_precision

    cfg.trainer.precision = lightning_precision(cfg.trainer.precision, cfg.trainer.accelerator)  # as train.py does
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=instantiate_each(cfg.callbacks), logger=False)
    assert trainer is not None
    assert cfg.data.datamodule._target_ == "geoloc.training.datamodule.GeoDataModule"
    assert cfg.geocells._target_ == "geoloc.geo.cells.Geocells.load" and cfg.geocells.path == "x.parquet"


def test_the_location_encoder_is_a_config_group():
    """model/location_encoder chooses the GPS encoder: a seeded random one by default, GeoCLIP's released
    weights with geoclip; the network node follows the choice."""
    default = compose_train("cells=x.parquet")
    assert default.model.location_encoder._target_ == "geoloc.models.location_encoder.LocationEncoder"
    geoclip = compose_train("cells=x.parquet", "model/location_encoder=geoclip")
    assert geoclip.model.location_encoder._target_ == "geoloc.models.location_encoder.LocationEncoder.from_geoclip"
    assert geoclip.model.net.location_encoder._target_ == geoclip.model.location_encoder._target_


@pytest.mark.parametrize("value", ["true", "false"])
def test_the_replaced_geoclip_weights_setting_names_its_replacement(value, tmp_path):
    from train import train

    cfg = compose_train(*TINY, "cells=x.parquet", f"output_dir={tmp_path}", f"model.geoclip_weights={value}")
    with pytest.raises(ValueError, match="model.geoclip_weights.*model/location_encoder=geoclip"):
        train(cfg)
    assert not any(tmp_path.iterdir())  # refused before anything was read or written


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
    from geoloc.inference.predictor import build_predictor

    ckpt = tmp_path / "full" / "checkpoints" / "last.ckpt"
    assert (tmp_path / "full" / "checkpoints" / "best.ckpt").is_file()
    pred = build_predictor(str(ckpt))
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
           "data.datamodule.epoch_size=48", TINY_TEXT_DECODER]  # the text decoder trains under DDP too
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    k0 = Path(out / "keys_rank0.txt").read_text().split()
    k1 = Path(out / "keys_rank1.txt").read_text().split()
    assert len(k0) == len(k1) == 48  # epoch_size keeps the ranks in step
    assert not set(k0) & set(k1)  # each rank streams its own shards
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("model.text_decoder.") for k in state)


def _sample(latlng, key, **labels) -> dict:
    """A decoded sample as both training paths yield it (:func:`geoloc.data.transforms.decode_sample`)."""
    return {"image": torch.zeros(3, 8, 8), "latlng": torch.tensor(latlng, dtype=torch.float32), "key": key,
            "labels": labels}


def test_unreadable_photos_are_dropped_from_batches(sample, tmp_path):
    from geoloc.data.transforms import bad_sample
    from geoloc.geo.cells import Geocells
    from geoloc.training.datamodule import Collate

    _, cells = sample
    collate = Collate(Geocells.load(cells))
    batch = collate([_sample([48.8, 2.3], "a"), bad_sample("b", "truncated")])
    assert batch["image"].shape == (1, 3, 8, 8) and batch["key"] == ["a"] and batch["cell"].shape == (1,)
    assert batch["skipped"] == [("b", "truncated")]
    empty = collate([bad_sample("c", "missing")])
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
    """Evidence heads on the shared features: labels from each photo's coordinates, their losses in the
    total, validation accuracy per head, and a checkpoint that rebuilds with them."""
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


def test_collate_stacks_the_samples_evidence_labels(sample):
    """The collate computes no label: it stacks each sample's own, in batch order, skipping bad photos."""
    from geoloc.data.transforms import bad_sample
    from geoloc.geo.cells import Geocells
    from geoloc.training.datamodule import Collate

    _, cells = sample
    collate = Collate(Geocells.load(cells), ("land", "hemisphere"))
    batch = collate([_sample([48.85, 2.35], "paris", land=1, hemisphere=0), bad_sample("x", "unreadable"),
                     _sample([-33.87, 151.21], "sydney", land=1, hemisphere=1),
                     _sample([0.0, -30.0], "sea", land=0, hemisphere=-1)])
    assert batch["evidence/land"].tolist() == [1, 1, 0] and batch["evidence/hemisphere"].tolist() == [0, 1, -1]
    assert batch["evidence/land"].dtype == torch.long and collate.skipped["unreadable"] == 1
    empty = collate([bad_sample("y", "missing")])
    assert empty["evidence/land"].shape == (0,)
    with pytest.raises(ValueError, match="'paris' carries no label for the evidence head 'hemisphere'"):
        collate([_sample([48.85, 2.35], "paris", land=1)])


def test_table_labels_are_computed_once_per_dataset(sample, monkeypatch):
    """A table's evidence labels are looked up for all its rows in one call when the datamodule is set up,
    never per batch, and each photo's sample carries its row's labels."""
    import geoloc.evidence.labels as ev
    from geoloc.geo.cells import Geocells
    from geoloc.training.datamodule import Collate, GeoDataModule

    folder, cells = sample
    train_ds = read_sample(folder, split="train", n_images=240)
    val_ds = read_sample(folder, split="val", n_images=240)
    calls = []
    real = ev.evidence_labels
    monkeypatch.setattr(ev, "evidence_labels", lambda latlng, **kw: calls.append(len(latlng)) or real(latlng, **kw))
    dm = GeoDataModule(train_ds, val_ds, Geocells.load(cells), batch_size=16)
    dm.set_data_config({"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
                        "crop_pct": 1.0})
    dm.set_evidence_heads(["land", "hemisphere"])
    dm.setup("fit")
    assert calls == [len(train_ds), len(val_ds)]
    batch = next(iter(dm.val_dataloader()))
    assert calls == [len(train_ds), len(val_ds)]  # the loaders reuse them
    expect = real(val_ds.latlng).set_index(val_ds.table["key"])
    assert batch["evidence/land"].tolist() == expect.loc[batch["key"], "land"].tolist()
    assert batch["evidence/hemisphere"].tolist() == expect.loc[batch["key"], "hemisphere"].tolist()
    assert isinstance(dm.val_dataloader().collate_fn, Collate)


def test_scene_labels_reach_the_batch_from_tables_and_shards(sample, tmp_path):
    """The scene head's label is the dataset's S3_Label (photos without one are masked)."""
    import numpy as np
    import pandas as pd

    from geoloc.data.shards import make_webdataset, write_shards
    from geoloc.geo.cells import Geocells
    from geoloc.training.datamodule import Collate, _Photos, table_evidence_labels

    folder, cells = sample
    ds = read_sample(folder, split="train", n_images=240)
    ds = ds.subset(np.arange(len(ds)) < 6)
    ds.table["S3_Label"] = pd.Series([0, 1, 2, None, "x", 2.0], dtype=object)
    heads = ("scene", "land")
    collate = Collate(Geocells.load(cells), heads)
    photos = _Photos(ds, lambda im: torch.zeros(3, 4, 4), labels=table_evidence_labels(ds, heads))
    assert collate([photos[i] for i in range(6)])["evidence/scene"].tolist() == [0, 1, 2, -1, -1, 2]
    assert _Photos(ds, lambda im: torch.zeros(3, 4, 4))[0]["labels"] == {}  # without evidence heads: none
    write_shards(ds, tmp_path / "shards", split="train")
    stream = make_webdataset(tmp_path / "shards", split="train", shuffle=0, evidence_heads=heads,
                             transform=lambda im: torch.zeros(3, 4, 4))
    batch = collate(list(stream))
    expect = dict(zip(ds.table["key"], [0, 1, 2, -1, -1, 2]))
    assert batch["evidence/scene"].tolist() == [expect[k] for k in batch["key"]]


def _rewrite_records(shard: Path, out: Path, edit) -> None:
    """Copies a shard, passing each JSON record through ``edit``."""
    import io
    import json
    import tarfile

    with tarfile.open(shard) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith(".json"):
                data = json.dumps(edit(json.loads(data))).encode()
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def _first_record(shard: Path) -> bytes:
    import tarfile

    with tarfile.open(shard) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".json"))
        return tf.extractfile(member).read()


def test_shard_labels_from_records_and_computed_agree(sample, tmp_path):
    """The stream takes each record's own labels (written at sharding time); records without them (older
    shards) get the same labels computed from their coordinates, and a table gets the same again."""
    import json

    import numpy as np
    import pandas as pd

    from geoloc.data.shards import make_webdataset, write_shards
    from geoloc.evidence.labels import EVIDENCE_VERSION, HEADS, evidence_labels
    from geoloc.training.datamodule import table_evidence_labels

    folder, _ = sample
    ds = read_sample(folder, split="train", n_images=240)
    ds = ds.subset(np.arange(len(ds)) < 12)
    ds.table["S3_Label"] = pd.Series([0, 1, 2, None] * 3, dtype=object)
    heads = tuple(HEADS)
    write_shards(ds, tmp_path / "new", split="train")
    shard = tmp_path / "new" / "train-000000.tar"
    truth = evidence_labels(ds.latlng, scene=ds.table["S3_Label"].to_numpy()).set_index(ds.table["key"])
    labelled = lambda rec: {**rec, "labels": {h: int(truth.loc[rec["key"], h]) for h in heads},  # noqa: E731
                            "evidence_version": EVIDENCE_VERSION}
    _rewrite_records(shard, tmp_path / "with.tar", labelled)
    _rewrite_records(shard, tmp_path / "without.tar",  # as shards written before records carried labels
                     lambda rec: {k: v for k, v in rec.items() if k not in ("labels", "evidence_version")})

    def stream(path):
        items = make_webdataset([path], shuffle=0, evidence_heads=heads)
        return {s["key"]: s["labels"] for s in items}

    written = stream(shard)
    assert json.loads(_first_record(shard))["labels"]  # the writer stores them
    from_records, computed = stream(tmp_path / "with.tar"), stream(tmp_path / "without.tar")
    assert from_records == computed == written
    table = table_evidence_labels(ds, heads)
    assert {k: {h: int(table[h][i]) for h in heads} for i, k in enumerate(ds.table["key"])} == computed
    # a record's labels are what the stream uses: another value there is another label in the sample
    key = ds.table["key"].iloc[0]
    flipped = lambda rec: labelled(rec) if rec["key"] != key else {**labelled(rec), "labels": {  # noqa: E731
        **labelled(rec)["labels"], "hemisphere": 1 - int(truth.loc[key, "hemisphere"])}}
    _rewrite_records(shard, tmp_path / "flipped.tar", flipped)
    assert stream(tmp_path / "flipped.tar")[key]["hemisphere"] == 1 - computed[key]["hemisphere"]
    # a label out of range is a bad record, named
    _rewrite_records(shard, tmp_path / "bad.tar", lambda rec: {**labelled(rec), "labels": {
        **labelled(rec)["labels"], "land": 7}})
    bad = list(make_webdataset([tmp_path / "bad.tar"], shuffle=0, evidence_heads=heads, mark_bad=True))
    assert {s["bad"] for s in bad} == {"bad_record"}


@pytest.mark.slow
def test_validation_metrics_over_two_processes_equal_one_process(tmp_path):
    """Two gloo ranks holding different numbers of photos (5 and 3, and 0 and 8) score exactly what one
    process scores on all of them."""
    import textwrap

    script = tmp_path / "metrics.py"
    script.write_text(textwrap.dedent(f"""
        import torch, torch.distributed as dist, torch.multiprocessing as mp
        from geoloc.training.metrics import DistanceMetrics

        g = torch.Generator().manual_seed(0)
        pred = torch.rand(8, 2, generator=g) * torch.tensor([180.0, 360.0]) - torch.tensor([90.0, 180.0])
        true = pred + torch.randn(8, 2, generator=g) * 3

        def run(rank, split):
            dist.init_process_group("gloo", init_method="file://{tmp_path}/store" + str(split), rank=rank,
                                    world_size=2)
            m = DistanceMetrics()
            part = slice(0, split) if rank == 0 else slice(split, 8)
            if part.stop > part.start:
                m.update(pred[part], true[part])
            got = m.compute()
            single = DistanceMetrics(sync_on_compute=False)
            single.update(pred, true)
            assert got == single.compute(), (got, single.compute())
            dist.destroy_process_group()

        if __name__ == "__main__":
            for split in (5, 0):
                mp.spawn(run, args=(split,), nprocs=2)
            print("ok")
    """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
