"""Retrieval index: location clusters per cell, prototypes, nearest reference, files, CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from geoloc.data.readers import read_sample
from geoloc.geo import EARTH_RADIUS_KM, latlng_to_xyz
from geoloc.retrieval.index import (
    INDEX_FORMAT_VERSION,
    Clustering,
    RetrievalIndex,
    _density_labels,
    cluster_cell_points,
    default_index_dir,
)

from .conftest import REPO

METHODS = [("hdbscan", 0.0), ("optics", 0.0), ("dbscan", 25.0)]


def _blob(rng, centre, n, km):
    """``n`` points scattered about ``km`` around ``centre`` ``[lat, lng]`` (lng wrapped)."""
    pts = np.asarray(centre) + rng.normal(scale=km / 111.0, size=(n, 2))
    pts[:, 1] = (pts[:, 1] + 180) % 360 - 180
    return pts


def _same_partition(a, b) -> bool:
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("method,eps_km", METHODS)
def test_two_places_in_a_cell_are_two_clusters(method, eps_km):
    rng = np.random.default_rng(0)
    paris, lyon = _blob(rng, (48.85, 2.35), 20, 2), _blob(rng, (45.76, 4.84), 15, 2)
    labels = cluster_cell_points(np.vstack([paris, lyon]), method=method, eps_km=eps_km)
    assert labels.dtype == np.int64 and sorted(set(labels)) == [0, 1]
    assert len(set(labels[:20])) == 1 and len(set(labels[20:])) == 1 and labels[0] != labels[20]


def test_noise_joins_the_nearest_cluster_or_stands_alone():
    rng = np.random.default_rng(0)
    pts = np.vstack([_blob(rng, (48.85, 2.35), 20, 2), _blob(rng, (45.76, 4.84), 15, 2), [[45.0, 5.5]]])
    near = cluster_cell_points(pts, method="dbscan", eps_km=25)  # the lone photo is 100 km from Lyon
    assert near[-1] == near[20] and len(set(near)) == 2
    alone = cluster_cell_points(pts, method="dbscan", eps_km=25, noise="singleton")
    assert alone[-1] not in alone[:-1] and sorted(set(alone)) == [0, 1, 2]


def test_small_or_structureless_cells_are_one_cluster():
    assert cluster_cell_points(np.array([[0.0, 0.0], [50.0, 50.0]])).tolist() == [0, 0]  # < min_samples
    assert cluster_cell_points(np.zeros((0, 2))).shape == (0,)
    assert set(cluster_cell_points(np.tile([[10.0, 20.0]], (8, 1)))) == {0}  # one spot: HDBSCAN calls it noise


@pytest.mark.parametrize("method,eps_km", METHODS)
def test_distances_are_great_circle_across_the_antimeridian(method, eps_km):
    rng = np.random.default_rng(1)
    fiji = _blob(rng, (-16.5, 180.0), 30, 3)  # lng on both sides of +-180
    assert (fiji[:, 1] > 170).any() and (fiji[:, 1] < -170).any()
    other = _blob(rng, (-19.0, 178.0), 30, 3)  # ~360 km away
    pts = np.vstack([fiji, other])
    labels = cluster_cell_points(pts, method=method, eps_km=eps_km)
    assert not set(labels[:30]) & set(labels[30:])
    # turning the globe 180 degrees about its axis changes no distance, so no label
    turned = np.column_stack([pts[:, 0], (pts[:, 1] + 360) % 360 - 180])
    assert _same_partition(labels, cluster_cell_points(turned, method=method, eps_km=eps_km))
    if method != "optics":  # (OPTICS finds structure inside a 3 km blob too)
        assert len(set(labels[:30])) == 1 and len(set(labels[30:])) == 1


@pytest.mark.parametrize("method,eps_km", METHODS)
def test_chords_on_unit_vectors_cluster_like_sklearn_haversine(method, eps_km):
    from sklearn.cluster import DBSCAN, HDBSCAN, OPTICS

    rng = np.random.default_rng(2)
    pts = np.vstack([_blob(rng, c, n, km) for c, n, km in [((48.85, 2.35), 80, 3), ((48.9, 2.6), 30, 1),
                                                           ((45.76, 4.84), 60, 10), ((47.0, 1.0), 40, 80)]])
    radians = np.radians(pts)
    if method == "hdbscan":
        ref = HDBSCAN(min_cluster_size=3, min_samples=3, metric="haversine", copy=True).fit_predict(radians)
    elif method == "optics":
        ref = OPTICS(min_samples=3, xi=0.15, metric="haversine").fit_predict(radians)
    else:
        ref = DBSCAN(eps=eps_km / EARTH_RADIUS_KM, min_samples=3, metric="haversine").fit_predict(radians)
    ours = _density_labels(latlng_to_xyz(pts), method, 3, eps_km, 0.15)
    assert ref.max() >= 1 and _same_partition(ours, ref)


def test_large_cells_are_clustered_on_a_sample():
    rng = np.random.default_rng(3)
    pts = np.vstack([_blob(rng, (48.85, 2.35), 150, 2), _blob(rng, (45.76, 4.84), 150, 2)])
    labels = cluster_cell_points(pts, method="dbscan", eps_km=25, max_points=40)
    assert len(set(labels[:150])) == 1 and len(set(labels[150:])) == 1 and labels[0] != labels[150]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="eps_km"):
        Clustering(method="dbscan")
    with pytest.raises(ValueError, match="method"):
        Clustering(method="kmeans")
    with pytest.raises(ValueError, match="noise"):
        cluster_cell_points(np.zeros((5, 2)), noise="drop")


def _index(rng, n=80, d=8, cells=4, clustering=None):
    centres = np.array([[48.85, 2.35], [45.76, 4.84], [40.7, -74.0], [35.7, 139.7], [-33.9, 151.2]])
    latlng = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.05, size=(n, 2))
    emb = rng.normal(size=(n, d)).astype(np.float32)
    cell = rng.integers(0, cells, n)
    clustering = clustering or Clustering(min_samples=2)
    return RetrievalIndex.from_embeddings(latlng, emb, cell, keys=[f"k{i}" for i in range(n)],
                                          clustering=clustering), latlng, emb, cell


def test_prototypes_are_normalized_member_means_and_clusters_stay_in_cells():
    index, latlng, emb, cell = _index(np.random.default_rng(1))
    assert len(index.cluster_cell) > len(np.unique(cell))  # the cells do split into places
    assert np.all(np.diff(index.cluster_cell) >= 0) and np.all(np.diff(index.ref_cluster) >= 0)
    assert np.array_equal(index.cluster_cell[index.ref_cluster], index.ref_cell)
    for m in range(len(index.cluster_cell)):
        members = index.ref_cluster == m
        mean = index.ref_emb[members].mean(0)
        assert np.allclose(index.cluster_proto[m], mean / np.linalg.norm(mean), atol=1e-6)
        assert np.isclose(index.ref_latlng[members], index.cluster_latlng[m]).all(axis=1).any()  # a member's
    # the references are the input rows, reordered and named by key
    rows = np.array([int(k[1:]) for k in index.ref_keys])
    assert sorted(rows) == list(range(len(latlng)))
    assert np.array_equal(index.ref_latlng, latlng[rows]) and np.array_equal(index.ref_cell, cell[rows])
    assert np.allclose(index.ref_emb, emb[rows] / np.linalg.norm(emb[rows], axis=1, keepdims=True), atol=1e-6)


def test_score_cells_and_nearest_in_cluster_against_brute_force():
    rng = np.random.default_rng(2)
    index, *_ = _index(rng)
    q = rng.normal(size=(6, 8)).astype(np.float32)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cand = np.array([[0, 1, 2, 9], [3, 2, 1, 0], [9, 9, 0, 1], [1, 1, 1, 1], [2, 3, 0, 1], [0, 3, 2, 9]])
    scores, best = index.score_cells(torch.from_numpy(q), cand)  # tensors and arrays alike
    assert scores.shape == best.shape == cand.shape and scores.dtype == np.float32 and best.dtype == np.int64
    for b in range(len(q)):
        for k, c in enumerate(cand[b]):
            ids = np.flatnonzero(index.cluster_cell == c)
            if len(ids) == 0:  # cell 9 has no reference
                assert scores[b, k] == -np.inf and best[b, k] == -1
                continue
            sims = index.cluster_proto[ids] @ qn[b]
            assert np.isclose(scores[b, k], sims.max(), atol=1e-6) and best[b, k] == ids[np.argmax(sims)]
    cluster = best[:, 0]
    ll, idx = index.nearest_in_cluster(q, cluster)
    assert ll.shape == (6, 2) and idx.dtype == np.int64
    for b in range(len(q)):
        if cluster[b] < 0:
            assert idx[b] == -1 and np.isnan(ll[b]).all()
            continue
        members = np.flatnonzero(index.ref_cluster == cluster[b])
        sims = index.ref_emb[members] @ qn[b]
        assert idx[b] == members[np.argmax(sims)] and np.array_equal(ll[b], index.ref_latlng[idx[b]])


def test_nearest_in_cluster_is_the_most_similar_member_not_the_farthest():
    emb = np.eye(4, dtype=np.float32)  # one cluster of four photos, orthogonal embeddings
    latlng = np.array([[48.85, 2.35], [48.86, 2.34], [48.84, 2.36], [48.85, 2.37]])
    index = RetrievalIndex.from_embeddings(latlng, emb, np.zeros(4, np.int64))
    assert len(index.cluster_cell) == 1
    query = np.array([[0.1, 0.0, 0.9, -0.5]])  # most like photo 2, least like photo 3
    ll, idx = index.nearest_in_cluster(query, np.array([0]))
    assert index.ref_keys[idx[0]] == "2" and np.array_equal(ll[0], latlng[2])
    ll, idx = index.nearest_in_cluster(np.vstack([query, query]), np.array([-1, 0]))
    assert idx.tolist() == [-1, int(np.flatnonzero(index.ref_keys == "2")[0])] and np.isnan(ll[0]).all()
    with pytest.raises(IndexError, match="cluster ids"):
        index.nearest_in_cluster(query, np.array([5]))


def test_search_is_exact_top_k():
    rng = np.random.default_rng(3)
    index, *_ = _index(rng)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    want = np.sort(index.ref_emb @ (q / np.linalg.norm(q, axis=1, keepdims=True)).T, axis=0)[::-1][:3].T
    for backend in ("blas", "faiss"):
        s, i = index.search(q, k=3, backend=backend)
        assert i.shape == (5, 3) and np.allclose(s, want, atol=1e-5), backend
        assert np.allclose(np.take_along_axis(index.ref_emb @ (q / np.linalg.norm(q, axis=1, keepdims=True)).T,
                                              i.T, axis=0).T, s, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        index.search(q[:, :4])


def test_save_load_round_trip_and_refusals(tmp_path):
    index, *_ = _index(np.random.default_rng(4))
    net = torch.nn.Linear(3, 2)
    from geoloc.retrieval.gallery import encoder_fingerprint

    index.meta["fingerprint"] = encoder_fingerprint(net)
    folder = index.save(tmp_path / f"index_v{INDEX_FORMAT_VERSION}")
    assert sorted(p.name for p in folder.iterdir()) == ["index.npz", "meta.json", "ref_emb.npy", "refs.faiss"]
    again = RetrievalIndex.load(folder, net=net)
    for k in ("ref_latlng", "ref_emb", "ref_cell", "ref_cluster", "ref_keys", "cluster_cell", "cluster_proto",
              "cluster_latlng"):
        assert np.array_equal(getattr(index, k), getattr(again, k)), k
    assert isinstance(again.ref_emb, np.memmap) and not isinstance(RetrievalIndex.load(folder, mmap=False).ref_emb,
                                                                   np.memmap)
    assert again.meta["clustering"] == index.meta["clustering"] and again._faiss is None  # read on first use
    assert again.faiss_index.ntotal == len(index)
    q = np.random.default_rng(5).normal(size=(3, 8))
    assert np.array_equal(again.score_cells(q, [[0, 1]] * 3)[1], index.score_cells(q, [[0, 1]] * 3)[1])

    index.save(folder)  # overwriting an index replaces it whole, leaving nothing else behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
    with torch.no_grad():
        net.bias.add_(1.0)
    with pytest.raises(ValueError, match="made with other weights.*python -m geoloc index"):
        RetrievalIndex.load(folder, net=net)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["kind"] == "index" and meta["settings"]["clustering"] == index.meta["clustering"]
    meta["format_version"] = 99
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 99"):
        RetrievalIndex.load(folder)
    with pytest.raises(FileNotFoundError, match="not a retrieval index"):
        RetrievalIndex.load(tmp_path / "nothing")


def test_an_index_from_before_the_artifact_meta_still_loads(tmp_path):
    index, *_ = _index(np.random.default_rng(7))
    folder = index.save(tmp_path / "idx")
    stored = json.loads((folder / "meta.json").read_text())
    flat = {"format_version": 1, "fingerprint": stored["fingerprint"], **stored["settings"]}  # the old meta.json
    (folder / "meta.json").write_text(json.dumps(flat))
    again = RetrievalIndex.load(folder)
    assert again.meta["clustering"] == index.meta["clustering"] and again.meta["n_clusters"] == index.meta["n_clusters"]
    assert again.artifact_meta().kind == "index"
    q = np.random.default_rng(8).normal(size=(2, 8))
    assert np.array_equal(again.score_cells(q, [[0, 1, 2]] * 2)[1], index.score_cells(q, [[0, 1, 2]] * 2)[1])
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json: not JSON"):
        RetrievalIndex.load(folder)


def test_inconsistent_arrays_are_refused_naming_the_file(tmp_path):
    index, *_ = _index(np.random.default_rng(6))
    folder = index.save(tmp_path / "idx")
    with np.load(folder / "index.npz") as z:
        arrays = dict(z)
    arrays["ref_cell"] = arrays["ref_cell"] + 1
    np.savez(folder / "index.npz", **arrays)
    with pytest.raises(ValueError, match=r"idx: reference 'k\d+' is in cell"):
        RetrievalIndex.load(folder)


def test_build_from_a_run_skips_bad_photos_and_refuses_other_weights(tiny_run, tmp_path):
    from geoloc.data.transforms import eval_transform
    from geoloc.models.loading import load_checkpoint

    model = load_checkpoint(tiny_run["ckpt"])
    refs = read_sample(tiny_run["sample"], split="train", n_images=240)
    refs = refs.subset(np.arange(len(refs)) < 40)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    refs.table.loc[3, "path"] = str(tmp_path / "bad.jpg")
    bad_key = refs.table.loc[3, "key"]
    index, skipped = RetrievalIndex.build(model.net, refs, model.cells, eval_transform(model.data_config),
                                          batch_size=16)
    assert len(index) == 39 and len(skipped) == 1 and skipped.items[0][0] == bad_key
    assert index.meta["skipped"]["n_skipped"] == 1 and bad_key not in set(index.ref_keys)
    assert np.array_equal(index.ref_cell, model.cells.assign(index.ref_latlng))
    assert index.ref_emb.shape[1] == model.net.image_encoder.num_features and index.meta["embedding"] == "features"
    folder = index.save(tmp_path / "idx")
    RetrievalIndex.load(folder, net=model.net)
    with torch.no_grad():
        model.net.cell_head[1].bias.add_(1.0)
    with pytest.raises(ValueError, match="made with other weights.*python -m geoloc index"):
        RetrievalIndex.load(folder, net=model.net)


def test_cli(tiny_run, tmp_path):
    assert default_index_dir(tiny_run["ckpt"]) == tiny_run["run"] / "index_v1"  # out=null writes there
    folder = tmp_path / "index_v1"  # (not into the shared run: other tests expect it without an index)
    r = subprocess.run([sys.executable, "-m", "geoloc", "index", f"ckpt={tiny_run['ckpt']}", "data=sample",
                        f"data.root={tiny_run['sample']}", "data.n_images=240", "data.split=train",
                        "embedding=image_emb", f"out={folder}"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "location clusters" in r.stdout and "skipped 0" in r.stdout and str(folder) in r.stdout
    index = RetrievalIndex.load(folder)
    assert index.meta["n_references"] == len(read_sample(tiny_run["sample"], split="train", n_images=240))
    assert index.meta["embedding"] == "image_emb" and index.meta["clustering"]["method"] == "hdbscan"
    assert index.meta["ckpt"] == str(tiny_run["ckpt"].resolve())
