"""ModelPredictor: cell ranking, reranking by scorers (prototypes, gallery, evidence), fusion weights, the
factory that loads checkpoints and artifacts, and its fall-backs."""

import json

import numpy as np
import pytest

from geoloc.inference.predictor import ModelPredictor, build_predictor
from geoloc.retrieval.scorers import EvidenceScorer, PrototypeScorer


@pytest.fixture(scope="module")
def loaded(tiny_run):
    """The tiny run's model, loaded once (a ModelPredictor does no I/O of its own)."""
    from geoloc.models.loading import load_checkpoint

    return load_checkpoint(tiny_run["ckpt"])


def test_model_predictor_without_refinement(tiny_run):
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_sample

    pred = build_predictor(str(tiny_run["ckpt"]), topk=3)
    items = list(read_sample(tiny_run["sample"], split="test", n_images=240).iter_items(SkipReport()))[:7]
    out = pred.predict([it.image for it in items], [it.key for it in items])
    C = len(pred.cells)
    assert out.cell_prob.shape == (7, C) and np.allclose(out.cell_prob.sum(1), 1, atol=1e-5)
    top = np.argsort(-out.cell_prob, axis=1, kind="stable")[:, :3]
    assert np.array_equal(np.sort(out.topk_cells, 1), np.sort(top, 1))
    assert np.allclose(out.topk_prob, np.take_along_axis(out.cell_prob, out.topk_cells, 1), atol=1e-6)
    assert np.allclose(out.latlng, pred.centroids[out.topk_cells[:, 0]])
    assert pred.describe()["refine"] == "none"


def test_a_predictor_takes_a_loaded_model_not_a_path(tiny_run, loaded):
    with pytest.raises(TypeError, match="build_predictor"):
        ModelPredictor(str(tiny_run["ckpt"]))
    pred = ModelPredictor(loaded, topk=2, name="x")
    assert pred.net is loaded.net and pred.cells is loaded.cells and pred.describe()["name"] == "x"
    with pytest.raises(ValueError, match="topk must be at least 1"):
        ModelPredictor(loaded, topk=0)


class _Index:
    """A stand-in RetrievalIndex: one prototype per cell, its score and its coordinate are given."""

    def __init__(self, score_of_cell: dict, latlng_of_cell: dict):
        self.meta = {"embedding": "features"}
        self.score_of_cell, self.latlng_of_cell = score_of_cell, latlng_of_cell
        self.cluster_cell = np.array(sorted(score_of_cell), np.int64)
        self.cluster_latlng = np.array([self.latlng_of_cell.get(int(c), (np.nan, np.nan)) for c in self.cluster_cell])

    def score_cells(self, q, cand):
        s = np.array([[self.score_of_cell.get(int(c), -np.inf) for c in row] for row in cand], np.float32)
        cl = np.array([[int(c) if int(c) in self.score_of_cell else -1 for c in row] for row in cand])
        return s, cl

    def nearest_in_cluster(self, q, cluster):
        ll = np.array([self.latlng_of_cell.get(int(c), (np.nan, np.nan)) for c in cluster], np.float64)
        return ll, np.where(cluster >= 0, 0, -1)


def _outputs(prob):
    prob = np.asarray(prob, np.float32)
    return {"cell_prob": prob, "features": np.ones((len(prob), 4), np.float32),
            "image_emb": np.ones((len(prob), 4), np.float32)}


def _with_index(loaded, index, **kw):
    return ModelPredictor(loaded, [PrototypeScorer(index, temperature=0.1)], topk=2, candidates=3, **kw)


