"""TorchScript export: one file, loads without geoloc, agrees with the eager model for any batch and size, and
ranks, weighs and answers exactly as the Python predictor it is made from."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from geoloc.inference.export import build_exported, export, exported_from_predictor, script
from geoloc.inference.predictor import build_predictor

from .conftest import REPO


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.pt"
    path, meta = export(tiny_run["ckpt"], out, topk=3)
    return path, meta


def test_scripted_agrees_with_eager_for_any_batch_and_size(tiny_run):
    module, _ = build_exported(tiny_run["ckpt"], topk=3)
    scripted = script(module)
    g = torch.Generator().manual_seed(0)
    for b, h, w in [(1, 64, 64), (3, 90, 120), (5, 200, 71)]:
        x = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)
        with torch.no_grad():
            eager, ts = module(x), scripted(x)
        assert ts["latlng"].shape == (b, 2) and ts["topk_cells"].shape == (b, 3)
        for k in eager:
            assert (eager[k].float() - ts[k].float()).abs().max() <= 1e-4, k
        assert torch.equal(ts["latlng"], module.centroids[ts["topk_cells"][:, 0]])


def test_preprocessing_matches_the_python_predictor(tiny_run):
    """The exported resize/crop/normalize reproduces timm's PIL transform closely enough that the
    ranked cells agree with ModelPredictor on the same photos."""
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_sample

    module, _ = build_exported(tiny_run["ckpt"], topk=3)
    pred = build_predictor(str(tiny_run["ckpt"]), topk=3)
    items = list(read_sample(tiny_run["sample"], split="test", n_images=240).iter_items(SkipReport()))[:8]
    x = torch.stack([torch.from_numpy(np.asarray(it.image)).permute(2, 0, 1) for it in items])
    eager_x = torch.stack([pred.transform(it.image) for it in items])
    assert (module.preprocess(x) - eager_x).abs().mean() < 0.02  # PIL vs tensor bicubic: small differences
    with torch.no_grad():
        out = module(x)
    ref = pred.predict([it.image for it in items], [it.key for it in items])
    assert np.abs(out["cell_prob"].numpy() - ref.cell_prob).max() < 0.02


def test_loads_in_a_process_that_never_imports_geoloc(exported, tmp_path):
    path, meta = exported
    x = torch.randint(0, 256, (4, 3, 77, 101), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import json, sys, torch
        extra = {{"geoloc.json": ""}}
        m = torch.jit.load({str(path)!r}, _extra_files=extra)
        out = m(torch.load({str(tmp_path / 'x.pt')!r}))
        torch.save(dict(out), {str(tmp_path / 'out.pt')!r})
        assert not any(k == "geoloc" or k.startswith("geoloc.") for k in sys.modules), "geoloc was imported"
        print(json.loads(extra["geoloc.json"])["num_cells"])
    """)
    r = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) == meta["num_cells"]
    out = torch.load(tmp_path / "out.pt")
    module, _ = build_exported(meta["geoloc_ckpt"], topk=3)
    with torch.no_grad():
        eager = module(x)
    for k in eager:
        assert (eager[k].float() - out[k].float()).abs().max() <= 1e-4, k
    assert set(meta["outputs"]) == set(out)


@pytest.fixture(scope="module")
def artifacts(tiny_evidence_run, tmp_path_factory):
    """An index and a gallery cache for the evidence run, outside its run folder (other tests expect none)."""
    from geoloc.data.readers import read_sample
    from geoloc.prepare.gallery import build
    from geoloc.retrieval.index import RetrievalIndex

    tmp = tmp_path_factory.mktemp("export_artifacts")
    base = build_predictor(str(tiny_evidence_run["ckpt"]))
    refs = read_sample(tiny_evidence_run["sample"], split="train", n_images=240)
    index, _ = RetrievalIndex.build(base.net, refs, base.cells, base.transform)
    index.save(tmp / "index_v1")
    csv = tmp / "gallery.csv"
    np.savetxt(csv, refs.latlng, delimiter=",", header="lat,lng", comments="")
    _, gallery = build(tiny_evidence_run["ckpt"], source=str(csv), out=tmp / "gallery_v1.npz")
    return {"index": str(tmp / "index_v1"), "gallery": str(gallery), "index_obj": index}


#: Settings far from the defaults: every weight, temperature (the scorers' and the calibration's) and evidence
#: weight shows if the export drops it.
NON_DEFAULT = dict(topk=4, candidates=7, temperature=0.07, gallery_temperature=0.11,
                   weights={"cells": 0.6, "prototypes": 1.7, "gallery": 0.8, "evidence": 1.3},
                   evidence_weights={"land": 2.0, "koppen_group": 0.5, "hemisphere": 1.5, "script": 0.0,
                                     "driving_side": 0.25}, calibration=1.7)
