import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geoloc.data.images import SkipReport
from geoloc.data.readers import load_reference_latlng, read_im2gps, read_latlng_csv, read_yfcc4k

HEADER = "IMG_ID,AUTHOR,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban\n"
ROWS = [  # id, author, lat, lon
    ("a_1@N00.jpg", "1@N00", 48.8566, 2.3522),
    ("b_1@N00.jpg", "1@N00", 40.7128, -74.0060),
    ("c_2@N00.jpg", "2@N00", -33.8688, 151.2093),
    ("d_3@N00.jpg", "3@N00", 35.6762, 139.6503),
]


def write_im2gps(root, rows=ROWS, header=HEADER, images=True):
    root.mkdir(parents=True, exist_ok=True)
    lines = [header] + [f"{i},{a},{la},{lo},1,2,3,0.1,0.2,0.7\n" for i, a, la, lo in rows]
    (root / "im2gps3k_places365.csv").write_text("".join(lines))
    if images:
        (root / "images").mkdir(exist_ok=True)
        for k, (i, *_ ) in enumerate(rows):
            Image.new("RGB", (16, 12), (10 * k, 20, 30)).save(root / "images" / i, format="JPEG")
    return root


def test_im2gps_reads_table_and_images(tmp_path):
    ds = read_im2gps(write_im2gps(tmp_path / "b"))
    assert len(ds) == 4 and ds.name == "im2gps3k" and not ds.synthetic and ds.notes == []
    np.testing.assert_array_equal(ds.latlng, [[r[2], r[3]] for r in ROWS])
    assert list(ds.table["AUTHOR"]) == ["1@N00", "1@N00", "2@N00", "3@N00"]
    skipped = SkipReport()
    items = list(ds.iter_items(skipped))
    assert [it.key for it in items] == [r[0] for r in ROWS] and len(skipped) == 0
    assert items[0].image.mode == "RGB" and items[0].image.size == (16, 12)
    assert items[2].latlng == (-33.8688, 151.2093) and items[2].meta["S3_Label"] == 1
    # exclude (resume) passes rows over without counting them
    assert [it.key for it in ds.iter_items(SkipReport(), exclude={"a_1@N00.jpg"})][0] == "b_1@N00.jpg"


