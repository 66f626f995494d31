import csv
import json
import math
import statistics
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

import evaluate as evaluate_cli  # noqa: E402  (the repo root is on sys.path under pytest)
from geoloc.data.readers import read_im2gps
from geoloc.evaluation.engine import evaluate
from geoloc.inference.baselines import ConstantPredictor, PriorPredictor, geodesic_medoid, summed_distance_km

from .conftest import REPO
from .test_geo import vincenty_sphere_km
from .test_readers import write_im2gps

METRICS_KEYS = ["n", "n_skipped", "acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km",
                "median_km", "mean_km", "geoscore"]


def compose_eval(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


def independent_metrics(pred_csv):
    """Recomputes the metrics from predictions.csv with plain Python, row by row."""
    with open(pred_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    d = [vincenty_sphere_km((float(r["true_lat"]), float(r["true_lng"])),
                            (float(r["pred_lat"]), float(r["pred_lng"]))) for r in rows]
    out = {"n": len(d), "median_km": statistics.median(d), "mean_km": sum(d) / len(d),
           "geoscore": sum(5000 * math.exp(-x / 1492.7) for x in d) / len(d)}
    for t in (1, 25, 200, 750, 2500):
        out[f"acc_{t}km"] = 100.0 * sum(x <= t for x in d) / len(d)
    return out, rows


@pytest.mark.shared_data
def test_evaluate_cli_constant_on_real_im2gps3k(shared_data, tmp_path):
    out = tmp_path / "constant"
    cfg = compose_eval("data=im2gps3k", f"data.root={shared_data / 'im2gps3k-dev'}", "predictor=constant",
                       f"output_dir={out}", "progress=false")
    evaluate_cli.main(cfg)
    for name in ("metrics.json", "predictions.csv", "results.md"):
        assert (out / name).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(k in metrics for k in METRICS_KEYS)
    assert metrics["n"] + metrics["n_skipped"] == 1821
    want, rows = independent_metrics(out / "predictions.csv")
    for k, v in want.items():
        assert metrics[k] == pytest.approx(v, rel=1e-9, abs=1e-9), k
    # every row holds the truth from the benchmark file and the same constant guess
    truth = pd.read_csv(shared_data / "im2gps3k-dev" / "im2gps3k_places365.csv").set_index("IMG_ID")
    r = rows[100]
    assert float(r["true_lat"]) == truth.loc[r["IMG_ID"], "LAT"]
    assert len({(x["pred_lat"], x["pred_lng"]) for x in rows}) == 1
    # the constant is the medoid of the MP-16 training coordinates: no random reference point beats it
    ref = pd.read_csv(shared_data / "coords" / "mp16_gallery_100K.csv")[["LAT", "LON"]].to_numpy()
    medoid = np.array(metrics["predictor"]["medoid_latlng"])
    rng = np.random.default_rng(1)
    others = ref[rng.choice(len(ref), 300, replace=False)]
    sums = summed_distance_km(np.vstack([medoid, others]), ref)
    assert sums[0] <= sums[1:].min()
    table = (out / "results.md").read_text()
    assert "| constant |" in table and f"{metrics['acc_750km']:.1f}" in table
    assert 0 <= metrics["acc_country"] <= 100 and metrics["n_country"] > 1500


def test_medoid_exact_on_small_sets():
    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.uniform(-60, 70, 300), rng.uniform(-180, 180, 300)])
    brute = np.array([[vincenty_sphere_km(a, b) for b in pts] for a in pts[:300]]).sum(axis=1)
    np.testing.assert_array_equal(geodesic_medoid(pts), pts[np.argmin(brute)])
    # the two-step search finds the same point on a larger set with a dense cluster
    big = np.vstack([pts, rng.normal([45.0, 5.0], 2.0, size=(3000, 2))])
    exact = big[np.argmin(summed_distance_km(big, big))]
    np.testing.assert_array_equal(geodesic_medoid(big, max_candidates=256, refine=256), exact)


def test_prior_is_deterministic_per_key_and_follows_reference():
    ref = np.array([[10.0, 20.0], [30.0, 40.0], [-5.0, 100.0]])
    p = PriorPredictor(ref, seed=3)
    a = p.predict([None] * 3, ["x", "y", "z"]).latlng
    b = p.predict([None] * 2, ["z", "x"]).latlng
    np.testing.assert_array_equal(a[[2, 0]], b)
    keys = [f"k{i}" for i in range(3000)]
    draws = p.predict([None] * 3000, keys).latlng
    counts = [(draws == r).all(axis=1).sum() for r in ref]
    assert sum(counts) == 3000 and min(counts) > 900  # roughly uniform over the reference rows


