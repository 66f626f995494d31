"""Verbalizer: a reasoning chain that only says what the model computed.

A chain has three stages, as a person reasons about a photo (GRE Suite):

1. **scene**: the ``scene`` head (indoor / natural / urban);
2. **environment**: the other evidence heads (climate, land cover, coast, hemisphere, driving side,
   writing script) and, when the OCR stage ran, the script of the text read in the photo;
3. **region**: continent, country and admin-1 region (the geocell probabilities summed over the cells
   of each), the chosen cell and the coordinate; the ``continent`` head too when the model has one.

Every sentence comes from a *claim* ``{stage, head, value, probability, source}``: ``head`` names the
model output (``scene``, ``land_cover``, ... or ``geocells`` for the cell classifier; ``ocr`` for the
text reader), ``probability`` is what that output gave ``value``. Nothing is said about an attribute
the model did not predict. Then each top cell is *checked* against the evidence: the share of the
cell's own training photos with the predicted value (the cells file's ``evidence_<head>`` counts),
``agrees`` from 50%, ``partly`` from 10%, else ``disagrees``; ``no data`` when none of its photos
has a label for that head.

:func:`explain` turns a batch of network outputs and the predictor's answer into one chain per photo,
as JSON-ready dicts (``stages``, ``claims``, ``checks``, and ``text``: the chain rendered for people).
"""

from __future__ import annotations

import functools

import numpy as np

from geoloc.evidence.labels import HEADS

STAGES = ("scene", "environment", "region")
AGREE_SHARE, PARTLY_SHARE = 0.5, 0.1
ALTERNATIVE_PROB = 0.15  # other classes mentioned when the model gives them at least this much
#: How each head is named in a sentence.
HEAD_TITLES = {"scene": "scene", "koppen": "Köppen climate", "koppen_group": "climate zone", "land": "land or sea",
               "land_cover": "land cover", "coast": "distance to the coast", "hemisphere": "hemisphere",
               "continent": "continent", "driving_side": "traffic drives on the", "script": "writing script",
               "ocr": "text in the photo", "geocells": "geocells"}
_KOPPEN_GROUPS = {"A": "tropical (A)", "B": "arid (B)", "C": "temperate (C)", "D": "continental (D)",
                  "E": "polar (E)"}


def _value_text(head: str, value: str) -> str:
    if head == "koppen_group":
        return _KOPPEN_GROUPS.get(value, value)
    if head == "land_cover":
        return value.replace("_", " ")
    return value


def head_stage(head: str) -> str:
    return "scene" if head == "scene" else "region" if head == "continent" else "environment"


class _RegionSums:
    """Sums of the cell probabilities over the cells of each continent, country and admin-1 region."""

    def __init__(self, table):
        import scipy.sparse as sp

        n = len(table)

        def col(name):
            return (table[name].fillna("").astype(str).to_numpy(dtype=object) if name in table.columns
                    else np.full(n, "", dtype=object))

        country = col("country")
        self.levels = {"continent": col("continent"), "country": country,
                       "admin1": np.array([f"{a}, {c}" if a and c else "" for a, c in zip(col("admin1_name"),
                                                                                        country)], dtype=object)}
        self.matrices, self.names = {}, {}
        for level, codes in self.levels.items():
            names, inv = np.unique(codes, return_inverse=True)
            self.names[level] = names
            self.matrices[level] = sp.csr_matrix((np.ones(n), (np.arange(n), inv)), shape=(n, len(names)))

    def __call__(self, cell_prob: np.ndarray, level: str) -> tuple[np.ndarray, np.ndarray]:
        """``(value (B,), probability (B,))`` of the most probable non-empty group at ``level``."""
        sums = np.asarray(self.matrices[level].T.dot(np.asarray(cell_prob, np.float64).T).T)  # (B, G)
        sums[:, self.names[level] == ""] = -1.0
        best = sums.argmax(axis=1)
        return self.names[level][best], sums[np.arange(len(best)), best]


