"""The retrieval core: the cell-sorted table (range and dense searches agree), the one score fusion, the
scorer protocol."""

import warnings

import numpy as np
import pytest
import torch

from geoloc.retrieval.rerank import masked_log_softmax, rerank, top_candidates
from geoloc.retrieval.scorers import (
    EvidenceScorer,
    ExportedEvidence,
    GalleryScorer,
    PrototypeScorer,
    Scorer,
    evidence_log_term,
)
from geoloc.retrieval.table import CellTable, dense_best_in_cells, normalize


def _script(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks torch.jit deprecated
        return torch.jit.script(fn)


def _table(rng, n=300, d=8, cells=20):
    cell = np.sort(rng.choice(np.setdiff1d(np.arange(cells), [3, 7]), n))  # cells 3 and 7 hold no row
    return CellTable(normalize(rng.normal(size=(n, d))), cell, rng.uniform(-60, 60, size=(n, 2)))


def test_best_in_cells_is_the_best_row_of_each_candidate_cell():
    rng = np.random.default_rng(0)
    t = _table(rng)
    q = rng.normal(size=(6, 8)).astype(np.float32)
    cand = rng.integers(0, 20, size=(6, 5))
    cand[0, :2] = [3, 7]
    scores, row = t.best_in_cells(q, cand)
    assert scores.shape == row.shape == cand.shape and scores.dtype == np.float32 and row.dtype == np.int64
    qn = normalize(q)
    for b in range(6):
        for k, c in enumerate(cand[b]):
            ids = np.flatnonzero(t.cell == c)
            if len(ids) == 0:
                assert scores[b, k] == -np.inf and row[b, k] == -1
                continue
            sims = t.emb[ids] @ qn[b]
            assert np.isclose(scores[b, k], sims.max(), atol=1e-6) and row[b, k] == ids[np.argmax(sims)]


def test_the_dense_torch_search_agrees_with_the_range_search_and_scripts():
    rng = np.random.default_rng(1)
    t = _table(rng)
    q = rng.normal(size=(7, 8)).astype(np.float32)
    cand = rng.integers(0, 20, size=(7, 6))
    cand[1, :] = [3, 7, 3, 7, 3, 7]
    scores, row = t.best_in_cells(q, cand)
    args = (torch.from_numpy(normalize(q)), torch.from_numpy(t.emb), torch.from_numpy(t.cell),
            torch.from_numpy(cand), 20)
    for fn in (dense_best_in_cells, _script(dense_best_in_cells)):
        d_scores, d_row = fn(*args)
        assert np.array_equal(d_row.numpy(), row)
        assert np.allclose(d_scores.numpy(), scores, atol=1e-6)
        assert np.isneginf(d_scores.numpy()[1]).all()
    # the rows need not be sorted for the dense search: shuffled, it finds the same rows
    perm = rng.permutation(len(t))
    d_scores, d_row = dense_best_in_cells(args[0], args[1][perm], args[2][perm], args[3], 20)
    assert np.array_equal(np.where(d_row.numpy() >= 0, perm[d_row.numpy()], -1), row)


def test_a_table_of_unsorted_rows_sorts_them_and_keeps_their_ids():
    rng = np.random.default_rng(2)
    emb, cell = normalize(rng.normal(size=(50, 4))), rng.integers(0, 5, 50)
    t = CellTable.sorted(emb, cell, rng.normal(size=(50, 2)))
    assert np.all(np.diff(t.cell) >= 0) and np.array_equal(emb[t.ids], t.emb)
    q = rng.normal(size=(3, 4))
    _, row = t.best_in_cells(q, [[0, 1], [2, 9], [4, 4]])
    ids = t.row_ids(row)
    for b, cells in enumerate([[0, 1], [2, 9], [4, 4]]):
        for k, c in enumerate(cells):
            members = np.flatnonzero(cell == c)
            want = members[np.argmax(emb[members] @ normalize(q)[b])] if len(members) else -1
            assert ids[b, k] == want
    with pytest.raises(ValueError, match="sorted by cell"):
        CellTable(emb, cell)
    with pytest.raises(ValueError, match=r"queries must be \(B, 4\)"):
        t.best_in_cells(q[:, :2], [[0]] * 3)


def test_masked_log_softmax_golden():
    s = torch.tensor([[1.0, 0.0, -np.inf], [-np.inf, -np.inf, -np.inf]])
    for fn in (masked_log_softmax, _script(masked_log_softmax)):
        out = fn(s, 0.5).numpy()
        # row 0: scores / T = [2, 0, 0 (the row's lowest finite score stands in for -inf)]
        z = np.log(np.exp(2) + 2)
        assert np.allclose(out[0], [2 - z, -z, -z])
        assert np.array_equal(out[1], [0.0, 0.0, 0.0])  # no score at all: no evidence either way
    assert np.array_equal(masked_log_softmax(torch.full((2, 3), -np.inf), 1.0).numpy(), np.zeros((2, 3)))


def test_rerank_fuses_with_weights_and_keeps_the_candidates_mass():
    p = torch.tensor([[0.5, 0.3, 0.1], [0.4, 0.4, 0.2]])
    t1 = torch.tensor([[0.0, 2.0, -1.0], [0.0, 0.0, 0.0]])
    t2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    for fn in (rerank, _script(rerank)):
        post, order = fn(p, [t1, t2], [1.5, 0.5], 0.7)
        fused = 0.7 * np.log(p.numpy()) + 1.5 * t1.numpy() + 0.5 * t2.numpy()
        want = np.exp(fused) / np.exp(fused).sum(1, keepdims=True) * p.numpy().sum(1, keepdims=True)
        assert np.array_equal(order.numpy(), np.argsort(-want, axis=1, kind="stable"))
        assert np.allclose(post.numpy(), np.take_along_axis(want, order.numpy(), 1), atol=1e-6)
        assert order[1].tolist() == [0, 1, 2]  # a tie keeps the candidates' order (stable)
    post, order = rerank(p, [], [], 1.0)  # no scorer, weight 1: the classifier's own probabilities
    assert np.allclose(post.numpy(), p.numpy(), atol=1e-6) and order[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="one weight per term"):
        rerank(p, [t1], [], 1.0)
    p_cand, cand = top_candidates(torch.tensor([[0.1, 0.6, 0.3]]), 5)
    assert cand.tolist() == [[1, 2, 0]] and np.allclose(p_cand.numpy(), [[0.6, 0.3, 0.1]])


def test_the_evidence_term_is_a_product_of_experts():
    rng = np.random.default_rng(3)
    dists = [rng.dirichlet(np.ones(k), size=6) for k in (2, 5)]
    probs = [rng.dirichlet(np.ones(k), size=3) for k in (2, 5)]
    cand = rng.integers(0, 6, size=(3, 4))
    as_t = [torch.tensor(p, dtype=torch.float32) for p in probs], [torch.tensor(d, dtype=torch.float32) for d in dists]
    args = (*as_t, torch.from_numpy(cand), [0.5, 2.0])
    want = sum(w * np.log(np.einsum("bk,bck->bc", p, d[cand])) for p, d, w in zip(probs, dists, [0.5, 2.0]))
    for fn in (evidence_log_term, _script(evidence_log_term)):
        assert np.allclose(fn(*args).numpy(), want, atol=1e-5)
    scorer = EvidenceScorer({"land": dists[0], "koppen_group": dists[1]}, {"land": 0.5, "koppen_group": 2.0})
    out = {"evidence/land": probs[0], "evidence/koppen_group": probs[1]}
    assert np.allclose(scorer.log_term(out, torch.from_numpy(cand)).numpy(), want, atol=1e-5)
    exported = _script(ExportedEvidence({"land": dists[0], "koppen_group": dists[1]}, scorer.weights))
    t_out = {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}
    assert np.allclose(exported(t_out, torch.from_numpy(cand)).numpy(), want, atol=1e-5)
    # other weights: a new scorer, sharing the distributions; the first is unchanged
    other = scorer.with_weights({"land": 1.0})
    assert other.weights == {"land": 1.0} and scorer.weights == {"land": 0.5, "koppen_group": 2.0}
    assert other.cell_evidence is scorer.cell_evidence
    with pytest.raises(ValueError, match="evidence weights name"):
        scorer.with_weights({"coast": 1.0})
    with pytest.raises(ValueError, match="evidence_weights names"):
        EvidenceScorer({"land": dists[0]}, {"script": 1.0})


def test_every_scorer_follows_the_protocol():
    rng = np.random.default_rng(4)
    from geoloc.retrieval.index import Clustering, RetrievalIndex

    latlng = rng.uniform(-50, 50, size=(40, 2))
    index = RetrievalIndex.from_embeddings(latlng, rng.normal(size=(40, 4)), rng.integers(0, 5, 40),
                                           clustering=Clustering(min_samples=2))
    gallery = CellTable.sorted(normalize(rng.normal(size=(30, 4))), rng.integers(0, 5, 30), latlng[:30])
    scorers = [PrototypeScorer(index), GalleryScorer(gallery), EvidenceScorer({"land": np.full((5, 2), 0.5)})]
    out = {"features": rng.normal(size=(3, 4)), "image_emb": rng.normal(size=(3, 4)),
           "evidence/land": np.full((3, 2), 0.5)}
    cand = torch.tensor([[0, 1, 2], [3, 4, 0], [1, 1, 2]])
    for s in scorers:
        assert isinstance(s, Scorer) and isinstance(s.describe(), dict)
        term = s.log_term(out, cand)
        assert term.shape == (3, 3) and term.dtype == torch.float32 and torch.isfinite(term).all()
    for s in scorers[:2]:
        where, ok = s.place(out, np.array([0, 3, 4]))
        assert where.shape == (3, 2) and ok.dtype == bool
    with pytest.raises(ValueError, match="prototype answer"):
        PrototypeScorer(index, answer="farthest")
    with pytest.raises(ValueError, match="gallery_backend"):
        GalleryScorer(gallery, backend="annoy")
