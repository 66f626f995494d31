"""Answers chosen for the metric (predictor.decode): the expected scores against plain-Python sums, the prior's
answer is the best constant point, a one-hot distribution answers its cell, never worse than argmax in
expectation on a trained run, TorchScript-able, reported and kept apart in evaluation folders."""

import math

import numpy as np
import pytest
import torch

from geoloc.inference.predictor import ModelPredictor, build_predictor
from geoloc.retrieval import decode as D

from .test_geo import vincenty_sphere_km

KINDS = [("geoscore", 0.0), ("distance", 0.0), ("acc", 750.0), ("acc", 2500.0)]


def _score(kind, radius, d_km):
    """The per-photo score of one error, by the metric's definition."""
    if kind == "geoscore":
        return 5000.0 * math.exp(-d_km / 1492.7)
    if kind == "distance":
        return d_km
    return 1.0 if d_km <= radius else 0.0


def _brute_expected(answers, support, weights, kind, radius):
    """``(M,)`` expected score of each answer, one pair at a time in plain Python."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    return np.array([sum(wk * _score(kind, radius, vincenty_sphere_km(a, x)) for wk, x in zip(w, support))
                     for a in answers])


def _best(expected, kind):
    """The first best answer (lowest expected distance, else highest expected score)."""
    e = -expected if kind == "distance" else expected
    return int(np.flatnonzero(np.isclose(e, e.max(), rtol=0, atol=1e-9))[0])


def test_the_constants_are_the_metrics_and_the_distances_haversine():
    from geoloc.evaluation import metrics
    from geoloc.geo import EARTH_RADIUS_KM, haversine_matrix_km

    assert (D.GEOSCORE_MAX, D.GEOSCORE_SCALE_KM) == (metrics.GEOSCORE_MAX, metrics.GEOSCORE_SCALE_KM)
    assert D.EARTH_RADIUS_KM == EARTH_RADIUS_KM
    rng = np.random.default_rng(0)
    a = np.column_stack([rng.uniform(-90, 90, 30), rng.uniform(-180, 180, 30)])
    antipodes = np.column_stack([-a[5:10, 0], (a[5:10, 1] + 360) % 360 - 180])
    b = np.vstack([a[:5] + 1e-4, antipodes, a[10:][::-1]])  # near points, antipodes, any others
    got = D.pairwise_distance_km(torch.tensor(a)[None], torch.tensor(b)[None])[0].numpy()
    assert np.abs(got - haversine_matrix_km(a, b)).max() < 1e-3  # km: within a metre, near and antipodal alike
    assert np.abs(np.diag(got)[:5] - haversine_matrix_km(a[:5], b[:5]).diagonal()).max() < 1e-6
    assert np.allclose(np.diag(got)[5:10], math.pi * EARTH_RADIUS_KM, atol=1e-3)


@pytest.mark.parametrize("text,want", [("argmax", ("argmax", 0.0)), ("geoscore", ("geoscore", 0.0)),
                                       ("distance", ("distance", 0.0)), ("acc@750", ("acc", 750.0)),
                                       ("ACC@2500km", ("acc", 2500.0)), ("acc@0.5", ("acc", 0.5))])
def test_decode_names(text, want):
    assert D.parse_decode(text) == want
    assert D.parse_decode(D.decode_name(*want)) == want


@pytest.mark.parametrize("bad", ["acc", "acc@", "acc@-5", "acc@x", "acc@inf", "median", "", "top1"])
def test_bad_decode_names_say_what_is_allowed(bad):
    with pytest.raises(ValueError, match="geoscore|acc@"):
        D.parse_decode(bad)


@pytest.mark.parametrize("kind,radius", KINDS)
def test_expected_scores_and_the_choice_match_plain_sums(kind, radius):
    rng = np.random.default_rng(1)
    B, K = 5, 7
    pts = np.column_stack([rng.uniform(-60, 70, B * K), rng.uniform(-180, 180, B * K)]).reshape(B, K, 2)
    w = rng.dirichlet(np.ones(K), size=B) * 0.8  # candidate mass below 1, as rerank gives it
    got = D.expected_score(torch.tensor(pts), torch.tensor(pts), torch.tensor(w), kind, radius).numpy()
    pick = D.choose_answer(torch.tensor(pts), torch.tensor(w), kind, radius).numpy()
    scripted = torch.jit.script(D.choose_answer)(torch.tensor(pts, dtype=torch.float32),
                                                 torch.tensor(w, dtype=torch.float32), kind, radius).numpy()
    for i in range(B):
        want = _brute_expected(pts[i], pts[i], w[i], kind, radius)
        assert np.allclose(got[i], want, rtol=1e-9, atol=1e-9)
        assert pick[i] == scripted[i] == _best(want, kind)


def test_ties_go_to_the_most_probable_candidate():
    pts = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]]])  # all within 750 km of each other
    w = torch.tensor([[0.2, 0.5, 0.3]])
    assert D.choose_answer(pts, w, "acc", 750.0).tolist() == [0]  # every point covers all the mass
    assert D.choose_answer(pts, w, "argmax", 0.0).tolist() == [0]
    assert D.choose_answer(pts, w, "geoscore", 0.0).tolist() == [1]


@pytest.fixture(scope="module")
def loaded(tiny_run):
    from geoloc.models.loading import load_checkpoint

    return load_checkpoint(tiny_run["ckpt"])


def _outputs(prob):
    prob = np.asarray(prob, np.float32)
    return {"cell_prob": prob, "features": np.ones((len(prob), 4), np.float32),
            "image_emb": np.ones((len(prob), 4), np.float32)}


@pytest.mark.parametrize("kind,radius", KINDS)
def test_with_the_prior_it_answers_the_best_constant_point(loaded, kind, radius):
    """Cell probabilities proportional to the cells' training photos, every cell a candidate: the answer is
    the centroid a brute-force search over all centroids finds best under the training density."""
    cells = loaded.cells
    C = len(cells)
    counts = cells.table["n_points"].to_numpy(np.float64)
    prior = np.tile(counts / counts.sum(), (3, 1))
    pred = ModelPredictor(loaded, candidates=C, decode=D.decode_name(kind, radius))
    got = pred.refine_batch(_outputs(prior)).latlng
    cent = cells.centroids
    want = _brute_expected(cent, cent, counts, kind, radius)
    sign = -1.0 if kind == "distance" else 1.0
    for ll in got:  # a centroid, and the best one (up to the float32 rounding the choice is made in)
        i = int(np.argmin(np.abs(cent - ll).sum(axis=1)))
        assert np.allclose(cent[i], ll, atol=1e-9)
        assert sign * want[i] >= (sign * want).max() - 1e-3 * (5000.0 if kind == "geoscore" else 1.0)
    if kind == "geoscore":  # the most populated cell's centroid, the argmax answer, scores less here
        argmax = cent[int(np.argmax(counts))]
        assert want.max() > _brute_expected([argmax], cent, counts, kind, radius)[0]


@pytest.mark.parametrize("decode", ["geoscore", "distance", "acc@750", "acc@1"])
def test_a_one_hot_distribution_answers_its_cell(loaded, decode):
    C = len(loaded.cells)
    pred = ModelPredictor(loaded, candidates=C, decode=decode)
    cells = [0, C // 2, C - 1]
    prob = np.zeros((3, C), np.float32)
    prob[np.arange(3), cells] = 1.0
    out = pred.refine_batch(_outputs(prob))
    assert np.allclose(out.latlng, pred.centroids[cells])
    assert np.array_equal(out.topk_cells[:, 0], cells)


def test_a_one_hot_distribution_answers_where_a_scorer_places_inside_its_cell(loaded):
    from geoloc.retrieval.scorers import PrototypeScorer

    from .test_predictors import _Index

    C = len(loaded.cells)
    index = _Index({c: 0.5 for c in range(C)}, {c: (float(c), 10.0 + c) for c in range(C)})
    pred = ModelPredictor(loaded, [PrototypeScorer(index, temperature=0.1)], candidates=5, decode="geoscore")
    prob = np.full((2, C), 1e-9, np.float32)
    prob[0, 3], prob[1, 1] = 1.0, 1.0
    out = pred.refine_batch(_outputs(prob))
    assert np.allclose(out.latlng, [[3.0, 13.0], [1.0, 11.0]])  # the placed point, not the centroid


def _expected_under_post(latlng, cand_points, post, kind, radius):
    """Per photo, the expected score of answering ``latlng`` under ``post`` over the candidates' points."""
    return np.array([_brute_expected([latlng[i]], cand_points[i], post[i], kind, radius)[0]
                     for i in range(len(latlng))])


