"""``python -m geoloc STEP key=value ...``: the offline steps that turn data and checkpoints into the
artifacts training and prediction read, one command style for all of them (Hydra ``key=value``
overrides of ``conf/STEP.yaml``).

    python -m geoloc sample [out=DIR n_images=3000]               # the embedded synthetic sample
    python -m geoloc shards data=im2gps3k data.root=DIR out=OUT    # webdataset shards of any dataset
    python -m geoloc index ckpt=RUN/checkpoints/best.ckpt data=... # retrieval index of reference photos
    python -m geoloc gallery ckpt=RUN/checkpoints/best.ckpt       # cached GPS-gallery embeddings
    python -m geoloc features backbone=... data=...               # cached backbone features to train heads on
    python -m geoloc export ckpt=... out=model.pt                  # one TorchScript file
    python -m geoloc tune ckpt=... data=...                        # evidence reranking weights
    python -m geoloc calibrate ckpt=... data=...                   # the cell temperature (RUN/calibration_v1.json)
    python -m geoloc report OUT1 OUT2 [--out table.md]             # several evaluate.py runs in one table

Geocells are built by their own package (``python -m geocells.build``), which geoloc never imports.
"""

from __future__ import annotations

import importlib
import sys

#: step -> module with ``run()`` (the Hydra app) and its one-line purpose.
STEPS = {
    "sample": ("geoloc.prepare.sample", "generate the embedded synthetic sample"),
    "shards": ("geoloc.prepare.shards", "write a dataset as webdataset shards"),
    "index": ("geoloc.prepare.index", "build the retrieval index of reference photos for a checkpoint"),
    "gallery": ("geoloc.prepare.gallery", "embed the GPS gallery once for a checkpoint"),
    "features": ("geoloc.prepare.features", "embed a dataset once with a frozen backbone, to train heads on"),
    "export": ("geoloc.prepare.export", "export a checkpoint as one TorchScript file"),
    "tune": ("geoloc.prepare.tune", "choose evidence reranking weights on validation photos"),
    "calibrate": ("geoloc.prepare.calibrate", "fit the temperature of a checkpoint's cell probabilities on validation "
                  "photos"),
    "report": ("geoloc.evaluation.report", "put several evaluate.py runs in one table"),
    # maintainers: rebuild the committed evidence data from registry packages
    "country_tables": ("geoloc.prepare.country_tables", "rebuild the committed driving-side and script table"),
    "landcover": ("geoloc.prepare.landcover", "rebuild the committed IGBP land-cover raster"),
}


def usage() -> str:
    width = max(map(len, STEPS))
    return ("usage: python -m geoloc STEP key=value ...\n\nsteps:\n"
            + "".join(f"  {name:<{width}}  {what}\n" for name, (_, what) in STEPS.items())
            + "\nEach step's settings are in conf/STEP.yaml (tune: conf/tune_evidence.yaml); see the README.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    step, rest = argv[0], argv[1:]
    if step not in STEPS:
        print(f"geoloc: error: unknown step {step!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(STEPS[step][0])
    sys.argv = [f"geoloc {step}", *rest]
    # the step's module is this process's program: a launcher that starts more processes of it (Lightning's DDP,
    # trainer=ddp_cpu) runs `python -m <that module> key=value ...`
    sys.modules["__main__"].__spec__ = module.__spec__
    if step == "report":
        return module.main(rest) or 0
    module.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
