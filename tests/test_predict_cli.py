"""geoloc-predict: text and JSON output, EXIF GPS reported beside (never used), bad files reported."""

import json
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np

from geoloc.data.readers import read_sample
from geoloc.inference.cli import main

from .test_images import _jpeg_with_gps


def _photos(tiny_run, tmp_path):
    ds = read_sample(tiny_run["sample"], split="test", n_images=240)
    good = ds.table["path"][0]
    from PIL import Image

    img = Image.open(good).convert("RGB")
    exif_photo = _jpeg_with_gps(tmp_path / "eiffel.jpg", "N", ((48, 1), (51, 1), (296, 10)), "E",
                                ((2, 1), (17, 1), (402, 10)))
    with Image.open(exif_photo) as im:  # the sample's pixels with a GPS block
        exif = im.getexif()
    img.save(exif_photo, exif=exif, quality=95)
    img.save(tmp_path / "plain.jpg", quality=95)  # the very same JPEG pixels, no EXIF
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    return str(tmp_path / "plain.jpg"), str(exif_photo), str(tmp_path / "broken.jpg")


def test_text_output(tiny_run, tmp_path, capsys):
    good, exif_photo, broken = _photos(tiny_run, tmp_path)
    code = main([good, exif_photo, broken, str(tmp_path / "missing.jpg"), "--model", str(tiny_run["ckpt"]),
                 "--topk", "3"])
    out, err = capsys.readouterr()
    assert code == 1  # some photos failed, the others were predicted
    assert f"{good}: " in out and "  1. cell" in out and "  3. cell" in out and "%" in out
    assert "EXIF GPS: 48.8582°N, 2.2945°E" in out and "not used" in out
    assert f"{broken}: cannot read the image (unreadable" in err
    assert "missing.jpg: cannot read the image (missing" in err


def test_json_output_and_exif_is_never_used(tiny_run, tmp_path, capsys):
    good, exif_photo, broken = _photos(tiny_run, tmp_path)
    assert main([good, exif_photo, broken, "--model", str(tiny_run["ckpt"]), "--json", "--topk", "2"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == [good, exif_photo, broken]
    a, b, c = rows
    assert a["error"] is None and a["exif_latlng"] is None and len(a["top_cells"]) == 2
    assert {"cell_id", "prob", "country", "admin1", "centroid", "country_code"} <= set(a["top_cells"][0])
    assert np.allclose(b["exif_latlng"], [48.858222, 2.2945], atol=1e-5)
    assert b["exif_distance_km"] > 0
    # same pixels, with and without EXIF GPS: the same prediction
    assert np.allclose(a["latlng"], b["latlng"]) and a["top_cells"] == b["top_cells"]
    assert c["error"].startswith("unreadable") and c["latlng"] is None


def test_console_script_is_declared_and_runs(tiny_run):
    assert any(ep.name == "geoloc-predict" and ep.value == "geoloc.inference.cli:main"
               for ep in entry_points(group="console_scripts"))
    r = subprocess.run([sys.executable, "-m", "geoloc.inference.cli", "x.jpg", "--model", "nope.ckpt"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nope.ckpt: no such checkpoint" in r.stderr


def test_explain_in_text_and_json(tiny_evidence_run, tmp_path, capsys):
    good, _, broken = _photos(tiny_evidence_run, tmp_path)
    ckpt = str(tiny_evidence_run["ckpt"])
    assert main([good, "--model", ckpt, "--explain", "--topk", "2", "--refine", "evidence"]) == 0
    out = capsys.readouterr().out
    assert "  Why:" in out and "1. Scene:" in out and "2. Environment:" in out and "3. Region:" in out
    assert "driving_side head" in out and "summed over its geocells" in out
    assert main([good, broken, "--model", ckpt, "--explain", "--json"]) == 1
    a, b = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [s["stage"] for s in a["explanation"]["stages"]] == ["scene", "environment", "region"]
    assert {"head", "value", "probability"} <= set(a["explanation"]["claims"][0])
    assert b["explanation"] is None and b["error"]
    assert main([good, "--model", ckpt]) == 0 and "Why:" not in capsys.readouterr().out


#: What a prediction must not pull in: the training stack and the config system.
TRAINING_STACK = ("pytorch_lightning", "lightning", "lightning_fabric", "webdataset", "hydra", "omegaconf")


def test_the_predict_path_imports_no_training_stack(tiny_evidence_run, tmp_path):
    """geoloc-predict on a checkpoint (with evidence reranking and the reasoning chain) starts quickly: it never
    imports Lightning, webdataset or Hydra."""
    good, _, _ = _photos(tiny_evidence_run, tmp_path)
    code = ("import sys\n"
            "from geoloc.inference.cli import main\n"
            f"code = main([{good!r}, '--model', {str(tiny_evidence_run['ckpt'])!r}, '--refine', 'evidence', "
            "'--explain', '--json'])\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({TRAINING_STACK!r})), file=sys.stderr)\n"
            "sys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["explanation"]["stages"]
    assert r.stderr.strip().splitlines()[-1] == "[]", r.stderr[-2000:]
