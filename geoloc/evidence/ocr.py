"""Text in the photo (optional): read visible text and name the script it is written in.

Uses ``rapidocr-onnxruntime`` (Apache-2.0), whose detection and recognition models ship inside its
wheel, so nothing is downloaded. Install it with ``pip install -e '.[ocr]'``; it is imported only when
a :class:`TextReader` is made (a predictor with ``ocr=True``: ``predictor=model_explain`` in evaluate.py,
``geoloc-predict --explain --ocr``).

Limits: the recognizer bundled in the wheel (PP-OCR, Chinese model) reads Chinese characters, Latin letters
and digits only. Cyrillic, Greek and other scripts come out as Latin look-alikes ("Владивосток" was read
as "BAAAMBOCTOK" on an Im2GPS3k photo), so this stage tells Han text from Latin text and nothing finer;
bench/results/evidence.md measures how often its script is the main script of the photo's country.

The script of a piece of text is the script group (:data:`geoloc.evidence.country_tables.SCRIPTS`) of
most of its letters, from the Unicode character names; digits, punctuation and symbols do not count.
The evidence is the script with the most confidently read letters; its probability is the OCR
model's mean recognition confidence over the text in that script.
"""

from __future__ import annotations

import unicodedata

import numpy as np

#: Unicode name prefixes -> script group (first match wins).
_NAME_PREFIXES = (("LATIN", "Latin"), ("CYRILLIC", "Cyrillic"), ("ARABIC", "Arabic"), ("CJK", "Han"),
                  ("HIRAGANA", "Japanese"), ("KATAKANA", "Japanese"), ("HANGUL", "Korean"),
                  ("DEVANAGARI", "Devanagari"), ("BENGALI", "Bengali"), ("THAI", "Thai"), ("GREEK", "Greek"),
                  ("HEBREW", "Hebrew"), ("GEORGIAN", "Georgian"), ("ARMENIAN", "Armenian"), ("ETHIOPIC", "Ethiopic"))
MIN_CONFIDENCE = 0.5  # text read with less confidence is ignored
MIN_LETTERS = 2


def char_script(ch: str) -> str | None:
    """Script group of one character; None for digits, punctuation, spaces and symbols."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    name = unicodedata.name(ch, "")
    return next((group for prefix, group in _NAME_PREFIXES if name.startswith(prefix)), "other")


def text_script(text: str) -> tuple[str | None, int]:
    """``(script group of most letters, number of letters)`` of a string; ``(None, 0)`` without letters.

    Japanese text mixes kana and kanji: any kana makes the kanji count as Japanese."""
    groups = [g for g in map(char_script, text) if g is not None]
    if not groups:
        return None, 0
    if "Japanese" in groups:
        groups = ["Japanese" if g == "Han" else g for g in groups]
    values, counts = np.unique(groups, return_counts=True)
    return str(values[int(np.argmax(counts))]), len(groups)


def script_evidence(lines: list[tuple[str, float]]) -> dict | None:
    """Evidence from OCR lines ``(text, confidence)``: the script with the most confidently read letters.

    Returns:
        ``{"script", "confidence", "text": [lines in that script]}``, or None when nothing legible was read.
    """
    weight: dict[str, float] = {}
    conf: dict[str, list[float]] = {}
    texts: dict[str, list[str]] = {}
    for text, c in lines:
        script, n = text_script(text)
        if script is None or n < MIN_LETTERS or c < MIN_CONFIDENCE:
            continue
        weight[script] = weight.get(script, 0.0) + n * c
        conf.setdefault(script, []).append(float(c))
        texts.setdefault(script, []).append(text)
    if not weight:
        return None
    best = max(weight, key=weight.get)
    return {"script": best, "confidence": float(np.mean(conf[best])), "text": texts[best]}


class TextReader:
    """RapidOCR on a PIL image; :meth:`text_evidence` gives the script evidence of the photo."""

    def __init__(self):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise ImportError("the OCR stage needs rapidocr-onnxruntime (pip install -e '.[ocr]'); "
                              "it is off by default (ocr=false)") from e
        self.engine = RapidOCR()

    def read(self, image) -> list[tuple[str, float]]:
        """``[(text, confidence)]`` of every text line found in the image."""
        result, _ = self.engine(np.asarray(image.convert("RGB"))[:, :, ::-1])  # RapidOCR expects BGR
        return [(str(text), float(score)) for _, text, score in (result or [])]

    def text_evidence(self, image) -> dict | None:
        return script_evidence(self.read(image))
