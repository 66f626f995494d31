"""A map of geocells coloured by photo count, over country and admin-1 borders.

    python -m geocells.plot cells.parquet out.png [--boundaries PATH] [--bbox=minlng,minlat,maxlng,maxlat] [--dpi N]

Plate carrée (x = longitude, y = latitude, degrees). The PNG is written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from geoloc.artifacts import atomic_path
from geoloc.cli import user_errors

FIG_WIDTH_IN = 12.0
"""Figure width in inches; the height follows the bbox so a degree is square on the page."""
_LEFT_IN, _RIGHT_IN = 0.45, 0.2  # room for the latitude tick labels
_COLORBAR_IN = 1.0  # room under the map for the longitude tick labels and the colorbar
_TITLE_IN = 0.4


def figure_size(bbox: tuple[float, float, float, float]) -> tuple[float, float]:
    """Figure ``(width, height)`` in inches for a ``(minlng, minlat, maxlng, maxlat)`` degree box."""
    minlng, minlat, maxlng, maxlat = bbox
    map_w = FIG_WIDTH_IN - _LEFT_IN - _RIGHT_IN
    map_h = map_w * (maxlat - minlat) / (maxlng - minlng)
    return FIG_WIDTH_IN, round(map_h + _COLORBAR_IN + _TITLE_IN, 2)


def default_bbox(cells_gdf) -> tuple[float, float, float, float]:
    """The world in longitude; latitude from 60 S to 85 N, stretched to include every cell."""
    if len(cells_gdf):
        _, miny, _, maxy = cells_gdf.total_bounds
    else:
        miny, maxy = 0.0, 0.0
    return -180.0, float(max(-90.0, min(-60.0, miny - 1.0))), 180.0, float(min(90.0, max(85.0, maxy + 1.0)))


def _simplified(geoms, tolerance_deg: float):
    import shapely

    return shapely.simplify(np.asarray(geoms), tolerance_deg, preserve_topology=True)


def _minor_label(v: float, span: float) -> str:
    """Minor colorbar ticks: all labelled within one decade, the 2s and 5s within two, none beyond."""
    mantissa = v / 10 ** np.floor(np.log10(v))
    if span < 10 or (span < 100 and any(abs(mantissa - m) < 1e-6 for m in (2, 5))):
        return f"{v:,.0f}"
    return ""


def plot_cells(cells_gdf, boundaries_gdf, out_path: str | Path, *, title: str | None = None,
               bbox: tuple[float, float, float, float] | None = None, dpi: int = 150) -> Path:
    """Draws geocells coloured by ``n_points`` (log scale) over country borders and writes a PNG.

    Args:
        cells_gdf: GeoDataFrame of cells (lng/lat geometry) with an ``n_points`` column.
        boundaries_gdf: GeoDataFrame of admin regions with ``adm0_a3`` and ``level`` (0 = country,
            1 = admin-1), as from :func:`geoloc.geo.boundaries.load_boundaries`; None draws no borders.
        out_path: the PNG, written atomically (temp file beside it, then renamed).
        title: figure title.
        bbox: ``(minlng, minlat, maxlng, maxlat)`` degrees; None: :func:`default_bbox`.
        dpi: dots per inch; the image is ``figure_size(bbox) * dpi`` pixels.

    Returns:
        the PNG path.
    """
    import geopandas as gpd
    import matplotlib
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    bbox = tuple(float(v) for v in (bbox or default_bbox(cells_gdf)))
    minlng, minlat, maxlng, maxlat = bbox
    if not (minlng < maxlng and minlat < maxlat):
        raise ValueError(f"bbox {bbox}: expected minlng < maxlng and minlat < maxlat")
    figsize = figure_size(bbox)
    # about half a pixel in degrees: simplifying borders to it changes nothing visible and saves time
    tol = 0.5 * (maxlng - minlng) / (figsize[0] * dpi)

    # a bare Figure (no pyplot): no global backend state, nothing to close, nothing displayed
    fig = Figure(figsize=figsize, dpi=dpi)
    bottom = _COLORBAR_IN / figsize[1]
    top = 1.0 - _TITLE_IN / figsize[1]
    left, width = _LEFT_IN / figsize[0], 1.0 - (_LEFT_IN + _RIGHT_IN) / figsize[0]
    ax = fig.add_axes((left, bottom, width, top - bottom))
    ax.set_facecolor("#dfe9f2")  # sea
    countries = lines1 = None
    b = None if boundaries_gdf is None else boundaries_gdf.cx[minlng:maxlng, minlat:maxlat]
    if b is not None and len(b):
        b = b[["adm0_a3", "level", "geometry"]]
        # dissolve before simplifying: simplified neighbours no longer share borders exactly, and the
        # slivers between them would draw admin-1 borders as country borders
        countries = b.dissolve(by="adm0_a3")
        countries["geometry"] = _simplified(countries.geometry.values, tol)
        admin1 = b[b["level"] == 1]
        if len(admin1):
            lines1 = gpd.GeoSeries(_simplified(admin1.boundary.values, tol), crs=b.crs)
        countries.plot(ax=ax, color="#f2f2ee", linewidth=0)  # land with no cell

    n = cells_gdf["n_points"].to_numpy(dtype=np.float64)
    pos = n[n > 0]
    vmin = max(1.0, float(pos.min())) if len(pos) else 1.0
    vmax = max(vmin * 1.1, float(pos.max())) if len(pos) else 10.0
    norm = LogNorm(vmin=vmin, vmax=vmax)
    cmap = matplotlib.colormaps["viridis"]
    if len(cells_gdf):
        cells = cells_gdf[["geometry"]].copy()
        cells["geometry"] = _simplified(cells.geometry.values, tol)
        # cells with no photo (possible after merges) take the lowest colour
        cells.plot(ax=ax, column=np.clip(n, vmin, None), cmap=cmap, norm=norm, linewidth=0.15,
                   edgecolor="white")
    if lines1 is not None:
        lines1.plot(ax=ax, color="0.45", linewidth=0.15)
    if countries is not None:
        countries.boundary.plot(ax=ax, color="0.15", linewidth=0.5)

    ax.set_xlim(minlng, maxlng)
    ax.set_ylim(minlat, maxlat)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7, length=2)
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}°")
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}°")
    ax.set_xlabel("")  # geopandas labels the axes from the CRS; the degree ticks say enough
    ax.set_ylabel("")
    if title:
        ax.set_title(title, fontsize=11)
    cax = fig.add_axes((0.3, 0.45 / figsize[1], 0.4, 0.12 / figsize[1]))
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    cb = fig.colorbar(sm, cax=cax, orientation="horizontal")
    cb.set_label("photos per cell", fontsize=8)
    cb.ax.tick_params(which="both", labelsize=7)
    cb.ax.xaxis.set_major_formatter(lambda v, _: f"{v:,.0f}")
    cb.ax.xaxis.set_minor_formatter(lambda v, _: _minor_label(v, vmax / vmin))

    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return out_path


def _parse_bbox(text: str) -> tuple[float, float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 4:
        raise argparse.ArgumentTypeError(f"--bbox {text!r}: expected minlng,minlat,maxlng,maxlat (4 numbers)")
    return vals


@user_errors("geocells.plot")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m geocells.plot", description=__doc__.splitlines()[0])
    parser.add_argument("cells", help="geocell GeoParquet (python -m geocells.build)")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--boundaries", default=None,
                        help="admin boundary GeoParquet (default: geocells/data/admin_boundaries_v1.parquet)")
    parser.add_argument("--bbox", type=_parse_bbox, default=None,
                        help="minlng,minlat,maxlng,maxlat in degrees (write --bbox=-10,35,30,60 for a leading minus)")
    parser.add_argument("--dpi", type=int, default=150)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")  # an entry point: never open a display

    from geoloc.geo.boundaries import load_boundaries
    from geoloc.geo.cells import Geocells

    gc = Geocells.load(args.cells)
    if "geometry" not in gc.table.columns:
        raise SystemExit(f"{args.cells}: the cells have no geometry column to draw")
    boundaries = load_boundaries(args.boundaries)
    scheme = gc.meta.get("scheme", "unknown scheme")
    n_pts = int(gc.n_points.sum())
    title = f"{len(gc):,} geocells ({scheme}) from {n_pts:,} photos"
    out = plot_cells(gc.table, boundaries, args.out, title=title, bbox=args.bbox, dpi=args.dpi)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
