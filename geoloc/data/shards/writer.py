"""Writing webdataset shards: the offline step that training streams from (see :mod:`geoloc.data.shards`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from geoloc.artifacts import atomic_write_json, atomic_write_text, to_jsonable
from geoloc.data.images import SkipReport, encode_jpeg
from geoloc.data.readers import Item, ItemSource

MANIFEST_VERSION = 1

#: Largest webdataset key written; USTAR member names are limited to 100 bytes (key + ".json").
MAX_KEY_LEN = 80

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_SHARD_NAME = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.tar$")
_MTIME = 0  # fixed member times make shards reproducible, so their sha256 can be compared across runs


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


# ----------------------------------------------------------------------------------------------- writing


def _member_bytes(n: int) -> int:
    """Bytes a member of ``n`` bytes takes in a tar: a 512-byte header and data padded to 512."""
    return 512 + -(-n // 512) * 512


def _tar_size(n: int) -> int:
    """Size of a stream-written tar whose members and end blocks take ``n`` bytes (padded to a record)."""
    return -(-n // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _json_default(obj: Any) -> Any:
    """JSON for what :func:`geoloc.artifacts.to_jsonable` leaves: pandas' missing values to null, the rest to str."""
    if type(obj).__name__ in ("NAType", "NaTType"):
        return None
    return str(obj)


def _record_json(item: Item) -> bytes:
    lat, lng = (float(v) for v in item.latlng)
    record = {"key": str(item.key), "latlng": [lat, lng], "meta": to_jsonable(dict(item.meta or {}))}
    return json.dumps(record, allow_nan=False, default=_json_default, ensure_ascii=False).encode("utf-8")


class _HashingFile:
    """A write-only file wrapper that keeps the SHA-256 and size of what went through it."""

    def __init__(self, f):
        self.f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class _ShardWriter:
    """One shard being written under a temporary name; :meth:`finish` renames it into place."""

    def __init__(self, path: Path):
        self.path = path
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")
        self.hashing = _HashingFile(self.file)
        self.tar = tarfile.open(fileobj=self.hashing, mode="w|", format=tarfile.USTAR_FORMAT)
        self.keys: list[str] = []
        self.bytes = 1024  # the end-of-archive blocks

    def add(self, key: str, members: dict[str, bytes], original_key: str) -> None:
        for ext in sorted(members):  # the member order of webdataset's TarWriter
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o444
            info.uname = info.gname = "geoloc"
            self.tar.addfile(info, _BytesReader(data))
            self.bytes += _member_bytes(len(data))
        self.keys.append(original_key)

    def finish(self) -> dict:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.tmp, 0o644 & ~mask)  # mkstemp makes 0600
        os.replace(self.tmp, self.path)
        return {"name": self.path.name, "n_samples": len(self.keys), "bytes": self.hashing.size,
                "sha256": self.hashing.sha256.hexdigest()}

    def abort(self) -> None:
        try:
            self.tar.close()  # into the temporary, which goes; leaving it open would write on at exit
            self.file.close()
        except (OSError, ValueError):
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


class _BytesReader:
    """The minimal file object ``TarFile.addfile`` reads member data from."""

    def __init__(self, data: bytes):
        self.data, self.pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n is None or n < 0 else self.pos + n
        chunk = self.data[self.pos:end].tobytes()
        self.pos += len(chunk)
        return chunk

    def readinto(self, b) -> int:
        chunk = self.read(len(b))
        b[:len(chunk)] = chunk
        return len(chunk)


def _shard_files(out: Path, split: str) -> dict[int, Path]:
    """``{index: path}`` of the ``{split}-NNNNNN.tar`` files in ``out``."""
    found = {}
    for p in out.glob(f"{split}-*.tar"):
        m = _SHARD_NAME.match(p.name)
        if m and m["split"] == split:
            found[int(m["index"])] = p
    return found


def _read_journal(path: Path) -> tuple[dict | None, list[dict]]:
    """Header and shard records of a progress journal; a torn last line (a killed write) is dropped."""
    if not path.exists():
        return None, []
    lines = path.read_text(encoding="utf-8").splitlines()
    parsed = []
    for i, line in enumerate(lines):
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in parsed))  # drop the torn line
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e}); the journal is damaged. Rerun with "
                             "resume=false to write the shards afresh") from e
    if not parsed:
        return None, []
    header, records = parsed[0], parsed[1:]
    if header.get("kind") != "header":
        raise ValueError(f"{path}: line 1 is not a journal header; rerun with resume=false")
    return header, records


