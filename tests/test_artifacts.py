"""The artifacts layer: atomic folders, journals that survive a torn line, metadata checks that say how to rebuild."""

import json

import pytest

from geoloc.artifacts import ArtifactMeta, Journal, atomic_dir, complete_lines


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
