"""Readers for the geolocation benchmarks in the formats they are distributed in.

Every reader returns a :class:`GeoDataset`: a validated table (one row per photo: ``key``, ``lat``,
``lng``, an image ``path`` when there are images, and the dataset's metadata columns) whose
:meth:`GeoDataset.iter_items` yields decoded RGB photos and skips, with a counted reason, the rows
whose image is missing, unreadable, truncated or a decompression bomb.

Formats:

* Im2GPS3k / Im2GPS: ``IMG_ID,AUTHOR,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,...`` plus a
  folder of images named by ``IMG_ID``. Old copies of the Im2GPS3k file carry a ``LON,LAT`` header over
  lat, lon values; :func:`read_im2gps` detects that from the value ranges and explains what it did.
* YFCC4k: ``yfcc4k_places365.csv`` with numbered header columns among which ``IMG_ID``, ``LON``, ``LAT``.
* A plain CSV of ``path,lat,lng`` (``lon`` accepted for ``lng``), paths relative to the CSV's folder.
* The embedded synthetic sample (:mod:`geoloc.data.sample`), in the Im2GPS3k style with a ``split``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from PIL import Image

from geoloc.data.images import DEFAULT_MAX_PIXELS, ImageError, SkipReport, decode_image
from geoloc.geo import validate_latlng

#: Columns every GeoDataset table has; the rest is metadata carried along.
CORE_COLUMNS = ("key", "lat", "lng", "path")


@dataclass
class Item:
    """One geotagged photo.

    Attributes:
        key: the dataset's image id (``IMG_ID``).
        latlng: ``(lat, lng)`` in degrees.
        image: upright RGB image, or None for a coordinates-only dataset.
        meta: the row's other columns.
        index: the row's position in the source's reading order (what puts the items of a pass split over
            several processes back in order); -1 when unknown.
    """

    key: str
    latlng: tuple[float, float]
    image: Image.Image | None
    meta: dict = field(default_factory=dict)
    index: int = -1


class ItemSource(Protocol):
    """What :mod:`evaluate` and the shard writer read: anything that yields :class:`Item` s."""

    name: str
    synthetic: bool

    def __len__(self) -> int: ...

    def iter_items(self, skipped: SkipReport, *, exclude: set[str] | frozenset = frozenset(),
                   part: tuple[int, int] = (0, 1)) -> Iterator[Item]: ...


def check_part(part: tuple[int, int]) -> tuple[int, int]:
    """``(i, n)``: the ``i``-th of ``n`` disjoint shares of a source (rows whose index is ``i`` modulo ``n``)."""
    i, n = (int(v) for v in part)
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"part must be (i, n) with 0 <= i < n, got {tuple(part)}")
    return i, n


class GeoDataset:
    """A benchmark or training set read from a table.

    Args:
        table: DataFrame with ``key``, ``lat``, ``lng``, ``path`` (None when there is no image) and
            any metadata columns. Coordinates must already be validated.
        name: short dataset name used in reports.
        source: the file it was read from.
        synthetic: True for generated (non-photo) data; reports say so.
        notes: things the reader had to decide (for example a swapped legacy header), shown in reports.
        max_pixels: larger images are skipped as decompression bombs.
    """

    def __init__(self, table: pd.DataFrame, *, name: str, source: str | Path, synthetic: bool = False,
                 notes: list[str] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        missing = [c for c in CORE_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"{source}: dataset table lacks column(s) {missing}")
        self.table = table.reset_index(drop=True)
        self.name = name
        self.source = str(source)
        self.synthetic = synthetic
        self.notes = list(notes or [])
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        tag = ", synthetic" if self.synthetic else ""
        return f"GeoDataset({self.name!r}, n={len(self)}, source={self.source!r}{tag})"

    @property
    def latlng(self) -> np.ndarray:
        """``(N, 2)`` ``[lat, lng]`` in degrees."""
        return self.table[["lat", "lng"]].to_numpy(dtype=np.float64)

    @property
    def has_images(self) -> bool:
        return bool(self.table["path"].notna().any())

    def subset(self, mask) -> GeoDataset:
        """A new dataset of the rows where ``mask`` is true."""
        return GeoDataset(self.table[np.asarray(mask, dtype=bool)], name=self.name, source=self.source,
                          synthetic=self.synthetic, notes=self.notes, max_pixels=self.max_pixels)

    def iter_items(self, skipped: SkipReport, *, exclude: set[str] | frozenset = frozenset(),
                   part: tuple[int, int] = (0, 1)) -> Iterator[Item]:
        """Yields the rows as items, decoding images; bad images are counted in ``skipped``.

        Args:
            skipped: collects the rows skipped and why.
            exclude: keys to pass over silently (already done in an earlier, resumed run).
            part: ``(i, n)``: only the rows whose position is ``i`` modulo ``n`` (one process's share of a
                pass over several; the others are not decoded).
        """
        i, n = check_part(part)
        meta_cols = [c for c in self.table.columns if c not in CORE_COLUMNS]
        keys = self.table["key"].to_numpy()
        lat = self.table["lat"].to_numpy()
        lng = self.table["lng"].to_numpy()
        paths = self.table["path"].to_numpy()
        metas = self.table[meta_cols].to_dict("records") if meta_cols else [{}] * len(keys)
        for row, (key, la, ln, path, meta) in enumerate(zip(keys, lat, lng, paths, metas)):
            if row % n != i or key in exclude:
                continue
            image = None
            if path is not None and path == path:
                try:
                    image = decode_image(Path(path), max_pixels=self.max_pixels)
                except ImageError as e:
                    skipped.add(key, e.reason, e.detail)
                    continue
            yield Item(str(key), (float(la), float(ln)), image, meta, index=row)


def _read_csv(path: Path) -> pd.DataFrame:
    """The rows of a CSV with a header, indexed by file line; errors name the file and what is wrong.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the path is a directory, the file is empty, has a header but no rows, or is not CSV.
    """
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a CSV file; name the CSV file in it")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (point data.root at the folder that holds it)")
    try:
        df = pd.read_csv(path, dtype={"IMG_ID": str, "AUTHOR": str}, keep_default_na=False,
                         na_values=[""], low_memory=False)
    except pd.errors.EmptyDataError as e:
        raise ValueError(f"{path}: is empty (no header, no rows); expected a header line and one row per "
                         "photo") from e
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be parsed as CSV: {e}") from e
    if df.empty:
        raise ValueError(f"{path}: has a header but no rows (columns {[str(c) for c in df.columns][:12]}); "
                         "expected one row per photo")
    df.index = pd.RangeIndex(2, len(df) + 2)  # file line of each row (line 1 is the header)
    return df


def _numbered_columns(df: pd.DataFrame) -> list[str]:
    """Header names that are plain numbers (``0``, ``2``, ``3``, ...), as in YFCC4k as distributed."""
    return [str(c) for c in df.columns if re.fullmatch(r"[0-9]+", str(c).strip())]


def _require(df: pd.DataFrame, cols: list[str], path: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(df.columns)[:20]}")


def _coordinates(df: pd.DataFrame, lat_col: str, lng_col: str, path: Path) -> np.ndarray:
    """Validated ``(N, 2)`` coordinates, errors naming the file line and image id."""
    latlng = np.stack([pd.to_numeric(df[lat_col], errors="coerce").to_numpy(dtype=np.float64),
                       pd.to_numeric(df[lng_col], errors="coerce").to_numpy(dtype=np.float64)], axis=1)
    keys = df["IMG_ID"] if "IMG_ID" in df.columns else [None] * len(df)
    labels = [f"{line}" + (f" ({k})" if k is not None else "") for line, k in zip(df.index, keys)]
    return validate_latlng(latlng, what=f"{path} (row = file line)", row_labels=labels)


def _check_unique(keys: pd.Series, path: Path) -> None:
    dup = keys[keys.duplicated(keep=False)]
    if len(dup):
        first = dup.iloc[0]
        lines = [int(i) for i in keys.index[keys.to_numpy() == first]]
        raise ValueError(f"{path}: IMG_ID {first!r} appears on several lines {lines[:5]} "
                         f"({dup.nunique()} duplicated id(s)); image ids must be unique")


def _image_paths(keys: pd.Series, root: Path, images: str | None) -> pd.Series:
    if images is None:
        return pd.Series([None] * len(keys), dtype=object)
    folder = root / images
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found (set data.images=null to evaluate "
                                "coordinate-only predictors on the metadata alone)")
    return pd.Series([str(folder / k) for k in keys], dtype=object)


def _table(df: pd.DataFrame, latlng: np.ndarray, paths: pd.Series, meta_cols: list[str]) -> pd.DataFrame:
    table = pd.DataFrame({"key": df["IMG_ID"].astype(str).to_numpy(), "lat": latlng[:, 0],
                          "lng": latlng[:, 1], "path": paths.to_numpy()})
    for c in meta_cols:
        if c in df.columns:
            table[c] = df[c].to_numpy()
    return table


def _decide_lat_lon(df: pd.DataFrame, path: Path, order: str) -> tuple[str, str, list[str]]:
    """Which column holds latitude, for the Im2GPS format (see :func:`read_im2gps`)."""
    notes: list[str] = []
    if order not in ("auto", "header", "swapped"):
        raise ValueError(f"lat_lon_order must be 'auto', 'header' or 'swapped', got {order!r}")
    if order == "header":
        return "LAT", "LON", notes
    if order == "swapped":
        notes.append(f"{path.name}: values under LAT/LON read as lon/lat because lat_lon_order='swapped'")
        return "LON", "LAT", notes
    cols = list(df.columns)
    legacy = cols.index("LON") < cols.index("LAT")
    lat_vals = pd.to_numeric(df["LAT"], errors="coerce").abs()
    lon_vals = pd.to_numeric(df["LON"], errors="coerce").abs()
    lat_col_fits = bool((lat_vals <= 90).all())
    lon_col_fits = bool((lon_vals <= 90).all())
    if legacy and not lat_col_fits and lon_col_fits:
        n_out = int((lat_vals > 90).sum())
        notes.append(
            f"{path.name}: the header names the columns LON,LAT (in that order) but the column "
            f"named LAT holds {n_out} value(s) beyond +-90 while LON never does, so the values are "
            "lat, lon under swapped names (a known fault of old Im2GPS3k copies). They were read as "
            "latitude = column 'LON', longitude = column 'LAT'. Pass lat_lon_order='header' to refuse this."
        )
        return "LON", "LAT", notes
    if legacy and lat_col_fits and lon_col_fits:
        raise ValueError(
            f"{path}: the header says LON,LAT, the order of old Im2GPS3k copies whose values are really "
            "lat, lon, and every value fits either reading, so the order cannot be told from the data. "
            "Set lat_lon_order='swapped' (values are lat, lon) or 'header' (trust the names)."
        )
    return "LAT", "LON", notes


IM2GPS_META = ["AUTHOR", "S3_Label", "S16_Label", "S365_Label", "Prob_indoor", "Prob_natural", "Prob_urban"]


def photographer_folds(authors, n_folds: int, *, seed: int = 0) -> np.ndarray:
    """Photographer-disjoint folds balanced by photo count.

    Photographers are taken largest first (ties in a seeded, platform-stable order) and each goes to
    the fold with the fewest photos so far, so folds differ by at most one photographer's photos even
    when a few photographers took most of them (Im2GPS3k: 125 photographers, the largest with 117 of
    1,821 photos). A photo without an author counts as its own photographer.

    Args:
        authors: ``(N,)`` photographer ids; ``""``/None when unknown.
        n_folds: number of folds (>= 2).
        seed: breaks ties between photographers with as many photos.

    Returns:
        ``(N,)`` int64 fold of each photo in ``[0, n_folds)``.
    """
    import hashlib

    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    a = pd.Series(np.asarray(authors, dtype=object)).fillna("").astype(str)
    a = a.where(a != "", "photo:" + pd.Series(np.arange(len(a)).astype(str)))
    counts = a.value_counts()
    tie = {k: hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).hexdigest() for k in counts.index}
    order = sorted(counts.index, key=lambda k: (-counts[k], tie[k]))
    load = np.zeros(n_folds, dtype=np.int64)
    fold_of: dict[str, int] = {}
    for k in order:
        f = int(np.argmin(load))
        fold_of[k] = f
        load[f] += counts[k]
    return a.map(fold_of).to_numpy(dtype=np.int64)


def read_im2gps(root: str | Path, *, csv: str = "im2gps3k_places365.csv", images: str | None = "images",
                name: str = "im2gps3k", lat_lon_order: str = "auto", split: str | None = None,
                folds: int | None = None, fold: int | list[int] | None = None, fold_seed: int = 0,
                synthetic: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> GeoDataset:
    """Reads Im2GPS3k or Im2GPS (``IMG_ID,AUTHOR,LAT,LON,...``) and its image folder.

    Args:
        root: folder holding ``csv`` and the ``images`` folder.
        csv: CSV file name, relative to ``root`` (or absolute).
        images: image folder relative to ``root``; None reads coordinates only.
        name: dataset name for reports.
        lat_lon_order: ``"auto"`` detects old copies whose ``LON,LAT`` header sits over lat, lon values
            (from the value ranges; an undecidable file is an error asking for a choice), ``"header"``
            trusts the column names, ``"swapped"`` reads the column named LAT as longitude.
        split: keep only rows whose ``split`` column equals this (for files that have one).
        folds: split the photos into this many photographer-disjoint folds (:func:`photographer_folds`
            on ``AUTHOR``) and keep ``fold``; None keeps every row.
        fold: the fold (or list of folds) to keep.
        fold_seed: tie-breaking seed of the fold assignment.
        synthetic: mark the dataset as generated data.
        max_pixels: images larger than this are skipped as decompression bombs.

    Raises:
        FileNotFoundError: the CSV or image folder is missing.
        ValueError: the CSV is empty or has no rows, is a YFCC4k file (numbered columns), a required column
            is missing, an id repeats, or a coordinate is out of range (the message names the file line and
            image id).
    """
    root = Path(root)
    path = root / csv
    df = _read_csv(path)
    _require(df, ["IMG_ID", "LAT", "LON"], path)
    numbered = _numbered_columns(df)
    if numbered:
        raise ValueError(f"{path}: has numbered columns ({', '.join(numbered[:6])}, ...) as YFCC4k is distributed, "
                         "not the Im2GPS format (IMG_ID,AUTHOR,LAT,LON,...); read it with data=yfcc4k "
                         "(read_yfcc4k)")
    if split is not None:
        _require(df, ["split"], path)
        df = df[df["split"] == split]
    if folds is not None:
        if fold is None:
            raise ValueError(f"{path}: folds={folds} needs fold=<k or [k, ...]> to say which to keep")
        keep = [int(fold)] if isinstance(fold, (int, np.integer)) else [int(f) for f in fold]
        bad = [f for f in keep if not 0 <= f < folds]
        if bad:
            raise ValueError(f"{path}: fold {bad} out of range for folds={folds}")
        _require(df, ["AUTHOR"], path)
        df = df[np.isin(photographer_folds(df["AUTHOR"], folds, seed=fold_seed), keep)]
    lat_col, lng_col, notes = _decide_lat_lon(df, path, lat_lon_order)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    latlng = _coordinates(df, lat_col, lng_col, path)
    _check_unique(df["IMG_ID"], path)
    meta = IM2GPS_META + [c for c in df.columns if c not in IM2GPS_META + ["IMG_ID", "LAT", "LON"]]
    table = _table(df, latlng, _image_paths(df["IMG_ID"], root, images), meta)
    return GeoDataset(table, name=name, source=path, synthetic=synthetic, notes=notes, max_pixels=max_pixels)


#: YFCC4k's numbered columns that are worth carrying (YFCC100M field order).
YFCC_META = {"3": "AUTHOR", "15": "page_url", "17": "license"}


def read_yfcc4k(root: str | Path, *, csv: str = "yfcc4k_places365.csv", images: str | None = "images",
                name: str = "yfcc4k", max_pixels: int = DEFAULT_MAX_PIXELS) -> GeoDataset:
    """Reads YFCC4k as distributed: numbered header columns with ``IMG_ID``, ``LON``, ``LAT`` among them.

    Args:
        root: folder holding ``csv`` and the ``images`` folder.
        csv: CSV file name relative to ``root``.
        images: image folder relative to ``root``; None reads coordinates only.
        name: dataset name for reports.
        max_pixels: images larger than this are skipped as decompression bombs.

    Raises:
        FileNotFoundError: the CSV or image folder is missing.
        ValueError: the CSV is empty or has no rows, has no numbered columns (an Im2GPS-style file), a
            required column is missing, an id repeats, or a coordinate is out of range.
    """
    root = Path(root)
    path = root / csv
    df = _read_csv(path)
    _require(df, ["IMG_ID", "LAT", "LON"], path)
    if not _numbered_columns(df):
        raise ValueError(f"{path}: has no numbered columns (header {[str(c) for c in df.columns][:10]}), so it is "
                         "not YFCC4k as distributed (0,IMG_ID,2,3,...,LON,LAT,...); it looks like the Im2GPS "
                         "format: read it with data=im2gps3k or data=im2gps (read_im2gps)")
    df["IMG_ID"] = df["IMG_ID"].astype(str)
    latlng = _coordinates(df, "LAT", "LON", path)
    _check_unique(df["IMG_ID"], path)
    df = df.rename(columns={k: v for k, v in YFCC_META.items() if k in df.columns})
    table = _table(df, latlng, _image_paths(df["IMG_ID"], root, images), list(YFCC_META.values()))
    return GeoDataset(table, name=name, source=path, max_pixels=max_pixels)


def read_latlng_csv(path: str | Path, *, name: str | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> GeoDataset:
    """Reads a plain CSV of ``path,lat,lng`` (``lon`` accepted); relative paths start at the CSV's folder.

    The key of each row is its path as written; other columns are kept as metadata.
    """
    path = Path(path)
    df = _read_csv(path)
    df.columns = [str(c).strip().lower() for c in df.columns]
    if "lng" not in df.columns and "lon" in df.columns:
        df = df.rename(columns={"lon": "lng"})
    _require(df, ["path", "lat", "lng"], path)
    df = df.rename(columns={"path": "IMG_ID"})
    df["IMG_ID"] = df["IMG_ID"].astype(str)
    latlng = _coordinates(df, "lat", "lng", path)
    _check_unique(df["IMG_ID"], path)
    paths = pd.Series([str(p if Path(p).is_absolute() else path.parent / p) for p in df["IMG_ID"]], dtype=object)
    meta = [c for c in df.columns if c not in ("IMG_ID", "lat", "lng")]
    return GeoDataset(_table(df, latlng, paths, meta), name=name or path.stem, source=path, max_pixels=max_pixels)


def read_sample(root: str | Path | None = None, *, split: str | None = "test", n_images: int = 3000,
                seed: int = 0, image_size: int = 64) -> GeoDataset:
    """The embedded synthetic sample (generated and cached on first use), one split of it.

    Args:
        root: where the sample lives or is generated; None uses the cache (see :mod:`geoloc.data.sample`).
        split: ``train``, ``val``, ``test`` or None for all rows.
        n_images, seed, image_size: generator settings.
    """
    from geoloc.data.sample import ensure_sample

    folder = ensure_sample(root, n_images=n_images, seed=seed, image_size=image_size)
    ds = read_im2gps(folder, csv="sample.csv", images="images", name=f"sample-{split or 'all'}",
                     split=split, synthetic=True)
    ds.notes.append("SYNTHETIC: generated images whose appearance follows real geography at real MP-16 "
                    "photo locations; not photographs, numbers on it say nothing about real photos")
    return ds


def load_reference_latlng(source: str = "mp16_gallery", *, csv: str | Path | None = None,
                          split: str = "train", n_images: int = 3000, seed: int = 0,
                          image_size: int = 64) -> np.ndarray:
    """Training coordinates that baselines (constant, prior) are fitted on.

    Args:
        source: ``"mp16_gallery"`` (100K MP-16 photo coordinates shipped in the ``geoclip`` package),
            ``"sample"`` (the embedded sample's ``split``) or ``"csv"`` (a file with lat/lng columns,
            ``LAT``/``LON`` accepted).
        csv: the file for ``source="csv"``.

    Returns:
        ``(N, 2)`` ``[lat, lng]`` in degrees.
    """
    if source == "mp16_gallery":
        from geoloc.data.geography import mp16_gallery_latlng

        return mp16_gallery_latlng()
    if source == "sample":
        return read_sample(split=split, n_images=n_images, seed=seed, image_size=image_size).latlng
    if source == "csv":
        if csv is None:
            raise ValueError("load_reference_latlng(source='csv') needs csv=PATH")
        path = Path(csv)
        df = _read_csv(path)
        cols = {str(c).strip().lower(): c for c in df.columns}
        lat = cols.get("lat") or cols.get("latitude")
        lng = cols.get("lng") or cols.get("lon") or cols.get("longitude")
        if lat is None or lng is None:
            raise ValueError(f"{path}: needs lat and lng (or lon) columns; found {list(df.columns)}")
        return _coordinates(df, lat, lng, path)
    raise ValueError(f"unknown reference source {source!r}; expected 'mp16_gallery', 'sample' or 'csv'")
