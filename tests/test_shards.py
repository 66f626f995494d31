"""Shards: writing, reading back, resuming, the training stream's node/worker split, and the command."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geoloc.artifacts import to_jsonable
from geoloc.data.images import SkipReport, decode_image, encode_jpeg
from geoloc.data.readers import GeoDataset, read_im2gps, read_latlng_csv
from geoloc.data.shards import MANIFEST_VERSION, ShardDataset, make_webdataset, parse_record, safe_key, write_shards
from geoloc.evidence.labels import EVIDENCE_VERSION, HEADS, evidence_labels
from tests.conftest import REPO

N_GOOD = 12
MISSING, TRUNCATED = "photos/gone.jpg", "photos/cut.0.jpg"


def _photo(i: int, size=(32, 24)) -> Image.Image:
    """A smooth image (so JPEG error stays small) that differs from photo to photo."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    rgb = np.stack([x * 200 + 5 * i, y * 150 + 40, (x + y) * 60 + 10 * (i % 7)], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def write_photo_csv(root, n_good=N_GOOD):
    """``n_good`` photos (ids with dots, slashes, spaces, @), one missing and one truncated, as path,lat,lng."""
    (root / "photos" / "sub").mkdir(parents=True)
    rows = []
    for i in range(n_good):
        rel = [f"photos/a.{i}.jpg", f"photos/sub/b {i}@N00.png", f"photos/c_{i}.JPG"][i % 3]
        _photo(i).save(root / rel, format="PNG" if rel.endswith(".png") else "JPEG", quality=98)
        score = "" if i == 4 else f"{i / 3}"  # one empty cell: NaN in the table, null in the shard
        rows.append((rel, 10 + i * 0.123456789012345, -179.5 + (i * 29.87654321) % 359, f"tag{i}", score))
        if i == 2:
            rows.append((MISSING, 1.5, 2.5, "gone", "1"))
        if i == 7:
            _photo(99).save(root / TRUNCATED, format="JPEG")
            data = (root / TRUNCATED).read_bytes()
            (root / TRUNCATED).write_bytes(data[: len(data) // 2])
            rows.append((TRUNCATED, -45.25, 100.125, "cut", "2"))
    lines = ["path,lat,lng,tag,score"] + [f"{p},{la!r},{ln!r},{t},{s}" for p, la, ln, t, s in rows]
    (root / "photos.csv").write_text("\n".join(lines) + "\n")
    return root / "photos.csv"


@pytest.fixture
def photos(tmp_path):
    return read_latlng_csv(write_photo_csv(tmp_path / "src"))


@pytest.fixture
def shard_dir(tmp_path, photos):
    out = tmp_path / "shards"
    write_shards(photos, out, split="test", max_count=5)
    return out


def _without_labels(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "labels"}


def _items(source, **kw):
    skipped = SkipReport()
    items = list(source.iter_items(skipped, **kw))
    return items, skipped


def _good_rows(ds: GeoDataset) -> pd.DataFrame:
    return ds.table[~ds.table["key"].isin([MISSING, TRUNCATED])].reset_index(drop=True)


def test_safe_key():
    assert safe_key("abc_12-3") == "abc_12-3"  # already safe: unchanged
    k = safe_key("1000269685_e60e9cdfb4_1125_78841376@N00.jpg")
    assert k.startswith("1000269685_e60e9cdfb4_1125_78841376_N00~") and "." not in k and "/" not in k
    assert safe_key("a.jpg") != safe_key("a.png") != safe_key("a@jpg")
    assert len(safe_key("x" * 500 + ".jpg")) <= 80


def test_round_trip(shard_dir, photos):
    manifest = json.loads((shard_dir / "test-manifest.json").read_text())
    assert manifest["n_samples"] == N_GOOD and manifest["n_skipped"] == 2
    assert manifest["skipped"]["by_reason"] == {"missing": 1, "truncated": 1}
    assert [s["n_samples"] for s in manifest["shards"]] == [5, 5, 2]
    assert manifest["source"] == "photos" and manifest["synthetic"] is False
    # nothing else in the folder: no temporaries
    assert sorted(p.name for p in shard_dir.iterdir()) == [
        "test-000000.tar", "test-000001.tar", "test-000002.tar", "test-manifest.json", "test-progress.jsonl"]
    # member names: one dot (the extension), no slash; the json keeps the original id
    with tarfile.open(shard_dir / "test-000000.tar") as tf:
        names = tf.getnames()
        rec = json.loads(tf.extractfile(names[1]).read())
    assert all(n.count(".") == 1 and "/" not in n for n in names)
    assert names[:2] == [f"{safe_key('photos/a.0.jpg')}.jpg", f"{safe_key('photos/a.0.jpg')}.json"]
    assert rec["key"] == "photos/a.0.jpg" and rec["meta"] == {"tag": "tag0", "score": 0.0}
    assert set(rec["labels"]) == set(HEADS) and rec["evidence_version"] == EVIDENCE_VERSION

    ds = ShardDataset(shard_dir, split="test")
    items, skipped = _items(ds)
    rows = _good_rows(photos)
    assert [it.key for it in items] == list(rows["key"])
    # coordinates: exact float round trip
    assert [it.latlng for it in items] == list(zip(rows["lat"].tolist(), rows["lng"].tolist()))
    # metadata, with NaN -> None, and the evidence labels stored at sharding time
    assert [_without_labels(it.meta) for it in items] == to_jsonable(rows[["tag", "score"]].to_dict("records"))
    assert items[4].meta["score"] is None
    expected = evidence_labels(rows[["lat", "lng"]].to_numpy())
    assert [it.meta["labels"] for it in items] == expected[list(HEADS)].to_dict("records")
    # pixels, within JPEG tolerance
    for it, path in zip(items, rows["path"]):
        a = np.asarray(decode_image(path), dtype=np.float64)
        b = np.asarray(it.image, dtype=np.float64)
        assert it.image.mode == "RGB" and a.shape == b.shape and np.abs(a - b).mean() < 2.0, it.key
    # the writer's skips are reported again, so an evaluation over the shards counts them
    assert len(ds) == N_GOOD + 2 and dict(skipped.counts) == {"missing": 1, "truncated": 1}
    assert {k for k, *_ in skipped.items} == {MISSING, TRUNCATED}
    assert ds.synthetic is False and ds.notes == []


def _payload_per_sample(path) -> list[int]:
    """Bytes of each sample's members (photo and record, without tar headers) in a shard, in order."""
    sizes: dict[str, int] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key = m.name.partition(".")[0]
            sizes[key] = sizes.get(key, 0) + m.size
    return list(sizes.values())


def test_max_bytes_closes_a_shard_once_its_samples_reach_it(tmp_path, photos):
    """webdataset's maxsize: a shard takes samples until their bytes (tar headers not counted) reach the
    limit, so each shard passes it by at most its last sample."""
    limit = 5 * 1024
    m = write_shards(photos, tmp_path / "s", max_count=1000, max_bytes=limit)
    paths = [tmp_path / "s" / s["name"] for s in m["shards"]]
    assert len(paths) > 2 and sum(s["n_samples"] for s in m["shards"]) == N_GOOD
    assert [p.stat().st_size for p in paths] == [s["bytes"] for s in m["shards"]]
    for i, path in enumerate(paths):
        payload = _payload_per_sample(path)
        assert sum(payload[:-1]) < limit, path  # open until its last sample came in
        if i < len(paths) - 1:
            assert sum(payload) >= limit, path  # closed because it reached the limit
    assert m["settings"]["max_bytes"] == limit


class Killed(RuntimeError):
    pass


class DiesAfter:
    """An ItemSource that stops with an error after ``n`` items, like a killed job."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n
        self.name, self.synthetic, self.notes = inner.name, inner.synthetic, inner.notes

    def __len__(self):
        return len(self.inner)

    def iter_items(self, skipped, *, exclude=frozenset()):
        for i, item in enumerate(self.inner.iter_items(skipped, exclude=exclude)):
            if i == self.n:
                raise Killed(f"killed after {self.n} items")
            yield item


def test_resume_after_kill_equals_clean_run(tmp_path, photos, monkeypatch):
    clean = write_shards(photos, tmp_path / "clean", max_count=5)
    out = tmp_path / "killed"
    # label (and so write) samples two at a time, so that a shard is finished before the kill
    monkeypatch.setattr("geoloc.data.shards.writer._LABEL_CHUNK", 2)
    with pytest.raises(Killed):
        write_shards(DiesAfter(photos, 7), out, max_count=5)
    # one finished shard under its final name; the half second one left no file; no manifest yet
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar", "train-progress.jsonl"]
    # what a harder kill leaves: a temporary, a shard renamed but not journaled, a torn journal line
    (out / ".train-000001.tar.x1y2.tmp").write_bytes(b"half")
    (out / "train-000001.tar").write_bytes(b"renamed before the journal line")
    with open(out / "train-progress.jsonl", "a") as f:
        f.write('{"shard": {"name": "train-0000')
    again = write_shards(photos, out, max_count=5)
    assert again["shards"] == clean["shards"]  # byte-identical shards (sha256), whatever the label chunks
    assert again["skipped"] == clean["skipped"] and again["n_samples"] == N_GOOD
    keys = [it.key for it in _items(ShardDataset(out, split="train"))[0]]
    assert len(keys) == len(set(keys)) == N_GOOD
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # a rerun over a finished folder changes nothing
    assert write_shards(photos, out, max_count=5)["shards"] == clean["shards"]


def test_a_killed_run_leaves_its_finished_shards_journaled(tmp_path, photos, monkeypatch):
    out = tmp_path / "killed"
    monkeypatch.setattr("geoloc.data.shards.writer._LABEL_CHUNK", 2)
    with pytest.raises(Killed):
        write_shards(DiesAfter(photos, 7), out, max_count=5)
    header, *records = [json.loads(line) for line in (out / "train-progress.jsonl").read_text().splitlines()]
    assert header == {"kind": "header", "version": MANIFEST_VERSION, "split": "train", "source": "photos",
                      "jpeg_quality": 95, "evidence_version": EVIDENCE_VERSION}
    assert len(records) == 1  # the finished shard; the open one (and the photos read after it) are not
    shard, data = records[0]["shard"], (out / "train-000000.tar").read_bytes()
    assert shard == {"name": "train-000000.tar", "n_samples": 5, "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()}
    assert records[0]["keys"] == list(_good_rows(photos)["key"][:5])
    assert [k for k, *_ in records[0]["skipped"]] == [MISSING]  # skipped before the shard was closed
    with tarfile.open(out / "train-000000.tar") as tf:  # the keys in stored order
        stored = [json.loads(tf.extractfile(m).read())["key"] for m in tf.getmembers() if m.name.endswith(".json")]
    assert stored == records[0]["keys"]


def test_resume_refuses_another_source_and_restarts_on_request(tmp_path, photos, shard_dir):
    other = photos.subset(np.arange(len(photos)) < 5)
    other.name = "other"
    with pytest.raises(ValueError, match="resume=false"):
        write_shards(other, shard_dir, split="test", max_count=5)
    m = write_shards(other, shard_dir, split="test", max_count=5, resume=False)
    assert m["n_samples"] == 4 and m["n_skipped"] == 1 and [s["name"] for s in m["shards"]] == ["test-000000.tar"]
    assert sorted(p.name for p in shard_dir.glob("test-*.tar")) == ["test-000000.tar"]


def test_refuses_shards_it_did_not_write(tmp_path, photos, shard_dir):
    (shard_dir / "test-progress.jsonl").unlink()
    with pytest.raises(ValueError, match="not recorded"):
        write_shards(photos, shard_dir, split="test", max_count=5)
    assert len(list(shard_dir.glob("test-*.tar"))) == 3  # untouched


def test_every_photo_skipped(tmp_path, photos):
    bad = photos.subset(photos.table["key"].isin([MISSING, TRUNCATED]))
    m = write_shards(bad, tmp_path / "s", split="test")
    assert m["n_samples"] == 0 and m["shards"] == [] and m["n_skipped"] == 2
    ds = ShardDataset(tmp_path / "s", split="test")
    items, skipped = _items(ds)
    assert items == [] and len(ds) == 2 and dict(skipped.counts) == {"missing": 1, "truncated": 1}


def test_refuses_source_without_images(tmp_path):
    table = pd.DataFrame({"key": ["a"], "lat": [1.0], "lng": [2.0], "path": [None]})
    with pytest.raises(ValueError, match="without images"):
        write_shards(GeoDataset(table, name="coords", source="x.csv"), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_shard_dataset_url_forms(shard_dir):
    by_dir = [it.key for it in _items(ShardDataset(shard_dir, split="test", decode=False))[0]]
    brace = ShardDataset(str(shard_dir / "test-{000000..000002}.tar"), decode=False)
    assert [it.key for it in _items(brace)[0]] == by_dir and len(brace) == N_GOOD + 2
    # a list of some shards: counts from the manifest, the writer's skips not attributed to a part
    part = ShardDataset([shard_dir / "test-000000.tar", shard_dir / "test-000001.tar"])
    items, skipped = _items(part)
    assert len(part) == 10 and [it.key for it in items] == by_dir[:10] and len(skipped) == 0
    items, _ = _items(ShardDataset(shard_dir, split="test", decode=False))
    assert all(it.image is None for it in items)
    done = set(by_dir[:3])
    assert [it.key for it in _items(brace, exclude=done)[0]] == by_dir[3:]
    with pytest.raises(ValueError, match="split"):
        len(ShardDataset(shard_dir))
    with pytest.raises(FileNotFoundError, match="test-000006.tar"):
        len(ShardDataset(str(shard_dir / "test-{000006..000007}.tar")))
    with pytest.raises(FileNotFoundError, match="val-NNNNNN"):
        len(ShardDataset(shard_dir, split="val"))


def _cut_inside_second_sample(path):
    """Truncates a shard in the middle of its second sample's photo, as a broken copy would."""
    with tarfile.open(path) as tf:
        member = tf.getmembers()[2]
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])


