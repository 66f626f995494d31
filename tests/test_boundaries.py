"""Admin-0 + admin-1 boundaries: the committed GeoParquet, its loader and the build on tiny synthetic inputs.

Offline: the build is exercised on GeoJSON written to tmp_path (no npm)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, box

from geocells import boundaries as B

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def committed() -> gpd.GeoDataFrame:
    if not B.DEFAULT_PATH.is_file():
        pytest.fail(f"{B.DEFAULT_PATH} missing: rebuild with python -m geocells.boundaries")
    return B.load_boundaries()


def _regions_at(gdf: gpd.GeoDataFrame, latlng) -> list[list[tuple]]:
    """For each ``[lat, lng]``, the (adm0_a3, admin1_code, admin1_name, level) rows containing it."""
    latlng = np.asarray(latlng, dtype=float)
    tree = shapely.STRtree(gdf.geometry.to_numpy())
    pt_idx, geom_idx = tree.query(shapely.points(latlng[:, 1], latlng[:, 0]), predicate="intersects")
    out = [[] for _ in range(len(latlng))]
    for p, g in zip(pt_idx, geom_idx):
        row = gdf.iloc[g]
        out[p].append((row.adm0_a3, row.admin1_code, row.admin1_name, int(row.level)))
    return out


# ------------------------------------------------------------------------------------------- committed file


def test_committed_file_schema_and_size(committed):
    assert B.DEFAULT_PATH.stat().st_size <= 15_000_000
    for col in B.REQUIRED_COLUMNS:
        assert col in committed.columns
    assert committed.crs.to_epsg() == 4326
    assert committed["region_id"].dtype == np.int32
    assert np.array_equal(committed["region_id"].to_numpy(), np.arange(len(committed)))
    assert set(committed["level"].unique()) == {0, 1}
    lvl0 = committed[committed["level"] == 0]
    assert (lvl0["admin1_code"] == "").all() and (committed.loc[committed["level"] == 1, "admin1_code"] != "").all()
    assert committed["iso_a2"].str.fullmatch(r"[A-Z]{2}|").all()  # never Natural Earth's -99 / -1
    assert len(committed) > 4500 and committed["adm0_a3"].nunique() == 258  # every admin-0 country


def test_committed_geometries_valid_polygonal(committed):
    geoms = committed.geometry.to_numpy()
    assert shapely.is_valid(geoms).all()
    assert not shapely.is_empty(geoms).any()
    assert set(committed.geometry.geom_type) <= {"Polygon", "MultiPolygon"}
    lng, lat = shapely.get_coordinates(geoms).T
    assert lng.min() >= -180 and lng.max() <= 180 and lat.min() >= -90 and lat.max() <= 90


@pytest.mark.parametrize(
    "name, latlng, adm0_a3, admin1_code, admin1_name",
    [
        ("Paris", (48.8566, 2.3522), "FRA", "FR-75", "Paris"),  # Natural Earth 10m uses French departments
        ("Munich", (48.1351, 11.5820), "DEU", "DE-BY", "Bayern"),
        ("Sydney", (-33.8688, 151.2093), "AUS", "AU-NSW", "New South Wales"),
        ("Reykjavik", (64.1466, -21.9426), "ISL", "IS-0", "Reykjavík"),
        ("New York", (40.7128, -74.0060), "USA", "US-NY", "New York"),
        ("Bir Tawil", (21.87, 33.75), "BRT", "", ""),  # level 0, cut out of Sudan's Red Sea state
    ],
)
def test_known_points(committed, name, latlng, adm0_a3, admin1_code, admin1_name):
    [hits] = _regions_at(committed, [latlng])
    assert [h[:3] for h in hits] == [(adm0_a3, admin1_code, admin1_name)], name


def test_open_ocean_is_nowhere(committed):
    assert _regions_at(committed, [(30.0, -40.0), (-40.0, -120.0)]) == [[], []]


@pytest.mark.parametrize("adm0_a3", ["FRA", "DEU", "USA", "CYP", "SDN"])
def test_regions_of_a_country_do_not_overlap(committed, adm0_a3):
    geoms = committed.loc[committed["adm0_a3"] == adm0_a3].geometry.to_numpy()
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="intersects")
    pair = left < right
    overlap = shapely.area(shapely.intersection(geoms[left[pair]], geoms[right[pair]])).sum()
    assert overlap <= 1e-9 * shapely.area(geoms).sum()
    assert shapely.coverage_is_valid(geoms)  # shared borders are identical after simplification


# ---------------------------------------------------------------------------------------------- the loader


def _write(tmp_path: Path, geoms, *, drop=(), crs=4326, name="b.parquet") -> Path:
    n = len(geoms)
    gdf = gpd.GeoDataFrame(
        {
            "region_id": np.arange(n, dtype=np.int32),
            "adm0_a3": ["AAA"] * n,
            "iso_a2": ["AA"] * n,
            "country": ["Aland"] * n,
            "continent": ["Europe"] * n,
            "admin1_code": [f"AA-{i}" for i in range(n)],
            "admin1_name": [f"Region {i}" for i in range(n)],
            "level": np.ones(n, dtype=np.int8),
        },
        geometry=list(geoms),
        crs=crs,
    ).drop(columns=list(drop))
    path = tmp_path / name
    gdf.to_parquet(path)
    return path


BOWTIE = Polygon([(0, 0), (1, 1), (1, 0), (0, 1), (0, 0)])
COLLAPSED = Polygon([(0, 0), (1, 1), (2, 2), (0, 0)])  # zero area: make_valid leaves a line


def test_load_repairs_bowtie(tmp_path):
    path = _write(tmp_path, [box(2, 2, 3, 3), BOWTIE])
    assert not BOWTIE.is_valid
    gdf = B.load_boundaries(path)
    fixed = gdf.geometry.iat[1]
    assert fixed.is_valid and fixed.geom_type == "MultiPolygon"
    assert fixed.area == pytest.approx(0.5)  # two triangles
    assert gdf.geometry.iat[0].equals(box(2, 2, 3, 3))


def test_load_rejects_feature_without_polygon(tmp_path):
    path = _write(tmp_path, [box(2, 2, 3, 3), COLLAPSED])
    with pytest.raises(ValueError) as err:
        B.load_boundaries(path)
    msg = str(err.value)
    assert str(path) in msg and "region_id=1" in msg and "'AAA'" in msg and "Region 1" in msg


def test_load_names_missing_columns(tmp_path):
    path = _write(tmp_path, [box(0, 0, 1, 1)], drop=("continent", "level"))
    with pytest.raises(ValueError, match=r"continent.*level|level.*continent") as err:
        B.load_boundaries(path)
    assert str(path) in str(err.value)


def test_load_rejects_other_crs(tmp_path):
    path = _write(tmp_path, [box(0, 0, 1, 1)], crs=3857)
    with pytest.raises(ValueError, match="EPSG:4326"):
        B.load_boundaries(path)


def test_repair_inputs_skips_and_reports(tmp_path):
    gdf = gpd.GeoDataFrame({"adm0_a3": ["AAA", "BBB", "CCC"]}, geometry=[box(0, 0, 1, 1), BOWTIE, COLLAPSED],
                           crs=4326)
    out, rep = B.repair_polygons(gdf, what="in.geojson", label_columns=("adm0_a3",), on_empty="skip")
    assert list(out["adm0_a3"]) == ["AAA", "BBB"]
    assert len(rep["repaired"]) == 1 and "BBB" in rep["repaired"][0]
    assert len(rep["dropped"]) == 1 and "in.geojson: row 2" in rep["dropped"][0] and "CCC" in rep["dropped"][0]


# ----------------------------------------------------------------------------------------------- the build


def _geojson(path: Path, features: list[tuple[dict, object]]) -> Path:
    fc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": props, "geometry": shapely.geometry.mapping(geom)}
            for props, geom in features
        ],
    }
    path.write_text(json.dumps(fc))
    return path


def _admin0(tmp_path: Path, extra=()) -> Path:
    # Capitalized columns, as in the official ne_10m_admin_0_countries shapefile.
    return _geojson(tmp_path / "admin0.geojson", [
        ({"ADM0_A3": "AAA", "SOV_A3": "AAA", "ISO_A2_EH": "-99", "ISO_A2": "-99", "NAME": "Aaland",
          "CONTINENT": "Europe", "NE_ID": 10}, box(0, 0, 1, 1)),
        ({"ADM0_A3": "BBB", "SOV_A3": "BBB", "ISO_A2_EH": "BB", "ISO_A2": "-99", "NAME": "Beeland",
          "CONTINENT": "Africa", "NE_ID": 11}, box(1, 0, 2, 1)),
        *extra,
    ])


def _admin1(tmp_path: Path, features) -> Path:
    return _geojson(tmp_path / "admin1.geojson", features)


def _a1(a3, code, name, geom, ne_id, **kw) -> tuple[dict, object]:
    return ({"adm0_a3": a3, "iso_3166_2": code, "name": name, "iso_a2": kw.pop("iso_a2", "AA"),
             "ne_id": ne_id, **kw}, geom)


def test_build_two_squares(tmp_path):
    admin0 = _admin0(tmp_path)
    # AAA split in two; the east half names its country by a variant code (gu_a3) that the build must map.
    admin1 = _admin1(tmp_path, [
        _a1("AAA", "AA-W", "West", box(0, 0, 0.5, 1), 20),
        _a1("AAX", "AA-E", "East", box(0.5, 0, 1, 1), 21, gu_a3="AAA"),
    ])
    out = tmp_path / "out" / "b.parquet"
    regions, report = B.build_boundaries(admin0_path=admin0, admin1_path=admin1, out=out, tolerance_deg=0.001,
                                         log=lambda s: None)
    gdf = B.load_boundaries(out)
    assert list(gdf.columns) == [*B.REQUIRED_COLUMNS[:-1], "ne_id", "geometry"]
    rows = gdf.drop(columns="geometry").to_dict("records")
    assert rows == [
        {"region_id": 0, "adm0_a3": "AAA", "iso_a2": "AA", "country": "Aaland", "continent": "Europe",
         "admin1_code": "AA-E", "admin1_name": "East", "level": 1, "ne_id": 21},
        {"region_id": 1, "adm0_a3": "AAA", "iso_a2": "AA", "country": "Aaland", "continent": "Europe",
         "admin1_code": "AA-W", "admin1_name": "West", "level": 1, "ne_id": 20},
        {"region_id": 2, "adm0_a3": "BBB", "iso_a2": "BB", "country": "Beeland", "continent": "Africa",
         "admin1_code": "", "admin1_name": "", "level": 0, "ne_id": 11},
    ]
    assert gdf["region_id"].dtype == np.int32 and gdf["level"].dtype == np.int8
    assert [len(h) for h in _regions_at(gdf, [(0.5, 0.25), (0.5, 0.75), (0.5, 1.5), (5.0, 5.0)])] == [1, 1, 1, 0]
    assert _regions_at(gdf, [(0.5, 0.25)])[0][0][1] == "AA-W"
    assert gdf.geometry.iat[2].equals(box(1, 0, 2, 1))
    assert report.code_matches == ["AAX -> AAA via gu_a3=AAA (first: admin-1 row 1 (AA-E 'East', adm0_a3='AAX'))"]
    assert report.iso_a2_fixes == ["AAA: iso_a2 'AA' from admin-1 (admin-0 has '-99'/'-99')"]
    assert report.simplification["coverage_valid_after"] and report.simplification["hausdorff_km"]["max"] == 0.0
    # Deterministic: a second build writes the same bytes.
    B.build_boundaries(admin0_path=admin0, admin1_path=admin1, out=tmp_path / "again.parquet", tolerance_deg=0.001,
                       log=lambda s: None)
    assert (tmp_path / "again.parquet").read_bytes() == out.read_bytes()
    assert not list(out.parent.glob(".*.tmp"))  # the atomic write left no temporary file


def test_build_reconciles_overlaps_and_gaps(tmp_path):
    # CCC (no admin-1) lies inside AAA's West region: it is cut out of it. AAA's admin-1 leave a strip of
    # AAA uncovered (lng 0.9-1): it becomes a level-0 row of AAA. BBB's only admin-1 is a bow-tie: repaired
    # into two triangles, and the two other triangles of BBB become BBB's level-0 row.
    admin0 = _admin0(tmp_path, extra=[
        ({"ADM0_A3": "CCC", "SOV_A3": "CCC", "ISO_A2_EH": "-99", "ISO_A2": "-99", "NAME": "Zone",
          "CONTINENT": "Europe", "NE_ID": 12}, box(0.1, 0.1, 0.2, 0.2)),
    ])
    admin1 = _admin1(tmp_path, [
        _a1("AAA", "AA-W", "West", box(0, 0, 0.5, 1), 20),
        _a1("AAA", "AA-E", "East", box(0.5, 0, 0.9, 1), 21),
        _a1("BBB", "BB-1", "Bow", Polygon([(1, 0), (2, 1), (2, 0), (1, 1), (1, 0)]), 30, iso_a2="BB"),
    ])
    out = tmp_path / "b.parquet"
    _, report = B.build_boundaries(admin0_path=admin0, admin1_path=admin1, out=out, tolerance_deg=0.0,
                                   log=lambda s: None)
    gdf = B.load_boundaries(out)
    key = [(r.adm0_a3, r.admin1_code, int(r.level)) for r in gdf.itertuples()]
    assert key == [("AAA", "", 0), ("AAA", "AA-E", 1), ("AAA", "AA-W", 1), ("BBB", "", 0), ("BBB", "BB-1", 1),
                   ("CCC", "", 0)]
    assert gdf.geometry.iat[0].normalize().equals(box(0.9, 0, 1, 1).normalize())  # the uncovered strip
    assert gdf.geometry.iat[2].area == pytest.approx(0.5 - 0.01)  # West minus the hole CCC
    assert gdf.geometry.iat[3].area == pytest.approx(0.5) and gdf.geometry.iat[4].area == pytest.approx(0.5)
    assert _regions_at(gdf, [(0.15, 0.15)]) == [[("CCC", "", "", 0)]]
    assert report.whole_countries == ["CCC 'Zone'"] and len(report.carved) == 1 and len(report.remainders) == 2
    assert len(report.repairs["admin1"]["repaired"]) == 1
    assert gdf["iso_a2"].tolist() == ["AA", "AA", "AA", "BB", "BB", ""]
    assert shapely.coverage_is_valid(gdf.geometry.to_numpy())


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="boundaries", overrides=list(overrides))


def test_build_command(tmp_path):
    from geocells.boundaries.__main__ import main

    admin0 = _admin0(tmp_path)
    admin1 = _admin1(tmp_path, [_a1("AAA", "AA-1", "All", box(0, 0, 1, 1), 20)])
    defaults = _compose()
    assert (defaults.admin0, defaults.admin1, defaults.out, defaults.tolerance_deg) == (None, None, None, 0.003)
    out = tmp_path / "cli.parquet"
    regions, report = main(_compose(f"admin0={admin0}", f"admin1={admin1}", f"out={out}", "measure=false"))
    assert len(B.load_boundaries(out)) == len(regions) == 2 and report.output["path"] == str(out)
    rows = main(_compose(f"admin0={admin0}", f"admin1={admin1}", "sweep=[0.001,0.01]"))
    assert [r["tolerance_deg"] for r in rows] == [0.001, 0.01] and all(r["coverage_valid"] for r in rows)


def test_build_command_bad_source_is_one_line(tmp_path):
    admin1 = _admin1(tmp_path, [_a1("AAA", "AA-1", "All", box(0, 0, 1, 1), 20)])
    out = tmp_path / "cli.parquet"
    r = subprocess.run([sys.executable, "-m", "geocells.boundaries", f"admin0={tmp_path / 'nope.shp'}",
                        f"admin1={admin1}", f"out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip() == f"geocells.boundaries: error: {tmp_path / 'nope.shp'}: no such boundary file"
    assert not out.exists()


def test_build_command_missing_package_is_one_line(tmp_path, monkeypatch, capsys):
    from geocells.boundaries import build
    from geocells.boundaries.__main__ import main

    def missing():
        raise ModuleNotFoundError("geoloc needs the 'geo_country_service' package for the default admin-0 source, "
                                  "but it is not installed; install it with `pip install geo_country_service`.")

    monkeypatch.setattr(build, "default_admin0_path", missing)
    admin1 = _admin1(tmp_path, [_a1("AAA", "AA-1", "All", box(0, 0, 1, 1), 20)])
    with pytest.raises(SystemExit) as e:
        main(_compose(f"admin1={admin1}", f"out={tmp_path / 'x.parquet'}"))
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["geocells.boundaries: error: geoloc needs the "
                                                    "'geo_country_service' package for the default admin-0 source, "
                                                    "but it is not installed; install it with `pip install "
                                                    "geo_country_service`."]


def test_fetch_without_npm_says_so(tmp_path, monkeypatch):
    from geocells.boundaries import fetch

    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="npm not found.*admin1=package/data/build.json"):
        B.fetch_admin1_json(tmp_path)


def test_one_loader_for_geoloc_and_geocells():
    from geoloc.geo import boundaries as G

    assert B.load_boundaries is G.load_boundaries and B.REQUIRED_COLUMNS == G.REQUIRED_COLUMNS
    assert G.admin_boundaries_path().resolve() == B.DEFAULT_PATH.resolve()


# ------------------------------------------------------------------------------------------ simplification


def test_coverage_simplify_keeps_shared_border():
    # Two squares sharing a wiggly border (1 m zigzag): both sides must move together.
    ys = np.linspace(0, 1, 201)
    xs = 0.5 + 0.00001 * (np.arange(201) % 2)
    border = list(zip(xs, ys))
    left = Polygon([(0, 0), *border, (0, 1)])
    right = Polygon([(1, 0), (1, 1), *border[::-1]])
    assert shapely.coverage_is_valid(np.array([left, right]))
    out, info = B.simplify_regions(np.array([left, right]), 0.001)
    assert info["fallback_rows"] == []
    assert shapely.coverage_is_valid(out) and shapely.is_valid(out).all()
    assert shapely.get_num_coordinates(out).sum() < shapely.get_num_coordinates(np.array([left, right])).sum() / 10
    assert shapely.area(shapely.intersection(out[0], out[1])) == 0.0
    h = B.hausdorff_km(np.array([left, right]), out)
    assert (h < 0.01).all()  # the zigzag is ~1 m wide


def test_hausdorff_km_golden():
    # A square moved 0.01 degrees north: 1.112 km on the sphere (6371.0088 km * 0.01 deg in radians).
    a = box(10, 40, 11, 41)
    b = box(10, 40.01, 11, 41.01)
    h = B.hausdorff_km(np.array([a]), np.array([b]))
    assert h[0] == pytest.approx(6371.0088 * np.radians(0.01), rel=1e-6)
    # East-west distances shrink with cos(lat): 0.01 deg of longitude at 60 N is about 0.556 km.
    h = B.hausdorff_km(np.array([box(10, 59, 11, 61)]), np.array([box(10.01, 59, 11.01, 61)]))
    assert h[0] == pytest.approx(6371.0088 * np.radians(0.01) * np.cos(np.radians(59)), rel=1e-3)


def test_build_from_geopackage_layers(tmp_path):
    # The official all-in-one natural_earth_vector.gpkg holds both layers in one file.
    gpkg = tmp_path / "ne.gpkg"
    a0 = gpd.read_file(_admin0(tmp_path))
    a0.to_file(gpkg, layer="ne_10m_admin_0_countries", engine="pyogrio")
    a1 = gpd.read_file(_admin1(tmp_path, [_a1("AAA", "AA-1", "All", box(0, 0, 1, 1), 20)]))
    a1.to_file(gpkg, layer="ne_10m_admin_1_states_provinces", engine="pyogrio")
    regions, _ = B.build_boundaries(admin0_path=gpkg, admin0_layer="ne_10m_admin_0_countries",
                                    admin1_path=gpkg, admin1_layer="ne_10m_admin_1_states_provinces",
                                    out=None, log=lambda s: None)
    assert regions[["adm0_a3", "admin1_code", "level"]].values.tolist() == [["AAA", "AA-1", 1], ["BBB", "", 0]]
