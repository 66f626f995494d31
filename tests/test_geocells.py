import os
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from omegaconf import OmegaConf

from geocells import build as build_module
from geocells.build import SCHEMES, _main, build_geocells, read_points, write_geocells
from geoloc.geo.cells import Geocells
from geoloc.geo.h3index import h3_centers, h3_resolution, latlng_to_h3

from .conftest import REPO
from .test_geocells_points import answer_is_member_photo

MIN, MAX = 50, 600


@pytest.fixture(scope="module")
def boundaries():
    """Three countries: AAA with two admin-1 squares, BBB with one, CCC a small island without admin-1."""
    rows = [
        ("AAA", "AA", "Aland", "Europe", "AA-1", "One", 1, shapely.box(0, 40, 5, 45)),
        ("AAA", "AA", "Aland", "Europe", "AA-2", "Two", 1, shapely.box(5, 40, 10, 45)),
        ("BBB", "BB", "Bland", "Europe", "BB-1", "Bee", 1, shapely.box(10, 40, 15, 45)),
        ("CCC", "CC", "Cland", "Europe", "", "", 0, shapely.box(20, 40, 22, 42)),
    ]
    df = pd.DataFrame(rows, columns=["adm0_a3", "iso_a2", "country", "continent", "admin1_code", "admin1_name",
                                     "level", "geometry"])
    df.insert(0, "region_id", np.arange(len(df), dtype=np.int32))
    return gpd.GeoDataFrame(df, geometry="geometry", crs="EPSG:4326")


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(0)
    return np.vstack([
        rng.normal([42.5, 2.5], 0.4, size=(3000, 2)),          # a crowded region: must split
        rng.uniform([40.5, 5.5], [44.5, 9.5], size=(200, 2)),  # fits one cell
        rng.uniform([40.5, 10.5], [44.5, 14.5], size=(80, 2)),
        rng.uniform([40.2, 20.2], [41.8, 21.8], size=(10, 2)),  # a country below min_points
        [[39.8, 2.0], [39.85, 7.0], [45.3, 12.0]],              # just off the coast: nearest region
        np.repeat([[42.5, 2.5]], 700, axis=0),                  # one spot holding more than MAX photos
    ])


@pytest.fixture(scope="module")
def built(points, boundaries):
    return build_geocells(points, boundaries, min_points=MIN, max_points=MAX, res=5, max_res=8)


def test_counts_and_every_point_assigned(built, points):
    cells, report = built
    gc = Geocells(cells)
    ids, inside = gc.assign(points, return_inside=True)
    # a photo in a seam that a refined H3 cell's children leave open goes to the nearest cell
    assert (ids >= 0).all() and inside.mean() > 0.99
    # the builder's counts are exactly what assignment gives
    np.testing.assert_array_equal(np.bincount(ids, minlength=len(cells)), cells["n_points"])
    assert cells["n_points"].sum() == len(points) == report.n_points
    # only the 700 photos taken at one spot exceed max_points: a single H3 cell at max_res, reported
    over = cells[cells["n_points"] > MAX]
    assert report.cells_above_max == 1 and len(over) == 1 and 700 <= over["n_points"].iloc[0] < 720
    members = points[ids == over["cell_id"].iloc[0]]
    # 700 of its photos sit in one finest H3 cell, which cannot be split further
    assert np.unique(latlng_to_h3(members, 8), return_counts=True)[1].max() >= 700
    assert 8 in h3_resolution(over["h3_cells"].iloc[0]).tolist()
    small = cells[cells["n_points"] < MIN]
    assert set(small["adm0_a3"]) == {"CCC"} and report.countries_below_min == {"CCC": 10}
    assert len(cells) >= 3000 // MAX + 3


def test_no_cell_crosses_a_country_border(built, boundaries):
    cells, _ = built
    country_geom = boundaries.dissolve("adm0_a3").geometry
    for _, cell in cells.iterrows():
        centres = h3_centers(np.asarray(cell["h3_cells"], dtype=np.uint64))
        pts = shapely.points(centres[:, 1], centres[:, 0])
        for code, geom in country_geom.items():
            if code != cell["adm0_a3"]:
                assert not shapely.contains(geom, pts).any(), (cell["cell_id"], code)


