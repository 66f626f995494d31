"""Retrieval index of reference photos for a checkpoint (refine=prototypes reads it).

    python -m geoloc index ckpt=RUN/checkpoints/best.ckpt data=shards data.dir=SHARDS data.split=train
    python -m geoloc index ckpt=... data=sample data.split=train
    python -m geoloc index ckpt=... data=im2gps3k data.root=DIR data.folds=5 data.fold=[0,1,2]

Writes ``RUN/index_v1/`` (or ``out=DIR``); see :mod:`geoloc.retrieval.index` for the contents.
"""

from __future__ import annotations

import time
from pathlib import Path

from geoloc.cli import run_step
from geoloc.data.images import SkipReport
from geoloc.retrieval.index import RetrievalIndex, default_index_dir
from geoloc.retrieval.table import normalize


def summary(index: RetrievalIndex, skipped: SkipReport, out: Path, seconds: float) -> str:
    """What a run built, in a few lines."""
    m = index.meta
    lines = [f"indexed {m['n_references']} reference photos of {m['source']} ({m['embedding']} embeddings): "
             f"{m['n_clusters']} location clusters in {m['n_cells_with_references']} of {m['n_cells']} cells "
             f"({m['clustering']['method']}), {seconds:.1f} s",
             f"skipped {len(skipped)}" + (": " + ", ".join(f"{k}: {v}" for k, v in sorted(skipped.counts.items()))
                                          if len(skipped) else "")]
    lines += [f"  {k}: {r}" + (f" ({d})" if d else "") for k, r, d in skipped.items[:5]]
    lines.append(f"index: {out}")
    return "\n".join(lines)


def main(cfg) -> RetrievalIndex:
    """Embeds ``data.dataset`` with the checkpoint and writes the index."""
    import logging

    import hydra

    from geoloc.data.transforms import eval_transform
    from geoloc.models.loading import load_checkpoint

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it loads is not news
    started = time.perf_counter()
    model = load_checkpoint(cfg.ckpt, cells=cfg.cells, device=cfg.device)
    source = hydra.utils.instantiate(cfg.data.dataset)
    clustering = hydra.utils.instantiate(cfg.cluster)
    out = Path(cfg.out) if cfg.out else default_index_dir(cfg.ckpt)
    if cfg.get("trainer") is None:  # in this process, without Lightning
        index, skipped = RetrievalIndex.build(model.net, source, model.cells, eval_transform(model.data_config),
                                              embedding=cfg.embedding, batch_size=cfg.batch_size,
                                              clustering=clustering, device=cfg.device, precision=cfg.precision,
                                              progress=cfg.progress)
    else:  # Lightning's predict loop over the trainer's processes; the first one writes the index
        from geoloc.precision import resolve_precision
        from geoloc.training.embedding import pass_trainer, run_embedding_pass

        net, embedding = model.net, cfg.embedding
        trainer = pass_trainer(cfg.trainer, progress=cfg.progress)
        result = run_embedding_pass(source, eval_transform(model.data_config), lambda x: {"emb": net(x)[embedding]},
                                    {"net": net}, trainer=trainer, work_dir=out.parent,
                                    batch_size=cfg.batch_size, num_workers=cfg.num_workers, precision=cfg.precision)
        if result is None:
            return None  # another process of the pass: the first writes the index
        skipped = result.skipped
        index = RetrievalIndex.from_references(
            net, source, model.cells, result.latlng, normalize(result.outputs["emb"]) if len(result) else None,
            result.keys, skipped, embedding=embedding, clustering=clustering,
            precision=resolve_precision(cfg.precision, trainer.strategy.root_device), processes=result.world_size)
    index.meta["ckpt"] = str(Path(cfg.ckpt).resolve())
    index.save(out)
    print(summary(index, skipped, out, time.perf_counter() - started))
    return index


def run():
    return run_step("index", main, "geoloc index")


if __name__ == "__main__":
    run()