def test_prototype_refinement_fuses_and_returns_the_nearest_reference(loaded):
    C = len(loaded.cells)
    prob = np.full((1, C), 0.1 / (C - 3))
    prob[0, :3] = [0.5, 0.3, 0.1]  # cell 0 is the classifier's choice
    pred = _with_index(loaded, _Index({0: 0.0, 1: 0.9, 2: 0.2}, {1: (10.0, 20.0), 0: (1.0, 2.0)}))
    out = pred.refine_batch(_outputs(prob))
    # fused: log p + log softmax(s / 0.1): cell 1 wins (log .3 + 9 > log .5 + 0)
    assert out.topk_cells[0, 0] == 1
    assert np.allclose(out.latlng[0], [10.0, 20.0])  # the reference image's coordinate, not the centroid
    # fused probabilities keep the candidates' total mass (0.9), so they read on the classifier's scale
    assert out.topk_prob[0].sum() < prob[0, :3].sum() + 1e-6 and out.topk_prob[0, 0] > 0.5
    assert out.topk_prob[0, 0] > out.topk_prob[0, 1]
    # the fusion weights count: with the retrieval term down-weighted, the classifier's choice stands
    low = pred.with_weights({"prototypes": 0.05})
    assert low.refine_batch(_outputs(prob)).topk_cells[0, 0] == 0
    assert pred.weights["prototypes"] == 1.0 and low.scorers == pred.scorers  # a new predictor; this one is as it was
    # ... and by hand: log softmax over the candidates of w_cells log p + w_proto log softmax(s / T)
    w = pred.with_weights({"cells": 0.5, "prototypes": 2.0}).refine_batch(_outputs(prob))
    s = np.array([0.0, 0.9, 0.2]) / 0.1
    fused = 0.5 * np.log([0.5, 0.3, 0.1]) + 2.0 * (s - np.log(np.exp(s).sum()))
    want = np.exp(fused) / np.exp(fused).sum() * 0.9
    assert np.allclose(w.topk_prob[0], np.sort(want)[::-1][:2], atol=1e-6)
    # weak retrieval evidence leaves the classifier's choice alone
    pred = _with_index(loaded, _Index({0: 0.0, 1: 0.01, 2: 0.0}, {1: (10.0, 20.0), 0: (1.0, 2.0)}))
    out = pred.refine_batch(_outputs(prob))
    assert out.topk_cells[0, 0] == 0 and np.allclose(out.latlng[0], [1.0, 2.0])
    # a winning cell without references keeps its centroid
    pred = _with_index(loaded, _Index({1: -1.0, 2: -1.0}, {}))
    out = pred.refine_batch(_outputs(prob))
    assert out.topk_cells[0, 0] == 0 and np.allclose(out.latlng[0], pred.centroids[0])


def test_gallery_refinement_answers_a_gallery_point_in_the_chosen_cell(tiny_run, tmp_path):
    from geoloc.data.readers import read_sample
    from geoloc.prepare.gallery import build

    ref = read_sample(tiny_run["sample"], split="train", n_images=240).latlng
    csv = tmp_path / "gallery.csv"
    np.savetxt(csv, ref, delimiter=",", header="lat,lng", comments="")
    # the cache is built by the offline step, never by the predictor
    with pytest.raises(FileNotFoundError, match=r"gallery_v1.npz: no gallery cache; build it with python -m geoloc "
                                                r"gallery ckpt=.*last.ckpt source=.*gallery.csv"):
        build_predictor(str(tiny_run["ckpt"]), refine="gallery", gallery_source=str(csv))
    gallery, gal = build(tiny_run["ckpt"], source=str(csv), out=tmp_path / "g.npz")
    pred = build_predictor(str(tiny_run["ckpt"]), refine="gallery", gallery=str(gal), topk=3)
    assert pred.refine == "gallery" and pred.describe()["gallery"] == str(gal)
    assert pred.describe()["gallery_n"] == len(ref)
    rng = np.random.default_rng(0)
    prob = rng.dirichlet(np.ones(len(pred.cells)), size=5).astype(np.float32)
    out = pred.refine_batch({"cell_prob": prob, "features": rng.normal(size=(5, 8)).astype(np.float32),
                             "image_emb": rng.normal(size=(5, pred.net.location_encoder.out_features))})
    chosen = out.topk_cells[:, 0]
    assert np.array_equal(pred.cells.assign(out.latlng), chosen)  # the answer lies in the chosen cell
    g = [np.flatnonzero(np.all(np.isclose(gallery.latlng, ll), axis=1)) for ll in out.latlng]
    assert all(len(i) for i in g)  # and is a gallery point
    # unrestricted (GeoCLIP's own answer): the best gallery point anywhere, FAISS and BLAS agreeing
    emb = rng.normal(size=(5, pred.net.location_encoder.out_features)).astype(np.float32)
    answers = []
    for backend in ("blas", "faiss"):
        p2 = build_predictor(str(tiny_run["ckpt"]), refine="gallery", gallery=str(gal), gallery_restrict=False,
                             gallery_backend=backend)
        answers.append(p2.refine_batch({"cell_prob": prob, "features": emb, "image_emb": emb}).latlng)
    assert np.allclose(answers[0], answers[1])
    assert np.allclose(answers[0], gallery.latlng[gallery.search(emb, k=1)[1][:, 0]])