@functools.lru_cache(maxsize=4)
def _region_sums(cells) -> _RegionSums:
    return _RegionSums(cells.table)


def _claim(stage, head, value, probability, source, alternatives=()) -> dict:
    return {"stage": stage, "head": head, "value": value, "probability": float(probability), "source": source,
            "alternatives": [{"value": v, "probability": float(p)} for v, p in alternatives]}


def _fmt_prob(p: float) -> str:
    return f"{100 * p:.0f}%" if p >= 0.01 else "<1%"


def _share_text(check: dict) -> str:
    return "none" if check["cell_share"] == 0 else _fmt_prob(check["cell_share"])


def _claim_sentence(c: dict) -> str:
    head, value = c["head"], c["value"]
    alts = "".join(f", {_value_text(head, a['value'])} {_fmt_prob(a['probability'])}" for a in c["alternatives"])
    if head == "geocells":
        what = c["source"].split(":", 1)[1]
        if what == "coordinate":
            lat, lng = value
            where = f"coordinate {abs(lat):.3f}°{'N' if lat >= 0 else 'S'}, {abs(lng):.3f}°{'E' if lng >= 0 else 'W'}"
            if c.get("top_cell", True):
                return f"{where} inside that cell ({_fmt_prob(c['probability'])})"
            return (f"answer {where}, the point of cell {c['cell']} ({c.get('cell_name', '?')}, "
                    f"{_fmt_prob(c['probability'])}), the candidate with the best expected score")
        what = {"admin1": "admin-1 region"}.get(what, what)
        return f"{what} {value} ({_fmt_prob(c['probability'])}, summed over its geocells)"
    if head == "ocr":
        return f"text in the photo is written in {value} script ({_fmt_prob(c['probability'])} OCR confidence)"
    title = HEAD_TITLES.get(head, head)
    if head == "scene":
        return f"{value} ({_fmt_prob(c['probability'])}, {head} head{alts and ';'}{alts[1:]})"
    if head == "driving_side":
        return f"{title} {value} ({_fmt_prob(c['probability'])}, {head} head{alts and ';'}{alts[1:]})"
    return f"{title}: {_value_text(head, value)} ({_fmt_prob(c['probability'])}, {head} head{alts and ';'}{alts[1:]})"


def _head_claim(head: str, probs: np.ndarray) -> dict:
    classes = HEADS[head]
    order = np.argsort(-probs, kind="stable")
    alts = [(classes[k], probs[k]) for k in order[1:3] if probs[k] >= ALTERNATIVE_PROB]
    return _claim(head_stage(head), head, classes[order[0]], probs[order[0]], "evidence head", alts)


def _verdict(share: float | None) -> str:
    if share is None:
        return "no data"
    return "agrees" if share >= AGREE_SHARE else "partly" if share >= PARTLY_SHARE else "disagrees"