def test_damaged_shards_are_counted_not_fatal(shard_dir):
    _cut_inside_second_sample(shard_dir / "test-000001.tar")
    ds = ShardDataset(shard_dir, split="test")
    items, skipped = _items(ds)
    assert len(items) == N_GOOD - 4  # shard 1 kept one sample of five
    assert skipped.counts["corrupt_shard"] == 4 and len(items) + len(skipped) == len(ds)
    # lost samples are named by image id, from the journal
    lost = [k for k, r, _ in skipped.items if r == "corrupt_shard"]
    assert lost == _journal_keys(shard_dir)[1][1:]

    # a hand-made shard: bad json, a photo that is not one, a sample without json
    bad = shard_dir.parent / "bad-000000.tar"
    with tarfile.open(bad, "w") as tf:
        for name, data in [("k1.jpg", _jpeg(1)), ("k1.json", b"{not json"), ("k2.jpg", b"nope"),
                           ("k2.json", json.dumps({"key": "two", "latlng": [1, 2]}).encode()),
                           ("k3.jpg", _jpeg(3)),
                           ("k4.jpg", _jpeg(4)), ("k4.json", json.dumps({"key": "four", "latlng": [5, 6]}).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    items, skipped = _items(ShardDataset([bad]))
    assert [(it.key, it.latlng) for it in items] == [("four", (5.0, 6.0))]
    assert dict(skipped.counts) == {"bad_record": 2, "unreadable": 1}


def _journal_keys(folder, split="test"):
    """The image ids of each shard, as the progress journal records them."""
    records = [json.loads(line) for line in (folder / f"{split}-progress.jsonl").read_text().splitlines()[1:]]
    return [r["keys"] for r in records if r["shard"]]


def _jpeg(i):
    buf = io.BytesIO()
    _photo(i).save(buf, format="JPEG")
    return buf.getvalue()


def test_stray_shard_is_an_error(shard_dir):
    (shard_dir / "test-000003.tar").write_bytes((shard_dir / "test-000000.tar").read_bytes())
    with pytest.raises(ValueError, match="test-000003.tar: not listed"):
        len(ShardDataset(shard_dir, split="test"))


def _to_tensor(img):
    import torch

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W]


def test_make_webdataset_yields_tensors(shard_dir, photos):
    import torch

    ds = make_webdataset(shard_dir, split="test", shuffle=8, seed=3, transform=_to_tensor)
    out = list(ds)
    assert len(out) == N_GOOD and ds.skip_counter.counts == {}
    x, latlng = out[0]["image"], out[0]["latlng"]
    assert x.shape == (3, 24, 32) and x.dtype == torch.uint8
    assert latlng.shape == (2,) and latlng.dtype == torch.float32
    rows = _good_rows(photos).set_index("key")
    for s in out:
        np.testing.assert_allclose(s["latlng"].numpy(), rows.loc[s["key"], ["lat", "lng"]].to_numpy(float), atol=1e-4)
    assert sorted(s["key"] for s in out) == sorted(rows.index)
    again = make_webdataset(shard_dir, split="test", shuffle=8, seed=3)
    assert [s["key"] for s in out] == [s["key"] for s in again]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 24, 32) and batch["latlng"].shape == (4, 2) and len(batch["key"]) == 4


