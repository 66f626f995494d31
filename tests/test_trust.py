"""Trust boundaries and lost work: a run folder cannot run code, finished work is never overwritten, a
checkpoint knows its cells, and every bad model file gets a clear message instead of a traceback."""

from __future__ import annotations

import hashlib
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from geoloc.inference.cli import main as predict_main

from .conftest import REPO, TINY_TRAIN


def _copy_run(tiny_run, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    best = run / "checkpoints" / "best.ckpt"
    if not best.exists():  # the tiny run stops before its first validation: no best.ckpt of its own
        shutil.copy(run / "checkpoints" / "last.ckpt", best)
    return run


def _edit_config(run: Path, edit) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    edit(cfg)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _photo(tiny_run) -> str:
    from geoloc.data.readers import read_sample

    return str(read_sample(tiny_run["sample"], split="test", n_images=240).table["path"][0])


# --------------------------------------------------------------------------- 1. a run folder is data


def _pickle_that_writes(target: Path) -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (target, "owned"))

    return pickle.dumps(Evil())


def _to_old_format(cfg: dict) -> None:
    """A run config as train.py wrote it before the network had its own node: a top-level backbone and
    model.location_encoder, and the model.geoclip_weights flag."""
    net = cfg["model"].pop("net")
    cfg["backbone"] = net["backbone"]
    cfg["model"]["location_encoder"] = net["location_encoder"]
    cfg["model"]["geoclip_weights"] = False


_ATTACKS = ["builtins_open", "nested_target", "read_pickle", "copyfile", "hydra_args", "timm_checkpoint_path",
            "interpolation", "network_target", "network_directive"]


@pytest.mark.parametrize("fmt,attack", [("network_node", a) for a in _ATTACKS]
                         + [("old", a) for a in _ATTACKS if not a.startswith("network_")])  # old: no network node