def test_missing_index_falls_back_or_fails_clearly(tiny_run, tmp_path):
    with pytest.warns(UserWarning, match="falling back to cell centroids"):
        pred = build_predictor(str(tiny_run["ckpt"]), refine="prototypes")
    assert pred.refine == "none" and pred.describe()["refine_requested"] == "prototypes"
    with pytest.raises(FileNotFoundError, match="no retrieval index"):
        build_predictor(str(tiny_run["ckpt"]), refine="prototypes", index=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="refine must be one of"):
        build_predictor(str(tiny_run["ckpt"]), refine="magic")


def test_prototype_refinement_end_to_end_with_a_built_index(tiny_run, tmp_path):
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_sample
    from geoloc.retrieval.index import RetrievalIndex

    base = build_predictor(str(tiny_run["ckpt"]))
    refs = read_sample(tiny_run["sample"], split="train", n_images=240)
    index, _ = RetrievalIndex.build(base.net, refs, base.cells, base.transform)
    index.save(tmp_path / "index_v1")
    pred = build_predictor(str(tiny_run["ckpt"]), refine="prototypes", index=str(tmp_path / "index_v1"))
    assert pred.describe()["refine"] == "prototypes" and pred.describe()["prototype_answer"] == "nearest"
    items = list(read_sample(tiny_run["sample"], split="test", n_images=240).iter_items(SkipReport()))[:10]
    out = pred.predict([it.image for it in items], [it.key for it in items])
    has_refs = np.isin(out.topk_cells[:, 0], index.cluster_cell)
    for ll, ok in zip(out.latlng, has_refs):  # answers are training-photo coordinates where refs exist
        assert not ok or np.isclose(index.ref_latlng, ll).all(axis=1).any()
    # the exported model's rule: the best cluster's representative
    rep = build_predictor(str(tiny_run["ckpt"]), refine="prototypes", index=str(tmp_path / "index_v1"),
                          prototype_answer="representative").predict([it.image for it in items], [])
    assert np.array_equal(rep.topk_cells, out.topk_cells)
    for ll, ok in zip(rep.latlng, has_refs):
        assert not ok or np.isclose(index.cluster_latlng, ll).all(axis=1).any()


@pytest.mark.slow
def test_compiled_predictor_agrees_with_eager(tiny_run):
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_sample

    items = list(read_sample(tiny_run["sample"], split="test", n_images=240).iter_items(SkipReport()))[:6]
    images, keys = [it.image for it in items], [it.key for it in items]
    eager = build_predictor(str(tiny_run["ckpt"])).predict(images, keys)
    compiled = build_predictor(str(tiny_run["ckpt"]), compile=True)
    assert compiled.describe()["compiled"] is True
    out = compiled.predict(images, keys)
    assert np.abs(out.cell_prob - eager.cell_prob).max() < 1e-5
    assert np.array_equal(out.topk_cells, eager.topk_cells)


def test_a_run_with_relative_paths_loads_from_any_folder(tiny_run, tmp_path, monkeypatch):
    """train.py records the cells path as given (relative to where it ran); the run still loads elsewhere."""
    import shutil

    import yaml

    root = tmp_path / "project"
    run = root / "outputs" / "run"
    shutil.copytree(tiny_run["run"] / "checkpoints", run / "checkpoints")
    shutil.copy(tiny_run["cells"], root / "outputs" / "cells.parquet")
    cfg = yaml.safe_load((tiny_run["run"] / "config.yaml").read_text())
    cfg["cells"] = "outputs/cells.parquet"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)  # neither the project root nor the run folder
    pred = build_predictor(str(run / "checkpoints" / "last.ckpt"))
    assert pred.cells_path == str(root / "outputs" / "cells.parquet")


