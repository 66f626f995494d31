"""bf16 against fp32 on real photos with a trained model: the same answers, the same reasoning.

    .venv/bin/python bench/bench_precision.py [--study outputs/study] [--decode geoscore]

The model: the smoothing recipe of bench_study.py's rotation 4 (frozen EfficientNet-Lite2 + trained heads; run
the study first), on all 1,821 Im2GPS3k dev photos, predicted end to end from the photos by
:class:`~geoloc.inference.predictor.ModelPredictor` with ``precision=32`` and ``precision=bf16``. Reported:
top-1 cell agreement, the largest cell-probability difference, where the drift comes from (layers kept in
float32, oneDNN's implicit bf16 with float32 activations, on every 7th photo), the GeoScore of each (and its relative
difference), the reasoning chains' claims (same claims; the largest probability difference in percentage
points), the exported bf16 model against the eager bf16 predictor, and the time of each.
The same comparison for a trained ViT (``--vit``, default make demo's checkpoint, trained on the synthetic sample:
its agreement is a property of the arithmetic, its GeoScore on real photos no accuracy). Targets: >= 99% same
top-1 cell, GeoScore within 1%, claims within 1 point. Writes bench/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_study import SHARED, TAU  # noqa: E402


def _claims(chain: dict) -> dict:
    """``{(stage, head, source, value): probability}`` of a chain's claims."""
    return {(c["stage"], c["head"], c["source"], json.dumps(c["value"])): c["probability"] for c in chain["claims"]}


def _drift(net, x: torch.Tensor, batch: int) -> dict:
    """Where bf16's drift comes from, on the preprocessed photos ``x``: the relative feature error and top-1 cell
    agreement of bf16 autocast with each group of layers kept in float32, and of oneDNN's implicit bf16 (float32
    activations, bf16 inside convolutions and matmuls), with their times."""
    from torch import nn

    def run(bf16: bool) -> tuple[dict, float]:
        t, outs = time.perf_counter(), []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for s in range(0, len(x), batch):
                outs.append({k: v.float() for k, v in net(x[s:s + batch]).items()})
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}, time.perf_counter() - t

    def row(o: dict, seconds: float) -> dict:
        rel = (o["features"] - ref["features"]).norm() / ref["features"].norm()
        same = (o["cell_logits"].argmax(1) == ref["cell_logits"].argmax(1)).float().mean()
        return {"feature_rel_diff": round(float(rel), 4), "top1_cell_agreement": round(float(same), 4),
                "s": round(seconds, 2)}

    def in_fp32(keep):  # these modules run outside autocast, on float32 inputs
        saved = []
        for name, m in net.named_modules():
            if keep(name, m):
                def forward(*a, _f=m.forward, **k):
                    with torch.autocast("cpu", enabled=False):
                        return _f(*[t.float() if torch.is_tensor(t) else t for t in a], **k)
                saved.append((m, m.forward))
                m.forward = forward
        return saved

    ref, t32 = run(False)
    rows = {"fp32": {"s": round(t32, 2)}, "bf16 autocast": row(*run(True))}
    groups = {"stem conv": lambda n, m: n.endswith("conv_stem"),
              "depthwise convs": lambda n, m: isinstance(m, nn.Conv2d) and m.groups > 1,
              "last conv (conv_head)": lambda n, m: n.endswith("conv_head"),
              "cell, evidence and projection heads": lambda n, m: n.startswith(("cell_head", "evidence", "image_proj"))}
    for tag, keep in groups.items():
        saved = in_fp32(keep)
        rows[f"bf16 autocast, {tag} in fp32"] = row(*run(True))
        for m, f in saved:
            m.forward = f
    mk = torch.backends.mkldnn
    before = mk.conv.fp32_precision, mk.matmul.fp32_precision
    try:
        mk.conv.fp32_precision = mk.matmul.fp32_precision = "bf16"
        rows["oneDNN implicit bf16 (fp32 activations)"] = row(*run(False))
    finally:
        mk.conv.fp32_precision, mk.matmul.fp32_precision = before
    return {"photos": len(x), "rows": rows}