class Exploding:
    """Wraps a predictor and dies after `after` calls: a killed run."""

    def __init__(self, inner, after):
        self.inner, self.after, self.calls = inner, after, 0
        self.name, self.needs_images = inner.name, inner.needs_images
        self.cells = getattr(inner, "cells", None)

    def predict(self, images, keys):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt("killed")
        return self.inner.predict(images, keys)

    def describe(self):
        return self.inner.describe()


def make_bench(tmp_path, n=23):
    rng = np.random.default_rng(0)
    rows = [(f"img{i:03d}.jpg", f"a{i % 5}", float(rng.uniform(-60, 60)), float(rng.uniform(-179, 179)))
            for i in range(n)]
    root = write_im2gps(tmp_path / "bench", rows=rows)
    (root / "images" / "img004.jpg").unlink()
    (root / "images" / "img009.jpg").write_bytes(b"garbage")
    return read_im2gps(root), rows


def test_resume_after_kill_matches_clean_run(tmp_path):
    ds, rows = make_bench(tmp_path)
    ref = np.array([r[2:] for r in rows])
    clean = evaluate(ds, PriorPredictor(ref), tmp_path / "clean", batch_size=4, progress=False)
    assert clean["n"] == 21 and clean["n_skipped"] == 2
    assert clean["skipped_by_reason"] == {"missing": 1, "unreadable": 1}

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        evaluate(ds, Exploding(PriorPredictor(ref), after=2), out, batch_size=4, progress=False)
    partial = pd.read_csv(out / "predictions.csv")
    assert len(partial) == 8 and not (out / "metrics.json").exists()
    with open(out / "predictions.csv", "a") as f:  # a kill in the middle of a line
        f.write("img999.jpg,1.0,2")
    counting = Exploding(PriorPredictor(ref), after=10**9)
    resumed = evaluate(ds, counting, out, batch_size=4, progress=False)
    assert counting.calls == math.ceil(13 / 4)  # only the 13 rows not done yet were predicted
    done = pd.read_csv(out / "predictions.csv")
    assert len(done) == 21 and done["IMG_ID"].is_unique
    for k in METRICS_KEYS:
        assert resumed[k] == pytest.approx(clean[k]), k
    assert len(pd.read_csv(out / "skipped.csv")) == 2


class Explaining:
    """A predictor with ``explain`` on: one small reasoning chain per photo beside each prediction."""

    explain = True

    def __init__(self, inner):
        self.inner, self.name, self.needs_images = inner, inner.name, inner.needs_images

    def predict(self, images, keys):
        pred = self.inner.predict(images, keys)
        pred.explanations = [{"stages": [], "text": f"why {k}", "score": float("nan")} for k in keys]
        return pred

    def describe(self):
        return {**self.inner.describe(), "explain": True}


def test_explanations_survive_a_kill_and_resume(tmp_path):
    ds, rows = make_bench(tmp_path)
    ref = np.array([r[2:] for r in rows])
    out = tmp_path / "ex"
    dying = Exploding(Explaining(PriorPredictor(ref)), after=2)
    dying.explain = True
    with pytest.raises(KeyboardInterrupt):
        evaluate(ds, dying, out, batch_size=4, progress=False)
    assert len((out / "explanations.jsonl").read_text().splitlines()) == 8  # two batches, fsynced
    with open(out / "explanations.jsonl", "a") as f:  # a kill in the middle of a chain
        f.write('{"IMG_ID": "img0')
    evaluate(ds, Explaining(PriorPredictor(ref)), out, batch_size=4, progress=False)
    chains = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    keys = pd.read_csv(out / "predictions.csv", dtype={"IMG_ID": str})["IMG_ID"].tolist()
    assert [c["IMG_ID"] for c in chains] == keys and len(keys) == 21  # one chain per row, in row order
    assert chains[0] == {"IMG_ID": keys[0], "stages": [], "text": f"why {keys[0]}", "score": None}  # NaN: null


