"""The evidence study: how well the evidence heads read real photos on a pretrained backbone, and what the
evidence reranking and the reasoning chain do with them.

    .venv/bin/python bench/bench_evidence.py [--out outputs/study] [--rotations 0 1 2 3 4]

Models, data and folds are bench_study.py's (run it first; this reads its runs): the smoothing recipe on
frozen EfficientNet-Lite2 features of the 1,821 Im2GPS3k dev photos, every one of the 10 evidence heads at
loss weight 0.1 (``scene`` from the dataset's ``S3_Label``), one model per rotation (test fold ``r``, settings
chosen on fold ``r - 1``, trained on the other three).

Reported (bench/results/evidence.json and evidence.md):

* per head, on test fold 4 and on the five test folds together: accuracy of the predicted class, the
  majority-class baseline (the most frequent class of the *training* folds' labels), the expected calibration
  error of the top-1 probability (15 bins) and n (photos where the head has a label);
* geolocation on test fold 4 without reranking, with the evidence reranking at weight 1 for every head and
  with the weights chosen on fold 3 (``python -m geoloc tune``'s search), for argmax and expected-score answers;
* faithfulness over every test photo: each claim of each chain re-derived from the network outputs
  (:func:`geoloc.evidence.verbalize.verify_chain`), and how often the top cell agrees with the evidence;
* the OCR stage on the test photos (when rapidocr-onnxruntime is installed): how many photos show legible
  text, and how often its script is the main script of the country the photo was taken in;
* the text decoder (``--decoder`` runs this part alone and merges it into the results): the same recipe with
  a text decoder (``model.text_decoder``) trained on the training folds' captions, on test fold 4: per part and
  per stage, how often the decoder's claims are true (against the photo's own caption) and how often the
  training folds' most frequent value is; the share of claims the checker keeps and the truth of kept against
  dropped claims; agreement of the kept claims with the template chain; faithfulness
  (:func:`geoloc.evidence.claims.verify_checked_chain`); time per photo of the decoder (greedy and 4 beams)
  against the network's forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_study import (  # noqa: E402
    BACKBONE,
    BASE,
    HEAD_WEIGHT,
    LR,
    NO_GPS,
    REPO,
    SHARED,
    TAU,
    Evaluator,
    Photos,
    rotation,
    summarize,
    train,
)

#: The decoders the study trains (frozen backbone, so the text loss trains the decoder alone), one chosen on the
#: validation fold: without dropout, and with dropout 0.3 (1,090 training photos: the decoder can learn each
#: photo's caption by heart).
DECODERS = {"dropout0": "{width: 256, layers: 3, heads: 4, memory_tokens: 8}",
            "dropout0.3": "{width: 256, layers: 3, heads: 4, memory_tokens: 8, dropout: 0.3}"}


def _epoch(ckpt: Path) -> int:
    """The epoch (from 0) a checkpoint of ours was saved after."""
    import torch

    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"])


def head_metrics(prob: dict, labels: dict, train_labels: dict, heads: list[str]) -> dict:
    """Accuracy, majority baseline (of the training labels), ECE and n of each head on labelled photos."""
    from geoloc.evaluation.metrics import expected_calibration_error
    from geoloc.evidence.labels import HEADS

    rows = {}
    for h in heads:
        y = np.asarray(labels[h], np.int64)
        ok = y >= 0
        tr = np.asarray(train_labels[h], np.int64)
        tr = tr[tr >= 0]
        majority = int(np.bincount(tr, minlength=len(HEADS[h])).argmax())
        p = prob[h][ok]
        correct = p.argmax(1) == y[ok]
        acc, base = 100 * float(correct.mean()), 100 * float((y[ok] == majority).mean())
        rows[h] = {"n": int(ok.sum()), "classes": len(HEADS[h]), "accuracy": round(acc, 1),
                   "majority_class": HEADS[h][majority], "majority_accuracy": round(base, 1),
                   "above_majority": bool(acc > base),
                   "ece": round(expected_calibration_error(p.max(1), correct)["ece"], 3),
                   "mean_confidence": round(float(p.max(1).mean()), 3)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "outputs" / "study"))
    parser.add_argument("--rotations", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--decoder", action="store_true", help="only the text decoder part, merged into the results")
    args = parser.parse_args()
    out = Path(args.out)
    study = json.loads((HERE / "results" / "study.json").read_text())
    if args.decoder:
        from geoloc.artifacts import atomic_write_json, atomic_write_text

        cells = out / "cells.parquet"
        if not cells.is_file():
            sys.exit(f"{out}: no study runs here; run bench/bench_study.py --out {out} first")
        from geoloc.models.image_encoder import ImageEncoder

        photos = Photos(out, ImageEncoder("tf_efficientnet_lite2", weights="efficientnet_lite2", trainable_blocks=0))
        result = json.loads((HERE / "results" / "evidence.json").read_text())
        result["decoder"] = decoder_study(out, cells, photos, study)
        atomic_write_json(HERE / "results" / "evidence.json", result)
        md = markdown(result)
        atomic_write_text(HERE / "results" / "evidence.md", md)
        print(md)
        return
    from geoloc.data.readers import load_reference_latlng
    from geoloc.evidence.labels import HEADS
    from geoloc.evidence.verbalize import verify_chain
    from geoloc.models.image_encoder import ImageEncoder

    cells = out / "cells.parquet"
    if not cells.is_file():
        sys.exit(f"{out}: no study runs here; run bench/bench_study.py --out {out} first")
    photos = Photos(out, ImageEncoder("tf_efficientnet_lite2", weights="efficientnet_lite2", trainable_blocks=0))
    gallery = load_reference_latlng("mp16_gallery")
    heads = list(HEADS)
    per_rotation, pooled_prob, pooled_y, geo = {}, {h: [] for h in heads}, {h: [] for h in heads}, {}
    chosen_ckpt = {}
    for r in args.rotations:
        tau = study["choices"][f"r{r}/smooth"]["setting"][TAU]
        folder = out / "runs" / f"r{r}" / f"smooth_tau_km{tau:g}" / "checkpoints"
        # the heads' checkpoint, chosen on the validation fold: the cell head's (lowest validation cell loss) or
        # the last epoch's; the heads are separate linear maps of the frozen features, and the cell head's
        # early stop need not suit them
        by_val = {}
        for name in ("best", "last"):
            e = Evaluator(folder / f"{name}.ckpt", cells, photos, r, gallery)
            o = e.outputs(e.predictor(), "val")
            m = head_metrics({h: o[f"evidence/{h}"] for h in heads},
                             {h: photos.cache.labels[h][e.idx["val"]] for h in heads},
                             {h: photos.cache.labels[h][e.idx["train"]] for h in heads}, heads)
            by_val[name] = (float(np.mean([v["accuracy"] - v["majority_accuracy"] for v in m.values()])), e)
        pick = max(by_val, key=lambda k: by_val[k][0])
        e = by_val[pick][1]
        chosen_ckpt[r] = {"checkpoint": pick, "epochs": {k: _epoch(folder / f"{k}.ckpt") for k in by_val},
                          "validation_mean_accuracy_over_majority": {k: round(v[0], 2) for k, v in by_val.items()}}
        o = e.outputs(e.predictor(), "test")
        prob = {h: o[f"evidence/{h}"] for h in heads}
        test_labels = {h: photos.cache.labels[h][e.idx["test"]] for h in heads}
        train_labels = {h: photos.cache.labels[h][e.idx["train"]] for h in heads}
        per_rotation[r] = head_metrics(prob, test_labels, train_labels, heads)
        e = by_val["best"][1]  # geolocation: the network bench_study.py evaluates
        for h in heads:
            pooled_prob[h].append(prob[h])
            pooled_y[h].append(test_labels[h])
        if r != 4:
            continue
        # geolocation with and without the reranking, and the chains, on test fold 4
        cal, calib = e.calibration()
        for decode in ("argmax", "geoscore"):
            p0, c0 = e.choose(cal, (), decode)
            geo[f"no reranking [{decode}]"] = summarize(e.distances(p0, "test"), {"chosen_on_validation": c0})
            candidates = c0["candidates"]
            p1 = e.predictor([e.scorer("evidence")], candidates=candidates, decode=decode, calibration=cal)
            geo[f"evidence reranking, all weights 1 [{decode}]"] = summarize(e.distances(p1, "test"))
            p2, c2 = e.choose(cal, ("evidence",), decode)
            geo[f"evidence reranking, weights from fold 3 [{decode}]"] = summarize(
                e.distances(p2, "test"), {"chosen_on_validation": c2})
        explainer = p2  # the tuned reranking, expected-score answers
        out_t = e.outputs(explainer, "test")
        t = time.perf_counter()
        res = explainer.refine_batch(out_t)
        chains = explainer.explain_batch(out_t, res)
        explain_ms = 1000 * (time.perf_counter() - t) / len(chains)
        problems = [p for i, c in enumerate(chains) for p in verify_chain(c, out_t, i, res, explainer.cells)]
        top = [c for chain in chains for c in chain["checks"] if c["rank"] == 1 and c["verdict"] != "no data"]
        faith = {"photos": len(chains), "claims": sum(len(c["claims"]) for c in chains),
                 "claims_not_backed": len(problems), "examples_of_problems": problems[:5],
                 "top_cell_checks": {v: sum(c["verdict"] == v for c in top) for v in ("agrees", "partly",
                                                                                      "disagrees")},
                 "explain_ms_per_photo": round(explain_ms, 2), "calibration": calib}
        example = (str(photos.keys[e.idx["test"][0]]), chains[0]["text"])
        ocr = _ocr(out, e.idx["test"], photos, test_labels)
    cv = head_metrics({h: np.concatenate(v) for h, v in pooled_prob.items()},
                      {h: np.concatenate(v) for h, v in pooled_y.items()},
                      {h: photos.cache.labels[h] for h in heads}, heads) if len(args.rotations) > 1 else None
    if cv is not None:  # the majority baseline of the pooled figure: each rotation's own training folds
        for h in heads:
            hits = n = 0
            for r in args.rotations:
                e_idx = photos.part(rotation(r)[0])
                tr = photos.cache.labels[h][e_idx]
                tr = tr[tr >= 0]
                maj = int(np.bincount(tr, minlength=len(HEADS[h])).argmax())
                y = photos.cache.labels[h][photos.part(r)]
                hits += int((y[y >= 0] == maj).sum())
                n += int((y >= 0).sum())
            cv[h]["majority_accuracy"] = round(100 * hits / n, 1)
            cv[h]["above_majority"] = bool(cv[h]["accuracy"] > cv[h]["majority_accuracy"])
            cv[h]["majority_class"] = "per rotation"
    result = {"data": study["data"], "backbone": study["backbone"],
              "model": f"the smoothing recipe of bench_study.py, every head at loss weight {HEAD_WEIGHT}",
              "heads_test_fold_4": per_rotation.get(4), "heads_cross_validated": cv,
              "heads_above_majority": {"test_fold_4": sum(m["above_majority"] for m in per_rotation[4].values())
                                       if 4 in per_rotation else None,
                                       "cross_validated": sum(m["above_majority"] for m in cv.values())
                                       if cv else None, "of": len(heads)},
              "heads_per_rotation": per_rotation, "heads_checkpoint_chosen_on_validation": chosen_ckpt,
              "geolocation_test_fold_4": geo,
              "faithfulness": faith if 4 in per_rotation else None, "example": example if 4 in per_rotation else None,
              "ocr": ocr if 4 in per_rotation else None, "cores": os.cpu_count(), "machine": platform.machine(),
              "backbone_name": BACKBONE,
              "decoder": decoder_study(out, cells, photos, study) if 4 in args.rotations else None}
    from geoloc.artifacts import atomic_write_json, atomic_write_text

    atomic_write_json(HERE / "results" / "evidence.json", result)
    md = markdown(result)
    atomic_write_text(HERE / "results" / "evidence.md", md)
    print(md)


def decoder_study(out: Path, cells: Path, photos: Photos, study: dict, r: int = 4) -> dict:
    """The text decoder on rotation ``r``'s test fold (see the module docstring)."""
    import torch

    from geoloc.evidence.captions import PARTS, caption_parts
    from geoloc.evidence.claims import decoder_chains, verify_checked_chain
    from geoloc.evidence.verbalize import explain

    tau = study["choices"][f"r{r}/smooth"]["setting"][TAU]
    lr = study["choices"][f"r{r}/cls"]["setting"][LR]
    base = [b for b in BASE if not b.startswith("callbacks.checkpoint.monitor=")]
    runs = {}
    for variant, settings in DECODERS.items():
        # best.ckpt: the lowest validation text loss (the decoder's early stop); last.ckpt: the last epoch
        runs[variant] = train(out, cells, f"decoder_{variant}_tau_km{tau:g}", r,
                              [*NO_GPS, f"{TAU}={tau}", f"{LR}={lr}", f"++model.text_decoder={settings}",
                               "model.module.loss_weights.text=1.0", "callbacks.checkpoint.monitor=val/loss_text"],
                              base=base)
    scene = photos.cache.labels["scene"].astype(float)
    scene[scene < 0] = np.nan
    truth = caption_parts(photos.latlng, scene=scene)  # every photo's own caption

    def majority(idx) -> dict[str, str]:
        return {p: max(vals, key=vals.count) for p in PARTS
                if (vals := [truth[i][p] for i in idx if p in truth[i]])}

    def run(name: str, part: str, beams: int = 1):
        variant, which = name.split("/")
        e = Evaluator(runs[variant][0].parent / f"{which}.ckpt", cells, photos, r, np.zeros((1, 2)))
        pred = e.predictor(explain="both", explain_beams=beams)
        o = e.outputs(pred, part)
        t = time.perf_counter()
        tokens, probs = pred.generate_texts(o["features"])
        gen_s = (time.perf_counter() - t) / len(tokens)
        return e, pred, o, decoder_chains(tokens, probs, o, e.cells), gen_s

    def accuracy(chains, idx, keep=None) -> dict:
        rows = {}
        for p in PARTS:
            made = [(c["value"] == truth[i].get(p)) for ch, i in zip(chains, idx) for c in ch["claims"]
                    if c["head"] == p and (keep is None or (c["verdict"] == "backed") == keep)]
            rows[p] = (sum(made), len(made))
        return rows

    # the variant and checkpoint (lowest validation text loss or last epoch) with the best claim accuracy on the
    # validation fold
    val_acc = {}
    for name in (f"{v}/{w}" for v in DECODERS for w in ("best", "last")):
        e, _, _, chains, _ = run(name, "val")
        hits = accuracy(chains, e.idx["val"])
        val_acc[name] = round(100 * sum(h for h, _ in hits.values()) / max(1, sum(n for _, n in hits.values())), 2)
    pick = max(val_acc, key=val_acc.get)
    e, pred, o, chains, greedy_s = run(pick, "test")
    idx = e.idx["test"]
    maj = majority(e.idx["train"])
    all_rows, kept_rows, dropped_rows = accuracy(chains, idx), accuracy(chains, idx, True), accuracy(chains, idx, False)
    per_part = {}
    for p, stage in PARTS.items():
        have = [i for i in idx if p in truth[i]]
        h, n = all_rows[p]
        per_part[p] = {"stage": stage, "photos_with_truth": len(have), "claims": n,
                       "accuracy": round(100 * h / n, 1) if n else None,
                       "majority_value": maj.get(p),
                       "majority_accuracy": round(100 * np.mean([truth[i][p] == maj.get(p) for i in have]), 1)
                       if have else None,
                       "kept": kept_rows[p][1], "kept_accuracy": round(100 * kept_rows[p][0] / kept_rows[p][1], 1)
                       if kept_rows[p][1] else None,
                       "dropped": dropped_rows[p][1],
                       "dropped_accuracy": round(100 * dropped_rows[p][0] / dropped_rows[p][1], 1)
                       if dropped_rows[p][1] else None}
    per_stage = {}
    for stage in ("scene", "environment", "region"):
        ps = [p for p, s in PARTS.items() if s == stage]
        h, n = sum(all_rows[p][0] for p in ps), sum(all_rows[p][1] for p in ps)
        kh, kn = sum(kept_rows[p][0] for p in ps), sum(kept_rows[p][1] for p in ps)
        mh = sum(per_part[p]["majority_accuracy"] * per_part[p]["claims"] / 100 for p in ps
                 if per_part[p]["majority_accuracy"] is not None)
        per_stage[stage] = {"claims": n, "accuracy": round(100 * h / n, 1) if n else None,
                            "majority_accuracy_same_parts": round(100 * mh / n, 1) if n else None,
                            "kept": kn, "kept_accuracy": round(100 * kh / kn, 1) if kn else None}
    verdicts: dict[str, int] = {}
    for ch in chains:
        for c in ch["claims"]:
            verdicts[c["verdict"]] = verdicts.get(c["verdict"], 0) + 1
    total = sum(verdicts.values())
    problems = [q for i, ch in enumerate(chains) for q in verify_checked_chain(ch, o, i, e.cells)]
    # agreement with the template chain: a kept claim against the template's value for the same part
    res = pred.refine_batch(o)
    template = explain(o, res, e.cells)
    agree = n_both = 0
    for ch, tc in zip(chains, template):
        tv = {}
        for c in tc["claims"]:
            if c["source"] == "evidence head":
                tv[c["head"]] = c["value"]
            elif c["source"] in ("geocells:continent", "geocells:country", "geocells:admin1"):
                tv.setdefault(c["source"].split(":")[1], c["value"])
        for c in ch["claims"]:
            if c["verdict"] == "backed" and c["head"] in tv:
                n_both += 1
                agree += c["value"] == tv[c["head"]]
    # time per photo: the decoder (greedy, 4 beams) against the network's forward pass on the backbone
    beam_s = run(pick, "test", beams=4)[4]
    net = e.model.net
    x = torch.randn(32, 3, *net.image_encoder.data_config["input_size"][1:])
    with torch.inference_mode():
        net(x[:4])
        t = time.perf_counter()
        net(x)
        forward_s = (time.perf_counter() - t) / len(x)
    example = next((ch for ch in chains if ch["kept"] >= 3), chains[0])
    n_params = sum(p.numel() for p in net.text_decoder.parameters())
    return {"rotation": r, "checkpoint": pick, "validation_claim_accuracy": val_acc,
            "train_seconds": {v: s for v, (_, s) in runs.items()}, "epochs": {
                w: _epoch(runs[pick.split("/")[0]][0].parent / f"{w}.ckpt") for w in ("best", "last")},
            "decoder": DECODERS[pick.split("/")[0]], "decoder_parameters": n_params, "photos": len(idx),
            "per_stage": per_stage, "per_part": per_part,
            "checker": {"claims": total, "by_verdict": dict(sorted(verdicts.items())),
                        "share_kept": round(verdicts.get("backed", 0) / total, 4) if total else None},
            "faithfulness_problems": len(problems), "examples_of_problems": problems[:3],
            "agreement_with_template": {"kept_claims_compared": n_both,
                                        "agree_percent": round(100 * agree / n_both, 1) if n_both else None},
            "seconds_per_photo": {"decoder_greedy": round(greedy_s, 5), "decoder_beams_4": round(beam_s, 5),
                                  "network_forward_batch_32": round(forward_s, 5)},
            "example": {"key": str(photos.keys[idx[chains.index(example)]]),
                        "generated": example["generated_text"], "shown": example["text"],
                        "truth": truth[idx[chains.index(example)]]}}