def explain(out: dict, pred, cells, *, ocr: list[dict | None] | None = None, refine: str = "none") -> list[dict]:
    """One reasoning chain per photo.

    Args:
        out: the network outputs of :meth:`geoloc.inference.predictor.ModelPredictor.forward`: ``cell_prob (B, C)`` and
            ``evidence/<head> (B, K)`` probabilities.
        pred: the predictor's :class:`~geoloc.inference.base.Prediction` for the same photos (``latlng``,
            ``topk_cells``, ``topk_prob``).
        cells: the :class:`~geoloc.geo.cells.Geocells` the model classifies into.
        ocr: per photo, :func:`geoloc.evidence.ocr.text_evidence`'s result (None: not run or no text).
        refine: how the cell and coordinate were chosen (named in the chain).

    Returns:
        Per photo ``{"stages": [{"stage", "text", "claims": [indices]}], "claims": [...], "checks": [...],
        "text": str}``.
    """
    heads = [h for h in HEADS if f"evidence/{h}" in out]
    cell_prob = np.asarray(out["cell_prob"])
    regions = _region_sums(cells)
    level_best = {lvl: regions(cell_prob, lvl) for lvl in ("continent", "country", "admin1")}
    table = cells.table
    counts = {h: np.stack([np.asarray(c, np.float64) for c in table[f"evidence_{h}"]])
              for h in heads if f"evidence_{h}" in table.columns}
    script_counts = (np.stack([np.asarray(c, np.float64) for c in table["evidence_script"]])
                     if "evidence_script" in table.columns else None)
    chains = []
    for i in range(len(cell_prob)):
        claims = [_head_claim(h, np.asarray(out[f"evidence/{h}"][i], np.float64)) for h in heads]
        text_ev = ocr[i] if ocr is not None else None
        if text_ev:
            claims.append(_claim("environment", "ocr", text_ev["script"], text_ev["confidence"], "ocr"))
        for lvl in ("continent", "country", "admin1"):
            value, p = level_best[lvl]
            claims.append(_claim("region", "geocells", str(value[i]), p[i], f"geocells:{lvl}"))
        top = [int(c) for c in pred.topk_cells[i]]
        claims.append(_claim("region", "geocells", top[0], pred.topk_prob[i][0], f"geocells:cell ({refine})"))
        answer = top[0] if pred.answer_cell is None else int(pred.answer_cell[i])
        p_answer = pred.topk_prob[i][0] if pred.answer_prob is None else pred.answer_prob[i]
        claims.append({**_claim("region", "geocells", [float(v) for v in pred.latlng[i]], p_answer,
                                "geocells:coordinate"), "cell": answer, "top_cell": answer == top[0]})
        checks = []
        for rank, cell in enumerate(top, 1):
            for c in claims:
                head = c["head"]
                if head in counts or (head == "ocr" and script_counts is not None):
                    cnt = counts[head][cell] if head in counts else script_counts[cell]
                    classes = HEADS["script" if head == "ocr" else head]
                    n = float(cnt.sum())
                    share = float(cnt[classes.index(c["value"])] / n) if n > 0 and c["value"] in classes else None
                    checks.append({"cell_id": cell, "rank": rank, "head": head, "value": c["value"],
                                   "cell_share": share, "n_labelled": int(n), "verdict": _verdict(share)})
        chains.append(_assemble(claims, checks, top, pred.topk_prob[i], table))
    return chains


def _cell_name(table, cell: int) -> str:
    row = table.iloc[cell]
    parts = [str(row.get(k)) for k in ("admin1_name", "country") if isinstance(row.get(k), str) and row.get(k)]
    return ", ".join(parts) or "?"


def _assemble(claims: list[dict], checks: list[dict], top: list[int], top_prob, table) -> dict:
    for c in claims:
        if "cell" in c:
            c["cell_name"] = _cell_name(table, c["cell"])
    stages = []
    for stage in STAGES:
        idx = [k for k, c in enumerate(claims) if c["stage"] == stage]
        if not idx:
            continue
        sentences = [_claim_sentence(claims[k]) for k in idx]
        if stage == "region":
            cell_claim = next(claims[k] for k in idx if claims[k]["source"].startswith("geocells:cell"))
            sentences = [s for k, s in zip(idx, sentences) if claims[k] is not cell_claim]
            method = cell_claim["source"].split("(", 1)[1].rstrip(")")
            sentences.insert(len(sentences) - 1, f"cell {cell_claim['value']} ({_cell_name(table, cell_claim['value'])}"
                             f", {_fmt_prob(cell_claim['probability'])}, refine={method})")
        stages.append({"stage": stage, "text": "; ".join(sentences) + ".", "claims": idx})
    lines = [f"{n}. {s['stage'].capitalize()}: {s['text']}" for n, s in enumerate(stages, 1)]
    for rank, (cell, p) in enumerate(zip(top, top_prob), 1):
        mine = [c for c in checks if c["rank"] == rank and c["verdict"] != "no data"]
        if not mine:
            continue
        by = {v: [c for c in mine if c["verdict"] == v] for v in ("agrees", "partly", "disagrees")}
        parts = [f"{v} on " + ", ".join(f"{c['head']}={_value_text(c['head'], c['value'])} "
                                         f"({_share_text(c)} of its {c['n_labelled']} photos)" for c in cs)
                 for v, cs in by.items() if cs]
        lines.append(f"   cell {cell} ({_cell_name(table, cell)}, {_fmt_prob(float(p))}): " + "; ".join(parts))
    return {"stages": stages, "claims": claims, "checks": checks, "text": "\n".join(lines)}


