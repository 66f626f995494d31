"""Every command answers a user's bad input or bad file with one clear line naming it, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO


def _run(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.csv").write_text("")
    (d / "header_only.csv").write_text("path,lat,lng\n")
    (d / "text.ckpt").write_text("not a checkpoint\n")
    (d / "empty.ckpt").write_bytes(b"")
    (d / "cells.parquet").write_text("not parquet")
    return d


CASES = {
    "evaluate: no such benchmark folder": (["evaluate.py", "data=im2gps3k", "data.root={d}/nowhere", "predictor=prior",
                                            "output_dir={d}/e1"], "{d}/nowhere/im2gps3k_places365.csv: no such file"),
    "evaluate: an empty CSV": (["evaluate.py", "data=csv", "data.path={d}/empty.csv", "output_dir={d}/e2"],
                               "{d}/empty.csv"),
    "evaluate: a model without ckpt": (["evaluate.py", "predictor=model", "output_dir={d}/e3"], "no checkpoint given"),
    "evaluate: a damaged checkpoint": (["evaluate.py", "predictor=model", "ckpt={d}/text.ckpt", "output_dir={d}/e4"],
                                       "{d}/text.ckpt: cannot be read as a checkpoint"),
    "train: no cells": (["train.py", "output_dir={d}/t1"], "the setting 'cells' is required"),
    "train: cells that are not parquet": (["train.py", "cells={d}/cells.parquet", "output_dir={d}/t2"],
                                          "{d}/cells.parquet: not a geocell file"),
    "shards: a header-only CSV": (["-m", "geoloc", "shards", "data=csv", "data.path={d}/header_only.csv", "out={d}/s"],
                                  "{d}/header_only.csv: has a header but no rows"),
    "index: a text checkpoint": (["-m", "geoloc", "index", "ckpt={d}/text.ckpt"], "{d}/text.ckpt: cannot be read"),
    "export: an empty checkpoint": (["-m", "geoloc", "export", "ckpt={d}/empty.ckpt", "out={d}/m.pt"],
                                    "{d}/empty.ckpt: is empty"),
    "tune: a missing checkpoint": (["-m", "geoloc", "tune", "ckpt={d}/none.ckpt"],
                                   "{d}/none.ckpt: no such checkpoint"),
    "report: a folder without metrics": (["-m", "geoloc", "report", "{d}/nowhere"], "{d}/nowhere/metrics.json"),
    "predict: a cells file that is not parquet": (["-m", "geoloc.inference.cli", "x.jpg", "--model", "{d}/text.ckpt"],
                                                  "{d}/text.ckpt: cannot be read as a checkpoint"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_clear_line_and_no_traceback(bad_files, case):
    args, expect = CASES[case]
    r = _run(*[a.format(d=bad_files) for a in args])
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert expect.format(d=bad_files) in r.stderr, r.stderr[-3000:]


def test_user_errors_unwraps_hydra_and_keeps_bugs_loud(capsys, monkeypatch):
    from hydra.errors import InstantiationException

    from geoloc.cli import user_errors

    def wrapped():
        try:
            raise FileNotFoundError("data.csv: no such file")
        except FileNotFoundError as e:
            raise InstantiationException("Error in call to target 'x'") from e

    with pytest.raises(SystemExit) as e:
        user_errors("prog")(wrapped)()
    assert e.value.code == 2 and capsys.readouterr().err == "prog: error: data.csv: no such file\n"
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: its traceback stays
        user_errors("prog")(lambda: 1 / 0)()
    monkeypatch.setenv("GEOLOC_DEBUG", "1")
    with pytest.raises(InstantiationException):
        user_errors("prog")(wrapped)()
