"""Writing webdataset shards: the offline step that training streams from (see :mod:`geoloc.data.shards`).

Samples go through webdataset's ``ShardWriter``; its ``opener`` and ``post`` hooks make every shard an
artifact that is either finished or absent: written under a temporary name, then fsynced, renamed into
place, hashed and recorded in the progress journal (a :class:`geoloc.artifacts.Journal`) that a killed
run resumes from.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from geoloc.artifacts import AtomicFile, Journal, atomic_write_json, to_jsonable
from geoloc.data.images import SkipReport, encode_jpeg
from geoloc.data.readers import Item, ItemSource
from geoloc.geo import invalid_latlng

#: Version of the shard folder layout: the journal header, the manifest and the sample records.
#: 1: records ``{"key", "latlng", "meta"}``; 2: records also carry ``labels`` and ``evidence_version``.
MANIFEST_VERSION = 2

#: Largest webdataset key written; USTAR member names are limited to 100 bytes (key + ".json").
MAX_KEY_LEN = 80

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_SHARD_NAME = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.tar$")
#: Fixed member attributes make shards byte-for-byte reproducible, so their sha256 compare across runs.
_TAR_MEMBER = {"mtime": 0, "mode": 0o444, "user": "geoloc", "group": "geoloc"}
#: Samples labelled per :func:`~geoloc.evidence.labels.evidence_labels` call, whose fixed cost per call
#: is much larger than its cost per point. The output does not depend on it.
_LABEL_CHUNK = 64


def safe_key(img_id: str) -> str:
    """The webdataset ``__key__`` of an image id.

    Ids made only of ``[A-Za-z0-9_-]`` (and at most :data:`MAX_KEY_LEN` long) are kept as they are. Others
    become their sanitized stem (extension dropped, other characters replaced by ``_``, cut to 64
    characters) plus ``~`` and 10 hex digits of the id's SHA-1, so ``a.jpg`` and ``a.png`` stay distinct.
    ``~`` never occurs in a kept id, so a hashed key cannot equal a kept one.

    Example:
        ``"1000269685_e60e9cdfb4_1125_78841376@N00.jpg"`` -> ``"1000269685_e60e9cdfb4_1125_78841376_N00~<hash>"``
    """
    img_id = str(img_id)
    if _SAFE_KEY.match(img_id) and len(img_id) <= MAX_KEY_LEN:
        return img_id
    name = img_id.replace("\\", "/").rsplit("/", 1)[-1]
    stem = name.split(".", 1)[0] if not name.startswith(".") else name
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:64] or "_"
    return f"{stem}~{hashlib.sha1(img_id.encode('utf-8')).hexdigest()[:10]}"


# ----------------------------------------------------------------------------------------------- records


def _json_default(obj: Any) -> Any:
    """JSON for what :func:`geoloc.artifacts.to_jsonable` leaves: pandas' missing values to null, the rest to str."""
    if type(obj).__name__ in ("NAType", "NaTType"):
        return None
    return str(obj)


def _dumps(record: dict) -> bytes:
    return json.dumps(record, allow_nan=False, default=_json_default, ensure_ascii=False).encode("utf-8")


def _record(item: Item) -> dict:
    """A sample's json record without its labels; ValueError or TypeError when it cannot be JSON."""
    meta = dict(item.meta or {})
    if isinstance(meta.get("labels"), dict):
        meta.pop("labels")  # stored labels of a shard being re-sharded (ShardDataset): computed afresh
    record = {"key": str(item.key), "latlng": [float(v) for v in item.latlng], "meta": to_jsonable(meta)}
    _dumps(record)  # fails here, so the photo is skipped and counted, not the chunk it is labelled with
    return record


