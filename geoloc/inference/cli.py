"""``geoloc-predict``: where was this photo taken?

    geoloc-predict photo.jpg other.png --model RUN/checkpoints/best.ckpt
    geoloc-predict photos/*.jpg --model ... --json                      # one JSON object per photo
    geoloc-predict photo.jpg --model ... --refine prototypes --topk 3    # also gallery, both, evidence, ...
    geoloc-predict photo.jpg --model ... --explain [--ocr]               # the reasoning chain too
    geoloc-predict photo.jpg --model ... --explain generated             # the text decoder's, every claim checked
    geoloc-predict photo.jpg --model ... --decode geoscore               # the answer with the best expected score
    geoloc-predict photo.jpg --model model.pt [--explain]               # an exported model (geoloc.inference.export)
    geoloc-predict photo.jpg --model model.onnx [--explain]             # ... its ONNX file, through onnxruntime

Prints the predicted location, the top geocells with their country, region and probability, and the
GPS position in the photo's EXIF when there is one, with its distance from the prediction. A checkpoint's
cell probabilities are calibrated when its run has ``RUN/calibration_v1.json`` (``python -m geoloc
calibrate``; ``--calibration none`` turns it off); ``--decode`` chooses the answer for a metric
(:mod:`geoloc.retrieval.decode`). The EXIF
position is only reported, never used to predict. Photos that cannot be read are reported with the
reason and the others still run; the exit status is 1 when any photo failed.

``--explain`` adds the reasoning chain (:mod:`geoloc.evidence.verbalize`): scene, environment cues and
region, each claim with the probability a head of the model computed, and how the evidence agrees with
each top cell; ``--ocr`` also reads text in the photo (``--ocr-engine auto``: Tesseract when installed,
``make ocr``; else ``rapidocr-onnxruntime``). For a model trained with a text decoder, ``--explain`` also
shows the chain the decoder writes, with only the claims the model's outputs back
(:mod:`geoloc.evidence.claims`); ``--explain template|generated|both`` chooses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from geoloc.cli import USER_ERRORS, user_message
from geoloc.data.images import ImageError, decode_image, read_exif_latlng
from geoloc.geo import haversine_km
from geoloc.inference.predictor import REFINE_CHOICES


def _fmt_latlng(lat: float, lng: float) -> str:
    return f"{abs(lat):.4f}°{'N' if lat >= 0 else 'S'}, {abs(lng):.4f}°{'E' if lng >= 0 else 'W'}"


def _cell_info(table, cell: int) -> dict:
    row = table.iloc[int(cell)]

    def get(col):
        v = row.get(col) if hasattr(row, "get") else None
        return None if v is None or (isinstance(v, float) and np.isnan(v)) or v == "" else str(v)

    return {"cell_id": int(cell), "country": get("country"), "country_code": get("adm0_a3"),
            "admin1": get("admin1_name"), "centroid": [float(row["centroid_lat"]), float(row["centroid_lng"])]}


def predict_files(paths: list[str], predictor, *, batch_size: int = 32) -> list[dict]:
    """Runs the predictor on image files; one result dict per path, in order (``error`` set on failure).

    Photos are decoded a batch at a time, so memory does not grow with the number of files.
    """
    results: list[dict] = [{"path": p, "latlng": None, "top_cells": [], "exif_latlng": None,
                            "exif_distance_km": None, "error": None} for p in paths]
    if getattr(predictor, "explain", False):
        for r in results:
            r["explanation"] = None
    table = predictor.cells.table
    for s in range(0, len(paths), batch_size):
        good, images = [], []
        for i in range(s, min(s + batch_size, len(paths))):
            p = Path(paths[i])
            try:
                images.append(decode_image(p))
                good.append(i)
            except ImageError as e:
                results[i]["error"] = f"{e.reason}: {e.detail}" if e.detail else e.reason
            exif = read_exif_latlng(p) if p.is_file() else None
            results[i]["exif_latlng"] = list(exif) if exif else None
        if not good:
            continue
        out = predictor.predict(images, [paths[i] for i in good])
        del images
        for j, i in enumerate(good):
            fill_result(results[i], out, j, table)
    return results


def fill_result(r: dict, out, j: int, table) -> dict:
    """Writes photo ``j`` of a :class:`~geoloc.inference.base.Prediction` into its result dict (``latlng``,
    ``top_cells`` with names and probabilities, ``explanation`` when there is one, ``exif_distance_km`` when
    ``r["exif_latlng"]`` is set): what ``--json`` prints and ``geoloc-serve`` returns."""
    r["latlng"] = [float(v) for v in out.latlng[j]]
    r["top_cells"] = [{**_cell_info(table, c), "prob": float(p)} for c, p in zip(out.topk_cells[j], out.topk_prob[j])]
    if out.explanations is not None:
        r["explanation"] = out.explanations[j]
    if r.get("exif_latlng") is not None:
        r["exif_distance_km"] = float(haversine_km(np.array([r["latlng"]]), np.array([r["exif_latlng"]]))[0])
    return r


def load_predictor(model: str, *, cells: str | None = None, refine: str = "none", index: str | None = None,
                   clip_weights: str | None = None, gallery: str | None = None, topk: int | None = None,
                   device: str = "cpu", explain: bool | str = False, ocr: bool | str = False, decode: str | None = None,
                   calibration: str | None = None, precision: str | None = None, explain_beams: int = 1,
                   vlm: str | None = None):
    """A predictor for ``--model``: ``geoclip`` (GeoCLIP's released model), an exported TorchScript or ONNX file or a
    ``train.py`` checkpoint (the last two told apart by content, not by name).

    ``decode`` (None: ``argmax``) and ``calibration`` (None: ``auto`` for a checkpoint, none for GeoCLIP; a
    path; ``none``) apply to checkpoints and GeoCLIP; an exported model answers as it was exported.
    ``precision`` (None: ``32``; ``bf16``, ``auto``) is the forward pass's (:mod:`geoloc.precision`).
    ``explain``: False, True / ``auto``, ``template``, ``generated`` or ``both``
    (:func:`geoloc.evidence.claims.resolve_explain`); GeoCLIP and exported models give the template chain.
    """
    from geoloc.evidence.claims import resolve_explain
    from geoloc.models.loading import is_torchscript

    if model == "geoclip":
        explain = resolve_explain(explain, False, what="--model geoclip") is not None  # no text decoder
    from geoloc.inference.exported import is_onnx

    exported = Path(model).is_file() and (is_torchscript(model) or is_onnx(model))
    if vlm and (model == "geoclip" or exported):
        raise ValueError("--vlm applies to train.py checkpoints")
    if model == "geoclip":
        if refine != "none":
            raise ValueError("--model geoclip answers GeoCLIP's way (the best gallery point); --refine applies to "
                             "train.py checkpoints (give --index for prototype refinement)")
        from geoloc.inference.geoclip import build_geoclip_predictor

        return build_geoclip_predictor(clip_weights, cells=cells, index=index, topk=topk or 5, device=device,
                                       explain=explain, ocr=ocr, decode=decode or "argmax",
                                       calibration=None if calibration in (None, "auto") else calibration,
                                       precision=precision or "32")
    if exported:
        if (refine != "none" or index is not None or gallery is not None or decode is not None or calibration
                or precision):
            raise ValueError(f"{model}: an exported model refines, calibrates and decodes as it was exported (python "
                             "-m geoloc export refine=... predictor.decode=... predictor.precision=...); --refine, "
                             "--index, --gallery, --decode, --calibration and --precision apply to train.py "
                             "checkpoints")
        from geoloc.inference.exported import ExportedPredictor, OnnxPredictor

        kind = OnnxPredictor if is_onnx(model) else ExportedPredictor
        return kind(model, cells=cells, topk=topk, device=device, explain=explain, ocr=ocr)
    from geoloc.inference.predictor import build_predictor

    return build_predictor(model, cells=cells, refine=refine, index=index, gallery=gallery, topk=topk or 5,
                           device=device, explain=explain, ocr=ocr if explain else False, decode=decode or "argmax",
                           calibration="auto" if calibration is None else calibration, precision=precision or "32",
                           explain_beams=explain_beams, vlm=vlm)


def format_text(r: dict) -> str:
    """A human-readable block for one result."""
    if r["error"]:
        return f"{r['path']}: cannot read the image ({r['error']})"
    top = r["top_cells"][0] if r["top_cells"] else {}
    where = ", ".join(v for v in (top.get("admin1"), top.get("country")) if v)
    lines = [f"{r['path']}: {_fmt_latlng(*r['latlng'])}" + (f"  ({where})" if where else "")]
    for rank, c in enumerate(r["top_cells"], 1):
        place = ", ".join(v for v in (c["admin1"], c["country"]) if v) or "?"
        lines.append(f"  {rank}. cell {c['cell_id']:>5}  {100 * c['prob']:5.1f}%  {place}")
    if r["exif_latlng"] is not None:
        lines.append(f"  EXIF GPS: {_fmt_latlng(*r['exif_latlng'])} ({r['exif_distance_km']:,.0f} km from the "
                     "prediction; reported only, not used)")
    if r.get("explanation"):
        lines.append("  Why:")
        lines.extend("  " + line for line in r["explanation"]["text"].splitlines())
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    # timm imports wandb when it is installed, only for its training summaries: a third of a second this
    # command never uses (it only runs when geoloc-predict is the program, never on library import)
    if __name__ == "__main__" or Path(sys.argv[0]).name == "geoloc-predict":
        sys.modules.setdefault("wandb", None)
    parser = argparse.ArgumentParser(prog="geoloc-predict", description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", required=True, help="a checkpoint written by train.py (RUN/checkpoints/*.ckpt), "
                        "a model exported by python -m geoloc export (model.pt), or geoclip (GeoCLIP's released "
                        "model; needs --clip-weights)")
    parser.add_argument("--clip-weights", default=None, help="with --model geoclip: CLIP ViT-L/14 weights (a file, a "
                        "folder, or a hub name where there is internet)")
    parser.add_argument("--topk", type=_positive_int, default=None,
                        help="ranked cells to show (default 5; an exported model: as many as it returns)")
    parser.add_argument("--refine", default="none", choices=list(REFINE_CHOICES))
    parser.add_argument("--index", default=None, help="retrieval index folder (default RUN/index_v1)")
    parser.add_argument("--gallery", default=None, help="GPS-gallery cache (default RUN/gallery_v1.npz, built by "
                        "python -m geoloc gallery)")
    parser.add_argument("--decode", default=None, help="the answer: argmax (default: the most probable cell), "
                        "geoscore, distance or acc@KM (the candidate with the best expected score, distance or "
                        "accuracy)")
    parser.add_argument("--calibration", default=None, help="the cell temperature: a calibration file, or none "
                        "(default: RUN/calibration_v1.json when python -m geoloc calibrate wrote one)")
    parser.add_argument("--precision", default=None, help="the forward pass: 32 (default), bf16 (bfloat16 autocast: "
                        "AMX / AVX512-BF16 CPUs, GPUs) or auto (bf16 where the device has it)")
    parser.add_argument("--cells", default=None, help="geocells file (default: the run's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="photos decoded and predicted at a time")
    parser.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    parser.add_argument("--explain", nargs="?", const="auto", default=None, metavar="MODE",
                        help="the reasoning chain: scene, environment cues, region, each with its probability. MODE: "
                        "template (filled from the model's outputs), generated (written by the model's text decoder, "
                        "every claim checked against its outputs, unbacked ones dropped), both; default: both when "
                        "the model has a text decoder, else template")
    parser.add_argument("--vlm", default=None, metavar="FOLDER",
                        help="also ask a vision-language model saved in FOLDER (transformers, e.g. "
                        "Qwen2.5-VL; never downloaded) for the chain; only the claims the model backs are shown")
    parser.add_argument("--explain-beams", type=_positive_int, default=1,
                        help="beams of the text decoder's search (default 1: greedy)")
    parser.add_argument("--ocr", action="store_true", help="with --explain: also read text in the photo and name "
                        "its script")
    parser.add_argument("--ocr-engine", default="auto", choices=("auto", "tesseract", "rapidocr"),
                        help="auto: Tesseract when installed (make ocr), else rapidocr-onnxruntime")
    args = parser.parse_args(argv)
    try:
        predictor = load_predictor(args.model, cells=args.cells, refine=args.refine, index=args.index,
                                   clip_weights=args.clip_weights, gallery=args.gallery, topk=args.topk,
                                   device=args.device, explain=args.explain or bool(args.vlm),
                                   ocr=args.ocr_engine if args.ocr else False, decode=args.decode,
                                   calibration=args.calibration, precision=args.precision,
                                   explain_beams=args.explain_beams, vlm=args.vlm)
    except (ImportError, *USER_ERRORS) as e:
        message = user_message(e) or str(e)
        if os.environ.get("GEOLOC_DEBUG"):
            raise
        print(f"geoloc-predict: {message}", file=sys.stderr)
        return 2
    results = predict_files(args.images, predictor, batch_size=args.batch_size)
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(format_text(r), file=sys.stderr if r["error"] else sys.stdout)
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
