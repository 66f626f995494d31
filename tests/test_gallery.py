"""The GPS gallery: cached embeddings, exact search, restricted to cells; built by ``python -m geoloc gallery``,
refused with the command that rebuilds it when missing, damaged or made with other weights."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from geoloc.models.location_encoder import LocationEncoder
from geoloc.retrieval.gallery import GPSGallery, default_gallery_path, encoder_fingerprint

from .conftest import REPO


@pytest.fixture(scope="module")
def encoder():
    return LocationEncoder(sigmas=(1, 16), n_frequencies=16, hidden=32, depth=2, dim=16, seed=0)


@pytest.fixture(scope="module")
def latlng():
    rng = np.random.default_rng(0)
    return np.column_stack([rng.uniform(-60, 70, 500), rng.uniform(-180, 180, 500)])


def test_build_matches_encoder_and_search_is_exact(encoder, latlng):
    g = GPSGallery.build(encoder, latlng, batch_size=128)
    with torch.no_grad():
        ref = encoder(torch.tensor(latlng, dtype=torch.float32)).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(g.embeddings, ref, atol=1e-6)
    q = np.random.default_rng(1).normal(size=(7, 16)).astype(np.float32)
    scores, idx = g.search(q, k=3)
    f_scores, f_idx = g.search(q, k=3, backend="faiss")
    np.testing.assert_array_equal(idx, f_idx)
    np.testing.assert_allclose(scores, f_scores, atol=1e-5)
    brute = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ ref.T
    np.testing.assert_array_equal(idx[:, 0], brute.argmax(1))
    np.testing.assert_allclose(scores[:, 0], brute.max(1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    # a gallery point's own embedding finds itself
    _, self_idx = g.search(g.embeddings[:20], k=1)
    np.testing.assert_array_equal(self_idx[:, 0], np.arange(20))


def test_save_load_and_stale_cache_refused(encoder, latlng, tmp_path):
    g = GPSGallery.build(encoder, latlng)
    path = g.save(tmp_path / "gallery_v1.npz")
    back = GPSGallery.load(path, encoder=encoder)
    np.testing.assert_array_equal(back.embeddings, g.embeddings)
    np.testing.assert_array_equal(back.latlng, g.latlng)
    other = LocationEncoder(sigmas=(1, 16), n_frequencies=16, hidden=32, depth=2, dim=16, seed=1)
    assert encoder_fingerprint(other) != encoder_fingerprint(encoder)
    with pytest.raises(ValueError, match="other location-encoder weights"):
        GPSGallery.load(path, encoder=other)
    with pytest.raises(FileNotFoundError, match="nope.npz: no gallery cache; build it with python -m geoloc gallery"):
        GPSGallery.load(tmp_path / "nope.npz")
    with np.load(path) as z:  # the meta travels inside: kind, format version, fingerprint
        meta = json.loads(str(z["meta"]))
    assert meta["kind"] == "gallery" and meta["format_version"] == 1 and meta["fingerprint"] == g.fingerprint


def test_a_cache_from_before_the_meta_still_loads(encoder, latlng, tmp_path):
    g = GPSGallery.build(encoder, latlng)
    old = tmp_path / "gallery_v1.npz"
    np.savez(old, latlng=g.latlng, embeddings=g.embeddings, fingerprint=np.array(g.fingerprint),
             version=np.array(1))  # what earlier versions wrote
    back = GPSGallery.load(old, encoder=encoder)
    np.testing.assert_array_equal(back.embeddings, g.embeddings)
    np.savez(old, latlng=g.latlng, embeddings=g.embeddings, fingerprint=np.array(g.fingerprint), version=np.array(7))
    with pytest.raises(ValueError, match="gallery format 7.*rebuild it with python -m geoloc gallery"):
        GPSGallery.load(old)


def test_search_restricted_to_cells(encoder, latlng):
    g = GPSGallery.build(encoder, latlng)
    cells = (latlng[:, 1] > 0).astype(int) + 2 * (latlng[:, 0] > 0)  # four quadrant "cells"
    g.assign_cells(cells)
    q = g.embeddings[:10] + 0.01
    s, i = g.search_in_cells(q, np.tile([[1, 3]], (10, 1)))
    assert np.isin(cells[i], [1, 3]).all()
    for b in range(10):  # the best within the allowed cells, by brute force
        allowed = np.flatnonzero(np.isin(cells, [1, 3]))
        sc = g.embeddings[allowed] @ (q[b] / np.linalg.norm(q[b]))
        assert i[b] == allowed[np.argmax(sc)]
    s, i = g.search_in_cells(q[:2], np.array([[9], [9]]))
    assert (i == -1).all() and np.isinf(s).all()
    with pytest.raises(ValueError, match="one cell per gallery point"):
        g.assign_cells(cells[:3])


def test_the_gallery_step_builds_the_cache_a_scorer_reads(tiny_run, tmp_path):
    from geoloc.data.readers import read_sample
    from geoloc.models.loading import load_checkpoint
    from geoloc.retrieval.scorers import GalleryScorer

    assert default_gallery_path(tiny_run["ckpt"]) == tiny_run["run"] / "gallery_v1.npz"  # out=null writes there
    ref = read_sample(tiny_run["sample"], split="train", n_images=240).latlng
    csv = tmp_path / "coords.csv"
    np.savetxt(csv, ref, delimiter=",", header="lat,lng", comments="")
    out = tmp_path / "g.npz"  # (not into the shared run: other tests expect it without a gallery)
    r = subprocess.run([sys.executable, "-m", "geoloc", "gallery", f"ckpt={tiny_run['ckpt']}", f"source={csv}",
                        f"out={out}"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"embedded {len(ref)} gallery coordinates" in r.stdout and str(out) in r.stdout
    model = load_checkpoint(tiny_run["ckpt"])
    g = GPSGallery.load(out, encoder=model.net.location_encoder)
    np.testing.assert_allclose(g.latlng, ref)
    assert g.settings["source"] == str(csv.resolve())
    scorer = GalleryScorer.from_run(model, gallery=out)
    assert len(scorer) == len(ref) and np.array_equal(np.sort(scorer.table.ids), np.arange(len(ref)))
    assert np.array_equal(scorer.table.cell, np.sort(model.cells.assign(ref)))
    # a cache it cannot use names the file and the command that rebuilds it
    with pytest.raises(FileNotFoundError, match=r"gallery_v1.npz: no gallery cache; build it with python -m geoloc "
                                                r"gallery ckpt=.*last.ckpt"):
        GalleryScorer.from_run(model)
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(ValueError, match=r"damaged.npz: not a readable gallery cache.*python -m geoloc gallery "
                                         r"ckpt=.*out=.*damaged.npz"):
        GalleryScorer.from_run(model, gallery=damaged)
    other = GPSGallery.build(LocationEncoder(sigmas=(1, 16), n_frequencies=16, hidden=32, depth=2, dim=16, seed=5),
                             ref[:10])
    other.save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="other.npz: made with other location-encoder weights.*geoloc gallery"):
        GalleryScorer.from_run(model, gallery=tmp_path / "other.npz")
