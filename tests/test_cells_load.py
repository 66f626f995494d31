"""Geocells.load refuses files that are not geocell GeoParquet, naming the file and what is wrong."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geoloc.geo.cells import Geocells

NOT_GEOCELLS = "not a geocell file (GeoParquet written by python -m geocells.build)"


def _refusal(path) -> str:
    with pytest.raises(ValueError) as e:
        Geocells.load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: {NOT_GEOCELLS}: "), message
    return message[len(f"{path}: {NOT_GEOCELLS}: "):]


def test_a_text_file_is_not_a_geocell_file(tmp_path):
    (tmp_path / "cells.parquet").write_text("cell_id,lat,lng\n0,1,2\n")
    assert "magic bytes" in _refusal(tmp_path / "cells.parquet")


def test_a_truncated_parquet_file_is_not_a_geocell_file(tmp_path):
    path = tmp_path / "cells.parquet"
    pq.write_table(pa.table({"cell_id": [0, 1, 2], "n_points": [5, 6, 7]}), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "magic bytes" in _refusal(path)


def test_an_empty_file_is_not_a_geocell_file(tmp_path):
    (tmp_path / "cells.parquet").write_bytes(b"")
    assert _refusal(tmp_path / "cells.parquet") == "it is empty (0 bytes)"


def test_a_directory_is_not_a_geocell_file(tmp_path):
    assert _refusal(tmp_path) == "it is a directory"


def test_bad_geocell_metadata_is_not_a_geocell_file(tmp_path):
    path = tmp_path / "cells.parquet"
    table = pa.table({"cell_id": [0]}).replace_schema_metadata({b"geoloc.geocells": b"{not json"})
    pq.write_table(table, path)
    assert "metadata is not JSON" in _refusal(path)


def test_a_missing_file_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.parquet: no geocell file.*geocells.build"):
        Geocells.load(tmp_path / "nothing.parquet")


def test_a_parquet_table_without_geocell_columns_names_the_file(tmp_path):
    path = tmp_path / "cells.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), path)
    with pytest.raises(ValueError, match=rf"{path}: not a geocell table, missing column"):
        Geocells.load(path)
