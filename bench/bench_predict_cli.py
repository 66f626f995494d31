"""How long ``geoloc-predict`` takes for one photo, end to end as a user runs it, against importing torch.

    .venv/bin/python bench/bench_predict_cli.py [--model RUN/checkpoints/best.ckpt] [--photo PATH] [--repeats 5]

Runs, in fresh interpreters and alternating so that machine noise hits all alike:

* ``python -c "import torch"``: the floor every torch program pays;
* ``geoloc-predict PHOTO --model MODEL`` for a ``train.py`` checkpoint, and for the exported ``model.pt``
  beside it when there is one (``make demo`` leaves both);
* the heavy modules the command imports for a checkpoint (a child runs it and lists ``sys.modules``), to
  show that prediction does not import Lightning, webdataset, Hydra or wandb.

Defaults: the ``make demo`` run (``outputs/demo``) and its first test photo. Writes
``bench/results/predict_cli.json`` (best and median seconds of each, the ratio to ``import torch``, the cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
HEAVY = ("pytorch_lightning", "lightning", "webdataset", "hydra", "omegaconf", "wandb")


def _time(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - t
    if r.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return took


def _first_photo(demo: Path) -> Path:
    from geoloc.data.images import SkipReport, encode_jpeg
    from geoloc.data.shards import ShardDataset

    item = next(iter(ShardDataset(demo / "shards", split="test").iter_items(SkipReport())))
    out = demo / "bench_photo.jpg"
    out.write_bytes(encode_jpeg(item.image))
    return out


def _imported(model: Path, photo: Path) -> list[str]:
    code = ("import sys; sys.argv[0] = 'geoloc-predict'; from geoloc.inference.cli import main; "
            f"main([{str(photo)!r}, '--model', {str(model)!r}]); "
            "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules if sys.modules[m] is not None})))")
    r = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return [m for m in r.stdout.split() if m in HEAVY]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "outputs/demo/train/checkpoints/best.ckpt"))
    parser.add_argument("--photo", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    model = Path(args.model)
    if not model.is_file():
        raise SystemExit(f"{model}: no checkpoint (run make demo first, or give --model)")
    photo = Path(args.photo) if args.photo else _first_photo(REPO / "outputs/demo")
    exported = model.parent.parent.parent / "model.pt"
    cli = [PY, "-m", "geoloc.inference.cli", str(photo), "--model"]
    runs = {"import torch": [PY, "-c", "import torch"], "geoloc-predict checkpoint": [*cli, str(model)]}
    if exported.is_file():
        runs["geoloc-predict exported model.pt"] = [*cli, str(exported)]
    times: dict[str, list[float]] = {k: [] for k in runs}
    _time(runs["geoloc-predict checkpoint"])  # warm the file cache
    for _ in range(args.repeats):
        for name, cmd in runs.items():
            times[name].append(_time(cmd))
    floor = min(times["import torch"])
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cores": os.cpu_count(), "model": str(model),
        "photo": str(photo), "repeats": args.repeats, "target_s": 4.0,
        "runs": {k: {"best_s": round(min(v), 3), "median_s": round(statistics.median(v), 3),
                     "best_over_import_torch": round(min(v) / floor, 2)} for k, v in times.items()},
        "heavy_modules_imported": _imported(model, photo),
    }
    out = HERE / "results" / "predict_cli.json"
    from geoloc.artifacts import atomic_write_json

    atomic_write_json(out, result)
    for k, v in result["runs"].items():
        print(f"{k:34s} best {v['best_s']:.2f} s, median {v['median_s']:.2f} s ({v['best_over_import_torch']:.2f}x "
              "import torch)")
    print(f"heavy modules imported by the predict path: {result['heavy_modules_imported'] or 'none'}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
