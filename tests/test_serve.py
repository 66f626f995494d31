"""geoloc-serve: the same answers as geoloc-predict over HTTP, limits with clear 4xx errors, concurrent requests
that never mix, and the page driven in headless Chromium as a person uses it."""

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from geoloc.inference.serve import GeolocService, make_server

pytestmark = pytest.mark.formats  # make test-formats (CI runs it after make test)


@pytest.fixture(scope="module")
def server(tiny_text_run):
    from geoloc.inference.cli import load_predictor

    predictor = load_predictor(str(tiny_text_run["ckpt"]), topk=3, explain=True)
    service = GeolocService(predictor, max_bytes=2 * 2**20, max_pixels=2_000_000)
    srv = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}", predictor, tiny_text_run
    srv.shutdown()
    srv.server_close()


def _post(url, data: bytes, ctype="image/jpeg", name="photo.jpg"):
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": ctype, "X-Filename": name})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _photos(run, n):
    return sorted((run["sample"] / "images").glob("*.jpg"))[:n]


def test_health_and_the_page(server):
    url, predictor, _ = server
    with urllib.request.urlopen(url + "/health") as r:
        h = json.loads(r.read())
    assert h["status"] == "ok" and h["model"]["n_cells"] == len(predictor.cells)
    with urllib.request.urlopen(url + "/") as r:
        assert b"where was this photo taken" in r.read()
    for name in ("world", "cells"):
        with urllib.request.urlopen(f"{url}/{name}.json") as r:
            doc = json.loads(r.read())
        assert doc["type"] == "FeatureCollection" and doc["features"]
    assert _post(url + "/nowhere", b"x")[0] == 404


def test_predict_returns_what_geoloc_predict_prints(server):
    from geoloc.inference.cli import predict_files

    url, predictor, run = server
    photo = _photos(run, 1)[0]
    status, got = _post(url + "/predict", photo.read_bytes(), name=photo.name)
    assert status == 200 and "explanation" not in got
    (ref,) = predict_files([str(photo)], predictor)
    assert got["top_cells"] == ref["top_cells"] and got["latlng"] == ref["latlng"] and got["path"] == photo.name
    status, with_chain = _post(url + "/predict?explain=1", photo.read_bytes())
    assert status == 200 and with_chain["explanation"]["text"] == ref["explanation"]["text"]
    assert "generated" in with_chain["explanation"]
    # a multipart form (curl -F image=@photo.jpg)
    boundary = "geolocboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{photo.name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, form = _post(url + "/predict", body, ctype=f"multipart/form-data; boundary={boundary}")
    assert status == 200 and form["top_cells"] == ref["top_cells"]


def test_bad_requests_get_clear_4xx_errors(server, tmp_path):
    from PIL import Image

    url, _, run = server
    photo = _photos(run, 1)[0].read_bytes()
    status, e = _post(url + "/predict", photo, ctype="text/plain")
    assert status == 415 and "not an image" in e["error"]
    status, e = _post(url + "/predict", b"not a jpeg at all", ctype="image/jpeg")
    assert status == 400 and "not an image this service can read" in e["error"]
    status, e = _post(url + "/predict", b"\xff" * (3 * 2**20))
    assert status == 413 and "limit is 2 MB" in e["error"]
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 1500)).save(big)  # 3 MP > the 2 MP limit, a small file
    status, e = _post(url + "/predict", big.read_bytes(), ctype="image/png", name="big.png")
    assert status == 413 and "too many pixels" in e["error"] and "big.png" in e["error"]
    status, e = _post(url + "/predict", b"", ctype="image/jpeg")
    assert status == 400 and "empty" in e["error"]


def test_a_burst_of_concurrent_requests_each_get_their_own_answer(server):
    """8 requests at once, 24 in all, 12 different photos: every answer is the CLI's for that photo (one photo per
    call, as each request is)."""
    from geoloc.inference.cli import predict_files

    url, predictor, run = server
    photos = _photos(run, 12)
    ref = {p.name: r for p, r in zip(photos, predict_files([str(p) for p in photos], predictor, batch_size=1))}
    jobs = [photos[i % len(photos)] for i in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda p: (p.name, _post(url + "/predict", p.read_bytes(), name=p.name)), jobs))
    for name, (status, got) in answers:
        assert status == 200 and got["path"] == name
        assert got["top_cells"] == ref[name]["top_cells"] and got["latlng"] == ref[name]["latlng"]


def test_the_page_in_headless_chromium(server, tmp_path, request):
    """Upload a photo as a person does, wait for the map and the chain, check what the page shows."""
    from geoloc.inference.webdriver import Chromium, find_chromium

    found = find_chromium()
    if isinstance(found, str):
        pytest.skip(found)
    url, predictor, run = server
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "im2gps3k-dev" / "images"
    photo = next(iter(sorted(shared.glob("*.jpg"))), None) if shared.is_dir() else None
    photo = photo or _photos(run, 1)[0]
    with Chromium() as browser:
        browser.get(url + "/")
        browser.wait_for("svg#map[data-ready='1']")
        assert len(browser.find_all("#world path")) > 1000  # the admin-1 regions, drawn offline
        browser.find("#file").send_keys(str(photo))
        browser.wait_for("body[data-state='answered']", timeout=120)
        answer, chain = browser.find("#answer").text, browser.find("#chain").text
        assert "°" in answer and "top cell" in answer
        assert "Region:" in chain and "Generated by the text decoder" in chain
        assert browser.find_all("#answer-marker") and len(browser.find_all("#top-cells .cell")) == 3
        rows = browser.find_all("#cells tr")
        assert len(rows) == 3 and "cell" in rows[0].text
        shot = browser.screenshot(tmp_path / "page.png")
    assert shot.stat().st_size > 10_000
