"""Predicting with an exported TorchScript model (``python -m geoloc export``), as with a checkpoint.

The exported file carries everything an answer needs: preprocessing, network, cell centroids and, in
``geoloc.json``, the cells' names, their fingerprint and (for models with evidence heads) each cell's
evidence counts. :class:`ExportedPredictor` gives it the :class:`~geoloc.inference.base.Predictor` interface,
so ``geoloc-predict --model model.pt`` (with ``--explain``) works on it as on a ``train.py`` checkpoint. It
answers, calibrates and decodes as it was exported (``describe()`` says ``decode`` and ``cell_temperature``);
for a calibrated file, the uncalibrated probabilities come from its ``cell_logits`` output.

An exported file is TorchScript, which is code: load only files you trust (the README's "Trust and
safety"). A checkpoint, by contrast, is read as data.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from geoloc.inference.base import Prediction


class ExportedCells:
    """The cells of an exported model as its ``geoloc.json`` describes them: ids, centroids, names and
    evidence counts (what answers and the reasoning chain need; no geometry, so no point assignment).

    Attributes:
        table: one row per cell (``cell_id``, ``centroid_lat``, ``centroid_lng``, ``country``, ``adm0_a3``,
            ``admin1_name``, ``continent`` and ``evidence_<head>`` where the file has them).
        source: where it came from, for messages.
        stored_fingerprint: the fingerprint of the cells file the model was trained with.
    """

    def __init__(self, table: pd.DataFrame, source: str, stored_fingerprint: str | None = None):
        self.table, self.source, self.stored_fingerprint = table, source, stored_fingerprint

    def __len__(self) -> int:
        return len(self.table)

    @property
    def centroids(self) -> np.ndarray:
        return self.table[["centroid_lat", "centroid_lng"]].to_numpy(np.float64)


def read_exported(path: str | Path, *, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """Loads an exported model and its ``geoloc.json``, with errors that name the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a TorchScript file written by ``python -m geoloc export`` (or a newer format).
    """
    from geoloc.inference.export import EXPORT_FORMAT_VERSION
    from geoloc.models.loading import is_torchscript, resolve_device

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give the exported model file (python -m geoloc export out=...)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    if not is_torchscript(path):
        raise ValueError(f"{path}: not an exported TorchScript model (python -m geoloc export writes one)")
    extra = {"geoloc.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks torch.jit deprecated
            model = torch.jit.load(str(path), map_location=resolve_device(device), _extra_files=extra)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many kinds on damaged archives
        raise ValueError(f"{path}: cannot be loaded as an exported model ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); export it again with "
                         "python -m geoloc export") from e
    try:
        meta = json.loads(extra["geoloc.json"] or "null")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its geoloc.json is not JSON ({e}); export it again") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: a TorchScript file without geoloc.json, so not exported by geoloc; "
                         "export the checkpoint with python -m geoloc export")
    if int(meta.get("format_version", 0)) > EXPORT_FORMAT_VERSION:
        raise ValueError(f"{path}: export format {meta['format_version']} is newer than this geoloc reads "
                         f"({EXPORT_FORMAT_VERSION})")
    return model.eval(), meta


class ExportedPredictor:
    """An exported model behind the :class:`~geoloc.inference.base.Predictor` interface.

    Args:
        path: the exported ``.pt`` file.
        cells: optionally the cells file the model was trained with (refused if it is another one);
            None reads the cell names and evidence counts from the file itself.
        topk: ranked cells per photo (at most the number the model was exported with); None: all of them.
        device: ``cpu`` or ``cuda``.
        explain: attach a reasoning chain per photo (:mod:`geoloc.evidence.verbalize`), from the cell
            probabilities and the evidence heads the file returns; ``template``, ``generated`` (the chain the
            file's text decoder writes, every claim checked: :mod:`geoloc.evidence.claims`), ``both``, or True
            (both when the file has a text decoder).
        ocr: with ``explain``, also read text in the photo (:mod:`geoloc.evidence.ocr`).
        name: report name.
    """

    needs_images = True
    kind = "exported"

    def __init__(self, path: str | Path, *, cells: str | Path | None = None, topk: int | None = None,
                 device: str = "cpu", explain: bool | str = False, ocr: bool = False, name: str = "exported"):
        from geoloc.evidence.claims import resolve_explain

        self.path = Path(path)
        self.name, self.device = name, device
        self.model, self.meta = self._load(device)
        self.explain_mode = resolve_explain(explain, "text_vocab" in self.meta, what=str(self.path))
        self.explain = self.explain_mode is not None
        self._vocab = None
        exported_k = int(self.meta.get("topk", 1))
        self.topk = exported_k if topk is None else int(topk)
        if not 1 <= self.topk <= exported_k:
            raise ValueError(f"topk must lie in 1..{exported_k} for {self.path} (exported with topk={exported_k}; "
                             "export again with a larger topk=)")
        self.cells = self._cells(cells)
        self.evidence_heads = list(self.meta.get("evidence", {}))
        self.ocr = None
        if ocr and explain:
            from geoloc.evidence.ocr import make_reader

            self.ocr = make_reader(ocr)

    def _load(self, device: str):
        """``(model, geoloc.json)`` of the file."""
        return read_exported(self.path, device=device)

    @property
    def centroids(self) -> np.ndarray:
        """``(C, 2)`` the cells' centroids the file carries."""
        return self.model.centroids.detach().cpu().numpy().astype(np.float64)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The file on one uint8 ``(B, 3, H, W)`` array."""
        with torch.inference_mode():
            out = self.model(torch.from_numpy(images).to(self.device))
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

    def _cells(self, cells):
        centroids = self.centroids
        stored = self.meta.get("cells_fingerprint")
        if cells is not None:
            from geoloc.geo.cells import Geocells

            g = Geocells.load(cells)
            if len(g) != len(centroids) or (stored is not None and g.fingerprint() != stored):
                raise ValueError(f"{cells}: not the cells {self.path} was exported with ({len(g)} cells, fingerprint "
                                 f"{g.fingerprint()}; the model has {len(centroids)} cells, fingerprint {stored}); "
                                 "leave --cells out: the model file carries its cells' names")
            return g
        table = pd.DataFrame({"cell_id": np.arange(len(centroids)), "centroid_lat": centroids[:, 0],
                              "centroid_lng": centroids[:, 1]})
        for col, values in (self.meta.get("cells") or {}).items():
            if len(values) == len(table):
                table[col] = values
        for head, counts in (self.meta.get("cell_evidence") or {}).items():
            if len(counts) == len(table):
                table[f"evidence_{head}"] = [np.asarray(c, np.int64) for c in counts]
        return ExportedCells(table, f"{self.path} (geoloc.json)", stored)

    def forward(self, images) -> dict[str, np.ndarray]:
        """The exported model on a list of RGB photos (same-size photos share a batch).

        Returns:
            ``latlng (B, 2)``, ``topk_cells (B, k)``, ``topk_prob (B, k)``, ``cell_prob (B, C)``,
            ``embedding (B, D)`` and ``evidence/<head> (B, K)`` as numpy arrays, in input order.
        """
        arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape[:2], []).append(i)
        outs: dict[str, np.ndarray] = {}
        for idx in groups.values():
            o = self._run(np.ascontiguousarray(np.stack([arrays[i] for i in idx]).transpose(0, 3, 1, 2)))
            for k, v in o.items():
                if k not in outs:
                    outs[k] = np.empty((len(arrays), *v.shape[1:]), dtype=v.dtype)
                outs[k][idx] = v
        return outs

    def predict(self, images, keys) -> Prediction:
        out = self.forward(images)
        cells = out["topk_cells"][:, :self.topk].astype(np.int64)
        prob = out["topk_prob"][:, :self.topk].astype(np.float64)
        raw = None
        if self.temperature != 1.0 and "cell_logits" in out:
            raw = torch.from_numpy(out["cell_logits"].astype(np.float32)).softmax(-1).numpy()
        pred = Prediction(out["latlng"].astype(np.float64), self.cells.centroids[cells], prob, cells,
                          out["cell_prob"].astype(np.float32), cell_prob_uncalibrated=raw,
                          answer_cell=out["answer_cell"].astype(np.int64) if "answer_cell" in out else None,
                          answer_prob=out["answer_prob"].astype(np.float64) if "answer_prob" in out else None)
        if self.explain:
            from geoloc.evidence.claims import combine_chains, decoder_chains
            from geoloc.evidence.verbalize import explain

            template = generated = None
            if self.explain_mode in ("template", "both"):
                text = [self.ocr.text_evidence(im) for im in images] if self.ocr is not None else None
                template = explain(out, pred, self.cells, ocr=text, refine=self.refine_label)
            if self.explain_mode in ("generated", "both"):
                generated = decoder_chains(out["text_tokens"], out["text_probs"], out, self.cells, self.vocab)
            pred.explanations = combine_chains(template, generated, self.explain_mode)
        return pred

    @property
    def vocab(self):
        """The text decoder's vocabulary, rebuilt from ``geoloc.json`` (None without a decoder)."""
        if self._vocab is None and "text_vocab" in self.meta:
            from geoloc.evidence.captions import CaptionVocab

            tv = self.meta["text_vocab"]
            vocab = CaptionVocab(tv["values"])
            if vocab.fingerprint != tv.get("fingerprint"):
                raise ValueError(f"{self.path}: its text vocabulary does not rebuild to the fingerprint it records "
                                 f"({vocab.fingerprint} vs {tv.get('fingerprint')}); export it again")
            self._vocab = vocab
        return self._vocab

    @property
    def refine(self) -> str:
        """The refinement the file was exported with (``none``, ``prototypes``, ``both+evidence``, ...)."""
        return str(self.meta.get("refine") or ("prototypes" if self.meta.get("prototypes") else "none"))

    @property
    def refine_label(self) -> str:
        how = "none" if self.refine == "none" else f"{self.refine} (exported)"
        return how if self.decode == "argmax" else f"{how}, decode={self.decode}"

    @property
    def decode(self) -> str:
        """How the file chooses its answer among the candidates (``argmax`` for files exported before decodes)."""
        return str(self.meta.get("decode") or "argmax")

    @property
    def temperature(self) -> float:
        """The calibration temperature of the file's cell probabilities (1: uncalibrated)."""
        return float(self.meta.get("cell_temperature") or 1.0)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "model": str(self.path), "n_cells": len(self.cells),
                "backbone": self.meta.get("backbone"), "topk": self.topk,
                "prototypes": bool(self.meta.get("prototypes")), "refine": self.refine,
                "evidence_heads": self.evidence_heads,
                "explain": True if self.explain_mode == "template" else self.explain_mode or False,
                "ocr": self.ocr is not None, "decode": self.decode,
                "cell_temperature": self.temperature, "precision": str(self.meta.get("precision") or "32"),
                "calibration": (self.meta.get("calibration") or {}).get("file")}


