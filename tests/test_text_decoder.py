"""The reasoning head that writes the chain: training text from coordinates, the decoder, and every generated
claim checked against the model's own outputs."""

import json

import numpy as np
import pytest
import torch

from geoloc.evidence.captions import PARTS, CaptionWriter, caption_parts, caption_tokens, caption_vocab
from geoloc.evidence.claims import (
    check_claims,
    checked_chain,
    decoder_chains,
    parse_text,
    parse_tokens,
    resolve_explain,
    verify_checked_chain,
)
from geoloc.evidence.labels import HEADS
from geoloc.models.text_decoder import TextDecoder, build_text_decoder

#: London, Paris, Tokyo, Moscow, New York, a point in the Atlantic, Reykjavik
POINTS = np.array([[51.507, -0.128], [48.857, 2.352], [35.68, 139.76], [55.75, 37.62], [40.71, -74.0],
                   [40.0, -30.0], [64.14, -21.94]])


def test_training_text_says_where_a_photo_was_taken_in_stage_order():
    vocab = caption_vocab()
    parts = caption_parts(POINTS, scene=np.array([2, 2, 1, 0, 2, np.nan, 1]))
    london, atlantic = parts[0], parts[5]
    assert london["country"] == "United Kingdom" and london["continent"] == "Europe"
    assert london["driving_side"] == "left" and london["script"] == "Latin" and london["scene"] == "urban"
    assert london["place"].startswith("London (") and london["admin1"].endswith(", United Kingdom")
    assert parts[3]["script"] == "Cyrillic" and parts[2]["script"] == "Japanese" and parts[3]["scene"] == "indoor"
    assert "country" not in atlantic and "land_cover" not in atlantic and "coast" in atlantic  # at sea
    text = vocab.render(caption_tokens(london, vocab))
    assert text.startswith("Scene: urban. Environment: ") and "traffic on the left, Latin script." in text
    assert text.endswith("Region: a photo I took close to the town of London in the region of "
                         f"{london['admin1'].split(', ')[0]}, United Kingdom, Europe.")
    # stage order: scene, then environment cues, then region
    assert text.index("Scene:") < text.index("Environment:") < text.index("Region:")
    assert vocab.render(caption_tokens(atlantic, vocab)).startswith("Environment: ")


def test_the_vocabulary_is_closed_typed_and_deterministic():
    vocab = caption_vocab()
    assert len(vocab) < 12_000
    # a value token is a claim: its part and value
    t = vocab.token("country", "France")
    assert vocab.parts[t] == "country" and vocab.values[t] == "France"
    assert vocab.token("scene", "urban") != vocab.token("land_cover", "urban")
    groups = vocab.groups()
    assert groups[0][0] == 0 and groups[-1][1] == len(vocab)
    assert all(len({vocab.parts[i] for i in range(a, b)}) == 1 for a, b in groups)
    from geoloc.evidence.captions import CaptionVocab

    again = CaptionVocab({p: vocab.values_of(p) for p in PARTS})
    assert again.fingerprint == vocab.fingerprint and again.tokens == vocab.tokens


def test_captions_are_memoized_per_point_and_padded():
    w = CaptionWriter()
    a = w(POINTS, scene=np.array([2, 2, 1, 0, 2, -1, 1]))
    b = w(POINTS[::-1].copy(), scene=np.array([1, -1, 2, 0, 1, 2, 2]))
    assert a.shape == (len(POINTS), w.max_tokens) and (a[:, 0] == w.vocab.bos_id).all()
    np.testing.assert_array_equal(a[::-1], b)
    assert ((a == w.vocab.eos_id).sum(1) == 1).all()
    # written from labels a batch carries (shards store them), the texts are the same
    from geoloc.evidence.labels import evidence_labels

    scene = np.array([2, 2, 1, 0, 2, np.nan, 1])
    labels = evidence_labels(POINTS, scene=scene)
    np.testing.assert_array_equal(CaptionWriter()(POINTS, labels={h: labels[h].to_numpy() for h in labels}), a)


