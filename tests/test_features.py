"""The feature cache and heads trained on it: one embedding per backbone, transform and dataset, reused by every
run; bad photos skipped and counted; damaged or stale caches refused; a run trained on features predicts from
photos exactly as its heads score the cached features; one override switches the recipe to fine-tuning."""

import json
import shutil

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from geoloc.data.features import FeatureCache, FeatureStore, module_fingerprint
from geoloc.data.images import SkipReport
from geoloc.data.readers import read_im2gps, read_sample
from geoloc.data.sample import ensure_sample
from geoloc.models.image_encoder import ImageEncoder

from .conftest import REPO, TINY_TRAIN

#: train.py on features: a frozen test ViT, no augmentation.
ON_FEATURES = ["features.enabled=true", "backbone.trainable_blocks=0", "augment=false"]
EVIDENCE = "model.evidence={land_cover: 0.5, hemisphere: 0.5, continent: 0.5}"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A 240-image embedded sample, its geocells, and a sample whose copy has one truncated and one missing
    training photo."""
    from geocells.boundaries import load_boundaries
    from geocells.build import build_geocells, write_geocells

    root = tmp_path_factory.mktemp("features_sample")
    folder = ensure_sample(root / "s", n_images=240)
    train = read_sample(folder, split="train", n_images=240)
    cells, _ = build_geocells(train.latlng, load_boundaries(), min_points=5, max_points=40)
    cells_path = write_geocells(cells, root / "cells.parquet", meta={"scheme": "semantic"})
    bad = root / "bad"
    shutil.copytree(folder, bad)
    keys = train.table["key"].tolist()
    image = bad / "images" / keys[0]
    image.write_bytes(image.read_bytes()[:200])  # truncated
    (bad / "images" / keys[1]).unlink()  # missing
    return {"folder": folder, "cells": cells_path, "bad": bad, "bad_keys": {keys[0]: "truncated", keys[1]: "missing"}}


def _encoder(seed: int = 0, **kwargs) -> ImageEncoder:
    torch.manual_seed(seed)
    return ImageEncoder("test_vit", img_size=kwargs.pop("img_size", 64), trainable_blocks=0, **kwargs)


def _train_set(folder):
    return read_sample(folder, split="train", n_images=240)


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _common(sample, store_root, run):
    return [*TINY_TRAIN, f"cells={sample['cells']}", f"data.root={sample['folder']}", "data.n_images=240",
            "logger=none", f"features.store.root={store_root}", f"output_dir={run}"]


def test_a_cache_holds_every_usable_photo_once_with_its_labels_and_is_reused(sample, tmp_path, monkeypatch):
    from geoloc.data.transforms import eval_transform
    from geoloc.evidence.labels import HEADS
    from geoloc.retrieval.gallery import encoder_fingerprint
    from geoloc.training.datamodule import table_evidence_labels

    ds = _train_set(sample["folder"])
    enc = _encoder()
    store = FeatureStore(tmp_path)
    cache = store.get(ds, enc)
    assert cache.status == "built" and cache.folder == store.folder(ds, enc)
    assert cache.folder.parent == tmp_path and cache.folder.name.startswith("sample-train-")
    assert sorted(p.name for p in cache.folder.iterdir()) == ["features.npy", "meta.json", "rows.npz"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    assert len(cache) == len(ds) and cache.keys.tolist() == ds.table["key"].tolist()
    np.testing.assert_array_equal(cache.latlng, ds.latlng)
    expect = table_evidence_labels(ds, tuple(HEADS))  # as the datamodule labels photos
    assert set(cache.labels) == set(HEADS)
    for head in HEADS:
        np.testing.assert_array_equal(cache.labels[head], expect[head])
    # the features are the frozen backbone's, in eval mode, on the evaluation transform
    photos = [it.image for it in list(ds.iter_items(SkipReport()))[:7]]
    with torch.no_grad():
        direct = enc.eval()(torch.stack([eval_transform(enc.data_config)(im) for im in photos]))
    np.testing.assert_allclose(cache.features[:7], direct.numpy(), atol=1e-5)
    meta = json.loads((cache.folder / "meta.json").read_text())
    assert meta["kind"] == "features" and meta["format_version"] == 1
    assert meta["fingerprint"] == encoder_fingerprint(enc) == module_fingerprint(enc)
    s = meta["settings"]
    assert s["backbone"] == "test_vit" and s["dim"] == enc.num_features and s["n"] == len(ds)
    assert s["dataset"]["type"] == "table" and s["dataset"]["source"] == ds.source and s["skipped"]["n_skipped"] == 0
    assert s["data_config"]["input_size"] == [3, 64, 64]

    def no_embedding(*a, **k):
        raise AssertionError("a valid cache was embedded again")

    monkeypatch.setattr(FeatureCache, "build", classmethod(no_embedding))
    again = FeatureStore(tmp_path).get(_train_set(sample["folder"]), _encoder())  # another process, same inputs
    assert again.status == "reused" and again.folder == cache.folder
    np.testing.assert_array_equal(again.features, cache.features)


def test_another_backbone_transform_dataset_or_dtype_has_another_cache(sample, tmp_path):
    ds = _train_set(sample["folder"])
    store = FeatureStore(tmp_path)
    base = store.folder(ds, _encoder())
    assert store.folder(ds, _encoder()) == base  # seeded: the same weights
    assert store.folder(ds, _encoder(seed=1)) != base  # other weights
    assert store.folder(ds, _encoder(img_size=32)) != base  # other preprocessing (and weights shape)
    other_transform = _encoder()
    other_transform.data_config = {**other_transform.data_config, "crop_pct": 0.8}
    assert store.folder(ds, other_transform) != base
    assert store.folder(ds.subset(np.arange(len(ds)) > 0), _encoder()) != base  # other photos
    moved = ds.subset(np.ones(len(ds), bool))
    moved.table.loc[0, "lat"] += 0.01
    assert store.folder(moved, _encoder()) != base  # other coordinates
    assert FeatureStore(tmp_path, dtype="float16").folder(ds, _encoder()) != base


def test_bad_photos_are_skipped_counted_and_listed(sample, tmp_path):
    ds = read_sample(sample["bad"], split="train", n_images=240)
    cache = FeatureStore(tmp_path).get(ds, _encoder())
    assert len(cache) == len(ds) - 2 and not set(sample["bad_keys"]) & set(cache.keys)
    assert {k: r for k, r, _ in cache.skipped} == sample["bad_keys"]
    assert cache.meta.settings["skipped"]["by_reason"] == {"missing": 1, "truncated": 1}
    reread = FeatureCache.load(cache.folder)
    assert {k: r for k, r, _ in reread.skipped} == sample["bad_keys"]


def test_damaged_or_stale_caches_are_refused_with_how_to_rebuild(sample, tmp_path):
    ds = _train_set(sample["folder"])
    store = FeatureStore(tmp_path)
    folder = store.get(ds, _encoder()).folder
    good = {p.name: p.read_bytes() for p in folder.iterdir()}

    def restore():
        for name, data in good.items():
            (folder / name).write_bytes(data)

    data = bytearray(good["features.npy"])
    data[-4:] = b"\x00\x00\xc0\x7f"  # one value changed
    (folder / "features.npy").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"features.npy: its contents do not match.*damaged.*rebuild=true"):
        store.get(ds, _encoder())
    restore()
    (folder / "rows.npz").unlink()
    with pytest.raises(ValueError, match=r"rows.npz: missing.*damaged.*features.store.rebuild=true"):
        store.get(ds, _encoder())
    restore()
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json: not JSON"):
        store.get(ds, _encoder())
    for edit, match in ((lambda m: m.update(format_version=0), "features format 0, this geoloc reads 1"),
                        (lambda m: m.update(fingerprint="0" * 16), "other backbone weights"),
                        (lambda m: m["settings"]["dataset"].update(hash="x"), "stale: made with dataset"),
                        (lambda m: m["settings"].update(dim=3), r"features.npy: float32 \(\d+, 64\), its meta says")):
        meta = json.loads(good["meta.json"])
        edit(meta)
        (folder / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=match):
            store.get(ds, _encoder())
    rebuilt = FeatureStore(tmp_path, rebuild=True).get(ds, _encoder())
    assert rebuilt.status == "built" and store.get(ds, _encoder()).status == "reused"
    assert (folder / "meta.json").read_bytes() != b"" and len(rebuilt) == len(ds)


def test_a_float16_cache_changes_no_answer(sample, tmp_path):
    """Half the bytes; the heads' cell probabilities move by far less than anything a metric sees."""
    from geoloc.models.geolocator import GeoLocator
    from geoloc.models.location_encoder import LocationEncoder

    ds = _train_set(sample["folder"])
    enc = _encoder()
    full, half = FeatureStore(tmp_path).get(ds, enc), FeatureStore(tmp_path, dtype="float16").get(ds, enc)
    assert half.features.dtype == np.float16 and full.folder != half.folder
    assert (half.folder / "features.npy").stat().st_size < 0.6 * (full.folder / "features.npy").stat().st_size
    torch.manual_seed(0)
    net = GeoLocator(enc, LocationEncoder(sigmas=[1, 16], n_frequencies=16, hidden=32, dim=16), num_cells=50).eval()
    with torch.no_grad():
        p32 = net.heads(torch.from_numpy(full.features))["cell_logits"].softmax(-1)
        p16 = net.heads(torch.from_numpy(half.features).float())["cell_logits"].softmax(-1)
    assert (p32 - p16).abs().max() < 1e-3 and torch.equal(p32.argmax(-1), p16.argmax(-1))