def is_onnx(path: str | Path) -> bool:
    """Whether ``path`` is meant as an ONNX model (its ``.onnx`` name; onnxruntime then refuses a damaged one
    with a message that names it)."""
    return Path(path).suffix.lower() == ".onnx"


class OnnxPredictor(ExportedPredictor):
    """An ONNX export (``python -m geoloc export format=onnx``) run by onnxruntime, behind the same interface as
    :class:`ExportedPredictor` (answers, cell names and the template chain from the file alone). Arguments as
    there; ``device`` ``cpu`` (onnxruntime's CPU provider) or ``cuda`` (its CUDA provider, when installed)."""

    kind = "onnx"

    def _load(self, device: str):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ModuleNotFoundError(f"{self.path}: running an ONNX model needs onnxruntime; install it with "
                                      "`pip install -e '.[onnx]'`", name="onnxruntime") from e
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such model file")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else [
            "CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own kinds on damaged files
            raise ValueError(f"{self.path}: onnxruntime cannot load it ({str(e).strip().splitlines()[0][:200]}); "
                             "export it again with python -m geoloc export format=onnx") from e
        raw = session.get_modelmeta().custom_metadata_map.get("geoloc.json")
        if not raw:
            raise ValueError(f"{self.path}: an ONNX file without geoloc.json, so not exported by geoloc")
        meta = json.loads(raw)
        self._names = [o.name for o in session.get_outputs()]
        return session, meta

    @property
    def centroids(self) -> np.ndarray:
        return np.asarray(self.meta["centroids"], np.float64)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self._names, self.model.run(None, {"images": images})))