def verify_chain(chain: dict, out: dict, i: int, pred, cells, *, atol: float = 1e-5) -> list[str]:
    """Re-derives every claim of photo ``i``'s chain from the network outputs; returns what does not match.

    A claim from an evidence head must be that head's most probable class with its probability (and its
    alternatives their probabilities); a region claim the summed cell probability of that region; the
    cell and coordinate claims the predictor's answer. A chain may only name heads the outputs have.
    Every percentage in the stage sentences must be one of the claims' probabilities.

    Returns:
        Problems, as sentences (empty: the chain is faithful).
    """
    import re

    problems = []
    heads = {k.split("/", 1)[1] for k in out if k.startswith("evidence/")}
    regions = _region_sums(cells)
    for c in chain["claims"]:
        head, src = c["head"], c["source"]
        if src == "evidence head":
            if head not in heads:
                problems.append(f"photo {i}: claims {head}, which the model does not predict")
                continue
            probs, classes = np.asarray(out[f"evidence/{head}"][i], np.float64), HEADS[head]
            if c["value"] != classes[int(probs.argmax())] or abs(c["probability"] - probs.max()) > atol:
                problems.append(f"photo {i}: {head}={c['value']} {c['probability']:.4f}, but the head gave "
                                f"{classes[int(probs.argmax())]} {probs.max():.4f}")
            for a in c["alternatives"]:
                if abs(a["probability"] - probs[classes.index(a["value"])]) > atol:
                    problems.append(f"photo {i}: {head} alternative {a['value']} misstated")
        elif src.startswith("geocells:") and src.split(":")[1] in regions.levels:
            level = src.split(":")[1]
            member = regions.levels[level] == c["value"]
            p = float(np.asarray(out["cell_prob"][i], np.float64)[member].sum())
            if abs(p - c["probability"]) > atol:
                problems.append(f"photo {i}: {level} {c['value']} {c['probability']:.4f}, cells sum to {p:.4f}")
        elif src.startswith("geocells:cell"):
            if c["value"] != int(pred.topk_cells[i, 0]) or abs(c["probability"] - pred.topk_prob[i, 0]) > atol:
                problems.append(f"photo {i}: cell claim differs from the predictor's answer")
        elif src == "geocells:coordinate":
            if not np.allclose(c["value"], pred.latlng[i], atol=1e-9):
                problems.append(f"photo {i}: coordinate claim differs from the predictor's answer")
            answer = int(pred.topk_cells[i, 0]) if pred.answer_cell is None else int(pred.answer_cell[i])
            p = pred.topk_prob[i, 0] if pred.answer_prob is None else pred.answer_prob[i]
            if c.get("cell", answer) != answer or abs(c["probability"] - p) > atol:
                problems.append(f"photo {i}: the answer's cell or its probability differs from the predictor's")
        elif src != "ocr":
            problems.append(f"photo {i}: claim from unknown source {src!r}")
    stated = {round(100 * c["probability"]) for c in chain["claims"]} | {
        round(100 * a["probability"]) for c in chain["claims"] for a in c["alternatives"]}
    for s in chain["stages"]:
        for pct in re.findall(r"(\d+)%", s["text"]):
            if int(pct) not in stated:
                problems.append(f"photo {i}: the {s['stage']} stage states {pct}%, which no claim carries")
    return problems
