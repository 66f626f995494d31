"""The reasoning chain: faithful to the model's outputs, by test."""

import re
from pathlib import Path

import numpy as np
import pytest

from geoloc.evidence.labels import HEADS
from geoloc.evidence.ocr import script_evidence, text_script
from geoloc.evidence.verbalize import HEAD_TITLES, STAGES, explain, verify_chain
from geoloc.inference.predictor import build_predictor


def _photos(run, n):
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_sample

    items = list(read_sample(run["sample"], split="test", n_images=240).iter_items(SkipReport()))[:n]
    return [it.image for it in items], [it.key for it in items]


def _region_prob(cells, cell_prob, level, value):
    t = cells.table
    if level == "admin1":
        member = (t["admin1_name"].astype(str) + ", " + t["country"].astype(str)).to_numpy() == value
    else:
        member = t[level].astype(str).to_numpy() == value
    return float(cell_prob[member].sum())


@pytest.mark.parametrize("refine", ["none", "evidence"])
def test_every_claim_is_a_model_output_with_its_probability(tiny_evidence_run, refine):
    """Faithfulness over a batch: each claim is what a head computed, with the probability it computed."""
    pred = build_predictor(str(tiny_evidence_run["ckpt"]), refine=refine, explain=True, topk=3)
    images, keys = _photos(tiny_evidence_run, 12)
    out = pred.forward(images)
    res = pred.predict(images, keys)
    heads = set(pred.net.evidence)
    assert len(res.explanations) == 12
    for i, chain in enumerate(res.explanations):
        assert [s["stage"] for s in chain["stages"]] == list(STAGES)
        assert {c["head"] for c in chain["claims"]} <= heads | {"geocells"}
        assert {c["head"] for c in chain["claims"]} >= heads  # every head the model has speaks once
        for c in chain["claims"]:
            if c["source"] == "evidence head":
                probs = out[f"evidence/{c['head']}"][i]
                classes = HEADS[c["head"]]
                assert c["probability"] == pytest.approx(float(probs.max()), abs=1e-6)
                assert c["value"] == classes[int(probs.argmax())]
                for a in c["alternatives"]:
                    assert a["probability"] == pytest.approx(float(probs[classes.index(a["value"])]), abs=1e-6)
            elif c["source"] in ("geocells:continent", "geocells:country", "geocells:admin1"):
                level = c["source"].split(":")[1]
                assert c["probability"] == pytest.approx(
                    _region_prob(pred.cells, out["cell_prob"][i], level, c["value"]), abs=1e-5)
            elif c["source"].startswith("geocells:cell"):
                assert c["value"] == int(res.topk_cells[i, 0])
                assert c["probability"] == pytest.approx(float(res.topk_prob[i, 0]))
            else:
                assert c["source"] == "geocells:coordinate"
                assert c["value"] == pytest.approx(res.latlng[i].tolist())
        # every percentage in the stage sentences is one of the claims' probabilities
        stated = {round(100 * c["probability"]) for c in chain["claims"]} | {
            round(100 * a["probability"]) for c in chain["claims"] for a in c["alternatives"]}
        for s in chain["stages"]:
            for pct in re.findall(r"(\d+)%", s["text"]):
                assert int(pct) in stated, (pct, s["text"])
        assert verify_chain(chain, out, i, res, pred.cells) == []
        # the checks quote the cells' own photo counts
        for chk in chain["checks"]:
            counts = np.asarray(pred.cells.table[f"evidence_{chk['head']}"].iloc[chk["cell_id"]], float)
            assert chk["n_labelled"] == int(counts.sum())
            if chk["n_labelled"]:
                assert chk["cell_share"] == pytest.approx(counts[HEADS[chk["head"]].index(chk["value"])]
                                                          / counts.sum())


def test_an_answer_chosen_for_the_metric_is_named_as_the_cell_whose_point_it_is(tiny_evidence_run):
    """With decode=geoscore the answer may be another candidate's point than the top cell's: the chain names that
    cell and its probability (never "inside that cell" of the top one), and verify_chain holds it to them."""
    pred = build_predictor(str(tiny_evidence_run["ckpt"]), explain=True, topk=3, decode="geoscore", candidates=100)
    images, keys = _photos(tiny_evidence_run, 24)
    out = pred.forward(images)
    res = pred.predict(images, keys)
    owners = pred.cells.centroids[res.answer_cell]
    np.testing.assert_allclose(owners, res.latlng, atol=1e-9)  # no placing scorer: the answer is a centroid
    other = np.flatnonzero(res.answer_cell != res.topk_cells[:, 0])
    assert len(other), "no photo answered outside its top cell; the test needs one"
    for i in range(len(keys)):
        chain = res.explanations[i]
        coord = next(c for c in chain["claims"] if c["source"] == "geocells:coordinate")
        assert coord["cell"] == res.answer_cell[i] and coord["probability"] == pytest.approx(res.answer_prob[i])
        region = chain["stages"][-1]["text"]
        if i in other:
            assert f"the point of cell {res.answer_cell[i]} (" in region and "inside that cell" not in region
        assert verify_chain(chain, out, i, res, pred.cells) == []
    i = int(other[0])
    bad = res.explanations[i]
    next(c for c in bad["claims"] if c["source"] == "geocells:coordinate")["cell"] = int(res.topk_cells[i, 0])
    assert any("answer's cell" in p for p in verify_chain(bad, out, i, res, pred.cells))


