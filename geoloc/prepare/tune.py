"""Per-head weights of the evidence reranking, chosen on validation photos.

    python -m geoloc tune ckpt=RUN/checkpoints/last.ckpt data=im2gps3k data.root=DIR data.folds=5 data.fold=3 \\
        [refine=evidence] [out=RUN/evidence_weights_v1.json]

Writes ``{"weights": {head: w}, "geoscore": ..., ...}`` (:func:`geoloc.evidence.tune.tune_evidence_weights`);
give it to the predictor as ``predictor.evidence_weights=RUN/evidence_weights_v1.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geoloc.artifacts import atomic_write_json
from geoloc.cli import run_step
from geoloc.evidence.tune import tune_evidence_weights


def main(cfg) -> dict:
    """Runs the network once over the validation photos, tunes the weights, writes the weights file."""
    import hydra

    from geoloc.data.images import SkipReport

    predictor = hydra.utils.instantiate(cfg.predictor)
    source = hydra.utils.instantiate(cfg.data.dataset)
    skipped = SkipReport()
    images, latlng = [], []
    for it in source.iter_items(skipped):
        images.append(it.image)
        latlng.append(it.latlng)
    if not images:
        raise ValueError(f"{source.name}: no usable photos to tune on (skipped: {dict(skipped.counts)})")
    result = tune_evidence_weights(predictor, predictor.forward(images), np.asarray(latlng), grid=tuple(cfg.grid))
    result.update(ckpt=str(predictor.ckpt), dataset=source.name, n_skipped=len(skipped.items),
                  refine=predictor.refine)
    out = Path(cfg.out) if cfg.out else Path(predictor.ckpt).parent.parent / "evidence_weights_v1.json"
    atomic_write_json(out, result)
    print(f"{out}: weights {result['weights']}; mean GeoScore {result['geoscore']:.1f} "
          f"(without evidence {result['geoscore_without']:.1f}, all 1: {result['geoscore_uniform']:.1f}; "
          f"n={result['n']})")
    return result


def run():
    return run_step("tune_evidence", main, "geoloc tune")


if __name__ == "__main__":
    run()
