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


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@user_errors("evaluate.py")
def _entry(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    _entry()
