"""geoloc.data.sample: the embedded synthetic sample set."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geoloc.data import sample
from geoloc.data.geography import is_land, koppen
from geoloc.data.sample import CSV_COLUMNS, default_sample_root, ensure_sample, generate_sample, render_scenes

from .conftest import REPO


def _read(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "sample.csv", keep_default_na=False, dtype={"koppen": str, "AUTHOR": str})


def _haversine_km(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    la1, lo1, la2, lo2 = (np.radians(v) for v in (a[:, 0], a[:, 1], b[:, 0], b[:, 1]))
    h = np.sin((la2 - la1) / 2) ** 2 + np.cos(la1) * np.cos(la2) * np.sin((lo2 - lo1) / 2) ** 2
    return 2 * 6371.0088 * np.arcsin(np.sqrt(h))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate_sample(tmp_path_factory.mktemp("sample") / "s60", n_images=60, seed=0)


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    return generate_sample(tmp_path_factory.mktemp("sample") / "s300", n_images=300, seed=0)


def test_layout_and_csv_columns(small):
    assert sorted(p.name for p in small.iterdir()) == ["README.txt", "images", "meta.json", "sample.csv"]
    df = _read(small)
    assert tuple(df.columns) == CSV_COLUMNS
    assert len(df) == 60 and df["IMG_ID"].is_unique
    assert all(re.fullmatch(r"syn_\d{6}\.jpg", i) for i in df["IMG_ID"])
    assert sorted(p.name for p in (small / "images").iterdir()) == sorted(df["IMG_ID"])
    assert set(df["split"]) == {"train", "val", "test"}
    assert df["is_land"].dtype == bool


def test_coordinates_valid_and_lookups_consistent(small):
    df = _read(small)
    latlng = df[["LAT", "LON"]].to_numpy()
    assert np.isfinite(latlng).all()
    assert (np.abs(latlng[:, 0]) <= 90).all() and (np.abs(latlng[:, 1]) <= 180).all()
    np.testing.assert_array_equal(df["koppen"].to_numpy(), koppen(latlng))
    np.testing.assert_array_equal(df["is_land"].to_numpy(), is_land(latlng))
    assert df["is_land"].mean() > 0.6  # real photo locations are mostly on land


def test_photographer_disjoint_splits(medium):
    df = _read(medium)
    assert (df.groupby("AUTHOR")["split"].nunique() == 1).all()
    per_author = df.groupby("AUTHOR").size()
    assert per_author.between(1, 4).all() and (per_author > 1).any()
    authors = df.drop_duplicates("AUTHOR")["split"].value_counts(normalize=True)
    assert 0.7 < authors["train"] < 0.9
    assert 0.05 < authors["val"] < 0.15 and 0.05 < authors["test"] < 0.15
    # Consecutive ids are shuffled, not grouped by photographer.
    assert (df["AUTHOR"].to_numpy()[1:] == df["AUTHOR"].to_numpy()[:-1]).mean() < 0.2


def test_photos_of_one_author_are_within_a_few_km(medium):
    df = _read(medium)
    first = df.groupby("AUTHOR")[["LAT", "LON"]].transform("first").to_numpy()
    d = _haversine_km(df[["LAT", "LON"]].to_numpy(), first)
    assert d.max() <= 2 * sample._MAX_JITTER_KM + 0.01  # both within 5 km of the same gallery point
    assert d.max() > 0.5  # and actually jittered
    # Different authors are spread over the world.
    assert df["LAT"].std() > 15 and df["LON"].std() > 30


def test_images_are_rgb_jpegs_of_the_right_size(small, tmp_path):
    for path in sorted((small / "images").iterdir())[:20]:
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))
    root = generate_sample(tmp_path / "s", n_images=4, seed=3, image_size=40)
    for path in (root / "images").iterdir():
        with Image.open(path) as im:
            assert (im.mode, im.size) == ("RGB", (40, 40))
    assert json.loads((root / "meta.json").read_text())["image_size"] == 40


def test_meta_and_readme(small):
    meta = json.loads((small / "meta.json").read_text(encoding="utf-8"))
    expected = {
        "synthetic": True,
        "generator": "geoloc.data.sample",
        "version": 1,
        "n_images": 60,
        "seed": 0,
        "image_size": 64,
        "locations": "MP-16 100K gallery (geoclip package)",
    }
    assert {k: meta[k] for k in expected} == expected
    assert "SYNTHETIC" in meta["description"]
    assert sum(meta["split_counts"].values()) == 60
    readme = (small / "README.txt").read_text(encoding="utf-8")
    assert readme.startswith("SYNTHETIC IMAGES - NOT PHOTOGRAPHS")
    assert "python -m geoloc sample out=DIR n_images=60 seed=0 image_size=64" in readme  # the current command


def test_deterministic(small, tmp_path):
    again = generate_sample(tmp_path / "again", n_images=60, seed=0)
    assert (again / "sample.csv").read_bytes() == (small / "sample.csv").read_bytes()
    assert (again / "meta.json").read_bytes() == (small / "meta.json").read_bytes()
    for path in sorted((small / "images").iterdir()):
        assert (again / "images" / path.name).read_bytes() == path.read_bytes(), path.name
    other = generate_sample(tmp_path / "other", n_images=60, seed=1)
    assert (other / "sample.csv").read_bytes() != (small / "sample.csv").read_bytes()


def test_appearance_depends_on_geography(medium):
    df = _read(medium)
    imgs = np.stack([np.asarray(Image.open(medium / "images" / i), dtype=np.float64) for i in df["IMG_ID"]])
    top, bottom = imgs[:, :21].mean(axis=(1, 2)), imgs[:, -21:].mean(axis=(1, 2))  # (N, 3) mean RGB
    spread = imgs[:, -21:].std(axis=(1, 2))
    label = np.where(df["is_land"], df["koppen"].str[:1], "sea")

    # Sea is blue below the horizon, deserts are tan.
    sea = bottom[label == "sea"]
    desert = bottom[df["koppen"].isin(["BWh", "BWk"]).to_numpy() & df["is_land"].to_numpy()]
    assert len(sea) >= 5 and len(desert) >= 3
    assert (sea[:, 2] - sea[:, 0]).mean() > 40
    assert (desert[:, 0] - desert[:, 2]).mean() > 40

    # A nearest-class-mean classifier on 9 image statistics, fitted on half the photographers,
    # predicts the Köppen group (or sea) of the other half far above chance.
    feats = np.concatenate([top, bottom, spread], axis=1)
    feats = (feats - feats.mean(0)) / feats.std(0)
    half = df["AUTHOR"].str[-6:].astype(int).to_numpy() % 2 == 0
    fit, held = half & (label != ""), ~half & (label != "")
    classes = [c for c in np.unique(label) if c and (label[fit] == c).any() and (label[held] == c).any()]
    assert len(classes) >= 4
    means = np.stack([feats[fit & (label == c)].mean(0) for c in classes])
    keep = held & np.isin(label, classes)
    pred = np.array(classes)[((feats[keep][:, None] - means[None]) ** 2).sum(-1).argmin(1)]
    truth = label[keep]
    balanced_acc = np.mean([(pred[truth == c] == c).mean() for c in classes])
    assert balanced_acc > 1 / len(classes) + 0.2, balanced_acc


def test_render_varies_with_place_but_is_not_a_lookup_table():
    n = 24
    desert = np.tile([[23.0, 12.0]], (n, 1))  # Sahara (BWh)
    ocean = np.tile([[0.0, -30.0]], (n, 1))  # Atlantic
    a = render_scenes(desert, rng=np.random.default_rng(0)).astype(float)
    b = render_scenes(ocean, rng=np.random.default_rng(0)).astype(float)
    assert a.shape == (n, 64, 64, 3) and a.dtype == float
    lower_a, lower_b = a[:, -16:].mean(axis=(1, 2)), b[:, -16:].mean(axis=(1, 2))
    assert (lower_a[:, 0] > lower_a[:, 2]).all() and (lower_b[:, 2] > lower_b[:, 0]).all()
    # Same place, different draws: images differ well beyond JPEG-level noise.
    assert np.abs(a[0] - a[1]).mean() > 5
    assert a.reshape(n, -1).std(0).mean() > 5
    same = render_scenes(desert, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(same, a.astype(np.uint8))


def test_ensure_sample_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOLOC_CACHE", str(tmp_path / "cache"))
    root = ensure_sample(n_images=12, seed=1, image_size=32)
    assert (
        root == tmp_path / "cache" / "sample-v1-n12-s1-32px" == default_sample_root(n_images=12, seed=1, image_size=32)
    )
    stamp = [(root / name).stat().st_mtime_ns for name in ("sample.csv", "meta.json", "images")]

    def fail(*args, **kwargs):
        raise AssertionError("ensure_sample regenerated an existing sample")

    monkeypatch.setattr(sample, "generate_sample", fail)
    assert ensure_sample(n_images=12, seed=1, image_size=32) == root
    assert [(root / name).stat().st_mtime_ns for name in ("sample.csv", "meta.json", "images")] == stamp
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name]  # no temp leftovers


def test_ensure_sample_refuses_a_foreign_folder(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="foreign"):
        ensure_sample(foreign, n_images=5)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError):
        generate_sample(foreign, n_images=5)
    other = generate_sample(tmp_path / "other", n_images=5, seed=0)
    with pytest.raises(FileExistsError, match="differs"):
        ensure_sample(other, n_images=5, seed=1)  # same folder, other seed


def test_lost_race_discards_own_copy(tmp_path, monkeypatch):
    """Another process renames its finished sample into place while we are generating."""
    winner = generate_sample(tmp_path / "winner", n_images=8, seed=2)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name.startswith("race") and not Path(dst).exists():
            shutil.copytree(winner, dst)  # the other process wins, just before our rename
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)  # the rename geoloc.artifacts.atomic_dir makes
    assert ensure_sample(tmp_path / "race", n_images=8, seed=2) == tmp_path / "race"
    with pytest.raises(FileExistsError, match="race2: appeared while it was being written"):
        generate_sample(tmp_path / "race2", n_images=8, seed=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race", "race2", "winner"]  # our temp copies went
    assert (tmp_path / "race" / "sample.csv").read_bytes() == (winner / "sample.csv").read_bytes()


def test_an_empty_folder_receives_the_sample_with_the_usual_permissions(tmp_path):
    (tmp_path / "empty").mkdir()
    root = generate_sample(tmp_path / "empty", n_images=4, seed=0, image_size=32)
    assert len(_read(root)) == 4
    mask = os.umask(0)
    os.umask(mask)
    assert (root.stat().st_mode & 0o777) == 0o777 & ~mask  # not the 0700 of a temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_bad_arguments():
    for kwargs in ({"n_images": 0}, {"seed": -1}, {"image_size": 8}, {"n_images": 2.5}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ensure_sample("/nonexistent/never-created", **kwargs)


@pytest.mark.slow  # two fresh interpreters each load the land mask (~3 s)
def test_concurrent_processes_and_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "geoloc", "sample", f"out={out}", "n_images=30", "seed=4", "image_size=32"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert all(str(out) in o for o in outputs)
    assert len(_read(out)) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]
    code = textwrap.dedent(
        f"""
        from geoloc.data.sample import generate_sample
        generate_sample({str(tmp_path / "api")!r}, n_images=30, seed=4, image_size=32)
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)
    assert (tmp_path / "api" / "sample.csv").read_bytes() == (out / "sample.csv").read_bytes()
