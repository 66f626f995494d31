"""Generated text held to the model's own outputs: parse it into claims, check each, show only what holds.

A *claim* is ``{stage, head, value}``: the stage of the text it was written in, the part it names (a part of
:data:`geoloc.evidence.captions.PARTS`: scene, koppen, land_cover, coast, driving_side, script, place,
admin1, country, continent) and the value. Two parsers make claims:

* :func:`parse_tokens` reads the text decoder's tokens: a typed value token is a claim, with the decoder's
  probability for it (``decoder_probability``);
* :func:`parse_text` reads free text (a large vision-language model's, :mod:`geoloc.evidence.vlm`): the
  stage labels, the caption phrases ("Cfb climate", "traffic on the left", "close to the town of X", "the
  region of Y") and any country or continent named; sentences that name nothing it knows are counted as
  ``unparsed``.

:func:`check_claims` gives every claim the probability the *model* computed for it (``model_probability``)
and where it comes from (``basis``):

==============================  ===================================================================
claim                           basis
==============================  ===================================================================
a part the model has a head     that evidence head's probability of the value
for (scene, koppen, land_cover,
coast, driving_side, script,
continent)
such a part without a head      the cell distribution: ``sum_c p(c) * share of cell c's training photos
                                with the value`` over the cells with labelled photos
country, admin1, continent      the geocell probabilities summed over the region's cells
place                           the probability of the cells within ``PLACE_RADIUS_KM`` of the place
                                (those whose centroid is that close, and the nearest centroid's)
==============================  ===================================================================

and a verdict: **backed** when the value is the basis's most probable one or has at least
:data:`BACKED_PROB`; **contradicted** below :data:`CONTRADICTED_PROB`; **unbacked** in between or when the
model computed nothing about it. Then the text is held to itself: a claim that repeats an earlier one is
**repeated**, and a region claim that cannot hold together with a backed region claim the model gives more
probability (an admin-1 region of another country, a country on another continent) is **inconsistent**.
Only backed claims are shown (:func:`checked_chain`); the others are dropped and counted.
:func:`verify_checked_chain` re-derives a checked chain from the outputs, as
:func:`geoloc.evidence.verbalize.verify_chain` does for the template chain.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from geoloc.evidence.captions import PARTS, PLACE_RADIUS_KM, STAGE_WORDS, CaptionVocab, caption_vocab, display
from geoloc.evidence.labels import HEADS

BACKED_PROB = 0.15  # as the template chain, which names a class as an alternative from this probability
CONTRADICTED_PROB = 0.05
HEAD_PARTS = ("scene", "koppen", "land_cover", "coast", "driving_side", "script", "continent")
VERDICTS = ("backed", "unbacked", "contradicted", "inconsistent", "repeated")
DROPPED = VERDICTS[1:]


# ----------------------------------------------------------------------------------------------- parsing
def parse_tokens(tokens, probs, vocab: CaptionVocab | None = None) -> list[dict]:
    """The claims of one generated token row (stops at ``<eos>``).

    Args:
        tokens: ``(T,)`` ids (:meth:`geoloc.models.text_decoder.TextDecoder.generate`).
        probs: ``(T,)`` the decoder's probability of each.
    """
    vocab = vocab or caption_vocab()
    stages = {w: s for s, w in STAGE_WORDS.items()}
    stage, claims = None, []
    for t, p in zip(np.asarray(tokens).tolist(), np.asarray(probs, np.float64).tolist()):
        if t == vocab.eos_id:
            break
        if not 0 <= t < len(vocab):
            continue
        word = vocab.tokens[t]
        if word in stages:
            stage = stages[word]
        elif vocab.parts[t] is not None:
            claims.append({"stage": stage, "head": vocab.parts[t], "value": vocab.values[t],
                           "decoder_probability": float(p)})
    return claims


#: Common English names the boundary file spells otherwise (free text uses these; the captions do not).
_EXTRA_ALIASES = {"United States": "United States of America", "USA": "United States of America",
                  "U.S.": "United States of America", "UK": "United Kingdom", "Great Britain": "United Kingdom",
                  "Britain": "United Kingdom", "Czech Republic": "Czechia", "Holland": "Netherlands"}


@functools.lru_cache(maxsize=2)
def _country_aliases(vocab: CaptionVocab) -> dict[str, str]:
    """Other names of the vocabulary's countries -> its names: the country table's English names (by ISO code,
    e.g. "Bosnia and Herzegovina" for Natural Earth's "Bosnia and Herz.") and a few common short forms."""
    from geoloc.evidence.country_tables import country_table
    from geoloc.geo.boundaries import admin_boundaries_path, load_boundaries

    known = set(vocab.values_of("country"))
    b = load_boundaries(admin_boundaries_path())
    by_code: dict[str, set] = {}
    for code, country in zip(b["iso_a2"], b["country"]):
        if isinstance(code, str) and isinstance(country, str):
            by_code.setdefault(code, set()).add(country)
    t = country_table()
    aliases = {}
    for code, name in zip(t["iso_a2"], t["name"]):
        names = by_code.get(code, set())
        if len(names) == 1 and name not in known:
            aliases[str(name)] = next(iter(names))
    aliases.update({k: v for k, v in _EXTRA_ALIASES.items() if v in known})
    return aliases


def _alternation(names) -> str:
    return "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))


@functools.lru_cache(maxsize=2)
def _text_patterns(vocab: CaptionVocab):
    words = {p: _alternation(HEADS[p] if p in HEADS else ()) for p in HEAD_PARTS}
    heads = {
        "scene": re.compile(rf"^\W*(?:an?\s+)?({words['scene']})\b", re.I),
        "koppen": re.compile(rf"\b({words['koppen']})\s+climate", re.I),
        "land_cover": re.compile(rf"\b({words['land_cover']})\s+land\s+cover", re.I),
        "coast": re.compile(rf"({words['coast']})\s+from\s+the\s+coast", re.I),
        "driving_side": re.compile(r"traffic\s+(?:drives\s+|keeps\s+)?on\s+the\s+(left|right)", re.I),
        "script": re.compile(rf"\b({words['script']})\s+script", re.I),
    }
    country = re.compile(rf"(?<!\w)({_alternation([*vocab.values_of('country'), *_country_aliases(vocab)])})(?!\w)")
    continent = re.compile(rf"\b({words['continent']})\b")
    place = re.compile(r"close\s+to\s+the\s+(?:town|city)\s+of\s+(.+?)(?=\s+in\s+|,|\.|$)", re.I)
    admin1 = re.compile(r"the\s+region\s+of\s+(.+?)(?=,|\s+in\s+|\.|$)", re.I)
    return heads, country, continent, place, admin1


@functools.lru_cache(maxsize=2)
def _names(vocab: CaptionVocab):
    """Display name -> typed values, for places and admin-1 regions."""
    out = {"place": {}, "admin1": {}}
    for part in out:
        for v in vocab.values_of(part):
            out[part].setdefault(display(part, v).casefold(), []).append(v)
    return out


def _canonical(part: str, found: str) -> str:
    for c in HEADS[part]:
        if c.casefold() == found.casefold():
            return c
    return found


def parse_text(text: str, vocab: CaptionVocab | None = None) -> tuple[list[dict], int]:
    """The claims free text makes, and how many of its sentences named nothing known.

    Stages come from ``Scene:`` / ``Environment:`` / ``Region:`` labels (``None`` before any label). An
    admin-1 region is resolved within the country the same sentence names; a place by its name (the most
    populous of that name in the sentence's country, else anywhere).

    Returns:
        ``(claims, unparsed)``: claims ``{stage, head, value, decoder_probability: None}`` in text order.
    """
    from geoloc.evidence.captions import _places

    vocab = vocab or caption_vocab()
    heads, country_re, continent_re, place_re, admin1_re = _text_patterns(vocab)
    names = _names(vocab)
    aliases = _country_aliases(vocab)
    values, _, population = _places()
    pop = dict(zip(values, population))
    labels = re.compile(r"\b(Scene|Environment|Region)\s*:", re.I)
    pieces, stage, pos = [], None, 0
    for m in labels.finditer(text):
        pieces.append((stage, text[pos:m.start()]))
        stage, pos = m.group(1).lower(), m.end()
    pieces.append((stage, text[pos:]))
    claims, unparsed = [], 0
    for stage, piece in pieces:
        for sentence in (s for s in re.split(r"(?<=[.!?;])\s+|\n+", piece) if s.strip()):
            found: list[tuple[int, str, str]] = []
            rest = sentence
            for part, rx in heads.items():
                if part == "scene" and stage != "scene":
                    continue
                for m in rx.finditer(sentence):
                    found.append((m.start(), part, _canonical(part, m.group(1))))
            spans = []
            countries = [(m.start(), aliases.get(m.group(1), m.group(1))) for m in country_re.finditer(sentence)]
            pm, am = place_re.search(sentence), admin1_re.search(sentence)
            for m in (pm, am):
                if m:
                    spans.append(m.span(1))
            outside = [(s, c) for s, c in countries if not any(a <= s < b for a, b in spans)]
            here = outside[0][1] if outside else None
            if am:
                name = am.group(1).strip()
                cands = [v for v in names["admin1"].get(name.casefold(), []) if here and v.endswith(f", {here}")]
                if cands:
                    found.append((am.start(1), "admin1", cands[0]))
            if pm:
                cands = names["place"].get(pm.group(1).strip().casefold(), [])
                if cands:
                    found.append((pm.start(1), "place", max(cands, key=lambda v: pop.get(v, 0))))
            found += [(s, "country", c) for s, c in outside]
            found += [(m.start(), "continent", m.group(1)) for m in continent_re.finditer(rest)
                      if not any(a <= m.start() < b for a, b in spans)]
            if not found:
                unparsed += 1
            for _, part, value in sorted(found):
                claims.append({"stage": stage, "head": part, "value": value, "decoder_probability": None})
    return claims, unparsed


# ---------------------------------------------------------------------------------------------- checking
class _CellBasis:
    """What the cells file lets a claim be checked against: per-cell label counts and region membership."""

    def __init__(self, cells):
        from geoloc.evidence.verbalize import _region_sums

        table = cells.table
        self.regions = _region_sums(cells)
        self.counts = {}
        for part in HEAD_PARTS:
            col = f"evidence_{part}"
            if col in table.columns:
                c = np.stack([np.asarray(v, np.float64) for v in table[col]])
                self.counts[part] = c
        self.centroids = np.asarray(cells.centroids, np.float64)
        self._near: dict[str, np.ndarray] = {}

    def near_place(self, value: str) -> np.ndarray:
        """Indices of the cells within :data:`PLACE_RADIUS_KM` of a place: those whose centroid is that close,
        and the cell of the nearest centroid (from centroids alone, so an exported model's cells, which carry
        no geometry, give the same answer)."""
        if value not in self._near:
            from geoloc.evidence.captions import _places
            from geoloc.geo import haversine_km

            values, latlng, _ = _places()
            where = latlng[np.flatnonzero(values == value)[0]]
            d = haversine_km(np.broadcast_to(where, self.centroids.shape), self.centroids)
            self._near[value] = np.union1d(np.flatnonzero(d <= PLACE_RADIUS_KM), [int(d.argmin())]).astype(np.int64)
        return self._near[value]


@functools.lru_cache(maxsize=4)
def _basis(cells) -> _CellBasis:
    return _CellBasis(cells)


def _region_probability(cell_prob: np.ndarray, basis: _CellBasis, level: str, value: str):
    """The geocell probability summed over a region's cells, and whether it is the most probable region."""
    member = basis.regions.levels[level] == value
    if not member.any():
        return 0.0, False, "geocells"
    best, _ = basis.regions(cell_prob[None], level)
    return float(cell_prob[member].sum()), str(best[0]) == value, "geocells"


def _model_probability(claim: dict, out: dict, i: int, basis: _CellBasis) -> tuple[float | None, bool, str | None]:
    """``(probability, is the most probable value, basis name)`` the model computed for a claim."""
    part, value = claim["head"], claim["value"]
    cell_prob = np.asarray(out["cell_prob"][i], np.float64)
    if part in HEAD_PARTS:
        classes = HEADS[part]
        if value not in classes:
            return None, False, None
        k = classes.index(value)
        if f"evidence/{part}" in out:
            p = np.asarray(out[f"evidence/{part}"][i], np.float64)
            return float(p[k]), int(p.argmax()) == k, f"{part} head"
        if part == "continent":  # without a continent head: the geocells summed, as for countries
            return _region_probability(cell_prob, basis, part, value)
        if part in basis.counts:
            cnt = basis.counts[part]
            n = cnt.sum(1)
            ok = n > 0
            w = cell_prob[ok]
            if w.sum() <= 0:
                return None, False, None
            dist = (w[:, None] * cnt[ok] / n[ok, None]).sum(0) / w.sum()
            return float(dist[k]), int(dist.argmax()) == k, "cell distribution"
        return None, False, None
    if part in ("country", "admin1"):
        return _region_probability(cell_prob, basis, part, value)
    if part == "place":
        near = basis.near_place(value)
        return float(cell_prob[near].sum()), int(cell_prob.argmax()) in set(near.tolist()), "geocells"
    return None, False, None


def check_claims(claims: list[dict], out: dict, i: int, cells) -> list[dict]:
    """Each claim with ``model_probability``, ``basis``, ``verdict`` added (a new list; see the module doc).

    Args:
        claims: :func:`parse_tokens` or :func:`parse_text` claims of photo ``i``.
        out: the predictor's network outputs (``cell_prob (B, C)``, ``evidence/<head> (B, K)`` probabilities).
        cells: the model's :class:`~geoloc.geo.cells.Geocells`.
    """
    basis = _basis(cells)
    checked, seen = [], set()
    for c in claims:
        p, top, name = _model_probability(c, out, i, basis)
        verdict = ("unbacked" if p is None else "backed" if top or p >= BACKED_PROB
                   else "contradicted" if p < CONTRADICTED_PROB else "unbacked")
        if (c["head"], c["value"]) in seen:
            verdict = "repeated"
        seen.add((c["head"], c["value"]))
        checked.append({**c, "model_probability": p, "basis": name, "verdict": verdict})
    accepted: list[dict] = []  # backed region claims, most probable first
    for c in sorted((c for c in checked if c["verdict"] == "backed" and c["head"] in ("admin1", "country",
                                                                                      "continent")),
                    key=lambda c: -c["model_probability"]):
        if any(not _compatible(c, a) for a in accepted):
            c["verdict"] = "inconsistent"
        else:
            accepted.append(c)
    return checked


@functools.lru_cache(maxsize=1)
def _country_continents() -> dict[str, frozenset]:
    """Country name -> the continents of its admin-1 regions (the committed boundaries)."""
    from geoloc.geo.boundaries import admin_boundaries_path, load_boundaries

    b = load_boundaries(admin_boundaries_path())
    out: dict[str, set] = {}
    for country, continent in zip(b["country"], b["continent"]):
        if isinstance(country, str) and isinstance(continent, str):
            out.setdefault(country, set()).add(continent)
    return {k: frozenset(v) for k, v in out.items()}


def _where(c: dict) -> tuple[str | None, frozenset | None]:
    """``(country, continents)`` a region claim puts the photo in (None: says nothing at that level)."""
    if c["head"] == "continent":
        return None, frozenset([c["value"]])
    country = c["value"].rsplit(", ", 1)[1] if c["head"] == "admin1" else c["value"]
    return country, _country_continents().get(country)


def _compatible(a: dict, b: dict) -> bool:
    (ca, ka), (cb, kb) = _where(a), _where(b)
    if ca is not None and cb is not None and ca != cb:
        return False
    if a["head"] == b["head"] == "admin1" and a["value"] != b["value"]:
        return False
    return ka is None or kb is None or bool(ka & kb)


# ------------------------------------------------------------------------------------------- the chain
def _fmt(p: float) -> str:
    return f"{100 * p:.0f}%" if p >= 0.01 else "<1%"


def _phrase(part: str, value: str) -> str:
    v = display(part, value)
    return {"scene": f"{v} scene", "koppen": f"{v} climate", "land_cover": f"{v} land cover",
            "coast": f"{v} from the coast", "driving_side": f"traffic on the {v}", "script": f"{v} script",
            "place": f"close to the town of {v}", "admin1": f"in the region of {v}", "country": f"in {v}",
            "continent": v}.get(part, v)


def claim_sentence(c: dict) -> str:
    """A checked claim as shown: its phrase, the decoder's probability and the model's with its basis."""
    probs = [] if c.get("decoder_probability") is None else [f"decoder {_fmt(c['decoder_probability'])}"]
    probs.append(f"{c['basis']} {_fmt(c['model_probability'])}")
    return f"{_phrase(c['head'], c['value'])} ({'; '.join(probs)})"


def checked_chain(claims: list[dict], out: dict, i: int, cells, *, source: str, text: str,
                  unparsed: int = 0) -> dict:
    """A generated text's claims checked, and the chain of the backed ones.

    Returns:
        ``{"source", "generated_text", "claims" (every claim, checked), "stages" [{stage, text, claims}], "text"
        (the shown chain), "kept", "dropped" {verdict: n} (:data:`DROPPED`), "unparsed"}``. A kept claim is shown
        in the stage of its part (:data:`geoloc.evidence.captions.PARTS`), whichever stage it was written in.
    """
    checked = check_claims(claims, out, i, cells)
    stages = []
    for stage in STAGE_WORDS:
        idx = [k for k, c in enumerate(checked) if c["verdict"] == "backed" and PARTS.get(c["head"]) == stage]
        if idx:
            stages.append({"stage": stage, "text": "; ".join(claim_sentence(checked[k]) for k in idx) + ".",
                           "claims": idx})
    lines = [f"{n}. {s['stage'].capitalize()}: {s['text']}" for n, s in enumerate(stages, 1)]
    dropped = {v: sum(c["verdict"] == v for c in checked) for v in DROPPED}
    if any(dropped.values()) or unparsed:
        lines.append("   dropped: " + ", ".join(
            [f"{n} {v}" for v, n in dropped.items() if n] + ([f"{unparsed} unparsed"] if unparsed else []))
            + " (" + "; ".join(f"{_phrase(c['head'], c['value'])} {c['verdict']}" for c in checked
                               if c["verdict"] != "backed") + ")")
    return {"source": source, "generated_text": text, "claims": checked, "stages": stages,
            "text": "\n".join(lines), "kept": sum(c["verdict"] == "backed" for c in checked), "dropped": dropped,
            "unparsed": int(unparsed)}


def decoder_chains(tokens, probs, out: dict, cells, vocab: CaptionVocab | None = None) -> list[dict]:
    """:func:`checked_chain` of every photo's generated tokens ``(B, T)``."""
    vocab = vocab or caption_vocab()
    return [checked_chain(parse_tokens(t, p, vocab), out, i, cells, source="decoder", text=vocab.render(t))
            for i, (t, p) in enumerate(zip(np.asarray(tokens), np.asarray(probs)))]


def verify_checked_chain(chain: dict, out: dict, i: int, cells, *, atol: float = 1e-6) -> list[str]:
    """Re-derives a checked chain from the outputs; returns what does not match (empty: faithful).

    Every claim's model probability and verdict must be what :func:`check_claims` computes now, only backed
    claims may be shown, and every percentage shown must be a claim's decoder or model probability.
    """
    problems = []
    again = check_claims([{k: c[k] for k in ("stage", "head", "value", "decoder_probability")}
                          for c in chain["claims"]], out, i, cells)
    for c, a in zip(chain["claims"], again):
        if c["verdict"] != a["verdict"] or (a["model_probability"] is None) != (c["model_probability"] is None) or (
                a["model_probability"] is not None and abs(a["model_probability"] - c["model_probability"]) > atol):
            problems.append(f"photo {i}: {c['head']}={c['value']} checked as {c['verdict']} "
                            f"{c['model_probability']}, the outputs give {a['verdict']} {a['model_probability']}")
    shown = {k for s in chain["stages"] for k in s["claims"]}
    for k in shown:
        if chain["claims"][k]["verdict"] != "backed":
            problems.append(f"photo {i}: shows the {chain['claims'][k]['verdict']} claim "
                            f"{chain['claims'][k]['head']}={chain['claims'][k]['value']}")
    stated = {round(100 * c[key]) for c in chain["claims"] for key in ("decoder_probability", "model_probability")
              if c.get(key) is not None}
    for s in chain["stages"]:
        for pct in re.findall(r"(\d+)%", s["text"]):
            if int(pct) not in stated:
                problems.append(f"photo {i}: the {s['stage']} stage states {pct}%, which no claim carries")
    return problems


# ---------------------------------------------------------------------------------------- explain modes
EXPLAIN_MODES = ("template", "generated", "both")


def resolve_explain(explain, has_decoder: bool, *, what: str = "the model") -> str | None:
    """Which chains ``explain`` asks for: None (off), ``template``, ``generated`` or ``both``.

    ``True`` / ``auto`` means both chains for a model with a text decoder, else the template chain. Asking
    for the generated chain of a model without a decoder is an error that says how to get one.
    """
    if explain in (None, False, "false", "none", "off", ""):
        return None
    if explain in (True, "true", "auto"):
        return "both" if has_decoder else "template"
    if explain not in EXPLAIN_MODES:
        raise ValueError(f"explain must be true, false, auto or one of {list(EXPLAIN_MODES)}, got {explain!r}")
    if explain != "template" and not has_decoder:
        raise ValueError(f"explain={explain}: {what} has no text decoder to generate a chain (train one with "
                         "model.text_decoder={width: 256, layers: 3, heads: 4}); explain=template gives the "
                         "template chain")
    return explain


def combine_chains(template: list[dict] | None, generated: list[dict] | None, mode: str) -> list[dict]:
    """One explanation per photo for ``mode``: the template chain's fields, the checked generated chain
    under ``generated``, and ``text`` showing what the mode asks for."""
    n = len(template if template is not None else generated)
    out = []
    for i in range(n):
        chain = dict(template[i]) if mode in ("template", "both") else {}
        if mode in ("generated", "both"):
            g = generated[i]
            chain["generated"] = g
            chain["text"] = (g["text"] if mode == "generated" else
                             f"{template[i]['text']}\nGenerated by the text decoder, checked against the model:\n"
                             f"{g['text'] or '   (no claim backed)'}")
        out.append(chain)
    return out
