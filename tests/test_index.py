"""Retrieval index: location clusters per cell, prototypes, nearest reference, files, CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from geoloc.data.readers import read_sample
from geoloc.index import RetrievalIndex, cluster_cell_points, default_index_dir

from .conftest import REPO


def test_clusters_follow_haversine_density():
    rng = np.random.default_rng(0)
    paris = np.array([48.85, 2.35]) + rng.normal(scale=0.02, size=(20, 2))
    lyon = np.array([45.76, 4.84]) + rng.normal(scale=0.02, size=(15, 2))
    lone = np.array([[43.3, 5.4]])
    labels = cluster_cell_points(np.vstack([paris, lyon, lone]), eps_km=25, min_samples=3)
    assert len(set(labels[:20])) == 1 and len(set(labels[20:35])) == 1 and labels[0] != labels[20]
    assert labels[35] not in labels[:35]  # noise becomes its own cluster, never dropped
    assert sorted(set(labels)) == [0, 1, 2]
    # across the antimeridian: 179.99 and -179.99 are 2 km apart on the sphere
    fiji = np.array([[-16.5, 179.99], [-16.5, -179.99], [-16.51, 179.995], [-16.49, -179.995]])
    assert len(set(cluster_cell_points(fiji, eps_km=10, min_samples=3))) == 1
    # fewer photos than min_samples: one cluster
    assert cluster_cell_points(np.array([[0.0, 0.0], [50.0, 50.0]]), min_samples=3).tolist() == [0, 0]


def _index(rng, n=60, d=8, cells=4):
    latlng = np.column_stack([rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)])
    emb = rng.normal(size=(n, d)).astype(np.float32)
    cell = rng.integers(0, cells, n)
    return RetrievalIndex.from_embeddings(latlng, emb, cell, eps_km=500, min_samples=2), latlng, emb, cell


def test_prototypes_scores_and_nearest_against_brute_force():
    rng = np.random.default_rng(1)
    index, latlng, emb, cell = _index(rng)
    embn = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    # prototypes: normalized mean of members
    for m in range(len(index.cluster_cell)):
        members = index.ref_emb[index.ref_cluster == m]
        want = members.mean(0) / np.linalg.norm(members.mean(0))
        assert np.allclose(index.cluster_proto[m], want, atol=1e-6)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cand = np.array([[0, 1, 2, 9]] * 5)  # cell 9 has no reference
    scores, best = index.score_cells(q, cand)
    for b in range(5):
        for k, c in enumerate(cand[b]):
            ids = np.flatnonzero(index.cluster_cell == c)
            if len(ids) == 0:
                assert scores[b, k] == -np.inf and best[b, k] == -1
                continue
            sims = index.cluster_proto[ids] @ qn[b]
            assert np.isclose(scores[b, k], sims.max(), atol=1e-6) and best[b, k] == ids[np.argmax(sims)]
    ll, idx = index.nearest_in_cluster(q, best[:, 0])
    for b in range(5):
        members = np.flatnonzero(index.ref_cluster == best[b, 0])
        sims = index.ref_emb[members] @ qn[b]
        assert idx[b] == members[np.argmax(sims)]  # the most similar member, not the farthest
        assert np.allclose(ll[b], index.ref_latlng[idx[b]])
        # and it is an original reference with its own coordinate
        orig = np.flatnonzero(np.all(np.isclose(embn, index.ref_emb[idx[b]], atol=1e-6), axis=1))
        assert np.allclose(latlng[orig[0]], ll[b])
    ll, idx = index.nearest_in_cluster(q[:1], np.array([-1]))
    assert np.isnan(ll).all() and idx[0] == -1
    s, i = index.search(q, k=3)
    assert np.allclose(s[:, 0], (index.ref_emb @ qn.T).max(0), atol=1e-5)


def test_save_load_round_trip_and_refusals(tmp_path):
    index, *_ = _index(np.random.default_rng(2))
    index.meta["fingerprint"] = "abc"
    folder = index.save(tmp_path / "index_v1")
    again = RetrievalIndex.load(folder)
    for k in ("ref_latlng", "ref_emb", "ref_cluster", "cluster_cell", "cluster_proto", "cluster_latlng"):
        assert np.array_equal(getattr(index, k), getattr(again, k))
    index.save(folder)  # overwriting an index replaces it whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index_v1"]
    meta = json.loads((folder / "meta.json").read_text())
    meta["format_version"] = 99
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 99"):
        RetrievalIndex.load(folder)
    with pytest.raises(FileNotFoundError, match="not a retrieval index"):
        RetrievalIndex.load(tmp_path / "nothing")


def test_build_from_a_run_skips_bad_photos_and_refuses_other_weights(tiny_run, tmp_path):
    import torch

    from geoloc.lightning.datamodule import eval_transform
    from geoloc.models.loading import load_checkpoint

    model = load_checkpoint(tiny_run["ckpt"])
    refs = read_sample(tiny_run["sample"], split="train", n_images=240)
    refs = refs.subset(np.arange(len(refs)) < 40)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    refs.table.loc[3, "path"] = str(tmp_path / "bad.jpg")
    index, skipped = RetrievalIndex.build(model.net, refs, model.cells, eval_transform(model.data_config),
                                          batch_size=16)
    assert len(index) == 39 and len(skipped) == 1
    assert np.array_equal(np.sort(index.ref_cell), np.sort(model.cells.assign(index.ref_latlng)))
    folder = index.save(tmp_path / "idx")
    RetrievalIndex.load(folder, net=model.net)
    with torch.no_grad():
        model.net.cell_head[1].bias.add_(1.0)
    with pytest.raises(ValueError, match="other network weights"):
        RetrievalIndex.load(folder, net=model.net)


def test_cli(tiny_run, tmp_path):
    assert default_index_dir(tiny_run["ckpt"]) == tiny_run["run"] / "index_v1"  # out=null writes there
    folder = tmp_path / "index_v1"  # (not into the shared run: other tests expect it without an index)
    r = subprocess.run([sys.executable, "-m", "geoloc.index", f"ckpt={tiny_run['ckpt']}", "data=sample",
                        f"data.root={tiny_run['sample']}", "data.n_images=240", "data.split=train", f"out={folder}"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "location clusters" in r.stdout
    index = RetrievalIndex.load(folder)
    assert index.meta["n_references"] == len(read_sample(tiny_run["sample"], split="train", n_images=240))