def _ocr(out: Path, idx: np.ndarray, photos: Photos, labels: dict) -> dict:
    """Text read in the test photos (cached in the study folder: OCR is slow)."""
    cached = out / "ocr_test_fold_4.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    try:
        from geoloc.evidence.ocr import TextReader

        reader = TextReader()
    except ImportError as e:
        return {"skipped": str(e)}
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_im2gps
    from geoloc.evidence.labels import HEADS

    want = {str(k) for k in photos.keys[idx]}
    items = [it for it in read_im2gps(SHARED / "im2gps3k-dev", folds=5, fold=4).iter_items(SkipReport())
             if it.key in want]
    truth = dict(zip(map(str, photos.keys[idx]), labels["script"]))
    t = time.perf_counter()
    found = [reader.text_evidence(it.image) for it in items]
    seconds = time.perf_counter() - t
    with_text = [i for i, f in enumerate(found) if f]
    known = [i for i in with_text if truth[items[i].key] >= 0]
    match = [i for i in known if found[i]["script"] == HEADS["script"][truth[items[i].key]]]
    scripts: dict[str, int] = {}
    for i in with_text:
        scripts[found[i]["script"]] = scripts.get(found[i]["script"], 0) + 1
    result = {"photos": len(items), "with_legible_text": len(with_text), "scripts_read": scripts,
              "with_text_and_country": len(known), "script_is_the_country_main_script": len(match),
              "ms_per_photo": round(1000 * seconds / max(len(items), 1), 1),
              "examples": [found[i]["text"][:3] for i in with_text[:8]]}
    cached.write_text(json.dumps(result, ensure_ascii=False))
    return result


