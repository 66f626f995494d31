"""Cached backbone features of a dataset (what ``train.py features.enabled=true`` trains the heads on).

    python -m geoloc features backbone=test_vit data=sample                      # the sample's train and val
    python -m geoloc features backbone=... data=im2gps3k data.root=DIR data.folds=5 data.train_folds=[0,1,2] \\
        data.val_folds=[3]
    python -m geoloc features backbone=... data=csv data.path=photos.csv part=dataset

Training builds a missing cache itself; this step builds them ahead (once for several runs, or before a
multi-process run whose every process would otherwise embed the photos). The backbone is built as train.py
builds it (seeded by ``seed``, in eval mode), so the caches are the ones training looks for. Writes
``$GEOLOC_CACHE/features/<dataset>-<hash>/`` atomically; see :mod:`geoloc.data.features`.
"""

from __future__ import annotations

import time

import numpy as np

from geoloc.cli import run_step
from geoloc.data.features import FeatureCache


def summary(part: str, cache: FeatureCache, seconds: float) -> str:
    """What one part gave, in a few lines."""
    s = cache.meta.settings
    done = "reused" if cache.status == "reused" else f"embedded in {seconds:.1f} s"
    lines = [f"{part}: {len(cache)} photos of {cache.name} by {s['backbone']} ({cache.dim}-d {s['dtype']}, weights "
             f"{cache.fingerprint}), {done}"]
    skipped = s["skipped"]
    if skipped["n_skipped"]:
        lines.append(f"  skipped {skipped['n_skipped']}: " + ", ".join(f"{k}: {v}" for k, v in
                                                                    skipped["by_reason"].items()))
        lines += [f"    {k}: {r}" + (f" ({d})" if d else "") for k, r, d in cache.skipped[:5]]
    lines.append(f"  features: {cache.folder}")
    return "\n".join(lines)


def main(cfg) -> dict[str, FeatureCache]:
    """Builds (or finds) the caches of the configured dataset parts; prints what it did.

    Returns:
        ``{part: cache}``: ``train`` and ``val``, or ``dataset``.
    """
    import hydra
    import torch
    from omegaconf import OmegaConf

    part = cfg.part
    if part not in ("auto", "train_val", "dataset"):
        raise ValueError(f"part must be auto, train_val or dataset, got {part!r}")
    has_datamodule = OmegaConf.select(cfg, "data.datamodule") is not None
    if part == "auto":
        part = "train_val" if has_datamodule else "dataset"
    if part == "train_val" and not has_datamodule:
        raise ValueError(f"data={cfg.data.name} has no datamodule (train and val sets); use part=dataset")
    nodes = ({"train": cfg.data.datamodule.train, "val": cfg.data.datamodule.val} if part == "train_val"
             else {"dataset": cfg.data.dataset})
    torch.manual_seed(int(cfg.seed))  # as train.py seeds before it builds the network, backbone first
    encoder = hydra.utils.instantiate(cfg.backbone)
    store = hydra.utils.instantiate(cfg.store)
    builder = None if cfg.get("trainer") is None else _pass_builder(cfg, store)
    caches = {}
    for name, node in nodes.items():
        started = time.perf_counter()
        cache = store.get(hydra.utils.instantiate(node), encoder, builder=builder)
        if cache is None:  # another process of the pass: the first one saves and reports
            continue
        caches[name] = cache
        print(summary(name, cache, time.perf_counter() - started))
    return caches


def _pass_builder(cfg, store):
    """Embeds through Lightning's predict loop over ``cfg.trainer``'s processes (the first gets the cache)."""
    from geoloc.data.transforms import eval_transform
    from geoloc.training.embedding import pass_trainer, run_embedding_pass

    def build(source, encoder):
        started = time.perf_counter()
        trainer = pass_trainer(cfg.trainer, progress=store.progress)
        result = run_embedding_pass(source, eval_transform(encoder.data_config), lambda x: {"features": encoder(x)},
                                    {"encoder": encoder}, trainer=trainer, work_dir=store.root,
                                    batch_size=store.batch_size, num_workers=cfg.num_workers)
        if result is None:
            return None
        features = result.outputs.get("features", np.zeros((0, 0), np.float32))
        return FeatureCache.from_embeddings(source, encoder, features, result.keys, result.latlng,
                                            [m.get("S3_Label") for m in result.meta], result.skipped,
                                            dtype=store.dtype, seconds=time.perf_counter() - started,
                                            processes=result.world_size)

    return build


def run():
    return run_step("features", main, "geoloc features")


if __name__ == "__main__":
    run()