def test_verify_chain_catches_a_misstated_claim(tiny_evidence_run):
    pred = build_predictor(str(tiny_evidence_run["ckpt"]), explain=True, topk=2)
    images, keys = _photos(tiny_evidence_run, 2)
    out = pred.forward(images)
    res = pred.refine_batch(out)
    chain = pred.explain_batch(out, res, images)[0]
    assert verify_chain(chain, out, 0, res, pred.cells) == []
    land = next(c for c in chain["claims"] if c["head"] == "land")
    land["probability"] += 0.1
    coast = dict(land, head="coast", value="< 1 km")  # a head this model does not have
    chain["claims"].append(coast)
    chain["stages"][0]["text"] += " 1000%"
    problems = verify_chain(chain, out, 0, res, pred.cells)
    assert any("land=" in p for p in problems) and any("coast, which the model does not predict" in p
                                                        for p in problems)
    assert any("1000%" in p for p in problems)


def test_a_model_without_evidence_heads_says_nothing_about_evidence(tiny_run):
    pred = build_predictor(str(tiny_run["ckpt"]), explain=True)
    images, keys = _photos(tiny_run, 4)
    for chain in pred.predict(images, keys).explanations:
        assert [s["stage"] for s in chain["stages"]] == ["region"]
        assert {c["head"] for c in chain["claims"]} == {"geocells"} and chain["checks"] == []
        for head in HEADS:
            if head != "continent":
                assert HEAD_TITLES[head] not in chain["text"].lower()


def test_text_in_the_photo_is_one_more_claim_and_is_checked_against_the_cells(tiny_evidence_run):
    pred = build_predictor(str(tiny_evidence_run["ckpt"]), topk=2)
    images, keys = _photos(tiny_evidence_run, 2)
    out = pred.forward(images)
    res = pred.refine_batch(out)
    ocr = [{"script": "Cyrillic", "confidence": 0.87, "text": ["Москва"]}, None]
    chains = explain(out, res, pred.cells, ocr=ocr)
    claim = [c for c in chains[0]["claims"] if c["head"] == "ocr"]
    assert claim == [{"stage": "environment", "head": "ocr", "value": "Cyrillic", "probability": 0.87,
                      "source": "ocr", "alternatives": []}]
    assert "Cyrillic script (87% OCR confidence)" in chains[0]["text"]
    assert not any(c["head"] == "ocr" for c in chains[1]["claims"])
    # the sample's cells hold no Cyrillic-writing country: every top cell disagrees
    verdicts = [c["verdict"] for c in chains[0]["checks"] if c["head"] == "ocr"]
    assert len(verdicts) == 2 and "disagrees" in verdicts and "agrees" not in verdicts


def test_script_of_text():
    assert text_script("Москва 2024") == ("Cyrillic", 6)
    assert text_script("東京タワー")[0] == "Japanese"  # kana make the kanji Japanese
    assert text_script("北京")[0] == "Han" and text_script("서울")[0] == "Korean"
    assert text_script("Ελλάδα")[0] == "Greek" and text_script("12:30 - !") == (None, 0)
    ev = script_evidence([("STOP", 0.95), ("Москва", 0.8), ("Ленина", 0.9), ("x", 0.99), ("Berlin", 0.3)])
    assert ev["script"] == "Cyrillic" and ev["confidence"] == pytest.approx(0.85) and ev["text"] == ["Москва",
                                                                                                    "Ленина"]
    assert script_evidence([("--", 0.9)]) is None


def test_ocr_reader_on_a_rendered_sign():
    pytest.importorskip("rapidocr_onnxruntime")
    from PIL import Image, ImageDraw, ImageFont

    from geoloc.evidence.ocr import TextReader

    img = Image.new("RGB", (420, 120), "white")
    ImageDraw.Draw(img).text((20, 30), "HELLO WORLD", fill="black", font=ImageFont.load_default(size=48))
    ev = TextReader().text_evidence(img)
    assert ev is not None and ev["script"] == "Latin" and 0.5 < ev["confidence"] <= 1.0