def _compare(ckpt: Path, images, true, *, decode: str, candidates: int, batch: int) -> tuple[dict, object]:
    """fp32 against bf16 autocast for one trained model, end to end from the photos: the agreement figures and
    the eager bf16 predictor."""
    from geoloc.evaluation.metrics import geoscore
    from geoloc.geo import haversine_km
    from geoloc.inference.predictor import build_predictor

    out, times, preds, chains = {}, {}, {}, {}
    for precision in ("32", "bf16"):
        p = build_predictor(str(ckpt), refine="evidence", decode=decode, candidates=candidates, batch_size=batch,
                            precision=precision, explain=True)
        p.forward(images[:batch])  # warm-up
        t = time.perf_counter()
        out[precision] = p.forward(images)
        times[precision] = time.perf_counter() - t
        preds[precision] = p.refine_batch(out[precision])
        chains[precision] = p.explain_batch(out[precision], preds[precision])
    a, b = out["32"], out["bf16"]
    gs = {k: float(geoscore(haversine_km(preds[k].latlng, true)).mean()) for k in preds}
    claim_diff, claims_same = 0.0, 0
    for ca, cb in zip(chains["32"], chains["bf16"]):
        x, y = _claims(ca), _claims(cb)
        claims_same += x.keys() == y.keys()
        claim_diff = max([claim_diff, *(abs(x[k] - y[k]) for k in x.keys() & y.keys())])
    figures = {
        "photos": len(images),
        "top1_cell_agreement": round(float((a["cell_prob"].argmax(1) == b["cell_prob"].argmax(1)).mean()), 4),
        "max_abs_cell_prob_diff": float(np.abs(a["cell_prob"] - b["cell_prob"]).max()),
        "feature_rel_diff": float(np.linalg.norm(a["features"] - b["features"]) / np.linalg.norm(a["features"])),
        "geoscore": {k: round(v, 2) for k, v in gs.items()},
        "geoscore_rel_diff": round(abs(gs["bf16"] - gs["32"]) / gs["32"], 4),
        "answers_within_1km": round(float((haversine_km(preds["32"].latlng, preds["bf16"].latlng) <= 1).mean()), 4),
        "chains_with_the_same_claims": round(claims_same / len(chains["32"]), 4),
        "max_claim_prob_diff_points": round(100 * claim_diff, 2),
        "forward_s": {k: round(v, 1) for k, v in times.items()},
        "bf16_speedup": round(times["32"] / times["bf16"], 2),
    }
    return figures, (p, b)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", default=str(REPO / "outputs" / "study"))
    parser.add_argument("--vit", default=str(REPO / "outputs" / "demo" / "train" / "checkpoints" / "best.ckpt"),
                        help="a trained ViT checkpoint compared the same way (default: make demo's)")
    parser.add_argument("--decode", default="geoscore")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_im2gps
    from geoloc.data.transforms import eval_transform
    from geoloc.inference.export import export

    study = json.loads((HERE / "results" / "study.json").read_text())
    tau = study["choices"]["r4/smooth"]["setting"][TAU]
    ckpt = Path(args.study) / "runs" / "r4" / f"smooth_tau_km{tau:g}" / "checkpoints" / "best.ckpt"
    if not ckpt.is_file():
        sys.exit(f"{ckpt}: missing; run bench/bench_study.py --out {args.study} first")
    items = list(read_im2gps(SHARED / "im2gps3k-dev").iter_items(SkipReport()))
    images, true = [it.image for it in items], np.asarray([it.latlng for it in items])
    lite2, (eager_bf16, b) = _compare(ckpt, images, true, decode=args.decode, candidates=50, batch=args.batch)
    # the exported bf16 model against the eager bf16 predictor, on the first photos
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = export(eager_bf16, Path(tmp) / "model_bf16.pt")
        module = torch.jit.load(str(path))
        n = 64
        with torch.no_grad():
            exp = np.concatenate([module(torch.from_numpy(np.asarray(im)).permute(2, 0, 1)[None])["cell_prob"].numpy()
                                  for im in images[:n]])
    net = eager_bf16.net.eval()
    drift = _drift(net, torch.stack([eval_transform(eager_bf16.model.data_config)(im) for im in images[::7][:256]]),
                   args.batch)
    result = {
        "model": f"{ckpt} (EfficientNet-Lite2 frozen + heads, refine=evidence, decode={args.decode})",
        **lite2,
        "exported_bf16_vs_eager_bf16": {
            "photos": n, "max_abs_cell_prob_diff": float(np.abs(exp - b["cell_prob"][:n]).max()),
            "top1_agreement": float((exp.argmax(1) == b["cell_prob"][:n].argmax(1)).mean())},
        "drift_by_layers": drift,
    }
    if Path(args.vit).is_file():  # a ViT on the same photos: its numbers agree, its accuracy means nothing here
        vit, _ = _compare(Path(args.vit), images, true, decode=args.decode, candidates=10 ** 6, batch=args.batch)
        result["vit"] = {"model": f"{args.vit} (make demo's ViT with evidence heads, trained on the SYNTHETIC sample: "
                                  "its GeoScore on real photos is not an accuracy)", **vit}
    result.update({
        "targets": {"top1_cell_agreement": 0.99, "geoscore_rel_diff": 0.01, "max_claim_prob_diff_points": 1.0},
        "cores": os.cpu_count(), "threads": torch.get_num_threads(), "machine": platform.machine(),
    })
    from geoloc.artifacts import atomic_write_json

    atomic_write_json(HERE / "results" / "precision.json", result)
    for k, v in result.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
