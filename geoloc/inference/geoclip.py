"""GeoCLIP's released model as a geoloc predictor (``predictor=geoclip``, ``geoloc-predict --model geoclip``).

It answers GeoCLIP's way, the best of its 100K gallery points under ``softmax(exp(logit_scale) * cos)``
(a :class:`~geoloc.retrieval.scorers.GalleryScorer` searching the whole gallery, placed with no weight in the
cell ranking), and ranks cells by the gallery's softmax mass per cell (the network's
:class:`~geoloc.models.geoclip.GallerySumHead`), so top cells, Recall-vs-Area, calibration, admin-1
accuracy and the reasoning chain's region stage work as for a trained model. ``index=DIR`` adds prototype
refinement from an index built with this network (:class:`~geoloc.retrieval.index.RetrievalIndex`).

The gallery softmax has GeoCLIP's own logit scale, fitted for contrastive training on MP-16, not for
the mass per geocell; ``calibration=PATH`` adds a cell temperature fitted on validation photos
(``python -m geoloc calibrate predictor=geoclip ... out=PATH``). ``decode`` other than ``argmax`` answers the
candidate cell's point (its centroid, or its best prototype) with the best expected score instead of
GeoCLIP's best gallery point.
"""

from __future__ import annotations

from pathlib import Path

from geoloc.inference.predictor import ModelPredictor


def build_geoclip_predictor(clip_weights: str | Path | None = None, *, cells: str | Path | None = None,
                            random_clip: bool = False, index: str | Path | None = None, temperature: float = 0.05,
                            topk: int = 5, candidates: int = 10, weights: dict | None = None, batch_size: int = 32,
                            device: str = "cpu", explain: bool = False, ocr: bool = False,
                            gallery_cache: str | Path | None = None, gallery_latlng=None,
                            clip_kwargs: dict | None = None, name: str = "geoclip", decode: str = "argmax",
                            calibration=None, precision: str = "32") -> ModelPredictor:
    """GeoCLIP (CLIP ViT-L/14 + GeoCLIP's MLP, GPS encoder and logit scale) behind the predictor interface.

    Args:
        clip_weights: CLIP ViT-L/14 weights: a file, a folder or a hub name (``openai/clip-vit-large-patch14``,
            ``timm/vit_large_patch14_clip_224.openai``); see :mod:`geoloc.models.clip`.
        cells: the cells the gallery mass is summed over; None: the cells of the 100K gallery coordinates.
        random_clip: random CLIP weights, to test the code path only (its answers are not GeoCLIP's).
        index: optionally a retrieval index built with this network, for prototype refinement.
        temperature: ``T`` of the prototype scores.
        topk, candidates, batch_size, device, explain, name: see :class:`ModelPredictor`.
        weights: fusion weights; default ``{"cells": 1, "gallery": 0, "prototypes": 1}``: cells ranked by
            gallery mass, the answer the best gallery point anywhere.
        ocr: with ``explain``, read text in the photo.
        gallery_cache: where the gallery's embeddings are cached (default ``$GEOLOC_CACHE/geoclip``).
        gallery_latlng: ``(N, 2)`` another gallery than GeoCLIP's 100K MP-16 coordinates.
        clip_kwargs: architecture overrides of a small random tower (tests).
        decode: ``argmax`` (GeoCLIP's best gallery point) or ``geoscore`` / ``distance`` / ``acc@<km>``
            (:mod:`geoloc.retrieval.decode`; raise ``candidates`` with it).
        calibration: a calibration file fitted for this network (``python -m geoloc calibrate predictor=geoclip
            ... out=PATH``), a temperature, or None (GeoCLIP's own scale).
        precision: the forward pass: ``32``, ``bf16``, ``16`` (CUDA) or ``auto`` (:mod:`geoloc.precision`).
    """
    from geoloc.inference.calibration import resolve_calibration
    from geoloc.models.geoclip import build_geoclip, geoclip_temperature
    from geoloc.retrieval.decode import parse_decode
    from geoloc.retrieval.scorers import GalleryScorer, PrototypeScorer

    parse_decode(decode)

    model = build_geoclip(clip_weights, cells=cells, random_clip=random_clip, gallery_latlng=gallery_latlng,
                          gallery_cache=gallery_cache, device=device, clip_kwargs=clip_kwargs)
    cal = resolve_calibration(calibration, ckpt=None, net=model.net, rebuild="python -m geoloc calibrate "
                              "predictor=geoclip predictor.clip_weights=... data=... out=PATH")
    gallery = model.gallery
    scorers = [GalleryScorer(gallery.cell_table(model.cells.assign(gallery.latlng)), temperature=geoclip_temperature(),
                             restrict=False, path="geoclip")]
    if index is not None:
        scorers.insert(0, PrototypeScorer.from_run(model, index=index, temperature=temperature))
    reader = None
    if ocr and explain:
        from geoloc.evidence.ocr import make_reader

        reader = make_reader(ocr)
    return ModelPredictor(model, scorers, topk=topk, candidates=candidates,
                          weights={"cells": 1.0, "gallery": 0.0, "prototypes": 1.0, **(weights or {})},
                          batch_size=batch_size, device=device, explain=explain, ocr=reader, name=name,
                          decode=decode, calibration=cal, precision=precision)