REFINES = ["none", "prototypes", "gallery", "both", "evidence", "prototypes+evidence", "gallery+evidence",
           "both+evidence"]
#: Each refinement with the argmax answer and with one chosen for a metric (every candidate placed, then decoded).
DECODES = ["geoscore", "distance", "acc@750"]
CASES = ([(r, True, "argmax") for r in REFINES] + [("gallery", False, "argmax")]
         + [(r, True, DECODES[i % 3]) for i, r in enumerate(REFINES)] + [("gallery", False, "geoscore")])


@pytest.mark.parametrize("refine,restrict,decode", CASES)
def test_the_exported_model_equals_the_predictor_with_non_default_weights(tiny_evidence_run, artifacts, refine,
                                                                          restrict, decode):
    """Same ranked cells, probabilities within 1e-5 and the same answer, for every refinement the export carries
    (the predictor answering by the export's rule for prototypes: the cluster's representative), calibrated,
    with the argmax answer and with answers chosen for a metric."""
    pred = build_predictor(str(tiny_evidence_run["ckpt"]), refine=refine, index=artifacts["index"],
                           gallery=artifacts["gallery"], gallery_restrict=restrict, prototype_answer="representative",
                           decode=decode, **NON_DEFAULT)
    assert pred.refine == refine and pred.decode == decode and pred.temperature == 1.7
    module, meta = exported_from_predictor(pred)
    assert meta["refine"] == refine and meta["weights"]["cells"] == 0.6
    assert meta["decode"] == decode and meta["cell_temperature"] == 1.7
    scripted = script(module)
    x = torch.randint(0, 256, (9, 3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ts, eager = scripted(x), module(x)
    for k in eager:
        assert (eager[k].float() - ts[k].float()).abs().max() <= 1e-5, k
    # the predictor on the same preprocessed pixels (its own PIL transform differs slightly, see above)
    ref = pred.refine_batch(pred.forward_batch(module.preprocess(x)))
    assert np.array_equal(ref.topk_cells, ts["topk_cells"].numpy())
    assert np.abs(ref.topk_prob - ts["topk_prob"].numpy()).max() < 1e-5
    assert np.abs(ref.latlng - ts["latlng"].numpy()).max() < 1e-4
    assert np.array_equal(ref.answer_cell, ts["answer_cell"].numpy())  # the cell whose point is the answer
    assert np.abs(ref.answer_prob - ts["answer_prob"].numpy()).max() < 1e-5
    assert np.abs(ref.cell_prob - ts["cell_prob"].numpy()).max() < 1e-5
    assert np.allclose(ts["cell_prob"], (ts["cell_logits"] / 1.7).softmax(-1), atol=1e-6)  # calibrated
    if refine not in ("none", "evidence"):  # answers placed inside the cell, not its centroid
        assert np.abs(ref.latlng - pred.centroids[ref.topk_cells[:, 0]]).max() > 1e-3
    if refine != "none":  # the reranking did something here: the weights count
        plain = build_predictor(str(tiny_evidence_run["ckpt"]), topk=4, candidates=7).refine_batch(
            pred.forward_batch(module.preprocess(x)))
        assert np.abs(plain.topk_prob - ref.topk_prob).max() > 1e-3


@pytest.mark.parametrize("refine,decode", [("none", "geoscore"), ("prototypes", "distance"), ("gallery", "acc@2500")])
def test_the_exported_decode_answers_away_from_the_argmax_as_the_predictor_does(tiny_evidence_run, artifacts, refine,
                                                                                decode):
    """A flat distribution (a high temperature, the scorers placing but not reranking): the decoded answers leave
    the top cell for many photos, and the exported model picks the same placed candidate points."""
    pred = build_predictor(str(tiny_evidence_run["ckpt"]), refine=refine, index=artifacts["index"],
                           gallery=artifacts["gallery"], prototype_answer="representative", candidates=8, topk=8,
                           calibration=20.0, decode=decode, weights={"prototypes": 0.0, "gallery": 0.0})
    module, _ = exported_from_predictor(pred)
    scripted = script(module)
    x = torch.randint(0, 256, (12, 3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ts = scripted(x)
    out = pred.forward_batch(module.preprocess(x))
    ref, argmax = pred.refine_batch(out), pred.with_decode("argmax").refine_batch(out)
    assert np.abs(ref.latlng - ts["latlng"].numpy()).max() < 1e-4
    moved = np.abs(argmax.latlng - ref.latlng).max(axis=1) > 1e-3
    assert moved.sum() >= 3
    if refine != "none":  # the answers are placed candidate points (a representative, a gallery point), not centroids
        cands = pred.centroids[ref.topk_cells]  # (B, K, 2)
        assert np.abs(ref.latlng[:, None] - cands).sum(-1).min(axis=1).max() > 1e-3


def test_the_exported_weights_are_the_predictors(tiny_evidence_run, artifacts):
    """The defect this guards against: an export that reranked with weight 1 whatever the predictor said."""
    ckpt = str(tiny_evidence_run["ckpt"])
    x = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    outs = {}
    for w in (0.2, 5.0):
        pred = build_predictor(ckpt, refine="prototypes", index=artifacts["index"], prototype_answer="representative",
                               weights={"prototypes": w})
        module, _ = exported_from_predictor(pred)
        with torch.no_grad():
            outs[w] = module(x)
        ref = pred.refine_batch(pred.forward_batch(module.preprocess(x)))
        assert np.abs(ref.topk_prob - outs[w]["topk_prob"].numpy()).max() < 1e-5
    assert (outs[0.2]["topk_prob"] - outs[5.0]["topk_prob"]).abs().max() > 1e-3


def test_prototypes_export_answers_a_cluster_representative(tiny_evidence_run, artifacts, tmp_path):
    module, meta = build_exported(tiny_evidence_run["ckpt"], topk=3, prototypes=True, index=artifacts["index"],
                                  temperature=0.05)
    assert meta["prototypes"] and meta["refine"] == "prototypes"
    x = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = module(x)
    index = artifacts["index_obj"]
    has = np.isin(out["topk_cells"][:, 0].numpy(), index.cluster_cell)
    for ll, ok in zip(out["latlng"].double().numpy(), has):  # a representative where the cell has references
        assert not ok or np.isclose(index.cluster_latlng, ll, atol=1e-4).all(axis=1).any()
    cells = build_predictor(str(tiny_evidence_run["ckpt"])).cells
    assert np.array_equal(cells.assign(out["latlng"].double().numpy()), out["topk_cells"][:, 0].numpy())
    # the nearest-reference rule cannot travel (no reference photos in the file); a missing index is an error
    pred = build_predictor(str(tiny_evidence_run["ckpt"]), refine="prototypes", index=artifacts["index"])
    with pytest.raises(ValueError, match="prototype_answer=representative"):
        exported_from_predictor(pred)
    with pytest.raises(FileNotFoundError, match="no retrieval index"):
        build_exported(tiny_evidence_run["ckpt"], prototypes=True, index=tmp_path / "none")


def test_cli(tiny_run, tmp_path):
    out = tmp_path / "m.pt"
    r = subprocess.run([sys.executable, "-m", "geoloc", "export", f"ckpt={tiny_run['ckpt']}", f"out={out}", "topk=2"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote" in r.stdout and out.is_file()
    extra = {"geoloc.json": ""}
    torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["geoloc.json"])
    assert meta["topk"] == 2 and len(meta["cells"]["country"]) == meta["num_cells"]
    assert meta["refine"] == "none" and meta["weights"] == {"cells": 1.0}
    # the predictor's settings travel: refine, fusion weights; a missing index is named, not skipped
    r = subprocess.run([sys.executable, "-m", "geoloc", "export", f"ckpt={tiny_run['ckpt']}", f"out={out}",
                        "predictor.weights.cells=0.5"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["geoloc.json"])["weights"] == {"cells": 0.5}
    r = subprocess.run([sys.executable, "-m", "geoloc", "export", f"ckpt={tiny_run['ckpt']}", f"out={out}",
                        "prototypes=true"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "index_v1: no retrieval index" in r.stderr and "Traceback" not in r.stderr


def test_export_returns_evidence_probabilities(tiny_evidence_run, tmp_path):
    """A model trained with evidence heads exports their probabilities, named in geoloc.json."""
    ckpt = tiny_evidence_run["ckpt"]
    path, meta = export(ckpt, tmp_path / "m.pt")
    from geoloc.evidence.labels import HEADS
    from tests.conftest import EVIDENCE_HEADS

    assert meta["evidence"] == {h: list(HEADS[h]) for h in EVIDENCE_HEADS}
    module, _ = build_exported(ckpt)
    x = torch.randint(0, 256, (3, 3, 70, 90), dtype=torch.uint8)
    with torch.no_grad():
        eager, ts = module(x), torch.jit.load(str(path))(x)
    assert ts["evidence/land"].shape == (3, 2) and ts["evidence/koppen_group"].shape == (3, 5)
    assert torch.allclose(ts["evidence/koppen_group"].sum(1), torch.ones(3))
    for k in eager:
        assert (eager[k].float() - ts[k].float()).abs().max() <= 1e-4, k
