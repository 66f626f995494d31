"""Calibrated cell probabilities: the temperature is the exact NLL minimum, python -m geoloc calibrate writes a file
bound to the checkpoint, every predictor of the run and the exported model use it, a file of other weights is
refused, and evaluation reports the ECE before and after."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from geoloc.inference.calibration import (
    Calibration,
    fit_temperature,
    read_calibration,
    resolve_calibration,
    temperature_nll,
)
from geoloc.inference.predictor import build_predictor

from .conftest import REPO


def _overconfident(n=20_000, c=20, scale=3.0, seed=0):
    """Cells drawn from softmax(z), reported as logits ``scale * z``: the right temperature is ``scale``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 1.5
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    return scale * z, y


@pytest.mark.parametrize("scale", [3.0, 1.0 / 3.0])
def test_the_temperature_undoes_a_known_over_or_under_confidence(scale):
    z, y = _overconfident(scale=scale)
    fit = fit_temperature(z, y)
    assert fit["temperature"] == pytest.approx(scale, rel=0.05)
    assert fit["nll_after"] < fit["nll_before"] and not fit["at_bound"]


def test_the_fit_is_the_exact_minimum():
    from scipy.optimize import minimize_scalar

    z, y = _overconfident(n=3000, c=30, scale=2.0, seed=1)
    fit = fit_temperature(z, y)
    ref = minimize_scalar(lambda lt: temperature_nll(z, y, np.exp(lt)), bounds=(-3, 3), method="bounded",
                          options={"xatol": 1e-10})
    assert fit["temperature"] == pytest.approx(np.exp(ref.x), rel=1e-6)
    t = fit["temperature"]
    for other in (t * 0.999, t * 1.001):  # a minimum
        assert temperature_nll(z, y, other) > fit["nll_after"]
    assert fit["nll_after"] == pytest.approx(temperature_nll(z, y, t)) and fit["iterations"] < 20
    # log-probabilities are logits up to a constant per row: the same fit
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    assert fit_temperature(logp + 7.0, y)["temperature"] == pytest.approx(t, rel=1e-9)


