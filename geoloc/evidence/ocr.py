"""Text in the photo (optional): read visible text and name the script it is written in.

Two engines, chosen by :class:`TextReader` (``engine="auto"``: Tesseract when installed, else RapidOCR):

- **Tesseract** (Apache-2.0; Debian ``tesseract-ocr`` and its traineddata packs, ``make ocr`` installs them as
  root): one recognition pass with every installed pack of :data:`TESSERACT_LANGS` (Latin, Cyrillic, Greek,
  Arabic, Hebrew, Devanagari, Thai, simplified Han, Japanese, Korean), sparse-text page segmentation for
  photos, word confidences from its TSV output. It is run as the ``tesseract`` program (what ``pytesseract``
  wraps), so no Python binding is needed.
- **RapidOCR** (``rapidocr-onnxruntime``, Apache-2.0, ``pip install -e '.[ocr]'``), whose models ship inside
  its wheel. Its recognizer (PP-OCR, Chinese model) reads Chinese characters, Latin letters and digits only:
  Cyrillic, Greek and other scripts come out as Latin look-alikes ("Владивосток" was read as "BAAAMBOCTOK"
  on an Im2GPS3k photo), so with it this stage tells Han text from Latin text and nothing finer.

Neither downloads anything. A reader is made only when asked for (a predictor with ``ocr=True``:
``predictor=model_explain`` in evaluate.py, ``geoloc-predict --explain --ocr``).

The script of a piece of text is the script group (:data:`geoloc.evidence.country_tables.SCRIPTS`) of
most of its letters, from the Unicode character names; digits, punctuation and symbols do not count.
The evidence is the script with the most confidently read letters; its probability is the engine's mean
recognition confidence over the text in that script.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import unicodedata
import warnings

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


def script_evidence(lines: list[tuple[str, float]], min_confidence: float = MIN_CONFIDENCE) -> dict | None:
    """Evidence from OCR lines ``(text, confidence)``: the script with the most confidently read letters; lines
    read with less than ``min_confidence`` are ignored.

    Returns:
        ``{"script", "confidence", "text": [lines in that script]}``, or None when nothing legible was read.
    """
    weight: dict[str, float] = {}
    conf: dict[str, list[float]] = {}
    texts: dict[str, list[str]] = {}
    for text, c in lines:
        script, n = text_script(text)
        if script is None or n < MIN_LETTERS or c < min_confidence:
            continue
        weight[script] = weight.get(script, 0.0) + n * c
        conf.setdefault(script, []).append(float(c))
        texts.setdefault(script, []).append(text)
    if not weight:
        return None
    best = max(weight, key=weight.get)
    return {"script": best, "confidence": float(np.mean(conf[best])), "text": texts[best]}


#: Tesseract language packs read at once: one per script group named above (Debian ``tesseract-ocr-<lang>``).
TESSERACT_LANGS = ("eng", "rus", "ell", "ara", "heb", "hin", "tha", "chi_sim", "jpn", "kor")
#: What installs them (Debian, as root): ``make ocr`` runs it.
TESSERACT_INSTALL = ("apt-get install -y tesseract-ocr " + " ".join(
    f"tesseract-ocr-{lang.replace('_', '-')}" for lang in TESSERACT_LANGS))
ENGINES = ("auto", "rapidocr+tesseract", "tesseract", "rapidocr")


def tesseract_languages(binary: str = "tesseract") -> list[str]:
    """The traineddata packs the installed Tesseract has (empty when it is not installed)."""
    if shutil.which(binary) is None:
        return []
    res = subprocess.run([binary, "--list-langs"], capture_output=True, text=True, timeout=60)
    return [line.strip() for line in res.stdout.splitlines()[1:] if line.strip()]


class TesseractEngine:
    """The ``tesseract`` program on a photo: ``[(line text, mean word confidence 0..1)]``.

    Args:
        langs: the packs to read with (None: every installed one of :data:`TESSERACT_LANGS`).
        psm: Tesseract's page segmentation mode (11: sparse text, for photos).
        binary: the program.

    Raises:
        RuntimeError: Tesseract, or every pack asked for, is not installed (the message gives the install line).
    """

    name = "tesseract"
    #: lines read with less confidence are not evidence (chosen on a validation fold, bench/bench_ocr.py):
    #: in photos, the sparse-text mode finds "words" in textures, which many packs read with middling confidence
    min_confidence = 0.85

    def __init__(self, langs=None, psm: int = 11, binary: str = "tesseract"):
        have = tesseract_languages(binary)
        if not have:
            raise RuntimeError(f"Tesseract is not installed ({binary!r} not found or without language packs); "
                               f"install it with: {TESSERACT_INSTALL} (make ocr), or use engine=rapidocr")
        wanted = list(langs) if langs is not None else list(TESSERACT_LANGS)
        self.langs = [lang for lang in wanted if lang in have]
        if not self.langs:
            raise RuntimeError(f"none of the Tesseract packs {wanted} is installed (found {have}); install them "
                               f"with: {TESSERACT_INSTALL}")
        self.missing = [lang for lang in wanted if lang not in have]
        self.psm, self.binary = int(psm), binary

    def read(self, image) -> list[tuple[str, float]]:
        with tempfile.TemporaryDirectory(prefix="geoloc-ocr.") as tmp:
            path = os.path.join(tmp, "photo.png")
            image.convert("RGB").save(path)
            res = subprocess.run([self.binary, path, "stdout", "-l", "+".join(self.langs), "--psm", str(self.psm),
                                  "tsv"], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"tesseract failed ({res.returncode}): {res.stderr.strip()[-300:]}")
        return _tsv_lines(res.stdout)


def _tsv_lines(tsv: str) -> list[tuple[str, float]]:
    """Tesseract's TSV words grouped into lines: ``[(words joined by spaces, mean confidence / 100)]``."""
    lines: dict[tuple, tuple[list[str], list[float]]] = {}
    rows = tsv.splitlines()
    for row in rows[1:]:
        cols = row.split("\t")
        if len(cols) < 12 or cols[0] != "5":  # level 5: a word
            continue
        text, conf = cols[11].strip(), float(cols[10])
        if not text or conf < 0:
            continue
        words, confs = lines.setdefault((cols[1], cols[2], cols[3], cols[4]), ([], []))
        words.append(text)
        confs.append(conf / 100.0)
    return [(" ".join(w), float(np.mean(c))) for w, c in lines.values()]