def test_a_crafted_run_config_cannot_run_code(tiny_run, tmp_path, attack, fmt, capsys):
    from geoloc.models.loading import load_checkpoint

    run = _copy_run(tiny_run, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    written = tmp_path / "written.txt"

    def edit(cfg):
        if fmt == "old":
            _to_old_format(cfg)
        net = cfg["model"].get("net")
        backbone_at, encoder_at = ((net, "backbone"), (net, "location_encoder")) if net else (
            (cfg, "backbone"), (cfg["model"], "location_encoder"))
        b = backbone_at[0][backbone_at[1]]
        if attack == "builtins_open":  # truncates any file the user can write
            backbone_at[0][backbone_at[1]] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
        elif attack == "nested_target":  # geoloc's class on top, a call hidden in a setting
            b["name"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
        elif attack == "read_pickle":
            import base64

            encoder_at[0][encoder_at[1]] = {"_target_": "pandas.read_pickle", "filepath_or_buffer": {
                "_target_": "io.BytesIO", "initial_bytes": base64.b64encode(_pickle_that_writes(written)).decode()}}
        elif attack == "copyfile":
            encoder_at[0][encoder_at[1]] = {"_target_": "shutil.copyfile", "src": str(victim), "dst": str(written)}
        elif attack == "hydra_args":
            b["_args_"] = [str(victim)]
        elif attack == "timm_checkpoint_path":
            b["checkpoint_path"] = str(victim)
        elif attack == "interpolation":  # resolvers can read the environment or call code
            encoder_at[0][encoder_at[1]]["hidden"] = "${oc.env:HOME}"
        elif attack == "network_target":  # a foreign target for the network node itself
            cfg["model"]["net"] = {"_target_": "shutil.copyfile", "src": str(victim), "dst": str(written)}
        elif attack == "network_directive":
            net["_recursive_"] = False
            net["evidence_heads"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}

    _edit_config(run, edit)
    ckpt = run / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="config.yaml"):
        load_checkpoint(ckpt)
    assert predict_main([_photo(tiny_run), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "Traceback" not in err
    assert victim.read_text() == "precious" and not written.exists()


def test_the_run_config_allow_list_still_loads_real_runs(tiny_run, tmp_path):
    from geoloc.models.loading import build_from_run_config, load_checkpoint

    model = load_checkpoint(_copy_run(tiny_run, tmp_path) / "checkpoints" / "last.ckpt")
    assert model.net.image_encoder.name == "test_vit"
    enc = build_from_run_config({"_target_": "geoloc.models.location_encoder.LocationEncoder", "sigmas": [1, 16],
                                 "n_frequencies": 8, "hidden": 16, "depth": 1, "dim": 8}, "model.location_encoder",
                                "x.yaml")
    assert enc.out_features == 8
    net = build_from_run_config({
        "_target_": "geoloc.models.geolocator.build_geolocator", "dropout": 0.0, "evidence_heads": {"land": 0.5},
        "backbone": {"_target_": "geoloc.models.image_encoder.ImageEncoder", "name": "test_vit", "img_size": 32},
        "location_encoder": {"_target_": "geoloc.models.location_encoder.LocationEncoder", "sigmas": [1],
                             "n_frequencies": 8, "hidden": 16, "depth": 1, "dim": 8}}, "model.net", "x.yaml",
        num_cells=3)
    assert net.num_cells == 3 and set(net.evidence) == {"land"} and net.location_encoder.out_features == 8


def test_a_run_is_rebuilt_from_its_saved_network_node(tiny_run, tmp_path):
    """train.py saves the network node it built the network from (model.net, with the backbone and GPS
    encoder nested); loading builds that node, whatever the rest of the config says, with every weight
    from the checkpoint."""
    from geoloc.models.loading import load_checkpoint

    saved = yaml.safe_load((tiny_run["run"] / "config.yaml").read_text())
    net_node = saved["model"]["net"]
    assert net_node["_target_"] == "geoloc.models.geolocator.build_geolocator"
    assert net_node["backbone"]["name"] == "test_vit" and net_node["location_encoder"]["sigmas"] == [1, 16]
    run = _copy_run(tiny_run, tmp_path)

    def edit(cfg):  # the top-level groups are what the network node was made from; loading does not read them
        cfg["backbone"] = {"_target_": "builtins.open", "file": str(tmp_path / "never"), "mode": "w"}
        cfg["model"]["location_encoder"]["dim"] = 999

    _edit_config(run, edit)
    model = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert not (tmp_path / "never").exists()
    assert model.net.location_encoder.sigmas == (1.0, 16.0) and model.net.num_cells == len(model.cells)
    state = torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    mine = model.net.state_dict()
    assert set(mine) == {k[len("model."):] for k in state if k.startswith("model.")}
    for k, v in mine.items():
        torch.testing.assert_close(v, state[f"model.{k}"], rtol=0, atol=0, msg=k)


def test_old_run_configs_without_a_network_node_still_load(tiny_run, tmp_path):
    """A run saved before the network had its own node (top-level backbone, model.location_encoder,
    model.geoclip_weights) loads as it did, to the same network."""
    from geoloc.models.loading import load_checkpoint

    new = load_checkpoint(tiny_run["ckpt"])
    run = _copy_run(tiny_run, tmp_path)
    _edit_config(run, _to_old_format)
    old = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert "net" not in old.run_config["model"] and old.data_config == new.data_config
    images = torch.rand(2, 3, *new.data_config["input_size"][1:])
    with torch.no_grad():
        torch.testing.assert_close(old.net(images)["cell_logits"], new.net(images)["cell_logits"], rtol=0, atol=0)
    _edit_config(run, lambda cfg: cfg.pop("backbone"))
    with pytest.raises(ValueError, match="config.yaml: not a train.py run config"):
        load_checkpoint(run / "checkpoints" / "last.ckpt")


def test_a_run_trained_from_geoclip_weights_loads_without_reading_them(tiny_run, tmp_path, monkeypatch):
    """model/location_encoder=geoclip saves a from_geoclip node; loading builds GeoCLIP's plain architecture
    and takes the trained weights from the checkpoint, never reading GeoCLIP's file."""
    import geoloc.models.location_encoder as le
    from geoloc.models.geolocator import build_geolocator
    from geoloc.models.image_encoder import ImageEncoder
    from geoloc.models.loading import load_checkpoint

    run = _copy_run(tiny_run, tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    n_cells = ckpt["state_dict"]["model.cell_head.1.weight"].shape[0]
    trained = build_geolocator(ImageEncoder("test_vit", img_size=64), le.LocationEncoder(**le.GEOCLIP_CONFIG, seed=5),
                               num_cells=n_cells)
    ckpt["state_dict"] = {**{k: v for k, v in ckpt["state_dict"].items() if not k.startswith("model.")},
                          **{f"model.{k}": v for k, v in trained.state_dict().items()}}
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    missing = tmp_path / "no_such_weights.pth"
    _edit_config(run, lambda cfg: cfg["model"]["net"].update(location_encoder={
        "_target_": "geoloc.models.location_encoder.LocationEncoder.from_geoclip", "path": str(missing)}))

    def never(*args, **kwargs):
        raise AssertionError("GeoCLIP's weight file was read while loading a run")

    monkeypatch.setattr(le, "load_geoclip_weights", never)
    monkeypatch.setattr(le, "geoclip_weights_path", never)
    model = load_checkpoint(run / "checkpoints" / "last.ckpt")
    for k, v in trained.location_encoder.state_dict().items():
        torch.testing.assert_close(model.net.location_encoder.state_dict()[k], v, rtol=0, atol=0, msg=k)


# --------------------------------------------------------------------------- 2./3. no lost work


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _train_cfg(tiny_run, run: Path, *extra: str):
    cells = yaml.safe_load((tiny_run["run"] / "config.yaml").read_text())["cells"]
    return _compose(*TINY_TRAIN, f"cells={cells}", f"data.root={tiny_run['sample']}", "data.n_images=240",
                    f"output_dir={run}", "trainer.max_steps=6", "+trainer.limit_val_batches=1", "logger=none", *extra)


def test_training_again_into_a_finished_run_changes_no_checkpoint(tiny_run, tmp_path):
    from train import train

    run = _copy_run(tiny_run, tmp_path)
    before = {p.name: _sha(p) for p in (run / "checkpoints").glob("*.ckpt")}
    config = _sha(run / "config.yaml")
    with pytest.raises(ValueError, match="holds the checkpoints of an earlier run.*ckpt_path=last"):
        train(_train_cfg(tiny_run, run))
    (run / "checkpoints" / "last.ckpt").unlink()  # resuming needs last.ckpt; best.ckpt is not silently replaced
    with pytest.raises(ValueError, match="no last.ckpt to resume from"):
        train(_train_cfg(tiny_run, run, "ckpt_path=last"))
    before.pop("last.ckpt")
    assert {p.name: _sha(p) for p in (run / "checkpoints").glob("*.ckpt")} == before
    assert _sha(run / "config.yaml") == config


def _reordered_cells(tiny_run, tmp_path: Path) -> Path:
    """The same cells in another order: what silently mislabelled answers before fingerprints."""
    from geocells.build import write_geocells
    from geoloc.geo.cells import Geocells

    cells = Geocells.load(tiny_run["cells"])
    t = cells.table.iloc[::-1].reset_index(drop=True)
    t["cell_id"] = np.arange(len(t), dtype=np.int32)
    return write_geocells(t, tmp_path / "reordered.parquet", meta=cells.meta)


def test_a_failed_resume_leaves_the_run_loadable(tiny_run, tmp_path):
    from geoloc.inference.predictor import build_predictor
    from train import train

    run = _copy_run(tiny_run, tmp_path)
    other = _reordered_cells(tiny_run, tmp_path)
    config = _sha(run / "config.yaml")
    last = _sha(run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="not the cells"):
        train(_train_cfg(tiny_run, run, "ckpt_path=last", f"cells={other}", "trainer.max_steps=12"))
    with pytest.raises(ValueError, match="was trained with another model"):
        train(_train_cfg(tiny_run, run, "ckpt_path=last", "model.location_encoder.dim=8", "trainer.max_steps=12"))
    assert _sha(run / "config.yaml") == config and _sha(run / "checkpoints" / "last.ckpt") == last
    assert build_predictor(str(run / "checkpoints" / "best.ckpt")).describe()["n_cells"] > 0


def test_a_damaged_last_checkpoint_on_resume_points_to_best(tiny_run, tmp_path):
    from train import train

    run = _copy_run(tiny_run, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"last.ckpt: cannot be read as a checkpoint.*ckpt_path=.*best.ckpt"):
        train(_train_cfg(tiny_run, run, "ckpt_path=last"))


def test_resume_writes_the_config_only_once_training_starts(tiny_run, tmp_path):
    from train import train

    run = _copy_run(tiny_run, tmp_path)
    _, objects = train(_train_cfg(tiny_run, run, "ckpt_path=last", "trainer.max_steps=8"))
    assert objects["trainer"].global_step == 8
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 8
    assert not list(run.glob(".config.yaml.*"))  # written atomically: no temporary left


# --------------------------------------------------------------------------- 4. a checkpoint knows its cells


def test_a_checkpoint_refuses_the_same_cells_in_another_order(tiny_run, tmp_path):
    from geoloc.inference.export import export
    from geoloc.inference.exported import ExportedPredictor
    from geoloc.inference.predictor import build_predictor

    other = _reordered_cells(tiny_run, tmp_path)
    ckpt = tiny_run["ckpt"]
    assert torch.load(ckpt, weights_only=True)["geoloc"]["cells_fingerprint"]
    with pytest.raises(ValueError, match="not the cells .* was trained with"):
        build_predictor(str(ckpt), cells=str(other))
    path, meta = export(ckpt, tmp_path / "m.pt", topk=3)
    assert meta["cells_fingerprint"]
    with pytest.raises(ValueError, match="not the cells .* was exported with"):
        ExportedPredictor(path, cells=other)
    assert len(ExportedPredictor(path, cells=tiny_run["cells"]).cells) == meta["num_cells"]
    # a checkpoint from before fingerprints is checked against the centroids its loss kept
    old = torch.load(ckpt, weights_only=True)
    del old["geoloc"]
    run = _copy_run(tiny_run, tmp_path)
    torch.save(old, run / "checkpoints" / "old.ckpt")
    with pytest.raises(ValueError, match="centroids differ"):
        build_predictor(str(run / "checkpoints" / "old.ckpt"), cells=str(other))
    assert build_predictor(str(run / "checkpoints" / "old.ckpt")).describe()["n_cells"] == meta["num_cells"]


# --------------------------------------------------------------------------- 6. nothing trained is an error


def test_training_on_fewer_photos_than_a_batch_is_an_error(tiny_run, tmp_path):
    from train import train

    with pytest.raises(ValueError, match="fewer than one batch of batch_size=4096"):
        train(_train_cfg(tiny_run, tmp_path / "run", "batch_size=4096"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_training_on_photos_that_are_all_unreadable_is_an_error(tiny_run, tmp_path):
    from train import train

    csv = tmp_path / "photos.csv"
    csv.write_text("path,lat,lng\n" + "".join(f"gone{i}.jpg,{48 + i * 0.01},2.3\n" for i in range(40)))
    train_node = "{_target_: geoloc.data.readers.read_latlng_csv, path: " + str(csv) + "}"
    with pytest.raises(ValueError, match=r"no training step ran.*missing"):
        train(_train_cfg(tiny_run, tmp_path / "run", "~data.datamodule.train", f"+data.datamodule.train={train_node}"))
    assert not list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))  # nothing left to block a rerun


def test_training_reports_skipped_photos_and_photos_far_from_every_cell(tiny_run, tmp_path):
    import pandas as pd

    from train import train

    src = pd.read_csv(Path(tiny_run["sample"]) / "sample.csv")
    rows = src[src["split"] == "train"].head(40)
    paths = [str(Path(tiny_run["sample"]) / "images" / k) for k in rows["IMG_ID"]]
    csv = tmp_path / "photos.csv"
    lines = [f"{p},{la},{ln}" for p, la, ln in zip(paths, rows["LAT"], rows["LON"])]
    lines[0] = f"{tmp_path / 'gone.jpg'},{rows['LAT'].iloc[0]},{rows['LON'].iloc[0]}"  # a missing photo
    lines[1] = f"{paths[1]},-60.0,-120.0"  # the far south Pacific: far from every cell
    csv.write_text("path,lat,lng\n" + "\n".join(lines) + "\n")
    train_node = "{_target_: geoloc.data.readers.read_latlng_csv, path: " + str(csv) + "}"
    with pytest.warns(UserWarning, match=r"1 of 40 training photos .* more than 250 km from every cell"):
        _, objects = train(_train_cfg(tiny_run, tmp_path / "run", "~data.datamodule.train",
                                      f"+data.datamodule.train={train_node}", "trainer.max_steps=4"))
    assert objects["skipped"] == {"missing": 1}
    assert "gone.jpg,missing,train" in (tmp_path / "run" / "skipped.csv").read_text()


# --------------------------------------------------------------------------- 7. bad model files, both kinds


def _bad_checkpoints(tiny_run, run: Path) -> dict[str, Path]:
    ck = run / "checkpoints"
    good = (ck / "last.ckpt").read_bytes()
    files = {"truncated": good[: len(good) // 2], "empty": b"", "text": b"this is not a checkpoint\n"}
    out = {}
    for name, data in files.items():
        (ck / f"{name}.ckpt").write_bytes(data)
        out[name] = ck / f"{name}.ckpt"
    torch.save({"epoch": 1}, ck / "no_state.ckpt")
    out["no_state"] = ck / "no_state.ckpt"
    return out


@pytest.mark.parametrize("kind,expect", [("truncated", "cannot be read as a checkpoint"),
                                         ("empty", "is empty"), ("text", "cannot be read as a checkpoint"),
                                         ("no_state", "holds no 'state_dict'")])
def test_predict_names_a_bad_checkpoint_without_a_traceback(tiny_run, tmp_path, capsys, kind, expect):
    path = _bad_checkpoints(tiny_run, _copy_run(tiny_run, tmp_path))[kind]
    assert predict_main([_photo(tiny_run), "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and expect in err and "Traceback" not in err


def test_predict_refuses_a_device_this_machine_lacks(tiny_run, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert predict_main([_photo(tiny_run), "--model", str(tiny_run["ckpt"]), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_predict_with_a_corrupted_gallery_cache(tiny_run, tmp_path, capsys):
    """A damaged cache is named with the command that rebuilds it, and left as it is (prediction builds nothing)."""
    run = _copy_run(tiny_run, tmp_path)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    damaged = b"PK\x03\x04 damaged"
    (run / "gallery_v1.npz").write_bytes(damaged)
    assert predict_main([_photo(tiny_run), "--model", ckpt, "--refine", "gallery", "--json"]) == 2
    err = capsys.readouterr().err
    assert "gallery_v1.npz: not a readable gallery cache" in err and "Traceback" not in err
    assert f"rebuild it with python -m geoloc gallery ckpt={ckpt}" in err
    assert (run / "gallery_v1.npz").read_bytes() == damaged
    (run / "gallery_v1.npz").unlink()
    assert predict_main([_photo(tiny_run), "--model", ckpt, "--refine", "gallery"]) == 2
    assert f"no gallery cache; build it with python -m geoloc gallery ckpt={ckpt}" in capsys.readouterr().err
    named = tmp_path / "mine.npz"
    named.write_bytes(b"garbage")
    from geoloc.inference.predictor import build_predictor

    with pytest.raises(ValueError, match="mine.npz: not a readable gallery cache.*python -m geoloc gallery"):
        build_predictor(ckpt, refine="gallery", gallery=str(named))
    # once the step has built it, the same command answers
    from geoloc.prepare.gallery import build

    csv = tmp_path / "coords.csv"
    csv.write_text("lat,lng\n48.85,2.35\n40.7,-74.0\n35.7,139.7\n")
    build(ckpt, source=str(csv))
    assert predict_main([_photo(tiny_run), "--model", ckpt, "--refine", "gallery", "--json"]) == 0


def test_predict_accepts_an_exported_model_even_inside_a_run_folder(tiny_evidence_run, tmp_path, capsys):
    import json

    from geoloc.inference.export import export

    run = _copy_run(tiny_evidence_run, tmp_path)
    path, _ = export(run / "checkpoints" / "last.ckpt", run / "checkpoints" / "model.pt", topk=3)
    photo = _photo(tiny_evidence_run)
    assert predict_main([photo, "--model", str(path), "--json", "--explain", "--topk", "2"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert len(exported["top_cells"]) == 2 and exported["top_cells"][0]["country"]
    stages = [s["stage"] for s in exported["explanation"]["stages"]]
    assert stages == ["scene", "environment", "region"]
    assert any(c["head"] == "driving_side" for c in exported["explanation"]["claims"])
    assert any(c["verdict"] != "no data" for c in exported["explanation"]["checks"])  # checked against the cells
    # the same answer as the checkpoint it came from (preprocessing differs by PIL vs tensor resizing only)
    assert predict_main([photo, "--model", str(run / "checkpoints" / "last.ckpt"), "--json", "--topk", "2"]) == 0
    ckpt = json.loads(capsys.readouterr().out)
    assert exported["top_cells"][0]["cell_id"] == ckpt["top_cells"][0]["cell_id"]
    assert predict_main([photo, "--model", str(path), "--refine", "prototypes"]) == 2
    assert "an exported model refines, calibrates and decodes as it was exported" in capsys.readouterr().err
    assert predict_main([photo, "--model", str(path), "--topk", "9"]) == 2
    assert "exported with topk=3" in capsys.readouterr().err


def test_predict_text_output_of_an_exported_model(tiny_run, tmp_path, capsys):
    from geoloc.inference.export import export

    path, _ = export(tiny_run["ckpt"], tmp_path / "m.pt", topk=3)
    assert predict_main([_photo(tiny_run), str(tmp_path), "--model", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "  1. cell" in out and "  3. cell" in out
    assert f"{tmp_path}: cannot read the image (unreadable: is a directory" in err


def test_predict_topk_must_be_positive(tiny_run, capsys):
    with pytest.raises(SystemExit) as e:
        predict_main([_photo(tiny_run), "--model", str(tiny_run["ckpt"]), "--topk", "-3"])
    assert e.value.code == 2 and "must be at least 1, got -3" in capsys.readouterr().err


# --------------------------------------------------------------------------- 8. memory does not grow with inputs


def test_predict_decodes_one_batch_at_a_time(tiny_run, tmp_path, monkeypatch):
    import geoloc.inference.cli as cli
    from geoloc.inference.predictor import build_predictor

    photo = _photo(tiny_run)
    predictor = build_predictor(str(tiny_run["ckpt"]))
    decoded, calls = [], []
    real_decode, real_predict = cli.decode_image, predictor.predict
    monkeypatch.setattr(cli, "decode_image", lambda p: decoded.append(p) or real_decode(p))

    def predict(images, keys):
        calls.append((len(images), len(decoded)))
        return real_predict(images, keys)

    predictor.predict = predict
    results = cli.predict_files([photo] * 10, predictor, batch_size=4)
    assert [c[0] for c in calls] == [4, 4, 2]
    assert [c[1] for c in calls] == [4, 8, 10]  # each batch decoded just before its forward pass
    assert all(r["error"] is None for r in results)


def test_a_huge_file_that_is_not_an_image_is_refused_from_its_first_bytes(tmp_path):
    from geoloc.data.images import ImageError, decode_image

    big = tmp_path / "huge.jpg"
    with open(big, "wb") as f:  # 2 GB, sparse: nothing of it is on the disk
        f.write(b"this is a log file, not a photo\n")
        f.truncate(2 * 1024**3)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as e:
            decode_image(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.reason == "unreadable" and str(big) in e.value.detail
    assert peak < 32 * 1024**2  # the file was never read whole (it was 2 GB)


# --------------------------------------------------------------------------- 9. the smaller ones


def test_skip_details_are_the_same_in_every_run():
    from geoloc.data.images import ImageError, decode_image

    with pytest.raises(ImageError) as e:
        decode_image(b"not an image", name="shard-000000.tar/k.jpg")
    assert "0x" not in e.value.detail and "shard-000000.tar/k.jpg" in e.value.detail


def test_a_model_predictor_without_a_checkpoint_says_so():
    from geoloc.inference.predictor import ModelPredictor, build_predictor

    with pytest.raises(ValueError, match="no checkpoint given: set ckpt="):
        build_predictor(None)
    with pytest.raises(TypeError, match="takes a loaded model.*build_predictor"):
        ModelPredictor(None)


def test_evaluate_refuses_rows_it_cannot_attribute(tmp_path):
    from geoloc.data.readers import read_sample
    from geoloc.evaluation.engine import run_predictions
    from geoloc.inference.baselines import ConstantPredictor

    ds = read_sample(split="test")
    pred = ConstantPredictor(ds.latlng)
    (tmp_path / "predictions.csv").write_text("IMG_ID,true_lat,true_lng,pred_lat,pred_lng,distance_km\n"
                                              "x,0,0,0,0,0\n")
    with pytest.raises(ValueError, match="holds predictions but .* no run.json"):
        run_predictions(ds, pred, tmp_path, progress=False)