def test_parsing_the_rendered_text_gives_the_claims_of_its_tokens():
    vocab = caption_vocab()
    rows = CaptionWriter()(POINTS, scene=np.array([2, 2, 1, 0, 2, -1, 1]))
    for row in rows:
        from_tokens = [(c["stage"], c["head"], c["value"]) for c in parse_tokens(row, np.ones(len(row)), vocab)]
        claims, unparsed = parse_text(vocab.render(row), vocab)
        assert [(c["stage"], c["head"], c["value"]) for c in claims] == from_tokens and unparsed == 0
        assert {h for _, h, _ in from_tokens} <= set(PARTS)


def _decoder(width=32, **kw):
    torch.manual_seed(0)
    return build_text_decoder(16, {"width": width, "layers": 2, "heads": 2, "memory_tokens": 2, **kw}).eval()


def test_generation_probabilities_are_the_decoders_own():
    """Greedy tokens' probabilities (KV cache) equal the teacher-forced distribution; the factored loss is the
    joint negative log-likelihood; beam search finds a text at least as probable; TorchScript generates alike."""
    dec = _decoder()
    f = torch.randn(3, 16)
    tokens, probs = dec.generate(f)
    logp = dec(f, tokens[:, :-1])
    p = logp.exp().gather(-1, tokens[:, 1:, None])[..., 0]
    real = tokens[:, 1:] != dec.pad_id
    torch.testing.assert_close(p[real], probs[:, 1:][real], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(logp.shape[:2]), rtol=1e-4, atol=1e-4)
    rows = CaptionWriter()(POINTS[:3])
    tok = torch.from_numpy(rows)
    lp = dec(f, tok[:, :-1]).gather(-1, tok[:, 1:, None])[..., 0]
    nll = -(lp[tok[:, 1:] != 0]).mean()
    torch.testing.assert_close(dec.loss(f, tok), nll, rtol=1e-4, atol=1e-5)
    bt, bp = dec.beam_search(f, beams=3)
    def total(t, pr):
        return torch.where(t != dec.pad_id, pr.log(), torch.zeros_like(pr)).sum(1)
    assert (total(bt, bp) >= total(tokens, probs) - 1e-4).all()
    gt, gp = dec.beam_search(f, beams=1)
    assert torch.equal(gt, tokens)
    scripted = torch.jit.script(dec)
    st, sp = scripted.generate(f)
    assert torch.equal(st, tokens) and torch.allclose(sp, probs)


def test_the_decoder_learns_to_write_the_chain_of_each_photo():
    """Four photos' features, each with its own text: after training, greedy decoding writes each text."""
    dec = _decoder(width=64).train()
    f = torch.randn(4, 16)
    tok = torch.from_numpy(CaptionWriter()(POINTS[:4], scene=np.array([2, 1, 0, 2])))
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    for _ in range(150):
        loss = dec.loss(f, tok)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    generated, _ = dec.eval().generate(f)
    vocab = caption_vocab()
    assert [vocab.render(g) for g in generated] == [vocab.render(t) for t in tok]


def test_groups_must_cover_the_vocabulary():
    with pytest.raises(ValueError, match="contiguous"):
        TextDecoder(8, 10, groups=[(0, 4), (5, 10)])
    with pytest.raises(ValueError, match="unknown text decoder setting"):
        build_text_decoder(8, {"width": 32, "depth": 2})


# -------------------------------------------------------------------------------------------- the checker
def _outputs(cells, cell, heads: dict):
    """Outputs that put all cell probability on ``cell`` and give each head ``{head: (class, p)}``."""
    prob = np.zeros((1, len(cells)))
    prob[0, cell] = 1.0
    out = {"cell_prob": prob}
    for h, (value, p) in heads.items():
        k = len(HEADS[h])
        v = np.full((1, k), (1 - p) / (k - 1))
        v[0, HEADS[h].index(value)] = p
        out[f"evidence/{h}"] = v
    return out