def test_the_training_stream_reads_the_labels_stored_at_sharding(shard_dir, monkeypatch):
    def no_lookup(*args, **kwargs):
        raise AssertionError("evidence labels computed again although the records hold them")

    stored = {it.key: it.meta["labels"] for it in _items(ShardDataset(shard_dir, split="test", decode=False))[0]}
    monkeypatch.setattr("geoloc.evidence.labels.evidence_labels", no_lookup)
    out = list(make_webdataset(shard_dir, split="test", shuffle=0, evidence_heads=list(HEADS)))
    assert {s["key"]: s["labels"] for s in out} == stored


@pytest.fixture
def eight_shards(tmp_path):
    """16 photos in 8 shards of 2; returns the folder and the image ids of each shard."""
    src = read_latlng_csv(write_photo_csv(tmp_path / "src16", n_good=16))
    m = write_shards(src, tmp_path / "s8", max_count=2)
    assert len(m["shards"]) == 8
    return tmp_path / "s8", _journal_keys(tmp_path / "s8", "train")


def test_make_webdataset_splits_by_node_and_worker(eight_shards, monkeypatch):
    import torch

    folder, shard_keys = eight_shards
    for var in ("WORKER", "NUM_WORKERS"):
        monkeypatch.delenv(var, raising=False)
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))  # what webdataset reads before torch.distributed
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = make_webdataset(folder, split="train", shuffle=4, transform=_to_tensor)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        seen[rank] = [s["key"] for s in loader]
    for rank in (0, 1):
        assert len(seen[rank]) == len(set(seen[rank])) == 8  # the two workers read disjoint shards
        assert set(seen[rank]) == {k for keys in shard_keys[rank::2] for k in keys}  # rank r: shards r, r+2, ...
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {k for keys in shard_keys for k in keys}