@pytest.fixture(scope="module")
def features_run(sample, tmp_path_factory):
    """A tiny run trained on cached features, with evidence heads, on the sample with two bad training photos."""
    from train import train

    root = tmp_path_factory.mktemp("features_run")
    run = root / "run"
    common = _common(sample, root / "features", run)
    common[common.index(f"data.root={sample['folder']}")] = f"data.root={sample['bad']}"
    metrics, objects = train(compose_train(*common, *ON_FEATURES, EVIDENCE, "trainer.max_epochs=4"))
    return {"metrics": metrics, "objects": objects, "run": run, "store": root / "features"}


def test_heads_train_on_cached_features_with_every_loss(features_run, sample):
    from geoloc.training.datamodule import FeatureDataModule

    metrics, objects = features_run["metrics"], features_run["objects"]
    dm = objects["datamodule"]
    assert isinstance(dm, FeatureDataModule) and dm.train_source.status == "built"
    for key in ("train/loss_cell", "train/loss_gps", "train/gps_acc", "train/loss_ev_land_cover", "val/median_km",
                "val/acc_ev_hemisphere"):
        assert np.isfinite(metrics[key]), key
    module = objects["module"]
    assert module.trained_batches == 4 * (len(dm.train_source) // 16)  # every epoch's full batches, drop_last
    assert not module.model.image_encoder.training and module.backbone_frozen
    # skipped photos are reported as for photos: counted, and listed in RUN/skipped.csv
    assert objects["skipped"] == {"missing": 1, "truncated": 1}
    rows = (features_run["run"] / "skipped.csv").read_text().splitlines()
    assert rows[0] == "IMG_ID,reason,split" and sorted(rows[1:]) == sorted(
        f"{k},{r},train" for k, r in sample["bad_keys"].items())
    assert (features_run["run"] / "config.yaml").is_file()


def test_a_run_trained_on_features_predicts_from_photos_as_its_heads_score_the_cache(features_run, sample):
    """The checkpoint holds the whole network: load_checkpoint, the predictor and the export read photos and
    give the cell probabilities the trained heads give the cached features of the same photos."""
    from geoloc.inference.export import build_exported
    from geoloc.inference.predictor import build_predictor

    ckpt = features_run["run"] / "checkpoints" / "last.ckpt"
    pred = build_predictor(str(ckpt))
    cache = features_run["objects"]["datamodule"].val_source
    assert module_fingerprint(pred.net.image_encoder) == cache.fingerprint  # the backbone is in the checkpoint
    val = read_sample(sample["bad"], split="val", n_images=240)
    items = list(val.iter_items(SkipReport()))
    assert [it.key for it in items] == cache.keys.tolist()
    out = pred.forward([it.image for it in items])
    with torch.no_grad():
        heads = pred.net.heads(torch.from_numpy(cache.features))
    np.testing.assert_allclose(out["cell_prob"], heads["cell_logits"].softmax(-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["features"], cache.features, atol=1e-5)
    for head in ("land_cover", "hemisphere", "continent"):
        np.testing.assert_allclose(out[f"evidence/{head}"], heads[f"evidence/{head}"].softmax(-1).numpy(), atol=1e-5)
    # forward_features: the predictor's outputs from the cache, and the same answers under any decode
    cached = pred.forward_features(cache.features)
    assert cached.keys() == out.keys()
    for key in out:
        np.testing.assert_allclose(cached[key], out[key], atol=1e-5, err_msg=key)
    for decode in ("argmax", "geoscore"):
        p = pred.with_decode(decode)
        np.testing.assert_allclose(p.refine_batch(cached).latlng, p.refine_batch(out).latlng, atol=1e-4)
    module, _ = build_exported(ckpt, topk=3)
    x = torch.stack([torch.from_numpy(np.asarray(it.image)).permute(2, 0, 1) for it in items[:6]])
    with torch.no_grad():
        exported = module(x)["cell_prob"].numpy()
    assert np.abs(exported - out["cell_prob"][:6]).max() < 0.02  # the export's tensor resize, as for any run


def test_features_are_refused_with_a_trained_backbone_or_augmentation(sample, tmp_path):
    from train import train

    common = _common(sample, tmp_path / "features", tmp_path / "run")
    for extra, match in ((["features.enabled=true", "augment=false"],
                          "backbone.trainable_blocks=None trains every block; set backbone.trainable_blocks=0"),
                         (["features.enabled=true", "augment=false", "backbone.trainable_blocks=2"],
                          "trainable_blocks=2 trains its last 2 block"),
                         (["features.enabled=true", "backbone.trainable_blocks=0"],
                          "un-augmented photos, but augment=true"),
                         (["features.enabled=maybe"], "features.enabled must be true, false or auto")):
        with pytest.raises(ValueError, match=match):
            train(compose_train(*common, *extra))
    assert not (tmp_path / "run").exists() and not (tmp_path / "features").exists()


def test_the_step_builds_what_training_reuses_and_one_override_switches_to_fine_tuning(sample, tmp_path, capsys):
    """``python -m geoloc features`` embeds the train and val sets as train.py would; the features experiment
    trains on them (features.enabled=auto); ``backbone.trainable_blocks=1`` makes it fine-tune on photos."""
    from geoloc.prepare.features import main as features_step
    from geoloc.training.datamodule import FeatureDataModule, GeoDataModule
    from train import train

    store = tmp_path / "features"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        step_cfg = compose(config_name="features", overrides=[
            "backbone=test_vit", f"data.root={sample['folder']}", "data.n_images=240", f"store.root={store}",
            "store.progress=false"])
    caches = features_step(step_cfg)
    assert set(caches) == {"train", "val"} and all(c.status == "built" for c in caches.values())
    assert "train: 189 photos of sample-train by test_vit" in capsys.readouterr().out
    recipe = ["experiment=im2gps3k_features", "data=sample", *_common(sample, store, tmp_path / "a"),
              "trainer.max_steps=3", "+trainer.limit_val_batches=1"]
    _, on_features = train(compose_train(*recipe))
    dm = on_features["datamodule"]
    assert isinstance(dm, FeatureDataModule) and dm.train_source.status == dm.val_source.status == "reused"
    assert dm.train_source.folder == caches["train"].folder and on_features["trainer"].global_step == 3

    recipe[recipe.index(f"output_dir={tmp_path / 'a'}")] = f"output_dir={tmp_path / 'b'}"
    before = {k: v.clone() for k, v in on_features["model"].image_encoder.state_dict().items()}
    _, tuned = train(compose_train(*recipe, "backbone.trainable_blocks=1"))
    assert isinstance(tuned["datamodule"], GeoDataModule) and not tuned["datamodule"].augment
    enc = tuned["model"].image_encoder
    trained = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("model.blocks.5.", "model.norm.", "model.fc_norm.")) for n in trained)
    after = enc.state_dict()
    assert torch.equal(after["model.blocks.0.attn.qkv.weight"], before["model.blocks.0.attn.qkv.weight"])
    assert not torch.equal(after["model.blocks.5.attn.qkv.weight"], before["model.blocks.5.attn.qkv.weight"])