def test_resume_refuses_another_run_and_resume_false_restarts(tmp_path):
    ds, rows = make_bench(tmp_path)
    ref = np.array([r[2:] for r in rows])
    out = tmp_path / "o"
    evaluate(ds, PriorPredictor(ref), out, progress=False)
    with pytest.raises(ValueError, match="holds a run of"):
        evaluate(ds, ConstantPredictor(ref), out, progress=False)
    m = evaluate(ds, ConstantPredictor(ref), out, progress=False, resume=False)
    assert m["predictor"]["kind"] == "constant" and m["n"] == 21


def test_model_predictor_on_coordinates_only_is_a_clear_error(tmp_path):
    ds, rows = make_bench(tmp_path)
    ds_coords = read_im2gps(tmp_path / "bench", images=None)

    class NeedsPhotos(ConstantPredictor):
        needs_images = True

    with pytest.raises(ValueError, match="needs photos"):
        evaluate(ds_coords, NeedsPhotos(np.array([r[2:] for r in rows])), tmp_path / "o", progress=False)


def test_topk_columns_written(tmp_path):
    ds, rows = make_bench(tmp_path, n=6)
    from geoloc.inference.base import Prediction

    class TopK(ConstantPredictor):
        def predict(self, images, keys):
            b = len(keys)
            return Prediction(np.zeros((b, 2)), np.zeros((b, 2, 2)), np.tile([0.7, 0.2], (b, 1)))

    evaluate(ds, TopK(np.array([[0.0, 0.0]])), tmp_path / "o", progress=False)
    df = pd.read_csv(tmp_path / "o" / "predictions.csv")
    assert list(df.columns)[6:] == ["top1_lat", "top1_lng", "top1_prob", "top2_lat", "top2_lng", "top2_prob"]
    assert (df["top2_prob"] == 0.2).all()


@pytest.mark.parametrize("data", ["sample", "im2gps3k", "im2gps", "yfcc4k", "csv", "shards"])
@pytest.mark.parametrize("predictor", ["constant", "prior"])
def test_every_config_composes(data, predictor):
    cfg = compose_eval(f"data={data}", f"predictor={predictor}", "++data.root=/x", "++data.path=/x", "++data.dir=/x")
    assert cfg.predictor._target_.startswith("geoloc.inference.")
    assert cfg.data.dataset._target_.startswith("geoloc.data.")
    assert cfg.output_dir.endswith(f"{cfg.data.name}/{predictor}")