def _claims(*pairs, stage="environment"):
    return [{"stage": stage, "head": h, "value": v, "decoder_probability": 0.5} for h, v in pairs]


def test_each_claim_is_checked_against_the_head_or_the_cells(tiny_evidence_run):
    from geoloc.geo.cells import Geocells

    cells = Geocells.load(tiny_evidence_run["cells"])
    t = cells.table
    cell = 0
    country, continent = str(t["country"].iloc[cell]), str(t["continent"].iloc[cell])
    other = next(c for c in sorted(set(t["country"].astype(str))) if c != country)
    far = next(c for c in ("Australia", "Brazil", "Japan", "Canada") if c != country)
    out = _outputs(cells, cell, {"driving_side": ("left", 0.9), "script": ("Latin", 0.06)})
    claims = _claims(("driving_side", "left"), ("driving_side", "right"), ("script", "Latin"),
                     ("country", country), ("country", other), ("continent", continent), ("country", country),
                     ("koppen", "Cfb"))
    checked = check_claims(claims, out, 0, cells)
    v = [(c["head"], c["value"], c["verdict"], c["basis"]) for c in checked]
    assert v[0] == ("driving_side", "left", "backed", "driving_side head")
    assert v[1][2] == "unbacked" and checked[1]["model_probability"] == pytest.approx(0.1)  # 10%: between
    assert v[2][2] == "unbacked"  # 6%: under the backing share, not the top class
    assert v[3] == ("country", country, "backed", "geocells") and checked[3]["model_probability"] == pytest.approx(1)
    assert v[4][2] == "contradicted"  # no probability on any cell of that country
    assert v[5][2] == "backed" and v[6][2] == "repeated"
    # koppen without a head: the cell distribution of the cell's training photos
    counts = np.asarray(t["evidence_koppen"].iloc[cell], float)
    share = counts[HEADS["koppen"].index("Cfb")] / counts.sum() if counts.sum() else None
    assert checked[7]["basis"] == ("cell distribution" if share is not None else None)
    if share is not None:
        assert checked[7]["model_probability"] == pytest.approx(share)
    # a region claim that cannot hold with a more probable backed one is inconsistent
    prob = np.zeros((1, len(cells)))
    far_cells = np.flatnonzero(t["country"].astype(str).to_numpy() == far)
    if len(far_cells):
        prob[0, cell], prob[0, far_cells[0]] = 0.6, 0.4
        mixed = check_claims(_claims(("country", far), ("country", country), stage="region"),
                             {"cell_prob": prob}, 0, cells)
        assert [c["verdict"] for c in mixed] == ["inconsistent", "backed"]


def test_only_backed_claims_are_shown_and_a_tampered_chain_is_caught(tiny_evidence_run):
    from geoloc.geo.cells import Geocells

    cells = Geocells.load(tiny_evidence_run["cells"])
    country = str(cells.table["country"].iloc[0])
    out = _outputs(cells, 0, {"driving_side": ("right", 0.97)})
    text = (f"Scene: urban. Environment: traffic on the left, traffic on the right. Region: a photo I took in "
            f"{country}. The sky is purple.")
    claims, unparsed = parse_text(text)
    chain = checked_chain(claims, out, 0, cells, source="test", text=text, unparsed=unparsed)
    assert unparsed == 1  # "The sky is purple."
    shown = [chain["claims"][k] for s in chain["stages"] for k in s["claims"]]
    assert {(c["head"], c["value"]) for c in shown} == {("driving_side", "right"), ("country", country)}
    assert chain["dropped"]["contradicted"] == 1 and chain["dropped"]["unbacked"] == 1  # left; scene (no head)
    assert "traffic on the left" not in chain["stages"][0]["text"]
    assert verify_checked_chain(chain, out, 0, cells) == []
    bad = json.loads(json.dumps(chain))
    bad["stages"][0]["text"] = bad["stages"][0]["text"].replace("97%", "99%")
    assert any("99%" in p for p in verify_checked_chain(bad, out, 0, cells))
    bad = json.loads(json.dumps(chain))
    left = next(k for k, c in enumerate(bad["claims"]) if c["value"] == "left")
    bad["stages"][0]["claims"].append(left)
    assert any("contradicted claim" in p for p in verify_checked_chain(bad, out, 0, cells))