def test_evidence_reranking_is_a_product_of_experts(tiny_evidence_run):
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_sample

    ckpt = str(tiny_evidence_run["ckpt"])
    from tests.conftest import EVIDENCE_HEADS

    assert set(build_predictor(ckpt, refine="evidence").describe()["evidence_weights"]) == set(EVIDENCE_HEADS)
    pred = build_predictor(ckpt, refine="evidence", topk=3, candidates=4,
                          evidence_weights={"land": 1.0, "koppen_group": 1.0, "hemisphere": 1.0, "script": 0.0})
    assert pred.describe()["refine"] == "evidence"
    assert set(pred.describe()["evidence_weights"]) == {"land", "koppen_group", "hemisphere"}
    C = len(pred.cells)
    hemi = pred.cells.evidence("hemisphere")
    south = int(np.argmax(hemi[:, 1]))  # the most southern cell, and the three most northern
    north = [int(c) for c in np.argsort(hemi[:, 1], kind="stable")[:3]]
    assert hemi[south, 1] > 0.8 and hemi[north, 1].max() < 0.2
    cand = [*north, south]
    prob = np.full((1, C), 0.2 / (C - 4))
    prob[0, cand] = [0.4, 0.2, 0.1, 0.1]
    out = {"cell_prob": prob.astype(np.float32), "features": np.zeros((1, 4), np.float32),
           "image_emb": np.zeros((1, 4), np.float32),
           "evidence/land": np.array([[0.5, 0.5]]), "evidence/koppen_group": np.full((1, 5), 0.2),
           "evidence/hemisphere": np.array([[0.001, 0.999]])}
    res = pred.refine_batch(out)
    assert res.topk_cells[0, 0] == south  # confident "south" evidence moves the answer to a southern cell
    # by hand: log p + sum_h log sum_k q_h(k) P_cell,h(k)
    score = np.log(prob[0, cand]) + sum(np.log(pred.cells.evidence(h)[cand] @ out[f"evidence/{h}"][0])
                                        for h in ("land", "koppen_group", "hemisphere"))
    assert res.topk_cells[0, 0] == cand[int(np.argmax(score))]
    assert np.array_equal(res.topk_cells[0], np.array(cand)[np.argsort(-score, kind="stable")][:3])
    # without the evidence the classifier's choice stands
    assert build_predictor(ckpt, topk=3, candidates=4).refine_batch(out).topk_cells[0, 0] == north[0]
    # the real path end to end
    items = list(read_sample(tiny_evidence_run["sample"], split="test", n_images=240).iter_items(SkipReport()))[:5]
    p = build_predictor(ckpt, refine="evidence").predict([it.image for it in items], [it.key for it in items])
    assert p.latlng.shape == (5, 2) and np.isfinite(p.topk_prob).all()
    with pytest.raises(ValueError, match="evidence_weights names"):
        build_predictor(ckpt, refine="evidence", evidence_weights={"coast": 1.0})


def test_evidence_refine_needs_evidence_heads(tiny_run):
    with pytest.raises(ValueError, match="trained with evidence heads"):
        build_predictor(str(tiny_run["ckpt"]), refine="evidence")