def test_separable_photos_end_at_the_bound_and_bad_inputs_are_refused():
    y = np.arange(10) % 4
    z = np.eye(4)[y] * 5.0  # always right: the NLL keeps falling as T -> 0
    fit = fit_temperature(z, y, bounds=(0.05, 20.0))
    assert fit["temperature"] == pytest.approx(0.05) and fit["at_bound"]
    with pytest.raises(ValueError, match="at least one photo"):
        fit_temperature(np.zeros((0, 4)), np.zeros(0, int))
    with pytest.raises(ValueError, match="true cells must lie in"):
        fit_temperature(z, y + 4)
    with pytest.raises(ValueError, match="non-finite"):
        fit_temperature(np.where(z > 0, np.inf, 0.0), y)
    with pytest.raises(ValueError, match="positive number"):
        Calibration(0.0)


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the tiny run (other tests expect the shared run uncalibrated), calibrated by the command."""
    root = tmp_path_factory.mktemp("calibrated")
    shutil.copytree(tiny_run["run"] / "checkpoints", root / "run" / "checkpoints")
    shutil.copy(tiny_run["run"] / "config.yaml", root / "run" / "config.yaml")
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    r = subprocess.run([sys.executable, "-m", "geoloc", "calibrate", f"ckpt={ckpt}", "data=sample",
                        f"data.root={tiny_run['sample']}", "data.n_images=240"], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cell temperature" in r.stdout and "calibration_v1.json" in r.stdout
    path = root / "run" / "calibration_v1.json"
    return {"ckpt": ckpt, "path": path, "record": json.loads(path.read_text()), "sample": tiny_run["sample"]}


def _items(run, split, n=None):
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_sample

    items = list(read_sample(run["sample"], split=split, n_images=240).iter_items(SkipReport()))
    return items if n is None else items[:n]


def test_the_step_writes_the_exact_fit_on_the_validation_photos(run):
    from geoloc.evaluation.metrics import expected_calibration_error

    rec = run["record"]
    assert rec["kind"] == "calibration" and rec["format_version"] == 1 and rec["dataset"] == "sample-val"
    assert rec["ckpt"] == str(run["ckpt"].resolve()) and rec["n"] > 10 and rec["n_skipped"] == 0
    raw = build_predictor(str(run["ckpt"]), calibration=None)
    items = _items(run, "val")
    z = raw.forward([it.image for it in items])["cell_logits"].astype(np.float64)
    y = raw.cells.assign(np.array([it.latlng for it in items]))
    assert len(y) == rec["n"]
    fit = fit_temperature(z, y)
    assert rec["temperature"] == pytest.approx(fit["temperature"], rel=1e-6)
    assert rec["nll_after"] <= rec["nll_before"] and rec["nll_before"] == pytest.approx(fit["nll_before"], rel=1e-6)
    correct = z.argmax(1) == y
    after = torch.from_numpy(z / rec["temperature"]).softmax(-1).max(-1).values.numpy()
    assert rec["ece_after"] == pytest.approx(expected_calibration_error(after, correct)["ece"], rel=1e-6)
    assert rec["fingerprint"] == read_calibration(run["path"]).fingerprint
    assert rec["cells_fingerprint"] == raw.cells.fingerprint()


def test_every_predictor_of_the_run_uses_it_unless_turned_off(run):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    t = run["record"]["temperature"]
    assert t != pytest.approx(1.0, abs=1e-3)
    pred = build_predictor(str(run["ckpt"]), topk=3)  # calibration="auto"
    assert pred.temperature == pytest.approx(t)
    assert pred.describe()["cell_temperature"] == pytest.approx(t)
    assert pred.describe()["calibration"] == str(run["path"])
    raw = build_predictor(str(run["ckpt"]), topk=3, calibration=None)
    assert raw.describe()["cell_temperature"] == 1.0 and raw.describe()["calibration"] is None
    images = [it.image for it in _items(run, "test", 6)]
    out, out_raw = pred.forward(images), raw.forward(images)
    assert np.allclose(out["cell_logits"], out_raw["cell_logits"], atol=1e-6)
    want = torch.from_numpy(out_raw["cell_logits"] / t).softmax(-1).numpy()
    assert np.allclose(out["cell_prob"], want, atol=1e-6)
    a, b = pred.refine_batch(out), raw.refine_batch(out_raw)
    assert np.array_equal(a.topk_cells, b.topk_cells)  # the same ranking, other probabilities
    assert np.allclose(a.cell_prob_uncalibrated, b.cell_prob, atol=1e-6) and b.cell_prob_uncalibrated is None
    assert np.abs(a.topk_prob - b.topk_prob).max() > 1e-4
    explicit = build_predictor(str(run["ckpt"]), calibration=str(run["path"]))
    assert explicit.temperature == pred.temperature
    assert build_predictor(str(run["ckpt"]), calibration=2.5).describe()["cell_temperature"] == 2.5
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for override, want_t in (([], t), (["predictor.calibration=null"], 1.0)):
            cfg = compose(config_name="evaluate", overrides=["predictor=model", f"ckpt={run['ckpt']}", *override])
            assert instantiate(cfg.predictor).temperature == pytest.approx(want_t)


def test_a_file_of_other_weights_is_refused(run, tmp_path):
    ckpt = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.startswith("model.cell_head"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 0.01
    other = run["ckpt"].parent / "other.ckpt"  # another checkpoint of the same run
    torch.save(ckpt, other)
    try:
        with pytest.warns(UserWarning, match="fitted for other network weights"):
            pred = build_predictor(str(other))
        assert pred.temperature == 1.0 and pred.describe()["calibration"] is None
        with pytest.raises(ValueError, match=r"fitted for other network weights.*python -m geoloc calibrate ckpt="):
            build_predictor(str(other), calibration=str(run["path"]))
    finally:
        other.unlink()
    with pytest.raises(FileNotFoundError, match="no calibration file; fit one with python -m geoloc calibrate"):
        build_predictor(str(run["ckpt"]), calibration=str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        read_calibration(bad)
    bad.write_text(json.dumps({**run["record"], "kind": "gallery"}))
    with pytest.raises(ValueError, match="'gallery' artifact, not 'calibration'"):
        read_calibration(bad)
    bad.write_text(json.dumps({**run["record"], "temperature": -1}))
    with pytest.raises(ValueError, match="positive number"):
        read_calibration(bad)
    assert resolve_calibration("none", ckpt=run["ckpt"], net=None) is None


def test_evaluation_reports_the_ece_before_and_after(run, tmp_path):
    import pandas as pd

    from geoloc.data.readers import read_sample
    from geoloc.evaluation.engine import evaluate
    from geoloc.evaluation.metrics import expected_calibration_error

    ds = read_sample(run["sample"], split="test", n_images=240)
    kw = dict(batch_size=16, progress=False)
    cal = evaluate(ds, build_predictor(str(run["ckpt"])), tmp_path / "cal", plots=True, **kw)
    raw = evaluate(ds, build_predictor(str(run["ckpt"]), calibration=None), tmp_path / "raw", **kw)
    assert cal["ece_top1_uncalibrated"] == pytest.approx(raw["ece_top1"], abs=1e-6)
    assert "ece_top1_uncalibrated" not in raw and cal["acc_cell_top1"] == raw["acc_cell_top1"]
    df = pd.read_csv(tmp_path / "cal" / "predictions.csv")
    correct = df["cell_top1"] == df["true_cell"]
    assert cal["ece_top1"] == pytest.approx(expected_calibration_error(df["cell_top1_prob"], correct)["ece"])
    assert (df["cell_top1_prob_uncalibrated"] != df["cell_top1_prob"]).all()
    assert cal["ece_top1"] != pytest.approx(raw["ece_top1"])
    assert cal["predictor"]["cell_temperature"] == pytest.approx(run["record"]["temperature"])
    md = (tmp_path / "cal" / "results.md").read_text()
    assert "before the calibration temperature" in md and (tmp_path / "cal" / "reliability.png").is_file()
    from geoloc.evaluation.report import combined_table

    table = combined_table([tmp_path / "cal", tmp_path / "raw"])
    assert f"model: cell temperature {run['record']['temperature']:.3g} (top-1 ECE" in table
    assert table.count("cell temperature") == 1


def test_the_step_speaks_to_the_user(tiny_run, tmp_path):
    for args, expect in ((["data=sample"], "no checkpoint given"),
                         (["predictor=constant"], "calibrate needs a model predictor"),
                         ([f"ckpt={tmp_path / 'none.ckpt'}"], "none.ckpt: no such checkpoint")):
        r = subprocess.run([sys.executable, "-m", "geoloc", "calibrate", *args], cwd=REPO, capture_output=True,
                           text=True)
        assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_the_exported_model_of_a_calibrated_run_is_calibrated(run, tmp_path):
    from geoloc.inference.exported import ExportedPredictor

    out = tmp_path / "m.pt"
    r = subprocess.run([sys.executable, "-m", "geoloc", "export", f"ckpt={run['ckpt']}", f"out={out}"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    t = run["record"]["temperature"]
    exported = ExportedPredictor(out)
    assert exported.meta["cell_temperature"] == pytest.approx(t)
    assert exported.meta["calibration"]["file"] == str(run["path"])
    assert exported.describe()["cell_temperature"] == pytest.approx(t)
    x = torch.randint(0, 256, (5, 3, 70, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        o = exported.model(x)
    assert np.allclose(o["cell_prob"], (o["cell_logits"] / t).softmax(-1), atol=1e-6)
    pred = build_predictor(str(run["ckpt"]))
    ref = pred.refine_batch(pred.forward_batch(exported.model.preprocess(x)))
    assert np.abs(ref.topk_prob - o["topk_prob"].numpy()).max() < 1e-5
    p = exported.predict([it.image for it in _items(run, "test", 3)], ["a", "b", "c"])
    assert p.cell_prob_uncalibrated is not None and not np.allclose(p.cell_prob_uncalibrated, p.cell_prob)


def test_geoclip_takes_a_cell_temperature(tiny_run, tmp_path):
    """GeoCLIP's network (a small random tower here) calibrated by the same step, its file bound to its weights."""
    from geoloc.data.readers import read_sample
    from geoloc.inference.geoclip import build_geoclip_predictor
    from geoloc.prepare.calibrate import calibrate

    gallery = read_sample(tiny_run["sample"], split="train", n_images=240).latlng

    def build(seed, **kw):
        torch.manual_seed(seed)
        return build_geoclip_predictor(random_clip=True, clip_kwargs=dict(embed_dim=64, depth=2, num_heads=2),
                                       gallery_latlng=gallery, batch_size=16, **kw)

    source = read_sample(tiny_run["sample"], split="val", n_images=240)
    with pytest.raises(ValueError, match="give out=PATH"):
        calibrate(build(0), source)
    record, path = calibrate(build(0), source, out=tmp_path / "geoclip_calibration_v1.json")
    assert record["ckpt"] == "geoclip" and path.is_file()
    pred = build(0, calibration=str(path))
    assert pred.describe()["cell_temperature"] == pytest.approx(record["temperature"])
    assert pred.describe()["kind"] == "geoclip"
    with pytest.raises(ValueError, match="fitted for other network weights"):
        build(1, calibration=str(path))  # another tower
