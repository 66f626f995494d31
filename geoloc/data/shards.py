"""Webdataset shards: the offline artifact that training streams and evaluation can read.

A shard directory written by :func:`write_shards` holds, for one ``split``:

* ``{split}-000000.tar``, ``{split}-000001.tar``, ...: webdataset tar shards. Each sample is two members,
  ``KEY.jpg`` (the photo as an upright RGB JPEG) and ``KEY.json``
  ``{"key": IMG_ID, "latlng": [lat, lng], "meta": {...}}``. ``KEY`` is :func:`safe_key` of the image id
  (webdataset splits member names at the first dot, so keys carry no dots or slashes); the original
  ``IMG_ID`` is the ``key`` in the json. Shards are byte-for-byte reproducible (fixed mtime and owner).
* ``{split}-manifest.json``: counts, per-shard ``n_samples`` and ``sha256``, every skipped photo with its
  reason, the source's name, ``synthetic`` flag and notes.
* ``{split}-progress.jsonl``: the journal a killed or extended run continues from: a header line, then one
  line per finished shard with the image ids it holds and the photos skipped before it.

Readers: :class:`ShardDataset` (an :class:`~geoloc.data.readers.ItemSource`, deterministic order, for
evaluation) and :func:`make_webdataset` (the shuffled, node- and worker-split training stream).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tarfile
import tempfile
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from geoloc.data.images import DEFAULT_MAX_PIXELS, ImageError, SkipReport, decode_image, encode_jpeg
from geoloc.data.readers import Item, ItemSource
from geoloc.io import atomic_write_json, atomic_write_text, to_jsonable

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
    """JSON for what :func:`geoloc.io.to_jsonable` leaves: pandas' missing values to null, the rest to str."""
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


# ----------------------------------------------------------------------------------------------- reading


def resolve_shards(urls: str | Path | Sequence[str | Path], split: str | None = None) -> list[Path]:
    """The shard files ``urls`` names, in order.

    Args:
        urls: a directory (all ``{split}-NNNNNN.tar`` in it, sorted; ``split`` required), a brace pattern
            such as ``"dir/test-{000000..000003}.tar"``, one file, or a list of files.
        split: the split prefix, for a directory.

    Raises:
        FileNotFoundError: a named file, or every shard of a directory, is missing.
        ValueError: a directory without ``split``, or a shard named twice (as absolute paths: a repeated
            list entry or brace alternative, or two spellings of one file), whose photos would count twice.
    """
    if isinstance(urls, (str, Path)):
        text = str(urls)
        if Path(text).is_dir():
            if not split:
                raise ValueError(f"{text}: is a directory; say which split to read (split=test, say)")
            found = _shard_files(Path(text), split)
            manifest = Path(text) / f"{split}-manifest.json"
            if not found and manifest.is_file() and not json.loads(manifest.read_text(encoding="utf-8"))["shards"]:
                return []  # a finished run that wrote nothing (every photo skipped)
            if not found:
                raise FileNotFoundError(f"{text}: holds no {split}-NNNNNN.tar shards (write them with "
                                        f"`python -m geoloc.shards ... out={text} split={split}`)")
            return [found[i] for i in sorted(found)]
        if "{" in text:
            import braceexpand

            paths = [Path(p) for p in braceexpand.braceexpand(text)]
        else:
            paths = [Path(text)]
    else:
        paths = [Path(p) for p in urls]
    if not paths:
        raise FileNotFoundError(f"{urls!r}: names no shard files")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shard files not found, first {missing[0]} "
                                f"(from {str(urls)[:200]})")
    _refuse_repeats(paths, urls)
    return paths


def _refuse_repeats(paths: list[Path], urls) -> None:
    """ValueError when a shard is named twice (compared as absolute paths): its photos would count twice."""
    first: dict[Path, Path] = {}
    for p in paths:
        a = p.resolve()
        if a in first:
            n = sum(1 for q in paths if q.resolve() == a)
            spelled = f" (as {first[a]} and {p})" if first[a] != p else ""
            source = str(urls)[:200] if isinstance(urls, (str, Path)) else f"a list of {len(paths)} shard files"
            raise ValueError(f"{a}: listed {n} times in the shards to read{spelled}, from {source}; its "
                             "photos would be read and scored twice. List each shard once")
        first[a] = p