def test_evidence_weights_are_chosen_on_validation_photos(tiny_evidence_run, tmp_path):
    """Coordinate ascent finds the head that carries the information; the CLI writes a weights file the
    predictor reads."""
    import subprocess
    import sys

    from geoloc.evidence.tune import tune_evidence_weights
    from tests.conftest import EVIDENCE_HEADS, REPO

    ckpt = str(tiny_evidence_run["ckpt"])
    pred = build_predictor(ckpt, refine="evidence", candidates=6)
    cells = pred.cells
    hemi = cells.evidence("hemisphere")
    south = np.flatnonzero(hemi[:, 1] > 0.8)
    north = np.flatnonzero(hemi[:, 0] > 0.8)
    rng = np.random.default_rng(0)
    n, C = 40, len(cells)
    truth = rng.choice(south, n)  # every photo is in a southern cell, the classifier prefers northern ones
    prob = np.full((n, C), 1e-3)
    prob[np.arange(n), rng.choice(north, n)] = 0.5
    prob[np.arange(n), truth] = 0.3
    prob /= prob.sum(1, keepdims=True)
    out = {"cell_prob": prob.astype(np.float32)}
    for h in pred.evidence_heads_available:
        k = len(cells.evidence(h)[0])
        out[f"evidence/{h}"] = np.full((n, k), 1.0 / k)  # uninformative ...
    out["evidence/hemisphere"] = np.tile([0.02, 0.98], (n, 1))  # ... except the hemisphere
    before = pred.describe()
    res = tune_evidence_weights(pred, out, cells.centroids[truth])
    assert res["weights"]["hemisphere"] > 0 and res["geoscore"] > res["geoscore_without"] + 1000
    assert set(res["weights"]) == set(EVIDENCE_HEADS)
    assert pred.describe() == before  # tuning returns the weights; the predictor is not changed
    tuned = pred.with_weights(evidence=res["weights"])
    assert tuned.describe()["evidence_weights"] == {h: w for h, w in res["weights"].items() if w > 0}
    wfile = tmp_path / "w.json"
    r = subprocess.run([sys.executable, "-m", "geoloc", "tune", f"ckpt={ckpt}", "data=sample",
                        f"data.root={tiny_evidence_run['sample']}", "data.n_images=240", f"out={wfile}",
                        "grid=[0,1]"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads(wfile.read_text())
    assert set(saved["weights"]) == set(EVIDENCE_HEADS) and saved["n"] > 10
    p2 = build_predictor(ckpt, refine="evidence", evidence_weights=str(wfile))
    assert p2.describe()["evidence_weights_file"] == str(wfile)
    assert p2.describe()["evidence_weights"] == {h: w for h, w in saved["weights"].items() if w > 0}
    with pytest.raises(FileNotFoundError, match="no evidence weights file"):
        build_predictor(ckpt, refine="evidence", evidence_weights=str(tmp_path / "none.json"))


def test_scorers_are_a_hydra_list_and_refine_names_are_shorthands(tiny_evidence_run, tmp_path):
    """predictor.scorers takes the list itself (partials the loaded model completes); refine= expands to it."""
    import hydra
    from hydra import compose, initialize_config_dir

    from geoloc.inference.predictor import REFINE_CHOICES, refine_name, refine_scorers
    from tests.conftest import REPO

    assert refine_scorers("both+evidence") == ("prototypes", "gallery", "evidence")
    assert all(refine_name(refine_scorers(r)) == r for r in REFINE_CHOICES)
    ckpt = str(tiny_evidence_run["ckpt"])
    scorers = ("[{_target_: geoloc.retrieval.scorers.EvidenceScorer.from_run, _partial_: true, "
               "weights: {land: 2.0, hemisphere: 0.5}}]")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["predictor=model", f"ckpt={ckpt}",
                                                         f"predictor.scorers={scorers}", "predictor.weights.cells=0.5",
                                                         "predictor.topk=3"])
        listed = hydra.utils.instantiate(cfg.predictor)
        short = hydra.utils.instantiate(compose(config_name="evaluate", overrides=[
            "predictor=model", f"ckpt={ckpt}", "refine=evidence", "predictor.weights.cells=0.5", "predictor.topk=3",
            "predictor.evidence_weights={land: 2.0, hemisphere: 0.5}"]).predictor)
    assert isinstance(listed, ModelPredictor) and [s.name for s in listed.scorers] == ["evidence"]
    assert listed.describe() == short.describe()
    assert listed.describe()["refine"] == "evidence" and listed.describe()["weights"]["cells"] == 0.5
    out = listed.forward([it.image for it in _items(tiny_evidence_run, 4)])
    a, b = listed.refine_batch(out), short.refine_batch(out)
    assert np.array_equal(a.topk_cells, b.topk_cells) and np.allclose(a.topk_prob, b.topk_prob)
    with pytest.raises(ValueError, match="either refine"):
        build_predictor(ckpt, refine="evidence", scorers=[EvidenceScorer.from_run])


def _items(run, n):
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_sample

    return list(read_sample(run["sample"], split="test", n_images=240).iter_items(SkipReport()))[:n]