def test_make_webdataset_uneven_split(shard_dir, monkeypatch):
    """3 shards of 5, 5, 2 samples on 2 ranks: 7 and 5 samples unless the epoch is fixed."""
    for var in ("WORKER", "NUM_WORKERS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    counts, fixed = [], []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        counts.append(len(list(make_webdataset(shard_dir, split="test", shuffle=0))))
        fixed.append(len(list(make_webdataset(shard_dir, split="test", shuffle=0, epoch_size=6))))
    assert counts == [7, 5] and fixed == [6, 6]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")  # no shard left for rank 3
    with pytest.raises(ValueError, match="fewer shards than workers"):
        list(make_webdataset(shard_dir, split="test"))


def test_make_webdataset_skips_bad_samples(shard_dir):
    _cut_inside_second_sample(shard_dir / "test-000001.tar")
    ds = make_webdataset(shard_dir, split="test", shuffle=0)
    with pytest.warns(UserWarning, match="skipped a shard sample"):
        out = list(ds)
    assert len(out) == N_GOOD - 4 and sum(ds.skip_counter.counts.values()) >= 1


def test_config_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("shards", overrides=["data=csv", "data.path=x.csv", "out=o"])
        assert cfg.split == "train" and cfg.max_count == 1000 and cfg.resume is True
        assert cfg.data.dataset._target_ == "geoloc.data.readers.read_latlng_csv"
        assert compose("shards", overrides=["out=o"]).split == "test"  # the sample's split


def test_command_end_to_end(tmp_path):
    csv = write_photo_csv(tmp_path / "src")
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "geoloc", "shards", "data=csv", f"data.path={csv}", "out=shards", "split=test",
           "max_count=5"]
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"wrote {N_GOOD} samples" in run.stdout and "missing: 1, truncated: 1" in run.stdout
    assert sorted(p.name for p in work.iterdir()) == ["shards"]  # no stray outputs/ folder
    assert (work / "shards" / ".hydra" / "config.yaml").is_file()
    ds = ShardDataset(work / "shards", split="test", decode=False)
    assert len(ds) == N_GOOD + 2 and len(_items(ds)[0]) == N_GOOD


