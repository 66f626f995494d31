"""Score a predictor on a geolocation benchmark.

    python evaluate.py data=im2gps3k data.root=DIR predictor=constant output_dir=OUT
    python evaluate.py data=yfcc4k data.root=DIR data.images=null predictor=prior
    python evaluate.py data=sample predictor=constant          # the embedded synthetic sample
    python evaluate.py data=shards data.dir=SHARDS data.split=test
    python evaluate.py data=im2gps3k data.root=DIR predictor=model ckpt=RUN/checkpoints/best.ckpt refine=prototypes

Writes OUT/predictions.csv (as it goes; rerun the same command to resume), OUT/skipped.csv,
OUT/metrics.json, OUT/results.md and the figures (error_cdf.png, error_map.png, and for models
reliability.png and recall_area.png). See geoloc/evaluation.py for the formats.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from geoloc.cli import user_errors
from geoloc.evaluation.engine import evaluate
from geoloc.geo.countries import default_admin_lookup


def main(cfg: DictConfig) -> dict:
    """Builds the dataset and predictor from the config and evaluates; returns the metrics."""
    source = hydra.utils.instantiate(cfg.data.dataset)
    predictor = hydra.utils.instantiate(cfg.predictor)
    if cfg.get("trainer") is not None:  # the network's pass through Lightning's predict loop, then the scoring
        source, predictor = _network_pass(cfg, source, predictor)
        if source is None:
            return {}  # another process of the pass: the first one scores and writes
    admin_of = default_admin_lookup() if cfg.country else None
    metrics = evaluate(source, predictor, cfg.output_dir, batch_size=cfg.batch_size, resume=cfg.resume,
                       progress=cfg.progress, admin_of=admin_of, plots=cfg.plots)
    keys = ["n", "n_skipped", "acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "median_km",
            "geoscore", "acc_country", "acc_admin1", "acc_cell_top1", "ece_top1", "recall_area_auc"]
    print(" ".join(f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                   for k in keys if k in metrics))
    print(f"wrote {cfg.output_dir}/metrics.json, predictions.csv, results.md")
    if metrics["n"] == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in metrics.get("skipped_by_reason", {}).items()) or "none"
        raise ValueError(f"{source.name}: no photo was scored ({metrics['n_skipped']} skipped: {reasons}); see "
                         f"{cfg.output_dir}/skipped.csv")
    return metrics


def _network_pass(cfg: DictConfig, source, predictor):
    """Runs the predictor's network over ``source`` on ``cfg.trainer``'s processes (``trainer=ddp_cpu``: 2 CPU
    processes; ``trainer=ddp``: GPUs and nodes); returns the source and predictor the engine then scores in the
    first process (the same predictions as without a trainer), or ``(None, None)`` in the others."""
    from pathlib import Path

    from geoloc.inference.predictor import PrecomputedPredictor
    from geoloc.training.embedding import pass_trainer, run_embedding_pass

    PrecomputedPredictor.check(predictor)  # before the pass, not after it
    result = run_embedding_pass(source, predictor.transform, predictor._forward, {"net": predictor.net},
                                trainer=pass_trainer(cfg.trainer, progress=cfg.progress), work_dir=Path(cfg.output_dir),
                                batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                precision=predictor.precision)
    if result is None:
        return None, None
    return result.as_source(source), PrecomputedPredictor(predictor, result.keys, result.outputs)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@user_errors("evaluate.py")
def _entry(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    _entry()