def _evidence_labels(records: list[dict]) -> list[dict[str, int]]:
    """``{head: class index}`` (``-1`` masked) for each record, one vectorized lookup for all of them.

    The scene is the record's ``S3_Label`` metadata, read as the training stream reads it
    (:func:`~geoloc.data.shards.stream.scene_label`: 0, 1, 2, else masked).
    """
    from geoloc.data.shards.stream import scene_label
    from geoloc.evidence.labels import HEADS, evidence_labels

    latlng = np.array([r["latlng"] for r in records], dtype=np.float64).reshape(-1, 2)  # (N, 2)
    scene = np.array([scene_label(r["meta"].get("S3_Label")) for r in records], dtype=np.int64)  # (N,)
    table = evidence_labels(latlng, scene=scene)[list(HEADS)].to_numpy(np.int64)  # (N, heads)
    return [dict(zip(HEADS, row.tolist())) for row in table]


def labels_description() -> dict:
    """What the ``labels`` of a record mean: the evidence label version and each head's classes."""
    from geoloc.evidence.labels import EVIDENCE_VERSION, HEADS

    return {"version": EVIDENCE_VERSION, "heads": {h: list(c) for h, c in HEADS.items()}}


# ----------------------------------------------------------------------------------------------- the folder


def _shard_files(out: Path, split: str) -> dict[int, Path]:
    """``{index: path}`` of the ``{split}-NNNNNN.tar`` files in ``out``."""
    found = {}
    for p in out.glob(f"{split}-*.tar"):
        m = _SHARD_NAME.match(p.name)
        if m and m["split"] == split:
            found[int(m["index"])] = p
    return found


def _read_journal(journal: Journal) -> tuple[dict | None, list[dict]]:
    """Header and shard records of a progress journal; a torn last line (a killed write) is dropped."""
    records = journal.read()
    if not records:
        return None, []
    header, records = records[0], records[1:]
    if not isinstance(header, dict) or header.get("kind") != "header":
        raise ValueError(f"{journal.path}: line 1 is not a journal header; rerun with resume=false to write "
                         "the shards afresh")
    return header, records


def _clear_split(out: Path, split: str) -> None:
    """Removes what an earlier run wrote for ``split`` (shards, temporaries, journal, manifest)."""
    for p in _shard_files(out, split).values():
        p.unlink()
    for p in out.glob(f".{split}-*.tmp"):
        p.unlink()
    for name in (f"{split}-progress.jsonl", f"{split}-manifest.json"):
        (out / name).unlink(missing_ok=True)