@pytest.mark.shared_data
def test_real_im2gps3k_photos(shared_data, tmp_path):
    full = read_im2gps(shared_data / "im2gps3k-dev")
    ds = full.subset(np.arange(len(full)) < 20)
    m = write_shards(ds, tmp_path / "real", split="test", max_count=8)
    assert m["n_samples"] + m["n_skipped"] == 20 and len(m["shards"]) == -(-m["n_samples"] // 8)
    items, _ = _items(ShardDataset(tmp_path / "real", split="test"))
    rows = ds.table.set_index("key")
    for it in items[:5]:
        src = decode_image(rows.loc[it.key, "path"])
        assert it.image.size == src.size and it.latlng == (rows.loc[it.key, "lat"], rows.loc[it.key, "lng"])
        assert np.abs(np.asarray(src, float) - np.asarray(it.image, float)).mean() < 3.0
        assert it.meta["AUTHOR"] == rows.loc[it.key, "AUTHOR"]
    assert len(list(make_webdataset(tmp_path / "real", split="test"))) == m["n_samples"]


def test_a_shard_listed_twice_is_refused(shard_dir):
    first = shard_dir / "test-000000.tar"
    ds = ShardDataset([first, shard_dir / "test-000001.tar", first])  # construction reads nothing
    with pytest.raises(ValueError, match=r"test-000000.tar: listed 2 times"):
        len(ds)
    with pytest.raises(ValueError, match=r"test-000000.tar: listed 2 times"):
        len(ShardDataset(str(shard_dir / "test-{000000,000001,000000}.tar")))
    # another spelling of the same file is the same shard
    with pytest.raises(ValueError, match=r"listed 2 times.*\(as .*test-000000.tar and .*\.\..*test-000000.tar\)"):
        len(ShardDataset([first, shard_dir / ".." / shard_dir.name / "test-000000.tar"]))
    with pytest.raises(ValueError, match=r"test-000000.tar: listed 2 times"):
        make_webdataset([first, first], shuffle=0)


def test_the_same_image_in_two_shard_folders_is_refused(tmp_path, photos, shard_dir, monkeypatch):
    copy = tmp_path / "copy"
    write_shards(photos, copy, split="test", max_count=5)
    both = [shard_dir / "test-000000.tar", shard_dir / "test-000001.tar", copy / "test-000000.tar"]
    first_id = _journal_keys(shard_dir)[0][0]
    expected = rf"image id '{first_id}' is in .*shards/test-000000.tar and in .*copy/test-000000.tar \(5 repeated"

    def no_scan(path):
        raise AssertionError(f"{path}: scanned although the journal records it")

    # the journals give the ids: no tar is opened before the refusal
    monkeypatch.setattr("geoloc.data.shards.reader._scan_keys", no_scan)
    skipped = SkipReport()
    items = ShardDataset(both, decode=False).iter_items(skipped)
    with pytest.raises(ValueError, match=expected):
        next(items)
    assert len(skipped) == 0
    with pytest.raises(ValueError, match=expected):  # a brace pattern over both folders
        _items(ShardDataset(str(tmp_path / "{shards,copy}/test-000000.tar"), decode=False))
    monkeypatch.undo()

    # without journals the tar headers give the webdataset keys, and the sample's json the image id
    for folder in (shard_dir, copy):
        (folder / "test-progress.jsonl").unlink()
    with pytest.raises(ValueError, match=rf"image id '{first_id}' \(webdataset key '{safe_key(first_id)}'\) is in"):
        _items(ShardDataset(both, decode=False))


def test_an_image_twice_in_one_shard_is_refused(tmp_path):
    path = tmp_path / "dup-000000.tar"
    with tarfile.open(path, "w") as tf:
        for key, i in [("k1", 1), ("k2", 2), ("k1", 3)]:
            for name, data in [(f"{key}.jpg", _jpeg(i)),
                               (f"{key}.json", json.dumps({"key": f"id-{key}", "latlng": [i, i]}).encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    ds = ShardDataset([path])
    assert len(ds) == 2  # distinct samples, from the header scan
    with pytest.raises(ValueError, match=r"image id 'id-k1' \(webdataset key 'k1'\) is twice in .*dup-000000.tar"):
        _items(ds)


def test_reading_distinct_shards_is_unchanged_by_the_checks(shard_dir, tmp_path, photos):
    # every shard once, in whatever url form, reads as before
    keys = [it.key for it in _items(ShardDataset(shard_dir, split="test", decode=False))[0]]
    assert keys == list(_good_rows(photos)["key"])
    other = read_latlng_csv(write_photo_csv(tmp_path / "src2", n_good=3))
    other_keys = [f"other/{k}" for k in _good_rows(other)["key"]]
    other.table["key"] = "other/" + other.table["key"]  # other ids, so the two folders do not overlap
    write_shards(other, tmp_path / "other", split="test")
    mixed = ShardDataset([*sorted(shard_dir.glob("test-*.tar")), tmp_path / "other" / "test-000000.tar"],
                         decode=False)
    assert [it.key for it in _items(mixed)[0]] == keys + other_keys


def test_training_stream_marks_unusable_samples_for_the_collate(tmp_path):
    """With mark_bad (what training uses) a photo that does not decode reaches the collate as a marked
    sample, so the run counts and lists it, instead of vanishing in a worker's handler."""
    import io
    import json
    import tarfile

    from geoloc.data.images import encode_jpeg

    good = encode_jpeg(Image.new("RGB", (8, 8), (10, 200, 30)))
    members = {"a.json": {"key": "a", "latlng": [48.85, 2.35]}, "a.jpg": good,
               "b.json": {"key": "b.jpg", "latlng": [51.5, -0.1]}, "b.jpg": b"\xff\xd8 not a jpeg",
               "c.json": b"{not json", "c.jpg": good}
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            data = json.dumps(data).encode() if isinstance(data, dict) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = list(make_webdataset([path], shuffle=0, mark_bad=True))
    assert out[0]["key"] == "a" and "bad" not in out[0]
    assert (out[1]["bad"], out[1]["key"]) == ("unreadable", "b.jpg")
    assert out[2]["bad"] == "bad_record" and out[2]["key"].endswith("train-000000.tar/c")
    with pytest.warns(UserWarning, match="skipped a shard sample"):
        assert len(list(make_webdataset([path], shuffle=0))) == 1  # without it: dropped and counted, as before


def test_records_carry_the_evidence_labels_of_exact_coordinates_and_scene(tmp_path):
    """Labels are looked up once, at sharding time, for every head, vectorized over the photos; the scene
    comes from the row's S3_Label as the training stream reads it (0, 1, 2, else -1)."""
    (tmp_path / "p").mkdir()
    scenes = [0, 1.0, 2, "1", None, 7, np.nan]
    latlng = [(48.8566, 2.3522), (-33.8688, 151.2093), (35.6762, 139.6503), (0.0, -30.0), (64.1466, -21.9426),
              (-1.2921, 36.8219), (40.7128, -74.006)]
    paths = []
    for i in range(len(scenes)):
        paths.append(str(tmp_path / "p" / f"{i}.jpg"))
        _photo(i).save(paths[-1])
    table = pd.DataFrame({"key": [f"img{i}" for i in range(len(scenes))], "lat": [a for a, _ in latlng],
                          "lng": [b for _, b in latlng], "path": paths, "S3_Label": scenes})
    m = write_shards(GeoDataset(table, name="scenes", source="x.csv"), tmp_path / "s", split="test", max_count=3)
    assert m["evidence_labels"]["version"] == EVIDENCE_VERSION
    assert m["evidence_labels"]["heads"] == {h: list(c) for h, c in HEADS.items()}
    items, _ = _items(ShardDataset(tmp_path / "s", split="test", decode=False))
    labels = [it.meta["labels"] for it in items]
    expected = evidence_labels(np.array(latlng), scene=[0, 1, 2, 1, -1, -1, -1])
    assert labels == expected[list(HEADS)].to_dict("records")
    assert [lab["scene"] for lab in labels] == [0, 1, 2, 1, -1, -1, -1]
    assert all(type(v) is int for lab in labels for v in lab.values())
    assert labels[0]["land"] == 1 and labels[0]["hemisphere"] == 0 and labels[1]["hemisphere"] == 1
    assert labels[3]["land"] == 0 and labels[3]["continent"] == -1  # at sea: masked where a head has no value


def test_records_refuse_a_longitude_the_validator_refuses(tmp_path):
    (tmp_path / "p").mkdir()
    for i in range(2):
        _photo(i).save(tmp_path / "p" / f"{i}.jpg")
    table = pd.DataFrame({"key": ["ok", "far"], "lat": [10.0, 10.0], "lng": [20.0, 200.0],
                          "path": [str(tmp_path / "p" / f"{i}.jpg") for i in range(2)]})
    out = tmp_path / "100%d"  # a folder name with a printf directive: webdataset's pattern is escaped
    m = write_shards(GeoDataset(table, name="t", source="x.csv"), out)
    assert m["n_samples"] == 1 and m["skipped"]["by_reason"] == {"bad_latlng": 1}
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]


def test_labels_of_another_evidence_version_are_not_used(tmp_path, photos, shard_dir, monkeypatch):
    record = {"key": "a", "latlng": [1.0, 2.0], "meta": {}, "labels": {"land": 1}}
    assert parse_record(json.dumps({**record, "evidence_version": EVIDENCE_VERSION}).encode(), "x")["labels"] == \
        {"land": 1}
    assert parse_record(json.dumps({**record, "evidence_version": EVIDENCE_VERSION - 1}).encode(), "x")["labels"] \
        is None  # computed again by whoever needs them
    assert parse_record(json.dumps({"key": "a", "latlng": [1.0, 2.0]}).encode(), "x")["labels"] is None
    with pytest.raises(ValueError, match="labels"):
        parse_record(json.dumps({**record, "labels": [1, 2]}).encode(), "x")
    # a folder whose labels are of another version is not continued with this one
    monkeypatch.setattr("geoloc.evidence.labels.EVIDENCE_VERSION", EVIDENCE_VERSION + 1)
    with pytest.raises(ValueError, match=rf"evidence labels of version {EVIDENCE_VERSION}.*resume=false"):
        write_shards(photos, shard_dir, split="test", max_count=5)
    items, _ = _items(ShardDataset(shard_dir, split="test", decode=False))
    assert items and all("labels" not in it.meta for it in items)


def _old_tar(path, samples) -> None:
    """A shard as geoloc wrote it by hand before it used webdataset's ShardWriter (same calls)."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uname = info.gname = "geoloc"
                tar.addfile(info, io.BytesIO(data))


def write_format1_folder(source, out, split="test", max_count=5) -> dict:
    """A shard folder as geoloc wrote it before records carried labels (format 1): shards, journal, manifest."""
    skipped = SkipReport()
    items = list(source.iter_items(skipped))
    out.mkdir(parents=True)
    journal = [{"kind": "header", "version": 1, "split": split, "source": source.name, "jpeg_quality": 95}]
    shards = []
    for n, start in enumerate(range(0, len(items), max_count)):
        chunk = items[start:start + max_count]
        path = out / f"{split}-{n:06d}.tar"
        _old_tar(path, [(safe_key(it.key), {
            "jpg": encode_jpeg(it.image.convert("RGB"), quality=95),
            "json": json.dumps({"key": it.key, "latlng": list(it.latlng), "meta": to_jsonable(it.meta)}).encode()})
            for it in chunk])
        data = path.read_bytes()
        shards.append({"name": path.name, "n_samples": len(chunk), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
        journal.append({"shard": shards[-1], "keys": [it.key for it in chunk],
                        "skipped": [list(s) for s in skipped.items] if n == 0 else []})
    (out / f"{split}-progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in journal))
    manifest = {"version": 1, "split": split, "n_samples": len(items), "n_skipped": len(skipped),
                "skipped": skipped.to_dict(max_items=len(skipped)), "shards": shards, "source": source.name,
                "synthetic": False, "notes": [], "settings": {"max_count": max_count, "max_bytes": 256e6,
                                                              "jpeg_quality": 95}}
    (out / f"{split}-manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def test_a_folder_written_before_labels_still_reads(tmp_path, photos):
    old = tmp_path / "old"
    write_format1_folder(photos, old)
    ds = ShardDataset(old, split="test")
    items, skipped = _items(ds)
    assert [it.key for it in items] == list(_good_rows(photos)["key"]) and len(ds) == N_GOOD + 2
    assert all("labels" not in it.meta for it in items) and dict(skipped.counts) == {"missing": 1, "truncated": 1}
    # the training stream computes the labels such records lack
    out = list(make_webdataset(old, split="test", shuffle=0, evidence_heads=["land", "hemisphere"]))
    assert len(out) == N_GOOD and all(set(s["labels"]) == {"land", "hemisphere"} for s in out)


def test_a_folder_written_before_labels_is_not_extended(tmp_path, photos):
    old = tmp_path / "old"
    before = write_format1_folder(photos, old)
    files = {p.name: p.read_bytes() for p in old.iterdir()}
    # a rerun with nothing new leaves it as it is
    assert write_shards(photos, old, split="test", max_count=5) == json.loads(json.dumps(before))
    assert {p.name: p.read_bytes() for p in old.iterdir()} == files
    # new photos would mix formats in one split: refused, with how to rewrite it
    more = read_latlng_csv(write_photo_csv(tmp_path / "src2", n_good=N_GOOD + 1))
    more.name = photos.name
    with pytest.raises(ValueError, match=r"shard format 1.*resume=false.*\(the source has photos it does not hold\)"):
        write_shards(more, old, split="test", max_count=5)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == files
    (old / "test-manifest.json").unlink()  # a killed format-1 run
    with pytest.raises(ValueError, match=r"shard format 1.*resume=false.*\(the run did not finish\)"):
        write_shards(photos, old, split="test", max_count=5)
    m = write_shards(more, old, split="test", max_count=5, resume=False)
    assert m["version"] == MANIFEST_VERSION and m["n_samples"] == N_GOOD + 1
    assert all("labels" in it.meta for it in _items(ShardDataset(old, split="test", decode=False))[0])


def test_webdataset_writes_the_tar_layout_geoloc_wrote_by_hand(tmp_path):
    """The ShardWriter's members (fixed mtime, mode and owner) are byte for byte those of the hand-written
    tars before it: the same samples give the same sha256 in either."""
    import webdataset as wds

    from geoloc.data.shards.writer import _TAR_MEMBER

    samples = [(safe_key(f"photos/{i}.jpg"), {"jpg": _jpeg(i), "json": json.dumps({"key": i}).encode()})
               for i in range(3)]
    _old_tar(tmp_path / "old.tar", samples)
    with open(tmp_path / "new.tar", "wb") as f:
        writer = wds.TarWriter(f, encoder=False, **_TAR_MEMBER)
        for key, members in samples:
            writer.write({"__key__": key, **members})
        writer.close()
    assert (tmp_path / "new.tar").read_bytes() == (tmp_path / "old.tar").read_bytes()
