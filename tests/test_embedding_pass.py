"""Embedding passes through Lightning's predict loop: a source split into disjoint parts, the parts merged back
into the one-process order, and the index, feature-cache and evaluation steps giving on 2 gloo processes
(trainer=ddp_cpu) what one process gives, with bad photos counted once and nothing written twice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from geoloc.data.features import FeatureCache
from geoloc.data.images import SkipReport
from geoloc.data.readers import read_sample
from geoloc.data.sample import ensure_sample
from geoloc.data.shards import ShardDataset, write_shards
from geoloc.data.transforms import eval_transform
from geoloc.models.image_encoder import ImageEncoder

from .conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The 240-image sample's test split as a folder with one truncated and one missing photo, and
    as shards (several per split) written from the intact one."""
    root = tmp_path_factory.mktemp("pass")
    folder = ensure_sample(root / "s", n_images=240)
    bad = root / "bad"
    shutil.copytree(folder, bad)
    keys = read_sample(folder, split="test", n_images=240).table["key"].tolist()
    (bad / "images" / keys[3]).write_bytes((bad / "images" / keys[3]).read_bytes()[:100])
    (bad / "images" / keys[10]).unlink()
    shards = root / "shards"
    write_shards(read_sample(folder, split="test", n_images=240), shards, split="test", max_count=7)
    return {"folder": folder, "bad": bad, "bad_keys": {keys[3], keys[10]}, "shards": shards, "n": len(keys)}


def _encoder():
    torch.manual_seed(0)
    return ImageEncoder("test_vit", img_size=64, trainable_blocks=0).eval()


@pytest.mark.parametrize("kind", ["table", "shards"])
def test_parts_are_disjoint_cover_the_source_and_report_each_skip_once(photos, kind):
    source = (read_sample(photos["bad"], split="test", n_images=240) if kind == "table"
              else ShardDataset(photos["shards"], split="test"))
    whole = SkipReport()
    every = [(it.index, it.key) for it in source.iter_items(whole)]
    assert [i for i, _ in every] == sorted(i for i, _ in every)  # indices follow the reading order
    got, skips = [], []
    for i in range(3):
        part = SkipReport()
        got += [(it.index, it.key) for it in source.iter_items(part, part=(i, 3))]
        skips += part.items
    assert sorted(got) == every and len(set(got)) == len(got)
    assert sorted(skips) == sorted(whole.items)
    with pytest.raises(ValueError, match="part must be"):
        next(source.iter_items(SkipReport(), part=(3, 3)))


def test_a_one_process_pass_gives_what_the_in_process_cache_build_gives(photos, tmp_path):
    from geoloc.training.embedding import run_embedding_pass

    source = read_sample(photos["bad"], split="test", n_images=240)
    enc = _encoder()
    built = FeatureCache.build(source, enc)
    result = run_embedding_pass(source, eval_transform(enc.data_config), lambda x: {"features": enc(x)},
                                {"encoder": enc}, work_dir=tmp_path, batch_size=5, num_workers=2)
    assert list(result.keys) == list(built.keys) and len(result) == photos["n"] - 2
    np.testing.assert_allclose(result.outputs["features"], built.features, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.latlng, built.latlng)
    assert {k for k, _, _ in result.skipped.items} == photos["bad_keys"] and len(result.skipped) == 2
    assert list(tmp_path.iterdir()) == []  # the parts are gone


def _run(*args, timeout=600):
    res = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


@pytest.mark.slow
def test_the_features_step_on_two_processes_caches_what_one_process_caches(photos, tmp_path):
    """``python -m geoloc features trainer=ddp_cpu``: the same cache (photos, order, values, skips) as one process
    without Lightning, saved once."""
    common = ["-m", "geoloc", "features", "backbone=test_vit", "part=dataset", "data.split=test",
              f"data.root={photos['bad']}", "data.n_images=240", "store.progress=false"]
    _run(*common, f"store.root={tmp_path / 'one'}")
    res = _run(*common, f"store.root={tmp_path / 'two'}", "trainer=ddp_cpu", "num_workers=1")
    assert res.stdout.count(f"dataset: {photos['n'] - 2} photos of sample-test") == 1  # one process reports, one saves
    (one,), (two,) = (list((tmp_path / d).iterdir()) for d in ("one", "two"))
    assert one.name == two.name  # the same cache name: same weights, preprocessing, photos
    a, b = FeatureCache.load(one), FeatureCache.load(two)
    assert list(a.keys) == list(b.keys) and len(b) == photos["n"] - 2
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-5)
    assert b.meta.settings["processes"] == 2
    assert {e["key"] for e in b.meta.settings["skipped"]["examples"]} == photos["bad_keys"]