@pytest.mark.parametrize("kind,radius", KINDS)
def test_never_worse_than_argmax_in_expectation_on_a_trained_run(tiny_run, kind, radius):
    """On the tiny run's own photos, per photo, the expected score of the decoded answer under the model's
    distribution over the candidates is at least the argmax answer's, and better somewhere."""
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_sample

    base = build_predictor(str(tiny_run["ckpt"]), candidates=12, topk=12, calibration=None)
    items = list(read_sample(tiny_run["sample"], split="test", n_images=240).iter_items(SkipReport()))[:24]
    out = base.forward([it.image for it in items])
    argmax = base.refine_batch(out)
    decoded = base.with_decode(D.decode_name(kind, radius)).refine_batch(out)
    assert np.array_equal(decoded.topk_cells, argmax.topk_cells)  # the ranking is not the decode's business
    points = base.centroids[argmax.topk_cells]  # refine=none: each candidate's point is its centroid
    a = _expected_under_post(argmax.latlng, points, argmax.topk_prob, kind, radius)
    d = _expected_under_post(decoded.latlng, points, argmax.topk_prob, kind, radius)
    if kind == "distance":
        a, d = -a, -d
    tol = {"geoscore": 1e-2, "distance": 1e-3, "acc": 1e-9}[kind]  # the choice is made on float32 points
    assert (d >= a - tol).all()
    if kind in ("geoscore", "distance"):  # an untrained model's spread-out mass: the choice matters
        assert (d > a + 1e-6).any()