def test_assignment_agrees_with_polygons(built, boundaries):
    cells, _ = built
    gc = Geocells(cells)
    rng = np.random.default_rng(1)
    pts = rng.uniform([40.0, 0.0], [45.0, 15.0], size=(5000, 2))
    ids, inside = gc.assign(pts, return_inside=True)
    geoms = cells.geometry.to_numpy()[ids]
    covered = shapely.covers(geoms, shapely.points(pts[:, 1], pts[:, 0]))
    # membership follows the H3 index hierarchy; where a crowded H3 cell was refined, its children's
    # polygons do not tile it exactly (aperture 7), so a thin seam disagrees with the drawn polygons
    assert covered[inside].mean() > 0.99
    outside_refined = np.abs(pts - [42.5, 2.5]).max(axis=1) > 2.0
    assert covered[inside & outside_refined].mean() > 0.999
    # a point in no cell goes to the nearest cell
    far = np.array([[0.0, -30.0]])
    nearest = gc.assign(far)
    d = shapely.distance(cells.geometry.to_numpy(), shapely.Point(-30.0, 0.0))
    assert nearest[0] == int(np.argmin(d))


def test_split_cells_are_contiguous_and_neighbors_symmetric(built):
    cells, _ = built
    one = cells[(cells["admin1_code"] == "AA-1")]
    assert len(one) >= 5
    on_land = shapely.within(one.geometry.to_numpy(), shapely.box(0, 40, 5, 45).buffer(0.2))
    assert on_land.sum() >= len(one) - 1  # one cell took the off-coast photo's H3 cell
    # contiguous in substance: the largest part holds >= 99% of each land cell (a refined city centre
    # can leave a sliver of a few hundred metres apart)
    def largest_share(g):
        parts = getattr(g, "geoms", [g])
        return max(p.area for p in parts) / g.area

    assert all(largest_share(g) >= 0.99 for g in one.geometry[on_land])
    nb = {i: set(n.tolist()) for i, n in zip(cells["cell_id"], cells["neighbors"])}
    assert all(i in nb[j] for i in nb for j in nb[i])
    assert any(nb[i] for i in one["cell_id"])


def test_mean_is_mean_of_member_points(built, points):
    cells, _ = built
    ids = Geocells(cells).assign(points)
    c = int(cells.loc[cells["adm0_a3"] == "BBB", "cell_id"].iloc[0])
    mine = points[ids == c]
    assert cells.loc[c, "mean_lat"] == pytest.approx(mine[:, 0].mean(), abs=0.05)
    assert cells.loc[c, "mean_lng"] == pytest.approx(mine[:, 1].mean(), abs=0.05)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_answer_point_is_a_member_photo(scheme, built, points, boundaries):
    cells = built[0] if scheme == "semantic" else build_geocells(points, boundaries, scheme=scheme, res=5)[0]
    assert answer_is_member_photo(cells, points).all()


def test_deterministic(points, boundaries, built):
    again, _ = build_geocells(points, boundaries, min_points=MIN, max_points=MAX, res=5, max_res=8)
    first, _ = built
    assert list(again["n_points"]) == list(first["n_points"])
    assert all(np.array_equal(a, b) for a, b in zip(again["h3_cells"], first["h3_cells"]))
    assert shapely.equals(again.geometry.to_numpy(), first.geometry.to_numpy()).all()


def test_other_schemes(points, boundaries):
    admin, _ = build_geocells(points, boundaries, scheme="admin", res=5)
    assert sorted(admin["admin1_code"]) == ["", "AA-1", "AA-2", "BB-1"]
    grid, _ = build_geocells(points, boundaries, scheme="h3", res=4)
    assert all(len(c) == 1 for c in grid["h3_cells"]) and grid["n_points"].sum() == len(points)
    ids = Geocells(grid).assign(points)
    np.testing.assert_array_equal(np.bincount(ids, minlength=len(grid)), grid["n_points"])


def test_bad_input_speaks(boundaries):
    with pytest.raises(ValueError, match=r"row 1: lat=nan"):
        build_geocells(np.array([[1.0, 2.0], [np.nan, 3.0]]), boundaries)
    with pytest.raises(ValueError, match="empty input"):
        build_geocells(np.zeros((0, 2)), boundaries)
    with pytest.raises(ValueError, match="min_points=50 is larger than the 3 points"):
        build_geocells(np.array([[42.0, 2.0]] * 3), boundaries)
    with pytest.raises(ValueError, match="max_points >= 2 \\* min_points"):
        build_geocells(np.array([[42.0, 2.0]] * 300), boundaries, min_points=100, max_points=150)
    with pytest.raises(ValueError, match="unknown scheme"):
        build_geocells(np.array([[42.0, 2.0]]), boundaries, scheme="voronoi")


