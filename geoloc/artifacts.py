"""The artifacts layer: how every file geoloc writes survives a kill and says what made it.

* :func:`atomic_path`, :func:`atomic_write_bytes` / ``_text`` / ``_json``: a file is written under a
  temporary name beside it, fsynced and renamed, so a reader sees the old file or the new one.
  :class:`AtomicFile` is the same as an open file with an explicit :meth:`~AtomicFile.commit`, for
  writers that hand a file object on (the shard writer gives one to webdataset per shard).
* :func:`atomic_dir`: the same for a folder of files (an index, the synthetic sample).
* :class:`Journal`: an append-only JSON-lines file, each record fsynced, a torn last line (a kill in
  mid-write) dropped on read; what long jobs (shards, evaluation) resume from. :func:`complete_lines`
  does the torn-line repair for any line-oriented file (CSV rows appended batch by batch).
* :class:`ArtifactMeta`: kind, format version, fingerprint of the weights that made it, settings;
  read back with checks whose messages say how to rebuild.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Makes a rename inside ``path`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path, mode: int = 0o666) -> None:
    """Gives ``tmp`` the permissions a new file gets (mkstemp/mkdtemp make 0600/0700) and renames it to ``path``."""
    os.chmod(tmp, mode & ~_umask())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yields a temporary path beside ``path`` for a writer to fill; renamed over ``path`` on success.

    Usage: ``with atomic_path(out) as tmp: frame.to_parquet(tmp)``. On an error the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicFile:
    """A binary file written under a temporary name beside ``path`` (``.NAME.XXXX.tmp``).

    :meth:`commit` flushes and fsyncs it, renames it to ``path`` and fsyncs the folder, so the rename
    is durable before anything that records it; :meth:`abort` removes it. As a context manager it
    commits on success and aborts on an error. Only :meth:`write` is offered to the code that fills it
    (a tar stream, say), so it cannot close the file early.

    Args:
        path: the final file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")

    def write(self, data) -> int:
        return self._file.write(data)

    def commit(self) -> Path:
        """Makes the file final; returns its path. On an error the temporary file is removed."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            _publish(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        _fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Removes the temporary file; ``path`` is left as it was."""
        try:
            self._file.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to a temporary file beside ``path``, fsyncs it, then renames it over ``path``."""
    with AtomicFile(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Numpy scalars and arrays to Python, NaN and infinities to None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, replace: bool = True):
    """Yields a temporary folder beside ``path`` for a writer to fill; on success every file in it is
    fsynced and the folder renamed to ``path``.

    Args:
        path: the final folder.
        replace: an existing folder at ``path`` is replaced whole (moved aside, then deleted); False
            raises FileExistsError instead (and also when another writer's folder appears meanwhile).

    On an error the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not replace and path.exists():
        raise FileExistsError(f"{path}: exists already; remove it or write elsewhere")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path}: appeared while it was being written")
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
        try:
            _publish(tmp, path, 0o777)
        except OSError as e:  # another writer renamed its folder into place after the check above
            if not replace and e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise FileExistsError(f"{path}: appeared while it was being written") from e
            raise
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def complete_lines(path: str | Path) -> int:
    """Drops a partial last line (a kill in mid-write) from a line-oriented file; returns the bytes dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        f.seek(0)
        data = f.read()
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


class Journal:
    """An append-only JSON-lines file: what a long job resumes from.

    :meth:`append` writes one record, :meth:`extend` several, each call flushed and fsynced once;
    :meth:`read` returns every complete record, dropping a torn last line (and repairing the file, so
    the next append starts on a line of its own). A damaged line anywhere else is an error that names
    the file and line.

    Args:
        path: the journal file (created on the first append).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self, *, repair: bool = True) -> list[dict]:
        """The complete records, in order.

        Args:
            repair: truncate a torn last line from the file; False only skips it, leaving the file as it
                is (for readers of a journal that a writer may be appending to).

        Raises:
            ValueError: a line other than the last is not JSON.
        """
        if not self.path.exists():
            return []
        if repair:
            complete_lines(self.path)
        # split at b"\n" only: str.splitlines would also split at U+2028 and U+0085, which JSON strings keep
        lines = self.path.read_bytes().split(b"\n")
        lines.pop()  # b"" after the last newline, or a torn line (a kill in mid-write) when not repaired
        records = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: line {i} is not JSON ({e}); the journal is damaged: start the job "
                                 "afresh (resume=false) or in another folder") from e
        return records

    def append(self, record: dict) -> None:
        self.extend([record])

    def extend(self, records: Iterable[dict]) -> None:
        """Appends ``records`` and fsyncs once: a batch is on disk when this returns."""
        text = "".join(json.dumps(to_jsonable(r), ensure_ascii=False) + "\n" for r in records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def reset(self, header: dict | None = None) -> None:
        """Starts the journal afresh (atomically), optionally with a first record."""
        atomic_write_text(self.path, "" if header is None else json.dumps(to_jsonable(header)) + "\n")


@dataclasses.dataclass
class ArtifactMeta:
    """What an artifact is and what made it, stored beside (or inside) it as JSON.

    Attributes:
        kind: ``"index"``, ``"gallery"``, ``"features"``, ``"shards"``, ...
        format_version: the layout version readers check.
        fingerprint: of the weights or inputs that made it (an artifact is only valid for those), or None.
        settings: how it was made (clustering, transform, source, ...).
        created: ISO time of writing.
    """

    kind: str
    format_version: int
    fingerprint: str | None = None
    settings: dict = dataclasses.field(default_factory=dict)
    created: str = dataclasses.field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return to_jsonable(dataclasses.asdict(self))

    def write(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict, *, source: str | Path, kind: str, format_version: int,
                  fingerprint: str | None = None, rebuild: str = "") -> ArtifactMeta:
        """Checks a stored meta; ValueError naming ``source`` and how to ``rebuild`` when it does not fit."""
        how = f"; rebuild it ({rebuild})" if rebuild else ""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: not an artifact description{how}")
        if d.get("kind", kind) != kind:
            raise ValueError(f"{source}: holds a {d.get('kind')!r} artifact, not {kind!r}")
        if d.get("format_version") != format_version:
            raise ValueError(f"{source}: {kind} format {d.get('format_version')}, this geoloc reads {format_version}"
                             f"{how}")
        if fingerprint is not None and d.get("fingerprint") != fingerprint:
            raise ValueError(f"{source}: made with other weights (fingerprint {d.get('fingerprint')}, these are "
                             f"{fingerprint}){how}")
        fields = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in fields}
        known.setdefault("kind", kind)
        known["settings"] = {**{k: v for k, v in d.items() if k not in fields}, **dict(known.get("settings") or {})}
        return cls(**known)

    @classmethod
    def read(cls, path: str | Path, **expect) -> ArtifactMeta:
        """Reads a meta JSON file written by :meth:`write` and checks it (see :meth:`from_dict`)."""
        path = Path(path)
        if not path.is_file():
            how = f"; rebuild it ({expect['rebuild']})" if expect.get("rebuild") else ""
            raise FileNotFoundError(f"{path}: missing{how}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not JSON ({e}); the artifact is damaged") from e
        return cls.from_dict(d, source=path, **expect)