def test_describe_reports_the_decode_and_evaluation_folders_keep_decodes_apart(tiny_run, tmp_path):
    from geoloc.data.readers import read_sample
    from geoloc.evaluation.engine import evaluate

    ckpt = str(tiny_run["ckpt"])
    argmax = build_predictor(ckpt, calibration=None)
    geo = build_predictor(ckpt, calibration=None, decode="geoscore", candidates=20)
    assert argmax.describe()["decode"] == "argmax" and geo.describe()["decode"] == "geoscore"
    assert geo.describe()["candidates"] == 20 and "candidates" not in argmax.describe()
    assert build_predictor(ckpt, decode="ACC@750km").describe()["decode"] == "acc@750"
    with pytest.raises(ValueError, match="acc@<km>"):
        build_predictor(ckpt, decode="acc@far")
    ds = read_sample(tiny_run["sample"], split="test", n_images=240)
    ds = ds.subset(np.arange(len(ds)) < 20)
    m = evaluate(ds, geo, tmp_path / "geo", batch_size=8, progress=False)
    assert m["predictor"]["decode"] == "geoscore"
    assert "decode=geoscore" in (tmp_path / "geo" / "results.md").read_text()
    from geoloc.evaluation.report import combined_table

    assert "model: decode=geoscore over 20 candidate cells" in combined_table([tmp_path / "geo"])
    with pytest.raises(ValueError, match=r"differing: decode 'geoscore' -> 'argmax'"):
        evaluate(ds, argmax, tmp_path / "geo", batch_size=8, progress=False)


def test_hydra_config_and_the_command_line_take_a_decode(tiny_run):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from geoloc.inference.cli import load_predictor

    from .conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["predictor=model", f"ckpt={tiny_run['ckpt']}",
                                                         "predictor.decode=acc@2500", "predictor.candidates=15"])
    assert cfg.predictor.decode == "acc@2500" and cfg.predictor.calibration == "auto"
    pred = instantiate(cfg.predictor)
    assert pred.describe()["decode"] == "acc@2500" and pred.candidates == 15
    assert load_predictor(str(tiny_run["ckpt"]), decode="distance").decode == "distance"
    assert load_predictor(str(tiny_run["ckpt"])).decode == "argmax"
