"""The artifacts layer: atomic folders, journals that survive a torn line, metadata checks that say how to rebuild."""

import json
import os

import pytest

from geoloc.artifacts import ArtifactMeta, AtomicFile, Journal, atomic_dir, atomic_write_bytes, complete_lines


def test_atomic_dir_replaces_whole_or_leaves_the_old(tmp_path):
    out = tmp_path / "idx"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    with pytest.raises(FileExistsError, match="exists already"), atomic_dir(out, replace=False):
        pass


def test_atomic_dir_without_replace_loses_a_race_with_file_exists(tmp_path, monkeypatch):
    out = tmp_path / "sample"
    real_replace = os.replace

    def replace(src, dst):  # another writer renames its folder into place just before ours
        if dst == out and not out.exists():
            out.mkdir()
            (out / "theirs.txt").write_text("1")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(FileExistsError, match="appeared while it was being written"), \
            atomic_dir(out, replace=False) as tmp:
        (tmp / "ours.txt").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample"] and (out / "theirs.txt").is_file()


def test_atomic_file_commits_or_leaves_nothing(tmp_path):
    path = tmp_path / "shard.tar"
    f = AtomicFile(path)
    f.write(b"abc")
    assert not path.exists() and f.tmp.parent == tmp_path and f.tmp.name.startswith(".shard.tar.")
    assert f.commit() == path and path.read_bytes() == b"abc"
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask  # not the 0600 of a temporary file
    with pytest.raises(RuntimeError), AtomicFile(path) as g:
        g.write(b"half")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"abc" and sorted(p.name for p in tmp_path.iterdir()) == ["shard.tar"]
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["shard.tar"]


def test_journal_extend_fsyncs_once_per_batch(tmp_path, monkeypatch):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    j = Journal(tmp_path / "chains.jsonl")
    j.extend({"IMG_ID": str(i), "x": float("nan")} for i in range(5))
    assert len(calls) == 1
    assert j.read() == [{"IMG_ID": str(i), "x": None} for i in range(5)]  # NaN is not JSON: null


def test_journal_read_without_repair_leaves_the_file_alone(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.append({"key": "a\u2028b\u0085c"})  # line separators other than \n stay inside their record
    with open(j.path, "ab") as f:
        f.write('{"key": "\u00e9'.encode()[:-1])  # torn in the middle of a UTF-8 character
    before = j.path.read_bytes()
    assert j.read(repair=False) == [{"key": "a\u2028b\u0085c"}]
    assert j.path.read_bytes() == before
    assert j.read() == [{"key": "a\u2028b\u0085c"}] and j.path.read_bytes().endswith(b"\n")


def test_journal_drops_a_torn_last_line_and_names_a_damaged_one(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.append({"a": 1})
    j.append({"b": 2})
    with open(j.path, "a") as f:
        f.write('{"c": ')  # a kill in mid-write
    assert j.read() == [{"a": 1}, {"b": 2}]
    j.append({"c": 3})
    assert j.read() == [{"a": 1}, {"b": 2}, {"c": 3}]
    j.path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match="j.jsonl: line 2 is not JSON"):
        j.read()


def test_complete_lines(tmp_path):
    p = tmp_path / "rows.csv"
    p.write_text("h\n1\n2")
    assert complete_lines(p) == 1 and p.read_text() == "h\n1\n"
    assert complete_lines(p) == 0


def test_artifact_meta_round_trip_and_refusals(tmp_path):
    meta = ArtifactMeta("index", 1, fingerprint="abc", settings={"method": "hdbscan"})
    path = meta.write(tmp_path / "meta.json")
    back = ArtifactMeta.read(path, kind="index", format_version=1, fingerprint="abc")
    assert back.settings == {"method": "hdbscan"} and back.fingerprint == "abc"
    with pytest.raises(ValueError, match="made with other weights.*rebuild it \\(python -m geoloc index\\)"):
        ArtifactMeta.read(path, kind="index", format_version=1, fingerprint="zzz", rebuild="python -m geoloc index")
    with pytest.raises(ValueError, match="index format 1, this geoloc reads 2"):
        ArtifactMeta.read(path, kind="index", format_version=2)
    with pytest.raises(ValueError, match="not 'gallery'"):
        ArtifactMeta.read(path, kind="gallery", format_version=1)
    legacy = tmp_path / "legacy.json"  # written before ArtifactMeta: no kind, extra keys become settings
    legacy.write_text(json.dumps({"format_version": 1, "fingerprint": "abc", "n_clusters": 3}))
    assert ArtifactMeta.read(legacy, kind="index", format_version=1).settings == {"n_clusters": 3}