def test_cli_on_embedded_sample_subprocess(tmp_path):
    env = {"GEOLOC_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    out = tmp_path / "out"
    cmd = [sys.executable, "evaluate.py", "data=sample", "data.n_images=120", "predictor=prior",
           f"output_dir={out}", "progress=false"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"]["synthetic"] is True and metrics["n"] > 0
    assert "SYNTHETIC" in (out / "results.md").read_text()


def test_image_independence_of_baselines(tmp_path):
    """Baselines never look at pixels: swapping every photo changes nothing."""
    ds, rows = make_bench(tmp_path, n=8)
    ref = np.array([r[2:] for r in rows])
    a = evaluate(ds, PriorPredictor(ref), tmp_path / "a", progress=False)
    for p in (tmp_path / "bench" / "images").glob("*.jpg"):
        if p.stat().st_size > 10:
            Image.new("RGB", (5, 5), (255, 255, 255)).save(p, format="JPEG")
    b = evaluate(ds, PriorPredictor(ref), tmp_path / "b", progress=False)
    assert a["geoscore"] == b["geoscore"]


def test_model_evaluation_cell_metrics_plots_and_resume(tiny_run, tmp_path):
    """A cell-ranking predictor gets per-row cell columns, admin-1 accuracy, ECE, Recall-vs-Area and
    the figures; a killed and resumed run scores exactly like a clean one."""
    from geoloc.data.readers import read_sample
    from geoloc.evaluation.metrics import cell_ranking, expected_calibration_error
    from geoloc.geo.countries import default_admin_lookup
    from geoloc.inference.predictor import build_predictor

    ds = read_sample(tiny_run["sample"], split="test", n_images=240)
    pred = build_predictor(str(tiny_run["ckpt"]), topk=3)
    kw = dict(batch_size=8, progress=False, admin_of=default_admin_lookup())
    clean = evaluate(ds, pred, tmp_path / "clean", plots=True, **kw)
    df = pd.read_csv(tmp_path / "clean" / "predictions.csv")
    assert {"true_cell", "cell_top1", "cell_top1_prob", "true_cell_rank", "area_to_cover_km2"} <= set(df.columns)
    assert np.array_equal(df["true_cell"], pred.cells.assign(df[["true_lat", "true_lng"]].to_numpy()))
    # the recorded ranking agrees with the full distribution recomputed for a few photos
    from geoloc.data.images import SkipReport

    items = list(ds.iter_items(SkipReport()))[:4]
    cp = pred.predict([it.image for it in items], [it.key for it in items]).cell_prob
    r = cell_ranking(cp, pred.cells.assign(np.array([it.latlng for it in items])), pred.cells.areas_km2)
    assert np.allclose(df["area_to_cover_km2"][:4], r["area_to_cover_km2"], rtol=1e-6)
    assert np.allclose(df["cell_top1_prob"][:4], r["top1_prob"], atol=1e-6)
    assert np.array_equal(df["true_cell_rank"][:4], r["true_rank"])
    for k in ("acc_admin1", "acc_country", "acc_cell_top1", "ece_top1", "recall_area_auc"):
        assert np.isfinite(clean[k]), k
    correct = df["cell_top1"] == df["true_cell"]
    assert clean["acc_cell_top1"] == pytest.approx(100 * correct.mean())
    assert clean["ece_top1"] == pytest.approx(expected_calibration_error(df["cell_top1_prob"], correct)["ece"])
    for fig in ("error_cdf.png", "error_map.png", "reliability.png", "recall_area.png"):
        data = (tmp_path / "clean" / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, fig
    md = (tmp_path / "clean" / "results.md").read_text()
    assert "Admin-1 (region) accuracy" in md and "ECE" in md and "![error_map.png]" in md

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        evaluate(ds, Exploding(pred, after=2), out, **kw)
    resumed = evaluate(ds, pred, out, **kw)
    for k in (*METRICS_KEYS, "acc_admin1", "acc_cell_top1", "ece_top1", "recall_area_auc"):
        assert resumed[k] == pytest.approx(clean[k]), k


def test_cli_model_with_refinement_ablation(tiny_run, tmp_path):
    out = tmp_path / "ev"
    r = subprocess.run([sys.executable, "evaluate.py", "data=sample", f"data.root={tiny_run['sample']}",
                        "data.n_images=240", "predictor=model", f"ckpt={tiny_run['ckpt']}", "refine=gallery",
                        f"predictor.gallery={tmp_path / 'g.npz'}", f"output_dir={out}", "progress=false"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "no gallery cache" in r.stderr  # an explicit missing file is an error
    import numpy as np_

    from geoloc.data.readers import read_sample

    csv_path, gallery = tmp_path / "gal.csv", tmp_path / "gal.npz"
    np_.savetxt(csv_path, read_sample(tiny_run["sample"], split="train", n_images=240).latlng, delimiter=",",
                header="lat,lng", comments="")
    r = subprocess.run([sys.executable, "-m", "geoloc", "gallery", f"ckpt={tiny_run['ckpt']}", f"source={csv_path}",
                        f"out={gallery}"], cwd=REPO, capture_output=True, text=True)  # the offline step
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "evaluate.py", "data=sample", f"data.root={tiny_run['sample']}",
                        "data.n_images=240", "predictor=model", f"ckpt={tiny_run['ckpt']}", "refine=gallery",
                        f"predictor.gallery={gallery}", f"output_dir={out}", "progress=false"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["predictor"]["refine"] == "gallery" and "acc_admin1" in m and "recall_area_auc" in m


def test_cli_writes_a_reasoning_chain_per_prediction(tiny_evidence_run, tmp_path):
    out = tmp_path / "ex"
    r = subprocess.run([sys.executable, "evaluate.py", "data=sample", f"data.root={tiny_evidence_run['sample']}",
                        "data.n_images=240", "predictor=model_explain", f"ckpt={tiny_evidence_run['ckpt']}",
                        "refine=evidence", f"output_dir={out}", "progress=false", "plots=false"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    chains = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    keys = pd.read_csv(out / "predictions.csv", dtype={"IMG_ID": str})["IMG_ID"].tolist()
    assert [c["IMG_ID"] for c in chains] == keys and len(keys) > 10
    assert all([s["stage"] for s in c["stages"]] == ["scene", "environment", "region"] for c in chains)
    m = json.loads((out / "metrics.json").read_text())
    assert m["predictor"]["explain"] is True and m["predictor"]["refine"] == "evidence"