class _Layout:
    """Resolved shard files and what the manifest and journal beside them say about them."""

    def __init__(self, urls, split: str | None):
        self.paths = resolve_shards(urls, split)
        self.is_dir = isinstance(urls, (str, Path)) and Path(str(urls)).is_dir()
        self.manifest: dict | None = None
        self.manifest_path: Path | None = None
        self.expected: dict[str, int] = {}  # shard name -> n_samples per the manifest
        self.complete = False  # the files are every shard of the manifest's split
        self._journals: dict[tuple[Path, str], dict[str, dict]] = {}
        if self.is_dir:
            folder, prefix = Path(str(urls)).resolve(), split
        else:
            parents = {p.parent.resolve() for p in self.paths}
            splits = {m["split"] if (m := _SHARD_NAME.match(p.name)) else None for p in self.paths}
            if len(parents) != 1 or len(splits) != 1 or None in splits:
                return
            folder, prefix = parents.pop(), splits.pop()
            if split is not None and prefix != split:
                return
        path = folder / f"{prefix}-manifest.json"
        if not path.is_file():
            return
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot be read as JSON ({e})") from e
        listed = {s["name"]: int(s["n_samples"]) for s in manifest.get("shards", [])}
        names = [p.name for p in self.paths]
        stray = [n for n in names if n not in listed]
        if stray:
            raise ValueError(f"{folder / stray[0]}: not listed in {path.name} ({len(stray)} such shard(s)); the "
                             "folder mixes shards of different runs or a run was interrupted. Rerun "
                             "`python -m geoloc.shards` with the same out= to finish it")
        if self.is_dir and set(names) != set(listed):
            absent = sorted(set(listed) - set(names))
            raise ValueError(f"{folder / absent[0]}: listed in {path.name} but missing ({len(absent)} shard(s))")
        self.manifest, self.manifest_path, self.expected = manifest, path, listed
        self.complete = set(names) == set(listed)

    def journal_keys(self, shard_name: str) -> list[str] | None:
        """The image ids the progress journal beside the manifest records for a shard, if it has a journal."""
        if self.manifest_path is None:
            return None
        prefix = self.manifest_path.name[: -len("-manifest.json")]
        record = self._journal(self.manifest_path.parent, prefix).get(shard_name)
        return None if record is None else list(record["keys"])

    def shard_keys(self, path: Path) -> tuple[list[str], bool]:
        """The keys of a shard's samples in stored order, and whether they are image ids.

        They are the image ids the ``{split}-progress.jsonl`` beside the shard records for it when the
        journal records a file of this very size; otherwise the webdataset keys a scan of the tar's
        member headers finds (:func:`_scan_keys`).
        """
        m = _SHARD_NAME.match(path.name)
        if m:
            record = self._journal(path.parent.resolve(), m["split"]).get(path.name)
            try:
                if record is not None and record["shard"].get("bytes") == path.stat().st_size:
                    return list(record["keys"]), True
            except OSError:
                pass
        return _scan_keys(path), False

    def _journal(self, folder: Path, prefix: str) -> dict[str, dict]:
        key = (folder, prefix)
        if key not in self._journals:
            self._journals[key] = _journal_shards(folder / f"{prefix}-progress.jsonl")
        return self._journals[key]


def _journal_shards(path: Path) -> dict[str, dict]:
    """``{shard name: record}`` of a progress journal, read without repairing it (a writer may be
    appending); {} when it is absent or damaged. A torn last line is ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    shards: dict[str, dict] = {}
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            return {}
        if i == 0:
            if not isinstance(record, dict) or record.get("kind") != "header":
                return {}
            continue
        shard = record.get("shard") if isinstance(record, dict) else None
        if isinstance(shard, dict) and isinstance(shard.get("name"), str) and isinstance(record.get("keys"), list):
            shards[shard["name"]] = record
    return shards


def _scan_keys(path: Path) -> list[str]:
    """Webdataset keys of a tar's samples (consecutive members with one key), from the member headers
    alone: an uncompressed tar is read by seeking from header to header. A damaged tar gives the keys
    before the damage."""
    keys: list[str] = []
    try:
        with tarfile.open(path, mode="r:*") as tf:
            for member in tf:
                if member.isreg():
                    key = member.name.partition(".")[0]
                    if not keys or keys[-1] != key:
                        keys.append(key)
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        pass
    return keys


def _stored_id(path: Path, wkey: str) -> str:
    """The image id in the json of the sample with webdataset key ``wkey`` (``wkey`` if it has none)."""
    for key, group in _tar_groups(path, []):
        if key == wkey and "json" in group:
            try:
                return str(json.loads(group["json"])["key"])
            except (ValueError, KeyError, TypeError):
                break
    return wkey


def _tar_groups(path: Path, errors: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` of the consecutive members of a tar; a read error ends it into ``errors``."""
    key, group = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                if not member.isreg():
                    continue
                base, _, ext = member.name.partition(".")
                data = tf.extractfile(member).read()
                if base != key and group:
                    yield key, group
                    group = {}
                key = base
                group[ext.lower()] = data
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        errors.append(f"{type(e).__name__}: {e}")
    if group:
        yield key, group