class _JournaledShards:
    """The ``opener`` and ``post`` hooks of a ``webdataset.ShardWriter``, and the shards they finished.

    Each shard is written to an :class:`~geoloc.artifacts.AtomicFile`. When the ShardWriter closes it,
    :meth:`post` commits it (fsync, rename into place, fsync of the folder), hashes it and appends one
    journal record: the shard, the image ids in it and the photos skipped since the previous record.

    Args:
        journal: the progress journal.
        skipped: the run's skip report (its items since the last record go into the next one).
        shards: shards finished by an earlier run (recorded in the journal already).
        n_journaled_skips: how many of ``skipped.items`` the journal already holds.
    """

    def __init__(self, journal: Journal, skipped: SkipReport, shards: list[dict], n_journaled_skips: int):
        self.journal, self.skipped = journal, skipped
        self.shards = list(shards)
        self.n_journaled_skips = n_journaled_skips
        self.keys: list[str] = []  # image ids in the open shard, in stored order
        self.file: AtomicFile | None = None

    def open(self, fname: str) -> AtomicFile:
        self.file = AtomicFile(fname)
        return self.file

    def post(self, fname: str) -> None:
        path = self.file.commit()
        self.file = None
        with open(path, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        self.record({"name": path.name, "n_samples": len(self.keys), "bytes": path.stat().st_size,
                     "sha256": sha256})

    def record(self, shard: dict | None) -> None:
        """Journals ``shard`` (None: only the photos skipped since the last record)."""
        new_skips = [list(s) for s in self.skipped.items[self.n_journaled_skips:]]
        self.journal.append({"shard": shard, "keys": self.keys, "skipped": new_skips})
        self.n_journaled_skips = len(self.skipped.items)
        if shard is not None:
            self.shards.append(shard)
        self.keys = []

    def abort(self, writer) -> None:
        """An error or interrupt: the open shard never gets its final name."""
        tar = getattr(writer, "tarstream", None)
        try:
            if tar is not None:
                tar.close()  # into the temporary, which goes; left open, it would write on at exit
        except (OSError, ValueError):
            pass
        if self.file is not None:
            self.file.abort()
            self.file = None


def write_shards(source: ItemSource, out_dir: str | Path, *, split: str = "train", max_count: int = 1000,
                 max_bytes: float = 256e6, jpeg_quality: int = 95, resume: bool = True,
                 progress: bool | None = None) -> dict:
    """Writes the photos of ``source`` as webdataset shards ``out_dir/{split}-NNNNNN.tar``.

    Every photo is decoded (bad ones are skipped and counted by reason), re-encoded as RGB JPEG and
    stored with its coordinates, metadata and evidence labels (see :mod:`geoloc.data.shards` for the
    layout). Each shard is written under a temporary name and renamed when complete, then recorded in
    ``{split}-progress.jsonl``; the manifest is written last. A killed run is continued by calling again
    with ``resume=True``: recorded shards are kept, their photos (and the ones skipped before them) are
    passed to ``source.iter_items(exclude=...)``, unrecorded files of this split are removed, and the
    result is the same as that of an uninterrupted run. Rerunning over a finished directory is cheap and
    adds only photos that are new in ``source``; photos skipped before are not retried (``resume=False``
    retries everything). One writer per folder and split at a time.

    A folder written before records carried labels (format 1) still reads; rerunning over it finished is
    a no-op, but it cannot be extended or continued: ``resume=False`` rewrites it.

    Args:
        source: photos with coordinates; a source read without images is refused.
        out_dir: folder for the shards (created).
        split: name prefix of the files, ``[A-Za-z0-9_]+``.
        max_count: most samples per shard.
        max_bytes: a shard is closed once the photos and records in it reach this many bytes (webdataset's
            ``maxsize``: tar headers and padding, about 1 KiB per sample, are not counted), so a shard
            file exceeds it by at most one sample and its headers.
        jpeg_quality: JPEG quality of the stored photos (1-100).
        resume: continue the run recorded in ``out_dir``; False deletes this split's shards, journal and
            manifest first.
        progress: show a progress bar on stderr; None shows one when stderr is a terminal.

    Returns:
        The manifest (also written to ``out_dir/{split}-manifest.json``).

    Raises:
        ValueError: bad arguments, a source without images, or a journal from another source, quality,
            evidence label version or shard format.
    """
    if not _SPLIT_NAME.match(str(split)):
        raise ValueError(f"split must be letters, digits or _ (it prefixes file names), got {split!r}")
    if int(max_count) < 1 or not max_bytes > 0:
        raise ValueError(f"max_count must be >= 1 and max_bytes > 0, got {max_count} and {max_bytes}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if getattr(source, "has_images", True) is False:
        raise ValueError(f"{source.name}: was read without images (data.images=null?); shards store photos, "
                         "so read it with its image folder")
    max_count, jpeg_quality = int(max_count), int(jpeg_quality)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / f"{split}-progress.jsonl")
    if not resume:
        _clear_split(out, split)

    labels_info = labels_description()
    header, records = _read_journal(journal)
    identity = {"kind": "header", "version": MANIFEST_VERSION, "split": split, "source": source.name,
                "jpeg_quality": jpeg_quality, "evidence_version": labels_info["version"]}
    if header is not None:
        _check_header(journal.path, header, identity)
    shard_records = [r for r in records if r.get("shard")]
    for i, r in enumerate(shard_records):
        path = out / r["shard"]["name"]
        if r["shard"]["name"] != f"{split}-{i:06d}.tar" or not path.is_file() \
                or path.stat().st_size != r["shard"]["bytes"]:
            raise ValueError(f"{path}: recorded in {journal.path.name} as shard {i} of {r['shard']['bytes']} "
                             "bytes but missing or of another size; pass resume=false to write this split afresh")
    unrecorded = {i: p for i, p in _shard_files(out, split).items() if i >= len(shard_records)}
    # a killed run may have renamed one shard without journaling it; that one is rewritten
    orphan = unrecorded.pop(len(shard_records), None) if header is not None else None
    if unrecorded:
        raise ValueError(f"{unrecorded[min(unrecorded)]}: {len(unrecorded)} {split} shard(s) in {out} are not "
                         f"recorded in {journal.path.name}; they are not from this run. Pass resume=false to "
                         "replace them, or choose another output folder")

    skipped = SkipReport()
    done: set[str] = set()
    for r in records:
        done.update(r.get("keys", []))
        for key, reason, detail in r.get("skipped", []):
            skipped.add(key, reason, detail)
            done.add(key)
    if header is not None and header.get("version") != MANIFEST_VERSION:
        return _legacy_rerun(source, out, split, journal.path, header, done)
    if orphan is not None:
        orphan.unlink()
    for path in out.glob(f".{split}-*.tmp"):
        path.unlink()
    if header is None:
        journal.reset(identity)

    used_keys = {safe_key(k): k for r in records for k in r.get("keys", [])}
    sink = _JournaledShards(journal, skipped, [r["shard"] for r in shard_records], len(skipped.items))
    pattern = str(out).replace("%", "%%") + f"/{split}-%06d.tar"

    bar = None
    if progress or (progress is None and sys.stderr.isatty()):
        from tqdm import tqdm

        bar = tqdm(total=max(len(source) - len(done), 0), desc=f"shards {split} <- {source.name}", unit="img",
                   dynamic_ncols=True, file=sys.stderr)

    import webdataset as wds

    writer = None
    pending: list[tuple[str, bytes, dict]] = []  # (webdataset key, JPEG, record) awaiting their labels

    def write_pending() -> None:
        nonlocal writer
        if not pending:
            return
        for (key, jpg, record), labels in zip(pending, _evidence_labels([r for *_, r in pending])):
            if writer is None:  # opened on the first sample: a run that writes nothing makes no shard
                writer = wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, post=sink.post,
                                         start_shard=len(sink.shards), verbose=0, opener=sink.open,
                                         encoder=False, **_TAR_MEMBER)
            record = {**record, "labels": labels, "evidence_version": labels_info["version"]}
            writer.write({"__key__": key, "jpg": jpg, "json": _dumps(record)})  # may close (post) the last shard
            sink.keys.append(record["key"])
        pending.clear()

    n_seen_skips = len(skipped)
    try:
        for item in source.iter_items(skipped, exclude=frozenset(done)):
            if bar is not None:
                bar.update(1 + len(skipped) - n_seen_skips)
                n_seen_skips = len(skipped)
            key = safe_key(item.key)
            if key in used_keys:
                skipped.add(item.key, "duplicate_key", f"webdataset key {key!r} already holds "
                            f"{used_keys[key]!r}")
                continue
            if item.image is None:
                skipped.add(item.key, "no_image", "the source gave no image for this row")
                continue
            latlng = np.asarray(item.latlng, dtype=np.float64)
            if latlng.shape != (2,) or invalid_latlng(latlng):
                skipped.add(item.key, "bad_latlng", f"latlng {latlng.tolist()} is not a valid [lat, lng] in "
                            "degrees (lat in [-90, 90], lng in [-180, 180])")
                continue
            try:
                jpg = encode_jpeg(item.image.convert("RGB"), quality=jpeg_quality)
                record = _record(item)
            except (OSError, ValueError, TypeError) as e:
                skipped.add(item.key, "unencodable", f"{type(e).__name__}: {e}")
                continue
            pending.append((key, jpg, record))
            used_keys[key] = item.key
            if len(pending) >= _LABEL_CHUNK:
                write_pending()
        write_pending()
        if writer is not None:
            writer.close()  # posts the last shard
            writer = None
        if len(skipped.items) > sink.n_journaled_skips:
            sink.record(None)
        if bar is not None:
            bar.update(len(skipped) - n_seen_skips)
    finally:
        if writer is not None:
            sink.abort(writer)
        if bar is not None:
            bar.close()

    shards = sink.shards
    manifest = {
        "version": MANIFEST_VERSION,
        "split": split,
        "n_samples": sum(s["n_samples"] for s in shards),
        "n_skipped": len(skipped),
        "skipped": skipped.to_dict(max_items=len(skipped)),
        "shards": shards,
        "source": source.name,
        "synthetic": bool(getattr(source, "synthetic", False)),
        "notes": [str(n) for n in getattr(source, "notes", [])],
        "settings": {"max_count": max_count, "max_bytes": max_bytes, "jpeg_quality": jpeg_quality},
        "evidence_labels": labels_info,
        "format": {"jpg": "upright RGB JPEG",
                   "json": {"key": "original IMG_ID", "latlng": "[lat, lng] degrees",
                            "meta": "the source row's other columns",
                            "labels": "{head: class index} of evidence_labels.heads, -1 where masked",
                            "evidence_version": "evidence_labels.version the labels were computed with"}},
    }
    atomic_write_json(out / f"{split}-manifest.json", manifest)
    return manifest