@pytest.mark.slow
def test_the_index_step_on_two_processes_indexes_what_one_process_indexes(tiny_run, photos, tmp_path):
    """``python -m geoloc index trainer=ddp_cpu`` over shards: every reference once, in the one-process order,
    the same embeddings and clusters; no part files left behind."""
    from geoloc.retrieval.index import RetrievalIndex

    common = ["-m", "geoloc", "index", f"ckpt={tiny_run['ckpt']}", "data=shards", f"data.dir={photos['shards']}",
              "data.split=test", "data.name=pass-test"]
    _run(*common, f"out={tmp_path / 'one' / 'index'}")
    _run(*common, f"out={tmp_path / 'two' / 'index'}", "trainer=ddp_cpu")
    a = RetrievalIndex.load(tmp_path / "one" / "index", mmap=False)
    b = RetrievalIndex.load(tmp_path / "two" / "index", mmap=False)
    assert list(a.ref_keys) == list(b.ref_keys) and len(b) == photos["n"]
    np.testing.assert_allclose(a.ref_emb, b.ref_emb, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a.ref_cluster, b.ref_cluster)
    assert b.meta["processes"] == 2
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["index"]


@pytest.mark.slow
def test_evaluate_on_two_processes_scores_what_one_process_scores(tiny_run, photos, tmp_path):
    """``evaluate.py trainer=ddp_cpu``: the network runs on 2 processes, the first scores; the same predictions,
    metrics, skips and reasoning chains (each photo once) as one process."""
    import pandas as pd

    common = ["evaluate.py", "data=sample", f"data.root={photos['bad']}", "data.n_images=240", "data.split=test",
              "predictor=model", f"ckpt={tiny_run['ckpt']}", "predictor.explain=true", "predictor.decode=geoscore",
              "progress=false", "plots=false", "country=false"]
    _run(*common, f"output_dir={tmp_path / 'one'}")
    _run(*common, f"output_dir={tmp_path / 'two'}", "trainer=ddp_cpu", "num_workers=1")
    a, b = (pd.read_csv(tmp_path / d / "predictions.csv") for d in ("one", "two"))
    assert len(b) == photos["n"] - 2 and list(a["IMG_ID"]) == list(b["IMG_ID"])
    assert (a["cell_top1"] == b["cell_top1"]).all()
    np.testing.assert_allclose(a[["pred_lat", "pred_lng"]], b[["pred_lat", "pred_lng"]], atol=1e-4)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert ma["n"] == mb["n"] == photos["n"] - 2 and ma["n_skipped"] == mb["n_skipped"] == 2
    assert abs(ma["geoscore"] - mb["geoscore"]) < 1e-3 and ma["predictor"] == mb["predictor"]
    chains = [json.loads(line)["IMG_ID"] for line in (tmp_path / "two" / "explanations.jsonl").open()]
    assert sorted(chains) == sorted(b["IMG_ID"]) and len(set(chains)) == len(chains)
    assert not list((tmp_path / "two").glob("parts-*"))


def test_a_failed_pass_leaves_no_parts_and_a_predictor_that_cannot_use_outputs_is_refused_first(photos, tmp_path):
    from geoloc.inference.baselines import ConstantPredictor
    from geoloc.inference.predictor import PrecomputedPredictor
    from geoloc.training.embedding import run_embedding_pass

    source = read_sample(photos["folder"], split="test", n_images=240)
    enc = _encoder()

    def broken(x):
        raise RuntimeError("the network broke")

    with pytest.raises(RuntimeError, match="the network broke"):
        run_embedding_pass(source, eval_transform(enc.data_config), broken, {"encoder": enc}, work_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="has none"):
        PrecomputedPredictor.check(ConstantPredictor(np.zeros((3, 2))))


def test_evaluate_with_a_trainer_refuses_ocr_before_running_the_network(tiny_run, photos, tmp_path):
    res = subprocess.run([sys.executable, "evaluate.py", "data=sample", f"data.root={photos['folder']}",
                          "data.n_images=240", "predictor=model", f"ckpt={tiny_run['ckpt']}", "predictor.explain=true",
                          "predictor.ocr=true", "trainer=cpu", f"output_dir={tmp_path / 'out'}", "progress=false"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "OCR reads the photos themselves" in res.stderr and "Predicting" not in res.stderr + res.stdout