def _parse_record(data: bytes | None, where: str) -> tuple[str, tuple[float, float], dict]:
    """Key, ``(lat, lng)`` and metadata of a sample's json; ValueError saying what is wrong."""
    if data is None:
        raise ValueError(f"{where}: no .json member")
    try:
        rec = json.loads(data)
        key, (lat, lng) = str(rec["key"]), rec["latlng"]
        lat, lng = float(lat), float(lng)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}.json: expected {{'key', 'latlng': [lat, lng]}} ({type(e).__name__}: {e})") from e
    if not (math.isfinite(lat) and math.isfinite(lng) and -90 <= lat <= 90):
        raise ValueError(f"{where}.json: latlng {[lat, lng]} is not a valid [lat, lng] in degrees")
    meta = rec.get("meta") or {}
    return key, (lat, lng), meta if isinstance(meta, dict) else {"meta": meta}


class ShardDataset:
    """Shards written by :func:`write_shards`, read back as an :class:`~geoloc.data.readers.ItemSource`.

    Samples come in a fixed order (shards in order, samples as stored); this is the evaluation reader.
    Nothing is read until the dataset is used. When the ``{split}-manifest.json`` beside the shards
    covers them, it gives ``len``, ``synthetic`` and ``notes``, shards it does not list are an error, and
    samples a damaged shard fails to yield are counted as skipped (reason ``corrupt_shard``).

    Every photo is read once, so that none is scored twice: a shard named twice (compared as absolute
    paths) is a ValueError when the shards are resolved (first use), and an image id in two shards, or
    twice in one, is a ValueError before the first item is yielded. The ids come from the progress
    journal beside each shard where it records that very file (same name and size), else from one scan
    of the tar's member headers (webdataset keys, :func:`safe_key` of the ids; cheap for the
    uncompressed tars :func:`write_shards` writes).

    Args:
        urls: a directory (with ``split``), a brace pattern ``"dir/test-{000000..000003}.tar"``, one shard,
            or a list of shards.
        split: the split to read from a directory.
        name: dataset name used in reports.
        decode: decode the photos; False yields ``image=None`` (fast, for coordinate-only baselines).
        max_pixels: larger photos are skipped as decompression bombs.
        replay_skipped: when reading a whole split, report the photos the shard writer skipped (same
            keys and reasons) so an evaluation counts them, as it would reading the original files.
    """

    def __init__(self, urls: str | Path | Sequence[str | Path], *, split: str | None = None, name: str = "shards",
                 decode: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS, replay_skipped: bool = True):
        self.urls = urls if isinstance(urls, (str, Path)) else list(urls)
        self.split = split
        self.name = name
        self.decode = decode
        self.max_pixels = max_pixels
        self.replay_skipped = replay_skipped
        self.source = str(urls) if isinstance(urls, (str, Path)) else f"{len(self.urls)} shard file(s)"
        self._ids_checked = False

    def __repr__(self) -> str:
        return f"ShardDataset({self.source!r}, split={self.split!r})"

    @cached_property
    def _layout(self) -> _Layout:
        return _Layout(self.urls, self.split)

    @property
    def shards(self) -> list[Path]:
        """The shard files, in reading order."""
        return list(self._layout.paths)

    @property
    def manifest(self) -> dict | None:
        """The manifest covering these shards, or None."""
        return self._layout.manifest

    @property
    def synthetic(self) -> bool:
        return bool((self.manifest or {}).get("synthetic", False))

    @property
    def notes(self) -> list[str]:
        if self.manifest is None:
            return ["shards read without a manifest: sample counts were not checked"]
        return list(self.manifest.get("notes", []))

    def _write_skips(self) -> list[tuple[str, str, str]]:
        if not (self.replay_skipped and self._layout.complete):
            return []
        return [(e["key"], e["reason"], e.get("detail", "")) for e in self.manifest["skipped"]["examples"]]

    @cached_property
    def _shard_keys(self) -> list[tuple[list[str], bool]]:
        """Per shard, in reading order: its samples' keys and whether they are image ids (else webdataset
        keys), as :meth:`_Layout.shard_keys` gives them."""
        return [self._layout.shard_keys(p) for p in self._layout.paths]

    @cached_property
    def _n_samples(self) -> int:
        layout = self._layout
        if layout.manifest is not None:
            return sum(layout.expected[p.name] for p in layout.paths)
        return sum(len(set(keys)) for keys, _ in self._shard_keys)

    def _check_ids_unique(self) -> None:
        """ValueError naming the first image id that is in two shards (or twice in one)."""
        if self._ids_checked:
            return
        first_shard: dict[str, int] = {}  # webdataset key -> index of the first shard holding it
        repeat, n_repeats = None, 0
        for i, (keys, are_ids) in enumerate(self._shard_keys):
            for key in keys:
                wkey = safe_key(key) if are_ids else key
                if wkey not in first_shard:
                    first_shard[wkey] = i
                    continue
                n_repeats += 1
                if repeat is None:
                    repeat = (key, are_ids, first_shard[wkey], i)
        if repeat is None:
            self._ids_checked = True
            return
        key, are_ids, j, i = repeat
        paths = self._layout.paths
        img_id = key if are_ids else _stored_id(paths[i], key)
        named = f"image id {img_id!r}" + (f" (webdataset key {key!r})" if img_id != key else "")
        where = f"twice in {paths[i]}" if i == j else f"in {paths[j]} and in {paths[i]}"
        raise ValueError(f"{named} is {where} ({n_repeats} repeated sample(s) in all); each photo must be read "
                         "once, or it is scored twice. The shards overlap (copies, or runs over the same photos): "
                         "read one set of them, or write the shards again from a single source")

    def __len__(self) -> int:
        """Samples in the shards, plus the writer's skipped photos when those are replayed."""
        return self._n_samples + len(self._write_skips())

    def iter_items(self, skipped: SkipReport, *, exclude: set[str] | frozenset = frozenset()) -> Iterator[Item]:
        """Yields the stored photos; unreadable samples are counted in ``skipped``, never fatal.

        Args:
            skipped: collects samples that could not be used (image reasons as in
                :func:`~geoloc.data.images.decode_image`, ``bad_record`` for a missing or invalid member,
                ``corrupt_shard`` for samples a damaged shard lost) and, with ``replay_skipped``, the
                photos the writer skipped.
            exclude: image ids to pass over silently (done in an earlier, resumed run).

        Raises:
            ValueError: an image id is in two shards or twice in one (before anything is yielded).
        """
        self._check_ids_unique()
        for key, reason, detail in self._write_skips():
            if key not in exclude:
                skipped.add(key, reason, f"when sharding: {detail}")
        for path in self._layout.paths:
            yield from self._iter_shard(path, skipped, exclude)

    def _iter_shard(self, path: Path, skipped: SkipReport, exclude) -> Iterator[Item]:
        errors: list[str] = []
        seen: list[str] = []
        for wkey, group in _tar_groups(path, errors):
            where = f"{path}/{wkey}"
            try:
                key, latlng, meta = _parse_record(group.get("json"), where)
            except ValueError as e:
                seen.append(where)
                skipped.add(where, "bad_record", str(e))
                continue
            seen.append(key)
            if key in exclude:
                continue
            image = None
            if self.decode:
                if "jpg" not in group:
                    skipped.add(key, "bad_record", f"{where}: no .jpg member")
                    continue
                try:
                    image = decode_image(group["jpg"], name=f"{where}.jpg", max_pixels=self.max_pixels)
                except ImageError as e:
                    skipped.add(key, e.reason, f"{where}.jpg: {e.detail}")
                    continue
            yield Item(key, latlng, image, meta)
        self._count_lost(path, seen, errors, skipped, exclude)

    def _count_lost(self, path: Path, seen: list[str], errors: list[str], skipped: SkipReport, exclude) -> None:
        """Counts the samples a damaged shard did not yield (known from the manifest), by key if possible."""
        expected = self._layout.expected.get(path.name)
        why = errors[0] if errors else "the tar ends early"
        if expected is None:
            if errors:
                skipped.add(str(path), "corrupt_shard", f"{why}; samples after the damage are lost (no manifest "
                            "says how many)")
            return
        n_lost = expected - len(seen)
        if n_lost <= 0:
            return
        keys = self._layout.journal_keys(path.name)
        detail = f"{path}: {why}; {n_lost} of {expected} samples unreadable"
        if keys is not None:
            got = set(seen)
            for key in keys:
                if key not in got and key not in exclude:
                    skipped.add(key, "corrupt_shard", detail)
        else:
            for i in range(n_lost):
                skipped.add(f"{path}#lost{i}", "corrupt_shard", detail)