#: One sign per script the OCR stage names, and the Debian font (fonts-noto-core / fonts-noto-cjk) it renders in.
SIGNS = {"Latin": ("Main Street Bakery", "truetype/noto/NotoSans-Regular.ttf"),
         "Cyrillic": ("Владивосток", "truetype/noto/NotoSans-Regular.ttf"),
         "Greek": ("Αθήνα κέντρο", "truetype/noto/NotoSans-Regular.ttf"),
         "Arabic": ("مرحبا بكم في القاهرة", "truetype/noto/NotoSansArabic-Regular.ttf"),
         "Hebrew": ("ירושלים העיר העתיקה", "truetype/noto/NotoSansHebrew-Regular.ttf"),
         "Devanagari": ("नई दिल्ली रेलवे स्टेशन", "truetype/noto/NotoSansDevanagari-Regular.ttf"),
         "Thai": ("กรุงเทพมหานคร", "truetype/noto/NotoSansThai-Regular.ttf"),
         "Han": ("北京火车站", "opentype/noto/NotoSansCJK-Regular.ttc"),
         "Japanese": ("とうきょうタワー", "opentype/noto/NotoSansCJK-Regular.ttc"),
         "Korean": ("서울특별시", "opentype/noto/NotoSansCJK-Regular.ttc")}
FONTS = Path("/usr/share/fonts")


def _sign(text: str, font: str):
    from PIL import Image, ImageDraw, ImageFont

    if not (FONTS / font).is_file():
        pytest.skip(f"{FONTS / font} not found: apt-get install fonts-noto-core fonts-noto-cjk (make ocr)")
    img = Image.new("RGB", (900, 160), "white")
    ImageDraw.Draw(img).text((30, 40), text, fill="black", font=ImageFont.truetype(str(FONTS / font), 48))
    return img


@pytest.mark.parametrize("engine", ["tesseract", "rapidocr+tesseract"])
@pytest.mark.parametrize("script", list(SIGNS))
def test_tesseract_names_the_script_of_a_sign_in_each_script(script, engine):
    """Tesseract with every installed pack (on the whole image, or on the lines RapidOCR's detector finds) reads a
    rendered sign and the stage names its script."""
    from geoloc.evidence.ocr import TESSERACT_INSTALL, TextReader, tesseract_languages

    lang = {"Latin": "eng", "Cyrillic": "rus", "Greek": "ell", "Arabic": "ara", "Hebrew": "heb", "Devanagari": "hin",
            "Thai": "tha", "Han": "chi_sim", "Japanese": "jpn", "Korean": "kor"}[script]
    if lang not in tesseract_languages():
        pytest.skip(f"Tesseract or its {lang} pack is not installed: {TESSERACT_INSTALL} (make ocr)")
    if engine != "tesseract":
        pytest.importorskip("rapidocr_onnxruntime")
    reader = TextReader(engine)
    assert reader.name == engine and lang in reader.engine.langs
    ev = reader.text_evidence(_sign(*SIGNS[script]))
    assert ev is not None and ev["script"] == script, ev
    assert 0.5 < ev["confidence"] <= 1.0


def test_the_engines_are_chosen_by_name_and_a_missing_tesseract_says_how_to_install_it(monkeypatch):
    from geoloc.evidence import ocr

    with pytest.raises(ValueError, match="OCR engine must be one of"):
        ocr.TextReader("easyocr")
    monkeypatch.setattr(ocr, "tesseract_languages", lambda binary="tesseract": [])
    with pytest.raises(RuntimeError, match="apt-get install -y tesseract-ocr .*tesseract-ocr-rus"):
        ocr.TextReader("tesseract")
    assert ocr.make_reader(False) is None and ocr.make_reader(None) is None
    reader = object.__new__(ocr.TextReader)  # an engine that fails on a photo: no evidence for it, a warning

    class Broken:
        min_confidence = 0.5

        def read(self, image):
            raise RuntimeError("tesseract failed (1): bad image")

    reader.engine, reader.name = Broken(), "broken"
    with pytest.warns(UserWarning, match="bad image"):
        assert reader.text_evidence(None) is None
    from PIL import Image

    dtr = object.__new__(ocr.DetectThenRead)  # a detector box of no height is passed over, not divided by
    dtr.detector = type("D", (), {"engine": staticmethod(lambda img, **k: ([[[0, 5], [10, 5], [10, 5], [0, 5]]], 0))})()
    dtr.reader = type("R", (), {"read": staticmethod(lambda crop: [("Berlin", 0.9)])})()
    assert dtr.read(Image.new("RGB", (20, 20))) == []
    pytest.importorskip("rapidocr_onnxruntime")
    assert ocr.TextReader("auto").name == "rapidocr"  # no Tesseract: the bundled engine
    assert ocr.make_reader(True).name == "rapidocr"


def test_tesseract_lines_and_confidences_from_its_tsv():
    from geoloc.evidence.ocr import _tsv_lines

    tsv = ("level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext\n"
           "4\t1\t1\t1\t1\t0\t0\t0\t9\t9\t-1\t\n"
           "5\t1\t1\t1\t1\t1\t0\t0\t9\t9\t90.0\tУлица\n"
           "5\t1\t1\t1\t1\t2\t0\t0\t9\t9\t70.0\tЛенина\n"
           "5\t1\t2\t1\t1\t1\t0\t0\t9\t9\t-1\t \n"
           "5\t1\t2\t1\t1\t2\t0\t0\t9\t9\t50.0\tSTOP\n")
    assert _tsv_lines(tsv) == [("Улица Ленина", pytest.approx(0.8)), ("STOP", pytest.approx(0.5))]