def _append_line(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _clear_split(out: Path, split: str) -> None:
    """Removes what an earlier run wrote for ``split`` (shards, temporaries, journal, manifest)."""
    for p in _shard_files(out, split).values():
        p.unlink()
    for p in out.glob(f".{split}-*.tmp"):
        p.unlink()
    for name in (f"{split}-progress.jsonl", f"{split}-manifest.json"):
        (out / name).unlink(missing_ok=True)


def write_shards(source: ItemSource, out_dir: str | Path, *, split: str = "train", max_count: int = 1000,
                 max_bytes: float = 256e6, jpeg_quality: int = 95, resume: bool = True,
                 progress: bool | None = None) -> dict:
    """Writes the photos of ``source`` as webdataset shards ``out_dir/{split}-NNNNNN.tar``.

    Every photo is decoded (bad ones are skipped and counted by reason), re-encoded as RGB JPEG and
    stored with its coordinates and metadata (see the module docstring for the layout). Each shard is
    written under a temporary name and renamed when complete, then recorded in
    ``{split}-progress.jsonl``; the manifest is written last. A killed run is continued by calling again
    with ``resume=True``: recorded shards are kept, their photos (and the ones skipped before them) are
    passed to ``source.iter_items(exclude=...)``, unrecorded files of this split are removed, and the
    result is the same as that of an uninterrupted run. Rerunning over a finished directory is cheap and
    adds only photos that are new in ``source``; photos skipped before are not retried (``resume=False``
    retries everything). One writer per folder and split at a time.

    Args:
        source: photos with coordinates; a source read without images is refused.
        out_dir: folder for the shards (created).
        split: name prefix of the files, ``[A-Za-z0-9_]+``.
        max_count: most samples per shard.
        max_bytes: a shard is closed before a sample would take its file over this size (a single larger
            sample gets a shard of its own).
        jpeg_quality: JPEG quality of the stored photos (1-100).
        resume: continue the run recorded in ``out_dir``; False deletes this split's shards, journal and
            manifest first.
        progress: show a progress bar on stderr; None shows one when stderr is a terminal.

    Returns:
        The manifest (also written to ``out_dir/{split}-manifest.json``).

    Raises:
        ValueError: bad arguments, a source without images, or a journal from another source or quality.
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
    journal = out / f"{split}-progress.jsonl"
    if not resume:
        _clear_split(out, split)

    header, records = _read_journal(journal)
    identity = {"kind": "header", "version": MANIFEST_VERSION, "split": split, "source": source.name,
                "jpeg_quality": jpeg_quality}
    if header is not None and {k: header.get(k) for k in identity} != identity:
        raise ValueError(f"{journal}: records a run of source {header.get('source')!r} with jpeg_quality="
                         f"{header.get('jpeg_quality')}, not {source.name!r} with {jpeg_quality}; pass "
                         "resume=false to write this split afresh, or choose another output folder")
    shard_records = [r for r in records if r.get("shard")]
    for i, r in enumerate(shard_records):
        path = out / r["shard"]["name"]
        if r["shard"]["name"] != f"{split}-{i:06d}.tar" or not path.is_file() \
                or path.stat().st_size != r["shard"]["bytes"]:
            raise ValueError(f"{path}: recorded in {journal.name} as shard {i} of {r['shard']['bytes']} bytes "
                             "but missing or of another size; pass resume=false to write this split afresh")
    unrecorded = {i: p for i, p in _shard_files(out, split).items() if i >= len(shard_records)}
    # a killed run may have renamed one shard without journaling it; that one is rewritten
    orphan = unrecorded.pop(len(shard_records), None) if header is not None else None
    if unrecorded:
        raise ValueError(f"{unrecorded[min(unrecorded)]}: {len(unrecorded)} {split} shard(s) in {out} are not "
                         f"recorded in {journal.name}; they are not from this run. Pass resume=false to "
                         "replace them, or choose another output folder")
    if orphan is not None:
        orphan.unlink()
    for path in out.glob(f".{split}-*.tmp"):
        path.unlink()
    if header is None:
        atomic_write_text(journal, json.dumps(identity) + "\n")

    skipped = SkipReport()
    done: set[str] = set()
    for r in records:
        done.update(r.get("keys", []))
        for key, reason, detail in r.get("skipped", []):
            skipped.add(key, reason, detail)
            done.add(key)
    used_keys = {safe_key(k): k for r in records for k in r.get("keys", [])}
    n_journaled_skips = len(skipped.items)
    shards = [r["shard"] for r in shard_records]

    bar = None
    if progress or (progress is None and sys.stderr.isatty()):
        from tqdm import tqdm

        bar = tqdm(total=max(len(source) - len(done), 0), desc=f"shards {split} <- {source.name}", unit="img",
                   dynamic_ncols=True, file=sys.stderr)

    def flush_shard(writer: _ShardWriter | None) -> None:
        nonlocal n_journaled_skips
        shard = writer.finish() if writer is not None else None
        new_skips = [list(s) for s in skipped.items[n_journaled_skips:]]
        _append_line(journal, {"shard": shard, "keys": writer.keys if writer else [], "skipped": new_skips})
        n_journaled_skips = len(skipped.items)
        if shard is not None:
            shards.append(shard)

    writer: _ShardWriter | None = None
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
            lat, lng = (float(v) for v in item.latlng)
            if not (math.isfinite(lat) and math.isfinite(lng) and -90 <= lat <= 90):
                skipped.add(item.key, "bad_latlng", f"latlng {[lat, lng]} is not a valid [lat, lng] in degrees")
                continue
            try:
                members = {"jpg": encode_jpeg(item.image.convert("RGB"), quality=jpeg_quality),
                           "json": _record_json(item)}
            except (OSError, ValueError, TypeError) as e:
                skipped.add(item.key, "unencodable", f"{type(e).__name__}: {e}")
                continue
            size = sum(_member_bytes(len(v)) for v in members.values())
            if writer is not None and (len(writer.keys) >= max_count or _tar_size(writer.bytes + size) > max_bytes):
                flush_shard(writer)
                writer = None
            if writer is None:
                writer = _ShardWriter(out / f"{split}-{len(shards):06d}.tar")
            writer.add(key, members, item.key)
            used_keys[key] = item.key
        if writer is not None or len(skipped.items) > n_journaled_skips:
            flush_shard(writer)
            writer = None
        if bar is not None:
            bar.update(len(skipped) - n_seen_skips)
    finally:
        if writer is not None:  # an error or interrupt: the half shard never gets a final name
            writer.abort()
        if bar is not None:
            bar.close()

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
        "format": {"jpg": "upright RGB JPEG", "json": {"key": "original IMG_ID", "latlng": "[lat, lng] degrees",
                                                       "meta": "the source row's other columns"}},
    }
    atomic_write_json(out / f"{split}-manifest.json", manifest)
    return manifest