class RapidOCREngine:
    """RapidOCR on a photo: ``[(line text, confidence)]``."""

    name = "rapidocr"
    min_confidence = MIN_CONFIDENCE

    def __init__(self):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise ImportError("the OCR stage needs rapidocr-onnxruntime (pip install -e '.[ocr]') or Tesseract "
                              f"({TESSERACT_INSTALL}); it is off by default (ocr=false)") from e
        self.engine = RapidOCR()

    def read(self, image) -> list[tuple[str, float]]:
        result, _ = self.engine(np.asarray(image.convert("RGB"))[:, :, ::-1])  # RapidOCR expects BGR
        return [(str(text), float(score)) for _, text, score in (result or [])]


class DetectThenRead:
    """RapidOCR finds the text lines (its detector is made for photos); Tesseract reads each line's crop with every
    installed pack (its recognizer names many scripts; on whole photos its page segmentation takes textures for
    words). RapidOCR's own recognizer is not run: it drops the lines it cannot read, which are the other scripts."""

    name = "rapidocr+tesseract"
    min_confidence = 0.85  # chosen on a validation fold (bench/bench_ocr.py), as the whole-photo engine's

    def __init__(self, langs=None):
        self.reader = TesseractEngine(langs, psm=7)  # 7: one line of text
        self.detector = RapidOCREngine()
        self.langs, self.missing = self.reader.langs, self.reader.missing

    def read(self, image) -> list[tuple[str, float]]:
        rgb = image.convert("RGB")
        boxes, _ = self.detector.engine(np.asarray(rgb)[:, :, ::-1], use_rec=False, use_cls=False)
        lines = []
        for box in boxes or []:
            xs, ys = [float(p[0]) for p in box], [float(p[1]) for p in box]
            pad = 0.15 * (max(ys) - min(ys))
            crop = rgb.crop((max(0, min(xs) - pad), max(0, min(ys) - pad), min(rgb.width, max(xs) + pad),
                             min(rgb.height, max(ys) + pad)))
            if crop.width < 2 or crop.height < 2:  # a degenerate box: nothing to read
                continue
            if crop.height < 40:  # Tesseract reads lines of 30+ px best
                crop = crop.resize((max(1, round(crop.width * 40 / crop.height)), 40))
            read = [(t, c) for t, c in self.reader.read(crop) if text_script(t)[1]]
            if read:
                lines.append(max(read, key=lambda tc: text_script(tc[0])[1] * tc[1]))
        return lines


class TextReader:
    """Reads the text of a photo with one engine; :meth:`text_evidence` gives the photo's script evidence.

    Args:
        engine: ``auto`` (RapidOCR's detector with Tesseract reading the lines when Tesseract is installed with a
            pack, else RapidOCR alone), ``rapidocr+tesseract``, ``tesseract`` (whole photos) or ``rapidocr``.
    """

    def __init__(self, engine: str = "auto"):
        if engine not in ENGINES:
            raise ValueError(f"OCR engine must be one of {ENGINES}, got {engine!r}")
        if engine == "auto":
            have = any(lang in TESSERACT_LANGS for lang in tesseract_languages())
            engine = "rapidocr+tesseract" if have else "rapidocr"
        self.engine = {"rapidocr+tesseract": DetectThenRead, "tesseract": TesseractEngine,
                       "rapidocr": RapidOCREngine}[engine]()
        self.name = self.engine.name

    def read(self, image) -> list[tuple[str, float]]:
        """``[(text, confidence)]`` of every text line found in the image."""
        return self.engine.read(image)

    def text_evidence(self, image) -> dict | None:
        """The photo's script evidence, or None; an engine that fails on one photo gives none for it (with a
        warning), so that a long evaluation goes on."""
        try:
            lines = self.read(image)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            warnings.warn(f"OCR ({self.name}) failed on a photo, which gets no text evidence: {e}", stacklevel=2)
            return None
        return script_evidence(lines, self.engine.min_confidence)


def make_reader(ocr) -> TextReader | None:
    """The reader a predictor's ``ocr`` setting asks for: None for False/None, the ``auto`` engine for True, or
    the engine named (``auto``, ``tesseract``, ``rapidocr``)."""
    if ocr is None or ocr is False:
        return None
    return TextReader("auto" if ocr is True else str(ocr))
