"""The ONNX export: the same answers as the eager module through onnxruntime, for any batch and photo size, and a
file that runs where neither geoloc nor torch is installed."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.formats  # make test-formats (CI runs it after make test)

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from geoloc.inference.export import build_exported, export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def onnx_model(tiny_text_run, tmp_path_factory):
    """The tiny run with evidence heads and a text decoder, reranked by the evidence scorer and answered by the
    expected GeoScore: every part of the module the exporter has to carry."""
    settings = {"topk": 3, "refine": "evidence", "decode": "geoscore", "candidates": 8}
    path, meta = export_onnx(tiny_text_run["ckpt"], tmp_path_factory.mktemp("onnx") / "model.onnx", **settings)
    module, _ = build_exported(tiny_text_run["ckpt"], **settings)
    return path, meta, module.eval()


@pytest.mark.slow
def test_onnxruntime_agrees_with_the_eager_module_for_any_batch_and_size(onnx_model):
    path, meta, module = onnx_model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == meta["output_names"] and "text_tokens" not in names  # the decoder stays TorchScript's
    g = torch.Generator().manual_seed(0)
    for b, h, w in [(1, 64, 64), (3, 90, 120), (5, 200, 71), (2, 41, 300)]:
        x = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)
        with torch.no_grad():
            eager = module(x)
        got = dict(zip(names, session.run(None, {"images": x.numpy()})))
        for k in names:
            assert got[k].shape == tuple(eager[k].shape), k
            assert np.abs(got[k].astype(np.float64) - eager[k].numpy().astype(np.float64)).max() <= 1e-4, k
        np.testing.assert_array_equal(got["topk_cells"], eager["topk_cells"].numpy())
        np.testing.assert_array_equal(got["answer_cell"], eager["answer_cell"].numpy())


@pytest.mark.slow
def test_the_file_runs_without_geoloc_or_torch_and_names_its_cells(onnx_model, tmp_path):
    path, meta, _ = onnx_model
    script = f"""
import json, sys
import numpy as np
import onnxruntime as ort
s = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
meta = json.loads(s.get_modelmeta().custom_metadata_map["geoloc.json"])
images = np.random.default_rng(0).integers(0, 256, (2, 3, 120, 90), dtype=np.uint8)
out = dict(zip([o.name for o in s.get_outputs()], s.run(None, {{"images": images}})))
top = out["topk_cells"][:, 0]
print(json.dumps({{"imported": sorted(m for m in ("torch", "geoloc") if m in sys.modules),
                   "latlng": out["latlng"].tolist(), "country": [meta["cells"]["country"][c] for c in top],
                   "centroid": [meta["centroids"][c] for c in top], "classes": meta["evidence"]}}))
"""
    r = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["imported"] == []  # neither torch nor geoloc
    assert len(res["latlng"]) == 2 and all(isinstance(c, str) for c in res["country"])
    assert res["classes"] == meta["evidence"] and len(res["centroid"]) == 2


def test_the_export_step_writes_both_files(tiny_run, tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from geoloc.prepare.export import main

    from .conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"ckpt={tiny_run['ckpt']}", f"out={tmp_path / 'm.pt'}",
                                                       "format=both"])
    main(cfg)
    assert (tmp_path / "m.pt").is_file() and (tmp_path / "m.onnx").is_file()
    assert "onnxruntime check" in capsys.readouterr().out
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"ckpt={tiny_run['ckpt']}", f"out={tmp_path / 'x'}",
                                                       "format=tflite"])
    with pytest.raises(ValueError, match="format must be one of"):
        main(cfg)


@pytest.mark.slow
def test_geoloc_predict_runs_the_onnx_file_as_the_torchscript_one(onnx_model, tiny_text_run, tmp_path, capsys):
    """``--model model.onnx``: the same answers as the TorchScript export, cell names and the template chain from
    the file alone."""
    from geoloc.inference.cli import main
    from geoloc.inference.export import export

    path, _, _ = onnx_model
    ts, _ = export(tiny_text_run["ckpt"], tmp_path / "model.pt", topk=3, refine="evidence", decode="geoscore",
                   candidates=8)
    photos = [str(p) for p in sorted((tiny_text_run["sample"] / "images").glob("*.jpg"))[:4]]
    results = {}
    for model in (path, ts):
        assert main([*photos, "--model", str(model), "--json", "--explain", "template"]) == 0
        results[model.suffix] = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    for a, b in zip(results[".onnx"], results[".pt"]):
        assert [c["cell_id"] for c in a["top_cells"]] == [c["cell_id"] for c in b["top_cells"]]
        assert np.allclose(a["latlng"], b["latlng"], atol=1e-4)
        assert a["explanation"]["stages"] and a["top_cells"][0]["country"] == b["top_cells"][0]["country"]


@pytest.mark.slow
def test_geoloc_serve_serves_the_onnx_file(onnx_model, tiny_text_run):
    """An exported model behind geoloc-serve: the CLI's answer over HTTP, its cells as centroids on the map (the
    file carries no cell geometry)."""
    import threading
    import urllib.request

    from geoloc.inference.cli import predict_files
    from geoloc.inference.exported import OnnxPredictor
    from geoloc.inference.serve import GeolocService, make_server

    path, _, _ = onnx_model
    predictor = OnnxPredictor(path, explain=True)
    srv = make_server(GeolocService(predictor), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}"
        photo = sorted((tiny_text_run["sample"] / "images").glob("*.jpg"))[0]
        req = urllib.request.Request(url + "/predict?explain=1", data=photo.read_bytes(), method="POST",
                                     headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(req) as r:
            got = json.loads(r.read())
        (ref,) = predict_files([str(photo)], predictor, batch_size=1)
        assert got["top_cells"] == ref["top_cells"] and got["explanation"]["stages"]
        with urllib.request.urlopen(url + "/cells.json") as r:
            cells = json.loads(r.read())
        assert {f["geometry"]["type"] for f in cells["features"]} == {"Point"}
        with urllib.request.urlopen(url + "/health") as r:
            assert json.loads(r.read())["model"]["kind"] == "onnx"
    finally:
        srv.shutdown()
        srv.server_close()