def _heads_table(rows: dict) -> list[str]:
    lines = ["| head | classes | n | accuracy % | majority-class baseline % | majority class | above | ECE | "
             "mean confidence |\n", "|---|---|---|---|---|---|---|---|---|\n"]
    for h, m in rows.items():
        lines.append(f"| {h} | {m['classes']} | {m['n']} | {m['accuracy']} | {m['majority_accuracy']} | "
                     f"{m['majority_class']} | {'yes' if m['above_majority'] else 'no'} | {m['ece']} | "
                     f"{m['mean_confidence']} |\n")
    return lines


def markdown(r: dict) -> str:
    lines = ["# Evidence study: EfficientNet-Lite2 features on im2gps3k-dev\n\n",
             f"{r['model']}; {r['backbone']}. {r['data']}. The heads' checkpoint is chosen per rotation on its "
             "validation fold (mean accuracy over the majority class) between the cell head's (lowest validation "
             f"cell loss) and the last epoch's: {r['heads_checkpoint_chosen_on_validation']}.\n\n"]
    above = r["heads_above_majority"]
    if r["heads_test_fold_4"]:
        lines += [f"## Evidence heads on test fold 4 ({above['test_fold_4']} of {above['of']} above their majority "
                  "class)\n\n", *_heads_table(r["heads_test_fold_4"]), "\n"]
    if r["heads_cross_validated"]:
        lines += [f"## Evidence heads, the five test folds together ({above['cross_validated']} of {above['of']} "
                  "above the majority class of each rotation's training folds)\n\n",
                  *_heads_table(r["heads_cross_validated"]), "\n"]
    if r["geolocation_test_fold_4"]:
        lines += ["## Geolocation on test fold 4\n\n",
                  "| | n | 750 km | 2500 km | median km | GeoScore | 95% CI |\n|---|---|---|---|---|---|---|\n"]
        for label, m in r["geolocation_test_fold_4"].items():
            lines.append(f"| {label} | {m['n']} | {m['acc_750km']:.1f} | {m['acc_2500km']:.1f} | "
                         f"{m['median_km']:.0f} | {m['geoscore']:.0f} | {m['geoscore_ci95'][0]:.0f}-"
                         f"{m['geoscore_ci95'][1]:.0f} |\n")
    f = r["faithfulness"]
    if f:
        lines += ["\n## Faithfulness\n\n",
                  f"{f['claims']} claims in {f['photos']} chains (tuned evidence reranking, expected-score answers) "
                  f"re-derived from the network outputs: {f['claims_not_backed']} not backed. Top cell against the "
                  f"evidence: {f['top_cell_checks']}. Explaining costs {f['explain_ms_per_photo']} ms per photo.\n\n",
                  f"Example chain ({r['example'][0]}):\n\n```\n{r['example'][1]}\n```\n\n"]
    o = r["ocr"]
    if o:
        lines.append("## OCR stage\n\n")
        if "skipped" in o:
            lines.append(f"Skipped: {o['skipped']}\n")
        else:
            lines.append(f"Legible text in {o['with_legible_text']} of {o['photos']} photos ({o['ms_per_photo']} ms "
                         f"per photo); scripts read: {o['scripts_read']}; the script is the main script of the "
                         f"photo's country in {o['script_is_the_country_main_script']} of "
                         f"{o['with_text_and_country']}. Examples: {o['examples']}\n")
    d = r.get("decoder")
    if d:
        sp = d["seconds_per_photo"]
        lines += [f"\n## Text decoder (test fold {d['rotation']}, {d['photos']} photos)\n\n",
                  f"`model.text_decoder={d['decoder']}` ({d['decoder_parameters'] / 1e6:.1f} M parameters) trained "
                  f"with the heads on the training folds' captions (variant/checkpoint `{d['checkpoint']}`, chosen on "
                  f"the validation fold's claim accuracy {d['validation_claim_accuracy']}; best = lowest validation "
                  f"text loss, epochs {d['epochs']}). Truth: each photo's own "
                  "caption; majority: the training folds' most frequent value of the part.\n\n",
                  "| stage | claims | true % | majority % (same parts) | kept | kept true % |\n",
                  "|---|---|---|---|---|---|\n"]
        for stage, m in d["per_stage"].items():
            lines.append(f"| {stage} | {m['claims']} | {m['accuracy']} | {m['majority_accuracy_same_parts']} | "
                         f"{m['kept']} | {m['kept_accuracy']} |\n")
        lines.append("\n| part | claims | true % | majority % | majority value | kept | kept true % | dropped | "
                     "dropped true % |\n|---|---|---|---|---|---|---|---|---|\n")
        for p, m in d["per_part"].items():
            lines.append(f"| {p} | {m['claims']} | {m['accuracy']} | {m['majority_accuracy']} | {m['majority_value']} "
                         f"| {m['kept']} | {m['kept_accuracy']} | {m['dropped']} | {m['dropped_accuracy']} |\n")
        c, a = d["checker"], d["agreement_with_template"]
        lines += [f"\nChecker: {c['claims']} claims, {c['by_verdict']}; kept {100 * c['share_kept']:.1f}%. "
                  f"Faithfulness: {d['faithfulness_problems']} problems. Kept claims agreeing with the template "
                  f"chain: {a['agree_percent']}% of {a['kept_claims_compared']}. Time per photo: decoder greedy "
                  f"{1000 * sp['decoder_greedy']:.1f} ms, 4 beams {1000 * sp['decoder_beams_4']:.1f} ms, the "
                  f"network's forward pass {1000 * sp['network_forward_batch_32']:.1f} ms (batch 32).\n\n",
                  f"Example ({d['example']['key']}), generated:\n\n```\n{d['example']['generated']}\n```\n\n"
                  f"shown after checking:\n\n```\n{d['example']['shown']}\n```\n"]
    return "".join(lines)


if __name__ == "__main__":
    main()