def test_bad_images_are_skipped_with_reasons(tmp_path):
    root = write_im2gps(tmp_path / "b")
    (root / "images" / ROWS[0][0]).unlink()                        # missing
    (root / "images" / ROWS[1][0]).write_bytes(b"not a jpeg")      # unreadable
    good = (root / "images" / ROWS[2][0]).read_bytes()
    (root / "images" / ROWS[2][0]).write_bytes(good[: len(good) // 2])  # truncated
    ds = read_im2gps(root)
    ds.max_pixels = 100  # and the last one is "too large" for this limit
    skipped = SkipReport()
    assert list(ds.iter_items(skipped)) == []
    assert dict(skipped.counts) == {"missing": 1, "unreadable": 1, "truncated": 1, "decompression_bomb": 1}
    assert {k for k, *_ in skipped.items} == {r[0] for r in ROWS}


def test_coordinates_only(tmp_path):
    ds = read_im2gps(write_im2gps(tmp_path / "b", images=False), images=None)
    items = list(ds.iter_items(SkipReport()))
    assert len(items) == 4 and all(it.image is None for it in items) and not ds.has_images


def test_out_of_range_names_row(tmp_path):
    rows = ROWS[:2] + [("bad.jpg", "9@N00", 95.0, 10.0)]
    with pytest.raises(ValueError, match=r"im2gps3k_places365.csv.*row 4 \(bad.jpg\): lat=95.0"):
        read_im2gps(write_im2gps(tmp_path / "b", rows=rows, images=False), images=None)
    rows = ROWS[:2] + [("nan.jpg", "9@N00", "", 10.0)]
    with pytest.raises(ValueError, match=r"row 4 \(nan.jpg\): lat=nan"):
        read_im2gps(write_im2gps(tmp_path / "c", rows=rows, images=False), images=None)


def test_duplicate_ids_and_missing_columns(tmp_path):
    with pytest.raises(ValueError, match=r"'a_1@N00.jpg' appears on several lines \[2, 4\]"):
        read_im2gps(write_im2gps(tmp_path / "b", rows=ROWS[:2] + ROWS[:1], images=False), images=None)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "im2gps3k_places365.csv").write_text("IMG_ID,LAT\nx.jpg,1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['LON'\]"):
        read_im2gps(tmp_path / "c", images=None)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_im2gps(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        read_im2gps(write_im2gps(tmp_path / "d", images=False))


LEGACY_HEADER = HEADER.replace("LAT,LON", "LON,LAT")


def test_legacy_header_swap_detected_and_explained(tmp_path):
    # old copies: header LON,LAT but the values are lat, lon (positionally as in the real file)
    root = write_im2gps(tmp_path / "b", header=LEGACY_HEADER, images=False)
    with pytest.warns(UserWarning, match="known fault of old Im2GPS3k copies"):
        ds = read_im2gps(root, images=None)
    np.testing.assert_array_equal(ds.latlng, [[r[2], r[3]] for r in ROWS])
    assert len(ds.notes) == 1 and "latitude = column 'LON'" in ds.notes[0]
    # trusting the header instead fails loudly on the impossible latitudes, naming the row
    with pytest.raises(ValueError, match=r"row 4 \(c_2@N00.jpg\): lat=151.2093"):
        read_im2gps(root, images=None, lat_lon_order="header")


def test_legacy_header_ambiguous_is_an_error(tmp_path):
    rows = [("a.jpg", "1", 10.0, 20.0), ("b.jpg", "1", -30.0, 45.0)]  # every value fits both readings
    root = write_im2gps(tmp_path / "b", rows=rows, header=LEGACY_HEADER, images=False)
    with pytest.raises(ValueError, match="cannot be told from the data.*lat_lon_order='swapped'"):
        read_im2gps(root, images=None)
    ds = read_im2gps(root, images=None, lat_lon_order="swapped")
    np.testing.assert_array_equal(ds.latlng, [[10.0, 20.0], [-30.0, 45.0]])


def test_standard_header_with_correct_values_has_no_notes(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = read_im2gps(write_im2gps(tmp_path / "b", images=False), images=None)
    assert ds.notes == []


def test_yfcc4k_numbered_columns(tmp_path):
    cols = ["0", "IMG_ID"] + [str(i) for i in range(2, 12)] + ["LON", "LAT"] + [str(i) for i in range(14, 25)]
    rows = []
    for n, (img, lat, lon) in enumerate([("10201275523.jpg", 43.649708, -79.365637),
                                         ("7289030198.jpg", 40.740067, -73.985495)]):
        r = {c: "" for c in cols}
        r.update({"0": n, "IMG_ID": img, "LON": lon, "LAT": lat, "3": "55289779@N00", "17": "CC BY"})
        rows.append(r)
    pd.DataFrame(rows, columns=cols).to_csv(tmp_path / "yfcc4k_places365.csv", index=False)
    ds = read_yfcc4k(tmp_path, images=None)
    np.testing.assert_array_equal(ds.latlng, [[43.649708, -79.365637], [40.740067, -73.985495]])
    assert list(ds.table["key"]) == ["10201275523.jpg", "7289030198.jpg"]
    assert ds.table["AUTHOR"][0] == "55289779@N00" and ds.table["license"][0] == "CC BY"


def test_plain_csv(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "x.png")
    (tmp_path / "photos.csv").write_text("path,lat,lon,note\nimgs/x.png,1.5,2.5,hello\nimgs/gone.png,3,4,\n")
    ds = read_latlng_csv(tmp_path / "photos.csv")
    skipped = SkipReport()
    items = list(ds.iter_items(skipped))
    assert [it.key for it in items] == ["imgs/x.png"] and items[0].latlng == (1.5, 2.5)
    assert items[0].meta["note"] == "hello" and dict(skipped.counts) == {"missing": 1}


def test_reference_csv(tmp_path):
    (tmp_path / "ref.csv").write_text("LAT,LON\n1,2\n3,4\n")
    np.testing.assert_array_equal(load_reference_latlng("csv", csv=tmp_path / "ref.csv"), [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="unknown reference source"):
        load_reference_latlng("nope")


@pytest.mark.shared_data
def test_real_im2gps3k_dev(shared_data):
    ds = read_im2gps(shared_data / "im2gps3k-dev")
    assert len(ds) == 1821 and ds.notes == []
    skipped = SkipReport()
    n = sum(1 for it in ds.iter_items(skipped) if it.image.mode == "RGB")
    assert n + len(skipped) == 1821


@pytest.mark.shared_data
def test_real_yfcc4k_and_im2gps_metadata(shared_data):
    y = read_yfcc4k(shared_data / "coords", images=None)
    assert len(y) == 4536 and y.table["key"].str.endswith(".jpg").all()
    assert (np.abs(y.latlng[:, 0]) <= 90).all()
    g = read_im2gps(shared_data / "coords", csv="im2gps_places365.csv", images=None, name="im2gps")
    assert len(g) == 237


def test_photographer_folds_are_disjoint_and_balanced():
    from geoloc.data.readers import photographer_folds

    authors = ["a"] * 50 + ["b"] * 30 + ["c"] * 20 + [f"x{i}" for i in range(40)] + ["", None]
    folds = photographer_folds(authors, 3, seed=1)
    assert folds.shape == (len(authors),)
    for name in ("a", "b", "c"):  # one photographer, one fold
        assert len({f for f, a in zip(folds, authors) if a == name}) == 1
    counts = np.bincount(folds, minlength=3)
    assert sorted(counts) == [46, 46, 50]  # "a" (50) alone; the other 92 photos split evenly
    assert np.array_equal(folds, photographer_folds(authors, 3, seed=1))  # deterministic
    with pytest.raises(ValueError, match="n_folds"):
        photographer_folds(authors, 1)


def test_read_im2gps_folds(shared_data):
    from geoloc.data.readers import read_im2gps

    root = shared_data / "im2gps3k-dev"
    parts = [read_im2gps(root, folds=5, fold=k) for k in range(5)]
    assert sum(len(p) for p in parts) == len(read_im2gps(root))
    authors = [set(p.table["AUTHOR"]) for p in parts]
    assert all(not (authors[i] & authors[j]) for i in range(5) for j in range(i + 1, 5))
    assert len(read_im2gps(root, folds=5, fold=[0, 1])) == len(parts[0]) + len(parts[1])
    with pytest.raises(ValueError, match="fold"):
        read_im2gps(root, folds=5)


def _yfcc_csv(path, rows=(("10201275523.jpg", 43.649708, -79.365637),)):
    """A YFCC4k metadata file in the distributed layout: numbered columns, IMG_ID, LON, LAT among them."""
    cols = ["0", "IMG_ID"] + [str(i) for i in range(2, 12)] + ["LON", "LAT"] + [str(i) for i in range(14, 25)]
    table = [{**{c: "" for c in cols}, "0": n, "IMG_ID": img, "LON": lon, "LAT": lat}
             for n, (img, lat, lon) in enumerate(rows)]
    pd.DataFrame(table, columns=cols).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("reader", ["im2gps", "yfcc4k", "latlng_csv", "reference"])
def test_empty_header_only_and_directory_csvs_are_errors_naming_the_file(tmp_path, reader):
    header = {"im2gps": HEADER, "yfcc4k": "0,IMG_ID,2,LON,LAT\n", "latlng_csv": "path,lat,lng\n",
              "reference": "LAT,LON\n"}[reader]
    path = tmp_path / "data.csv"

    def read():
        if reader == "im2gps":
            return read_im2gps(tmp_path, csv="data.csv", images=None)
        if reader == "yfcc4k":
            return read_yfcc4k(tmp_path, csv="data.csv", images=None)
        if reader == "latlng_csv":
            return read_latlng_csv(path)
        return load_reference_latlng("csv", csv=path)

    for content, what in [("", "is empty"), ("\n\n", "is empty"), (header, "has a header but no rows"),
                          (header + "\n", "has a header but no rows")]:
        path.write_text(content)
        with pytest.raises(ValueError, match=what) as e:
            read()
        assert str(e.value).startswith(f"{path}: "), content
    path.unlink()
    path.mkdir()
    with pytest.raises(ValueError, match="is a directory") as e:
        read()
    assert str(e.value).startswith(f"{path}: ")


def test_yfcc4k_reader_refuses_an_im2gps_file(tmp_path):
    write_im2gps(tmp_path, images=False)
    with pytest.raises(ValueError, match=r"im2gps3k_places365.csv: has no numbered columns.*Im2GPS format.*"
                                         r"data=im2gps3k or data=im2gps"):
        read_yfcc4k(tmp_path, csv="im2gps3k_places365.csv", images=None)


def test_im2gps_reader_refuses_a_yfcc4k_file(tmp_path):
    _yfcc_csv(tmp_path / "yfcc4k_places365.csv")
    with pytest.raises(ValueError, match=r"yfcc4k_places365.csv: has numbered columns.*data=yfcc4k"):
        read_im2gps(tmp_path, csv="yfcc4k_places365.csv", images=None)
    assert len(read_yfcc4k(tmp_path, images=None)) == 1


@pytest.mark.shared_data
def test_real_benchmark_files_are_refused_by_the_other_reader(shared_data):
    with pytest.raises(ValueError, match="data=yfcc4k"):
        read_im2gps(shared_data / "coords", csv="yfcc4k_places365.csv", images=None)
    with pytest.raises(ValueError, match="data=im2gps3k"):
        read_yfcc4k(shared_data / "im2gps3k-dev", csv="im2gps3k_places365.csv", images=None)
    with pytest.raises(ValueError, match="data=im2gps3k"):
        read_yfcc4k(shared_data / "coords", csv="im2gps_places365.csv", images=None)


def test_embedded_sample_format_is_read_as_im2gps(tmp_path):
    from geoloc.data.sample import CSV_COLUMNS

    (tmp_path / "sample.csv").write_text(",".join(CSV_COLUMNS) + "\n" + "s1.jpg,a1,10.5,20.5,test,Cfb,1\n")
    ds = read_im2gps(tmp_path, csv="sample.csv", images=None, split="test")
    np.testing.assert_array_equal(ds.latlng, [[10.5, 20.5]])


def test_longitude_out_of_range_names_file_line_and_id(tmp_path):
    rows = ROWS[:2] + [("far.jpg", "9@N00", 10.0, 200.0)]
    with pytest.raises(ValueError, match=r"im2gps3k_places365.csv.*row 4 \(far.jpg\): lat=10.0, lng=200.0"):
        read_im2gps(write_im2gps(tmp_path / "b", rows=rows, images=False), images=None)
    (tmp_path / "photos.csv").write_text("path,lat,lng\nx.jpg,1,2\ny.jpg,3,200\n")
    with pytest.raises(ValueError, match=r"photos.csv.*row 3 \(y.jpg\): lat=3.0, lng=200.0"):
        read_latlng_csv(tmp_path / "photos.csv")
