"""Write a dataset as webdataset shards (the offline step training reads from).

    python -m geoloc shards data=im2gps3k data.root=DIR out=OUT split=test
    python -m geoloc shards data=csv data.path=photos.csv out=OUT      # a plain path,lat,lng CSV
    python -m geoloc shards data=sample out=OUT                        # the embedded synthetic sample

Writes OUT/{split}-000000.tar, ... and OUT/{split}-manifest.json (see :mod:`geoloc.data.shards`). Rerun
the same command to continue a killed run; ``resume=false`` writes the split afresh.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from geoloc.cli import run_step
from geoloc.data.shards import write_shards


def summary(manifest: dict, out: str) -> str:
    """What a run wrote, in a few lines."""
    lines = [f"wrote {manifest['n_samples']} samples of {manifest['source']} in {len(manifest['shards'])} "
             f"shard(s) to {out}/{manifest['split']}-*.tar"
             + (" (SYNTHETIC data)" if manifest["synthetic"] else "")]
    by_reason = manifest["skipped"]["by_reason"]
    if by_reason:
        lines.append(f"skipped {manifest['n_skipped']}: " + ", ".join(f"{k}: {v}" for k, v in by_reason.items()))
        lines += [f"  {e['key']}: {e['reason']}" + (f" ({e['detail']})" if e["detail"] else "")
                  for e in manifest["skipped"]["examples"][:5]]
        if manifest["n_skipped"] > 5:
            lines.append(f"  ... (all {manifest['n_skipped']} in the manifest)")
    else:
        lines.append("skipped 0")
    lines.append(f"manifest: {out}/{manifest['split']}-manifest.json")
    return "\n".join(lines)


def main(cfg: DictConfig) -> dict:
    """Builds the dataset from the config and writes its shards; returns the manifest."""
    source = hydra.utils.instantiate(cfg.data.dataset)
    manifest = write_shards(source, cfg.out, split=cfg.split, max_count=cfg.max_count, max_bytes=cfg.max_bytes,
                            jpeg_quality=cfg.jpeg_quality, resume=cfg.resume, progress=cfg.progress)
    print(summary(manifest, cfg.out))
    return manifest


def run():
    return run_step("shards", main, "geoloc shards")


if __name__ == "__main__":
    run()