def test_resume_on_features_continues_exactly_and_refuses_other_backbone_weights(sample, tmp_path):
    from train import train

    store = tmp_path / "features"
    full_m, full = train(compose_train(*_common(sample, store, tmp_path / "full"), *ON_FEATURES,
                                       "trainer.max_epochs=2"))
    train(compose_train(*_common(sample, store, tmp_path / "cut"), *ON_FEATURES, "trainer.max_epochs=1"))
    res_m, res = train(compose_train(*_common(sample, store, tmp_path / "cut"), *ON_FEATURES,
                                     "trainer.max_epochs=2", "ckpt_path=last"))
    assert res["trainer"].global_step == full["trainer"].global_step
    a, b = full["module"].state_dict(), res["module"].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    assert res_m["val/median_km"] == pytest.approx(full_m["val/median_km"])
    with pytest.raises(ValueError, match="backbone weights .* are not those the cached features were made with"):
        train(compose_train(*_common(sample, store, tmp_path / "cut"), *ON_FEATURES, "trainer.max_epochs=3",
                            "ckpt_path=last", "seed=1"))


@pytest.mark.shared_data
def test_real_photos_are_cached_as_the_backbone_sees_them(shared_data, tmp_path):
    """Real JPEGs (EXIF orientation, odd sizes): the cached features are the backbone's on the decoded photos,
    and the scene label comes from the file's S3_Label column."""
    from geoloc.data.transforms import eval_transform

    ds = read_im2gps(shared_data / "im2gps3k-dev")
    ds = ds.subset(np.arange(len(ds)) < 12)
    enc = _encoder()
    cache = FeatureStore(tmp_path).get(ds, enc)
    items = list(ds.iter_items(SkipReport()))
    assert cache.keys.tolist() == [it.key for it in items]
    with torch.no_grad():
        direct = enc.eval()(torch.stack([eval_transform(enc.data_config)(it.image) for it in items]))
    np.testing.assert_allclose(cache.features, direct.numpy(), atol=1e-5)
    scene = ds.table["S3_Label"].to_numpy()
    np.testing.assert_array_equal(cache.labels["scene"], scene.astype(np.int16))
