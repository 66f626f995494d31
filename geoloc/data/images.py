"""Opening photos safely: every image comes out as an upright 8-bit RGB ``PIL.Image`` or as an
:class:`ImageError` that says why not (missing, unreadable, truncated, decompression bomb).

Large jobs catch :class:`ImageError`, count it in a :class:`SkipReport` and carry on.
"""

from __future__ import annotations

import io
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

#: Images with more pixels than this are refused as decompression bombs (Pillow's own default).
DEFAULT_MAX_PIXELS = 89_478_485

SKIP_REASONS = ("missing", "unreadable", "truncated", "decompression_bomb")


class ImageError(Exception):
    """An image that cannot be used.

    Attributes:
        reason: one of :data:`SKIP_REASONS`.
        path: the file (or key) it concerns.
    """

    def __init__(self, reason: str, path: str | Path, detail: str = ""):
        self.reason = reason
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass
class SkipReport:
    """Items a job skipped, by reason, so that nothing is dropped silently."""

    counts: Counter = field(default_factory=Counter)
    items: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, key: str, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.items.append((str(key), reason, detail))

    def __len__(self) -> int:
        return sum(self.counts.values())

    def to_dict(self, max_items: int = 50) -> dict:
        return {
            "n_skipped": len(self),
            "by_reason": dict(sorted(self.counts.items())),
            "examples": [
                {"key": k, "reason": r, "detail": d} for k, r, d in self.items[:max_items]
            ],
        }


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB.

    Grayscale, palette, CMYK and YCbCr convert directly; images with transparency are composited on
    white; 16- and 32-bit integer and float images are rescaled to 8 bits rather than clipped.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = arr.max() if arr.size and arr.max() > 1.0 else 1.0
            arr = arr / top * 255.0
        elif img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit range onto 8 bits
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


_OBJECT_REPR = re.compile(r"<_io\.\w+ (?:object|name=[^>]*) at 0x[0-9a-fA-F]+>|<_io\.\w+ name=[^>]*>")


def _detail(e: BaseException, label: str) -> str:
    """An exception's message for a skip report: the same text in every run (no object addresses)."""
    return _OBJECT_REPR.sub(label, str(e))


def decode_image(data: bytes | Path | str, *, name: str | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Opens an image from a path or bytes as upright RGB.

    A file is read through Pillow's lazy open, never whole into memory first: a large file that is not
    an image is refused from its first bytes, and a decompression bomb from its header.

    Args:
        data: a file path or the encoded bytes.
        name: what to call it in errors (defaults to the path).
        max_pixels: images larger than this are refused as decompression bombs.

    Returns:
        An 8-bit RGB image with its EXIF orientation applied.

    Raises:
        ImageError: with ``reason`` in :data:`SKIP_REASONS`.
    """
    label = name if name is not None else (str(data) if not isinstance(data, bytes) else "<bytes>")
    if isinstance(data, bytes):
        return _decode(io.BytesIO(data), label, max_pixels)
    path = Path(data)
    if path.is_dir():
        raise ImageError("unreadable", label, "is a directory, not an image file")
    if not path.is_file():
        raise ImageError("missing", label, "no such file")
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after Pillow has read what it needs
    except OSError as e:
        raise ImageError("unreadable", label, e.strerror or str(e)) from e
    with f:
        return _decode(f, label, max_pixels)


def _decode(f, label: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(f)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError("decompression_bomb", label, f"{w}x{h} = {w * h} pixels > {max_pixels}")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("decompression_bomb", label, _detail(e, label)) from e
    except OSError as e:
        msg = str(e).lower()
        reason = "truncated" if ("truncated" in msg or "broken data stream" in msg) else "unreadable"
        raise ImageError(reason, label, _detail(e, label)) from e
    except Exception as e:  # Pillow raises many kinds (SyntaxError, ValueError, ...) on bad files
        raise ImageError("unreadable", label, f"{type(e).__name__}: {_detail(e, label)}") from e
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # a broken EXIF block should not cost the photo
        warnings.warn(f"{label}: EXIF orientation ignored ({_detail(e, label)})", stacklevel=3)
    return to_rgb(img)


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    """Encodes an RGB image as JPEG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


_GPS_IFD = 0x8825  # EXIF GPSInfo
_GPS_LAT_REF, _GPS_LAT, _GPS_LNG_REF, _GPS_LNG = 1, 2, 3, 4


def _dms_to_degrees(dms) -> float:
    d, m, s = (float(v) for v in dms)
    return d + m / 60.0 + s / 3600.0


def read_exif_latlng(source: bytes | Path | str) -> tuple[float, float] | None:
    """The GPS position in a photo's EXIF, if it has a usable one.

    Reads the GPSInfo IFD (degrees, minutes, seconds as rationals with N/S and E/W references). Never
    raises on a photo: a missing, partial or malformed GPS block gives None.

    Args:
        source: the file (path or bytes).

    Returns:
        ``(lat, lng)`` in degrees, or None.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            gps = img.getexif().get_ifd(_GPS_IFD)
        if not gps or _GPS_LAT not in gps or _GPS_LNG not in gps:
            return None
        lat, lng = _dms_to_degrees(gps[_GPS_LAT]), _dms_to_degrees(gps[_GPS_LNG])
        if str(gps.get(_GPS_LAT_REF, "N")).strip().upper().startswith("S"):
            lat = -lat
        if str(gps.get(_GPS_LNG_REF, "E")).strip().upper().startswith("W"):
            lng = -lng
        if not (np.isfinite(lat) and np.isfinite(lng) and -90 <= lat <= 90 and -180 <= lng <= 180):
            return None
        if lat == 0.0 and lng == 0.0:  # cameras without a fix write zeros
            return None
        return lat, lng
    except Exception:  # noqa: BLE001 - EXIF in the wild is anything; a bad block is "no GPS", not an error
        return None