# ---------------------------------------------------------------------------------------------- training


def scene_label(value) -> int:
    """A Places365 ``S3_Label`` value (0 indoor, 1 natural, 2 urban) as an int; -1 when missing or invalid."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return -1
    return int(v) if v in (0.0, 1.0, 2.0) else -1


class _DecodeSample:
    """Webdataset map stage: a raw sample dict to ``(image_or_transformed, latlng (2,) float32, key)``, and
    with ``scene`` the sample's :func:`scene_label` as a fourth element. With ``mark_bad`` a sample whose
    record or photo is unusable becomes ``{"bad": reason, "key": ...}`` (what the training collate counts
    and reports) instead of an exception for the handler."""

    def __init__(self, transform: Callable | None, max_pixels: int, scene: bool = False, mark_bad: bool = False):
        self.transform = transform
        self.max_pixels = max_pixels
        self.scene = scene
        self.mark_bad = mark_bad

    def __call__(self, sample: dict):
        if not self.mark_bad:
            return self._decode(sample)
        try:
            return self._decode(sample)
        except (ImageError, ValueError) as e:
            try:
                key = str(json.loads(sample["json"])["key"])
            except (KeyError, TypeError, ValueError):
                key = f"{sample.get('__url__', '?')}/{sample.get('__key__', '?')}"
            return {"bad": e.reason if isinstance(e, ImageError) else "bad_record", "key": key}

    def _decode(self, sample: dict):
        import torch

        where = f"{sample.get('__url__', '?')}/{sample.get('__key__', '?')}"
        key, latlng, meta = _parse_record(sample.get("json"), where)
        if "jpg" not in sample:
            raise ValueError(f"{where}: no .jpg member")
        image = decode_image(sample["jpg"], name=f"{where}.jpg", max_pixels=self.max_pixels)
        x = self.transform(image) if self.transform is not None else image
        if self.scene:
            return x, torch.tensor(latlng, dtype=torch.float32), key, scene_label(meta.get("S3_Label"))
        return x, torch.tensor(latlng, dtype=torch.float32), key


class SkipCounter:
    """A webdataset ``handler`` that counts and warns about a bad sample or shard, then continues.

    Unlike ``webdataset.warn_and_continue`` it does not sleep half a second per error. Counts are per
    process: with DataLoader workers each worker counts (and warns about) its own skips.

    Attributes:
        counts: skips by reason (an :class:`ImageError` reason, or the exception's type name).
    """

    def __init__(self, warn: bool = True):
        self.counts: Counter = Counter()
        self.warn = warn

    def __call__(self, exn: Exception) -> bool:
        reason = exn.reason if isinstance(exn, ImageError) else type(exn).__name__
        self.counts[reason] += 1
        if self.warn:
            warnings.warn(f"skipped a shard sample ({reason}): {exn}", stacklevel=2)
        return True


def make_webdataset(urls: str | Path | Sequence[str | Path], *, split: str | None = None, shuffle: int = 1000,
                    seed: int = 0, resampled: bool = False, transform: Callable | None = None,
                    epoch_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                    handler: Callable[[Exception], bool] | None = None, empty_check: bool = True,
                    scene: bool = False, mark_bad: bool = False):
    """The training stream over shards: a ``webdataset.WebDataset`` pipeline.

    Stages: shard list -> ``wds.split_by_node`` -> ``wds.split_by_worker`` -> seeded shard shuffle ->
    tar reading -> seeded sample shuffle buffer (``shuffle`` samples) -> decode. Each element is a tuple
    ``(x, latlng, key)``: ``x`` is the upright RGB ``PIL.Image`` or ``transform(image)``, ``latlng`` a
    float32 tensor ``(2,)`` ``[lat, lng]`` in degrees, ``key`` the original image id; with ``scene`` a
    fourth element, the ``S3_Label`` of the source row (-1 when it has none). Give a ``transform``
    returning tensors to use torch's default collate.

    Splitting (webdataset 1.0.2): shards are dealt out *before* shuffling, in the order given: rank ``r``
    of ``W`` (``RANK``/``WORLD_SIZE`` from the environment if both are set, else ``torch.distributed`` if
    initialized) takes shards ``r, r+W, ...``; DataLoader worker ``w`` of ``K`` then takes every ``K``-th
    of those. So every (rank, worker) reads a fixed, disjoint set of shards every epoch, shuffled within
    itself; with ``resampled=True`` each worker instead draws shards at random with replacement (not
    reproducible: webdataset seeds it from the OS), an endless stream.

    Uneven splits: the stream length of a rank is the number of samples in its shards. When the shards do
    not divide evenly over ``W * K`` (or differ in size, the last one always does), ranks get different
    numbers of batches and DDP hangs or drops work at the end of an epoch; a (rank, worker) with no shard
    at all raises webdataset's ``ValueError: No samples found in dataset; perhaps you have fewer shards
    than workers`` (``empty_check=False`` makes it yield nothing instead). For DDP, give every worker the
    same fixed epoch: ``epoch_size = samples_per_epoch // (W * K)`` (samples per worker; the pipeline
    repeats its shards, or with ``resampled=True`` draws more, until it has yielded that many) and iterate
    a fixed number of batches per rank. Use ``persistent_workers=True`` in the DataLoader for a new
    shuffle order every epoch (non-persistent workers restart the seeded shuffles each epoch); or rebuild
    the stream with ``seed=base_seed + epoch``.

    Args:
        urls: as for :func:`resolve_shards` (a directory needs ``split``).
        split: the split to read from a directory.
        shuffle: sample shuffle buffer size; 0 keeps the stored order within a shard.
        seed: seed of the shard and sample shuffles (the same in every rank and worker, which read
            different shards).
        resampled: draw shards with replacement forever (then set ``epoch_size``).
        transform: applied to the PIL image in the worker.
        epoch_size: samples per worker per epoch (``with_epoch``); None ends after one pass.
        max_pixels: larger photos are skipped as decompression bombs.
        handler: called with each exception from a bad shard or sample; returns True to skip it. Defaults
            to a :class:`SkipCounter`, available as the returned pipeline's ``skip_counter``.
        empty_check: raise when a worker's stream turns out empty (webdataset's check).
        scene: also yield each sample's scene label (for the ``scene`` evidence head).
        mark_bad: yield ``{"bad": reason, "key": id}`` for a sample whose record or photo is unusable,
            instead of passing it to ``handler`` (the training collate drops, counts and reports these).

    Returns:
        An iterable ``webdataset.WebDataset``, usable as a torch ``IterableDataset``.

    Raises:
        ValueError: a shard is named twice (see :func:`resolve_shards`). Image ids are not checked across
            shards here (:class:`ShardDataset` does, for evaluation).
    """
    import webdataset as wds

    paths = [str(p) for p in resolve_shards(urls, split)]
    if not paths:
        raise ValueError(f"{urls}: the manifest lists no shards (every photo was skipped); nothing to train on")
    counter = SkipCounter() if handler is None else None
    handler = handler or counter
    ds = wds.WebDataset(paths, handler=handler, resampled=resampled,
                        shardshuffle=False if resampled else len(paths), detshuffle=True, seed=seed,
                        nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                        empty_check=empty_check)
    if shuffle and shuffle > 1:
        ds = ds.compose(wds.detshuffle(int(shuffle), initial=min(int(shuffle), 100), seed=seed))
    ds = ds.map(_DecodeSample(transform, max_pixels, scene, mark_bad), handler=handler)
    if epoch_size is not None:
        ds = ds.with_epoch(int(epoch_size))
    ds.skip_counter = counter
    return ds