def test_explain_modes():
    assert resolve_explain(True, True) == "both" and resolve_explain(True, False) == "template"
    assert resolve_explain(False, True) is None and resolve_explain("generated", True) == "generated"
    with pytest.raises(ValueError, match="no text decoder"):
        resolve_explain("generated", False)
    with pytest.raises(ValueError, match="explain must be"):
        resolve_explain("everything", True)


# ------------------------------------------------------------------------------------- trained end to end
def test_a_run_with_a_text_decoder_trains_it_and_explains_with_both_chains(tiny_text_run):
    from geoloc.inference.predictor import build_predictor

    from .test_verbalize import _photos

    ckpt = torch.load(tiny_text_run["ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["geoloc"]["caption_vocab"] == caption_vocab().fingerprint
    assert any(k.startswith("model.text_decoder.") for k in ckpt["state_dict"])
    pred = build_predictor(str(tiny_text_run["ckpt"]), explain=True, topk=3)
    assert pred.explain_mode == "both"
    images, keys = _photos(tiny_text_run, 6)
    res = pred.predict(images, keys)
    out = pred.forward(images)
    for i, chain in enumerate(res.explanations):
        g = chain["generated"]
        assert g["source"] == "decoder" and "stages" in chain  # the template chain too
        assert verify_checked_chain(g, out, i, pred.cells) == []
        assert g["kept"] + sum(g["dropped"].values()) == len(g["claims"])
        assert "Generated by the text decoder" in chain["text"]
    # the decoder's probabilities are its own: re-derived by teacher forcing
    tokens, probs = pred.generate_texts(out["features"])
    again = decoder_chains(tokens, probs, out, pred.cells)
    assert [c["claims"] for c in again] == [c["generated"]["claims"] for c in res.explanations]
    only = build_predictor(str(tiny_text_run["ckpt"]), explain="generated", explain_beams=2, topk=3)
    chain = only.predict(images[:2], keys[:2]).explanations[0]
    assert set(chain) == {"generated", "text"}


def test_loading_refuses_a_decoder_trained_on_another_vocabulary(tiny_text_run, tmp_path):
    import shutil

    from geoloc.models.loading import load_checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_text_run["run"], run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["geoloc"]["caption_vocab"] = "0123456789abcdef"
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="caption vocabulary"):
        load_checkpoint(run / "checkpoints" / "last.ckpt", cells=tiny_text_run["cells"])


def test_geoloc_predict_explain_generated(tiny_text_run, tiny_run, capsys):
    from geoloc.inference.cli import main

    sample = tiny_text_run["sample"]
    photo = next(iter(sorted((sample / "images").glob("*.jpg"))))
    assert main([str(photo), "--model", str(tiny_text_run["ckpt"]), "--explain", "generated", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["explanation"]["generated"]["source"] == "decoder"
    assert main([str(photo), "--model", str(tiny_run["ckpt"]), "--explain", "generated"]) == 2
    assert "no text decoder" in capsys.readouterr().err


def test_evaluate_writes_both_chains_and_counts_what_the_checker_dropped(tiny_text_run, tmp_path):
    from geoloc.data.readers import read_sample
    from geoloc.evaluation.engine import evaluate
    from geoloc.inference.predictor import build_predictor

    ds = read_sample(tiny_text_run["sample"], split="test", n_images=240)
    pred = build_predictor(str(tiny_text_run["ckpt"]), explain="both", topk=3)
    m = evaluate(ds, pred, tmp_path / "ev", batch_size=32, progress=False)
    chains = [json.loads(line) for line in (tmp_path / "ev" / "explanations.jsonl").read_text().splitlines()]
    assert len(chains) == m["n"] and all("generated" in c and "stages" in c for c in chains)
    g = m["generated_claims"]
    assert g["photos"] == m["n"] and g["claims"] == sum(len(c["generated"]["claims"]) for c in chains)
    assert sum(g["by_verdict"].values()) == g["claims"] and m["predictor"]["explain"] == "both"


def test_the_exported_model_writes_and_checks_the_same_chain(tiny_text_run, tmp_path):
    """The TorchScript file carries the decoder and its vocabulary: same tokens, same checked claims, no cells file."""
    from geoloc.inference.export import export
    from geoloc.inference.exported import ExportedPredictor
    from geoloc.inference.predictor import build_predictor

    from .test_verbalize import _photos

    path, meta = export(tiny_text_run["ckpt"], tmp_path / "model.pt", topk=3)
    assert meta["text_vocab"]["fingerprint"] == caption_vocab().fingerprint and "text_tokens" in meta["outputs"]
    images, keys = _photos(tiny_text_run, 4)
    exported = ExportedPredictor(path, explain=True)
    assert exported.explain_mode == "both"
    got = exported.predict(images, keys).explanations
    eager = build_predictor(str(tiny_text_run["ckpt"]), explain="generated", topk=3).predict(images, keys)
    for g, e in zip(got, eager.explanations):
        assert [(c["head"], c["value"], c["verdict"]) for c in g["generated"]["claims"]] == \
            [(c["head"], c["value"], c["verdict"]) for c in e["generated"]["claims"]]
        for a, b in zip(g["generated"]["claims"], e["generated"]["claims"]):
            # (the traced backbone's features differ from eager ones in the last bits; the decoder carries that on)
            assert a["decoder_probability"] == pytest.approx(b["decoder_probability"], abs=1e-3)
            if b["model_probability"] is not None:
                assert a["model_probability"] == pytest.approx(b["model_probability"], abs=1e-3)


def test_training_primes_every_photos_text_in_one_pass(tiny_text_run):
    """A table source's texts are written when fitting starts; a batch's float32 points then hit them."""
    module = tiny_text_run["objects"]["module"]
    writer = module._captions
    ds = tiny_text_run["objects"]["datamodule"].train_source
    assert writer is not None and len(writer._memo) >= len(ds)
    n = len(writer._memo)
    writer(ds.latlng[:16].astype(np.float32), np.full(16, -1))
    assert len(writer._memo) == n


def test_text_batch_trains_the_decoder_on_the_first_photos_of_a_batch(tiny_text_run):
    module = tiny_text_run["objects"]["module"]
    rng = np.random.default_rng(0)
    latlng = torch.tensor(np.column_stack([rng.uniform(40, 50, 6), rng.uniform(0, 10, 6)]), dtype=torch.float32)
    batch = {"latlng": latlng, "evidence/scene": torch.full((6,), -1)}
    out = {"features": torch.randn(6, module.model.image_encoder.num_features)}
    tokens = module._text_tokens(batch)
    with torch.no_grad():
        part = module._text_loss(batch, out, 2)
        whole = module._text_loss(batch, out)
        assert part == pytest.approx(float(module.model.text_decoder.loss(out["features"][:2], tokens[:2])))
        assert whole == pytest.approx(float(module.model.text_decoder.loss(out["features"], tokens)))
    from geoloc.training.module import GeoLocModule

    with pytest.raises(ValueError, match="text_batch"):
        GeoLocModule(module.model, tiny_text_run["objects"]["cells"], optimizer=torch.optim.AdamW, text_batch=0)