def test_write_load_and_cli(tmp_path, built, points, boundaries):
    cells, _ = built
    path = write_geocells(cells, tmp_path / "cells.parquet", meta={"scheme": "semantic"})
    gc = Geocells.load(path)
    assert gc.meta["scheme"] == "semantic" and len(gc) == len(cells)
    np.testing.assert_array_equal(gc.assign(points[:500]), Geocells(cells).assign(points[:500]))
    assert [p.name for p in tmp_path.iterdir()] == ["cells.parquet"]

    pd.DataFrame({"LAT": points[:, 0], "LON": points[:, 1]}).to_csv(tmp_path / "pts.csv", index=False)
    np.testing.assert_array_equal(read_points(tmp_path / "pts.csv"), points)
    boundaries.to_parquet(tmp_path / "b.parquet")
    out = tmp_path / "cli.parquet"
    res = subprocess.run([sys.executable, "-m", "geocells.build", f"points={tmp_path / 'pts.csv'}", f"out={out}",
                          f"boundaries={tmp_path / 'b.parquet'}", f"min_points={MIN}", f"max_points={MAX}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cells from 3993 points" in res.stdout and "CCC" in res.stdout
    loaded = Geocells.load(out)
    assert len(loaded) == len(cells) and loaded.meta["centroid"] == "medoid" and loaded.meta["bridge_km"] == 150


def test_points_file_errors(tmp_path):
    (tmp_path / "p.csv").write_text("lat,lon\n1,2\n95,3\n")
    with pytest.raises(ValueError, match=r"p.csv.*row 3: lat=95.0"):
        read_points(tmp_path / "p.csv")
    (tmp_path / "q.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="needs lat and lng"):
        read_points(tmp_path / "q.csv")


@pytest.mark.parametrize(("name", "content", "says"), [
    ("empty.csv", b"", "empty file"),
    ("header.csv", b"lat,lon\n", "no rows, only a header"),
    ("blank.csv", b"\n\n", "no header line"),
    ("ragged.csv", b"lat,lon\n1,2\n3,4,5,6\n", "not a readable CSV file (Error tokenizing data. C error: Expected 2"),
    ("latin1.csv", "lat,lon,place\n1,2,Bogotá\n".encode("latin-1"), "not UTF-8 text (line 2, byte 0xe1)"),
    ("fake.parquet", b"lat,lon\n1,2\n", "not a readable Parquet file"),
    ("empty.parquet", b"", "empty file; expected a Parquet table"),
    ("parquet.csv", b"PAR1\x15\x04PAR1", "a Parquet file without a .parquet suffix"),
])
def test_bad_points_files_name_the_file(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_points(path)
    assert str(e.value).startswith(f"{path}: ") and says in str(e.value)
    assert type(e.value) is ValueError  # not a pandas or pyarrow exception


def test_points_split_without_rows(tmp_path):
    (tmp_path / "p.csv").write_text("lat,lon,split\n1,2,train\n")
    with pytest.raises(ValueError, match=r"p.csv: no rows with split == 'val'; the file's splits are \['train'\]"):
        read_points(tmp_path / "p.csv", split="val")
    with pytest.raises(ValueError, match="is a folder"):
        read_points(tmp_path)


def _cfg(points, out):
    cfg = OmegaConf.load(REPO / "conf" / "geocells.yaml")
    cfg.points, cfg.out = str(points), str(out)
    return cfg


@pytest.fixture
def no_build(monkeypatch):
    """Fails the test if the build starts: the output must be checked first."""
    def fail(*args, **kwargs):
        raise AssertionError("the build started before the output path was checked")

    monkeypatch.setattr(build_module, "read_points", fail)
    monkeypatch.setattr(build_module, "build_geocells", fail)


def test_unwritable_output_fails_before_the_build(tmp_path, no_build, monkeypatch):
    pts = tmp_path / "pts.csv"
    pts.write_text("lat,lon\n1,2\n")
    with pytest.raises(ValueError, match=f"^{tmp_path}: is a folder; out= takes the cells file"):
        _main(_cfg(pts, tmp_path))
    with pytest.raises(ValueError, match=f"^{pts}/cells.parquet: cannot create its folder: {pts} is a file"):
        _main(_cfg(pts, pts / "cells.parquet"))
    with pytest.raises(ValueError, match=f"{pts} is a file"):
        _main(_cfg(pts, pts / "deeper" / "cells.parquet"))
    # a read-only folder (simulated: root may write anywhere)
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    with pytest.raises(PermissionError, match=f"^{tmp_path}/ro/cells.parquet: cannot write in {tmp_path}/ro"):
        _main(_cfg(pts, tmp_path / "ro" / "cells.parquet"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_folder(tmp_path, no_build):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=f"^{ro}/cells.parquet: cannot write in {ro}"):
            _main(_cfg(tmp_path / "pts.csv", ro / "cells.parquet"))
    finally:
        ro.chmod(0o755)


def test_cli_user_errors_are_one_line(tmp_path):
    (tmp_path / "header.csv").write_text("lat,lon\n")
    res = subprocess.run([sys.executable, "-m", "geocells.build", f"points={tmp_path / 'header.csv'}",
                          f"out={tmp_path / 'cells.parquet'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"geocells.build: error: {tmp_path / 'header.csv'}: no rows, only a header (columns ['lat', 'lon']); "
        "expected one row per training photo"]
