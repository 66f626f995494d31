import numpy as np
import pytest
import torch

from geoloc.models.location_encoder import LocationEncoder
from geoloc.retrieval.gallery import GPSGallery, encoder_fingerprint


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
    with pytest.raises(FileNotFoundError, match="no gallery cache"):
        GPSGallery.load(tmp_path / "nope.npz")


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
