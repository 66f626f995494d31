"""Reading shards back in a fixed order, as an :class:`~geoloc.data.readers.ItemSource` (evaluation)."""

from __future__ import annotations

import itertools
import json
import math
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path

from geoloc.artifacts import Journal
from geoloc.data.images import DEFAULT_MAX_PIXELS, ImageError, SkipReport, decode_image
from geoloc.data.readers import Item, check_part
from geoloc.data.shards.writer import _SHARD_NAME, _shard_files, safe_key

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
                                        f"`python -m geoloc shards ... out={text} split={split}`)")
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
                             "`python -m geoloc shards` with the same out= to finish it")
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
        records = Journal(path).read(repair=False)
    except (OSError, ValueError):
        return {}
    if not records or not isinstance(records[0], dict) or records[0].get("kind") != "header":
        return {}
    shards: dict[str, dict] = {}
    for record in records[1:]:
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


def parse_record(data: bytes | None, where: str) -> dict:
    """A sample's json record, checked; ValueError saying what is wrong.

    Args:
        data: the ``.json`` member (None when the sample has none).
        where: ``shard/key``, named in errors.

    Returns:
        ``{"key": str, "latlng": (lat, lng), "meta": dict, "labels": {head: int} | None}``. ``labels``
        are the evidence labels stored at sharding time (``-1`` masked); None when the record has none
        (written before shards carried labels) or they were computed with another
        :data:`~geoloc.evidence.labels.EVIDENCE_VERSION`: then compute them from ``latlng``.
    """
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
    labels = rec.get("labels")
    if labels is not None:
        if not (isinstance(labels, dict) and all(type(v) is int for v in labels.values())):
            raise ValueError(f"{where}.json: labels {str(labels)[:100]} are not {{head: class index}}")
        from geoloc.evidence.labels import EVIDENCE_VERSION

        if rec.get("evidence_version") != EVIDENCE_VERSION:
            labels = None
    return {"key": key, "latlng": (lat, lng), "meta": meta if isinstance(meta, dict) else {"meta": meta},
            "labels": labels}


def _peek_key(data: bytes | None) -> str | None:
    """A sample record's key without checking the rest (None when there is none to read)."""
    try:
        return str(json.loads(data)["key"])
    except (ValueError, KeyError, TypeError):
        return None


def _parse_record(data: bytes | None, where: str) -> tuple[str, tuple[float, float], dict]:
    """Key, ``(lat, lng)`` and metadata of a sample's json (:func:`parse_record` without the labels)."""
    rec = parse_record(data, where)
    return rec["key"], rec["latlng"], rec["meta"]


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

    Each item's ``meta`` is the source row's other columns, plus ``meta["labels"]``, the evidence labels
    ``{head: class index}`` stored at sharding time, when the record holds labels of the current
    evidence label version (see :func:`parse_record`).

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

    def iter_items(self, skipped: SkipReport, *, exclude: set[str] | frozenset = frozenset(),
                   part: tuple[int, int] = (0, 1)) -> Iterator[Item]:
        """Yields the stored photos; unreadable samples are counted in ``skipped``, never fatal.

        Args:
            skipped: collects samples that could not be used (image reasons as in
                :func:`~geoloc.data.images.decode_image`, ``bad_record`` for a missing or invalid member,
                ``corrupt_shard`` for samples a damaged shard lost) and, with ``replay_skipped``, the
                photos the writer skipped.
            exclude: image ids to pass over silently (done in an earlier, resumed run).
            part: ``(i, n)``: only the samples whose position in the reading order is ``i`` modulo ``n`` (one
                process's share of a pass over several; the others are not decoded). The first part also
                reports the writer's skipped photos and the samples damaged shards lost, so the parts together
                report each once.

        Raises:
            ValueError: an image id is in two shards or twice in one (before anything is yielded).
        """
        i, n = check_part(part)
        self._check_ids_unique()
        if i == 0:
            for key, reason, detail in self._write_skips():
                if key not in exclude:
                    skipped.add(key, reason, f"when sharding: {detail}")
        position = itertools.count()
        for path in self._layout.paths:
            yield from self._iter_shard(path, skipped, exclude, position, (i, n))

    def _iter_shard(self, path: Path, skipped: SkipReport, exclude, position, part) -> Iterator[Item]:
        errors: list[str] = []
        seen: list[str] = []
        i, n = part
        for wkey, group in _tar_groups(path, errors):
            where = f"{path}/{wkey}"
            row = next(position)
            if row % n != i:  # another process's sample: only its key is noted (for the lost count)
                rec = _peek_key(group.get("json"))
                seen.append(rec if rec is not None else where)
                continue
            try:
                rec = parse_record(group.get("json"), where)
            except ValueError as e:
                seen.append(where)
                skipped.add(where, "bad_record", str(e))
                continue
            key, latlng, meta = rec["key"], rec["latlng"], rec["meta"]
            if rec["labels"] is not None:
                meta = {**meta, "labels": rec["labels"]}
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
            yield Item(key, latlng, image, meta, index=row)
        if i == 0:
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
