"""TorchScript export: one file, loads without geoloc, agrees with the eager model, any batch and size."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from geoloc.inference.export import build_exported, export, script

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
    from geoloc.inference.predictor import ModelPredictor

    module, _ = build_exported(tiny_run["ckpt"], topk=3)
    pred = ModelPredictor(str(tiny_run["ckpt"]), topk=3)
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


def test_prototypes_rerank_like_the_predictor(tiny_run, tmp_path):
    from geoloc.data.readers import read_sample
    from geoloc.inference.predictor import ModelPredictor
    from geoloc.retrieval.index import RetrievalIndex

    base = ModelPredictor(str(tiny_run["ckpt"]))
    index, _ = RetrievalIndex.build(base.net, read_sample(tiny_run["sample"], split="train", n_images=240),
                                    base.cells, base.transform)
    index.save(tmp_path / "idx")
    module, meta = build_exported(tiny_run["ckpt"], topk=3, prototypes=True, index=tmp_path / "idx", temperature=0.05)
    assert meta["prototypes"]
    scripted = script(module)
    x = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager, ts = module(x), scripted(x)
    for k in eager:
        assert (eager[k].float() - ts[k].float()).abs().max() <= 1e-4, k
    # the same fusion as ModelPredictor(refine="prototypes") on the same network outputs
    pred = ModelPredictor(str(tiny_run["ckpt"]), refine="prototypes", index=str(tmp_path / "idx"), topk=3,
                          temperature=0.05)
    with torch.no_grad():
        feats, logits = module.backbone(module.preprocess(x))
    out = pred.refine_batch({"cell_prob": logits.softmax(-1).numpy(), "features": feats.numpy(),
                             "image_emb": np.zeros((6, 4), np.float32)})
    assert np.array_equal(out.topk_cells, ts["topk_cells"].numpy())
    assert np.allclose(out.topk_prob, ts["topk_prob"].numpy(), atol=1e-5)
    # the exported answer lies in the chosen cell (a cluster representative or the centroid)
    assert np.array_equal(base.cells.assign(ts["latlng"].double().numpy()), ts["topk_cells"][:, 0].numpy())


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