def _check_header(path: Path, header: dict, identity: dict) -> None:
    """ValueError unless the journal ``header`` records a run of this source, quality and label version
    (a format-1 header, written before records carried labels, is checked for source and quality only)."""
    same = ("split", "source", "jpeg_quality")
    if {k: header.get(k) for k in same} != {k: identity[k] for k in same}:
        raise ValueError(f"{path}: records a run of source {header.get('source')!r} with jpeg_quality="
                         f"{header.get('jpeg_quality')}, not {identity['source']!r} with {identity['jpeg_quality']}; "
                         "pass resume=false to write this split afresh, or choose another output folder")
    if header.get("version") == MANIFEST_VERSION and header.get("evidence_version") != identity["evidence_version"]:
        raise ValueError(f"{path}: its shards hold evidence labels of version {header.get('evidence_version')}, "
                         f"this geoloc computes version {identity['evidence_version']}; pass resume=false to "
                         "write this split afresh (or choose another output folder)")
    if header.get("version") not in (1, MANIFEST_VERSION):
        raise ValueError(f"{path}: shard format {header.get('version')!r}, this geoloc writes {MANIFEST_VERSION}; "
                         "pass resume=false to write this split afresh, or choose another output folder")


def _legacy_rerun(source: ItemSource, out: Path, split: str, journal: Path, header: dict, done: set[str]) -> dict:
    """A rerun over a folder written in shard format 1 (records without labels).

    A finished folder whose source has nothing new is left as it is (its manifest is returned); anything
    else would mix formats in one split, so it is refused with how to rewrite it.
    """
    manifest_path = out / f"{split}-manifest.json"
    refuse = (f"{journal}: written by an earlier geoloc (shard format {header.get('version')}, records without "
              f"evidence labels); it still reads, but cannot be continued or extended. Pass resume=false to "
              f"write this split afresh (with labels), or choose another output folder")
    if not manifest_path.is_file():
        raise ValueError(f"{refuse} (the run did not finish)")
    probe = SkipReport()
    if next(iter(source.iter_items(probe, exclude=frozenset(done))), None) is not None or len(probe):
        raise ValueError(f"{refuse} (the source has photos it does not hold)")
    return json.loads(manifest_path.read_text(encoding="utf-8"))
