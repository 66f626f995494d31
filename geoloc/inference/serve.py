"""``geoloc-serve``: the geolocator behind HTTP, with a page where a person drops a photo and sees where.

    geoloc-serve --model RUN/checkpoints/best.ckpt [--port 8000] [--host 127.0.0.1]
    geoloc-serve --model model.pt | model.onnx        # an exported model (TorchScript or ONNX)
    make serve                                         # the demo's model on http://127.0.0.1:8000

Endpoints:

* ``GET /``: the page (``geoloc/inference/web/index.html``): choose or drop a photo; the answer and the EXIF
  position (when the photo has one) as markers on a world map drawn from the committed admin-1 boundaries (no
  tile server, no network), the top cells shaded by probability, and the reasoning chain;
* ``POST /predict``: the photo as the request body (``Content-Type: image/jpeg``, ``image/png``, ...) or as the
  ``image`` field of a ``multipart/form-data`` form; ``?explain=1`` adds the reasoning chain. The answer is the
  JSON object ``geoloc-predict --json`` prints for a file (``path`` is the upload's name);
* ``GET /health``: ``{"status": "ok", "model": ...}``;
* ``GET /world.json``, ``GET /cells.json``: the map's regions and the model's cells (GeoJSON, simplified).

Limits, each a 4xx with a JSON ``{"error": ...}`` that says which: the upload's size (``--max-mb``, 413), its
pixel count (``--max-megapixels``, 413), its content type (415), a body that is not an image (400), a missing
length (411). Requests are served by threads; predictions run one at a time under a lock (the network already
uses every core), so concurrent answers never mix.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import json
import os
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")
PAGE = Path(__file__).with_name("web") / "index.html"


class RequestError(Exception):
    """A request the service refuses: its HTTP status and the message the client gets."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _simplified(gdf, tolerance: float, properties: list[str]) -> dict:
    """A GeoDataFrame as GeoJSON with simplified geometry and coordinates rounded to 0.01 degree."""
    import shapely

    geoms = shapely.set_precision(shapely.simplify(gdf.geometry.to_numpy(), tolerance, preserve_topology=True),
                                  0.01)
    features = []
    for i, g in enumerate(geoms):
        if g is None or g.is_empty:
            continue
        features.append({"type": "Feature", "geometry": shapely.geometry.mapping(g),
                         "properties": {p: _plain(gdf[p].iloc[i]) for p in properties if p in gdf.columns}})
    return {"type": "FeatureCollection", "features": features}


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return None if v is None or (isinstance(v, float) and v != v) else v


class GeolocService:
    """What the HTTP handler calls: prediction with limits, and the map's data (built once, on first use).

    Args:
        predictor: a predictor with ``explain`` on (the chain is left out of answers that do not ask for it).
        max_bytes: the largest upload.
        max_pixels: the largest image (width x height).
    """

    def __init__(self, predictor, *, max_bytes: int = 20 * 2**20, max_pixels: int = 40_000_000):
        self.predictor, self.max_bytes, self.max_pixels = predictor, int(max_bytes), int(max_pixels)
        self._lock = threading.Lock()
        self._maps: dict[str, bytes] = {}
        self.started = time.time()
        self.served = 0

    def health(self) -> dict:
        d = self.predictor.describe()
        return {"status": "ok", "model": {k: d.get(k) for k in ("name", "kind", "ckpt", "model", "backbone",
                                                                "n_cells", "refine", "decode", "explain")},
                "uptime_s": round(time.time() - self.started, 1), "predictions": self.served}

    def predict(self, data: bytes, name: str, *, explain: bool) -> dict:
        """The ``geoloc-predict --json`` object for one uploaded photo."""
        from geoloc.data.images import ImageError, decode_image, read_exif_latlng
        from geoloc.inference.cli import fill_result

        try:
            image = decode_image(data, name=name, max_pixels=self.max_pixels)
        except ImageError as e:
            if e.reason == "decompression_bomb":
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"{name}: the image has too many pixels ({e.detail}); the limit is "
                                   f"{self.max_pixels / 1e6:g} megapixels") from e
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}: not an image this service can read ({e.reason}"
                               + (f": {e.detail}" if e.detail else "") + ")") from e
        exif = read_exif_latlng(data)
        r = {"path": name, "latlng": None, "top_cells": [], "exif_latlng": list(exif) if exif else None,
             "exif_distance_km": None, "error": None}
        with self._lock:  # one prediction at a time: the network uses every core, and answers never mix
            out = self.predictor.predict([image], [name])
            self.served += 1
        fill_result(r, out, 0, self.predictor.cells.table)
        if not explain:
            r.pop("explanation", None)
        return r

    def map_data(self, which: str) -> bytes:
        """``world`` (the committed admin-1 regions) or ``cells`` (the model's cells; centroids only for an
        exported model, whose file carries no geometry) as GeoJSON bytes."""
        if which not in self._maps:
            if which == "world":
                from geoloc.geo.boundaries import admin_boundaries_path, load_boundaries

                doc = _simplified(load_boundaries(admin_boundaries_path()), 0.08, ["country", "admin1_name"])
            else:
                table = self.predictor.cells.table
                if "geometry" in getattr(table, "columns", ()):
                    t = table.assign(cell_id=range(len(table)))
                    doc = _simplified(t, 0.05, ["cell_id", "country", "admin1_name"])
                else:
                    doc = {"type": "FeatureCollection", "features": [
                        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [float(r["centroid_lng"]),
                                                                                          float(r["centroid_lat"])]},
                         "properties": {"cell_id": i, "country": _plain(r.get("country")),
                                        "admin1_name": _plain(r.get("admin1_name"))}}
                        for i, (_, r) in enumerate(table.iterrows())]}
            self._maps[which] = json.dumps(doc, separators=(",", ":")).encode()
        return self._maps[which]


def _upload(headers, body: bytes) -> tuple[bytes, str, str]:
    """``(image bytes, name, content type)`` of a raw image body or of a form's ``image`` field."""
    ctype = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data":
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + headers.get("Content-Type").encode() + b"\r\n\r\n" + body)
        for part in msg.iter_parts():
            if part.get_param("name", header="content-disposition") == "image":
                ptype = part.get_content_type().lower()
                if ptype not in IMAGE_TYPES and ptype != "application/octet-stream":
                    raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                       f"the image field is {ptype}; send one of {', '.join(IMAGE_TYPES)}")
                return part.get_payload(decode=True) or b"", part.get_filename() or "upload", ptype
        raise RequestError(HTTPStatus.BAD_REQUEST, "the form has no 'image' field")
    if ctype not in IMAGE_TYPES:
        raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type {ctype or '(none)'} is not an image; send one of {', '.join(IMAGE_TYPES)}"
                           " or a multipart/form-data form with an 'image' field")
    return body, headers.get("X-Filename") or "upload", ctype


def make_handler(service: GeolocService):
    """The request handler class for ``service``."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "geoloc-serve"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one line per request on stderr, not the default's noise
            if os.environ.get("GEOLOC_SERVE_QUIET") != "1":
                sys.stderr.write(f"geoloc-serve: {self.address_string()} {fmt % args}\n")

        def _send(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, obj) -> None:
            self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

        def do_GET(self):
            path = urlparse(self.path).path
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif path == "/health":
                self._json(HTTPStatus.OK, service.health())
            elif path in ("/world.json", "/cells.json"):
                self._send(HTTPStatus.OK, service.map_data(path[1:-5]), "application/geo+json")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page {path}; see / and POST /predict"})

        def do_POST(self):
            url = urlparse(self.path)
            if url.path != "/predict":
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {url.path}; POST /predict"})
                return
            try:
                length = self.headers.get("Content-Length")
                if length is None:
                    raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the photo with a Content-Length")
                n = int(length)
                if n > service.max_bytes:
                    if n <= 8 * service.max_bytes:  # read and dropped, so that the client hears the answer
                        left = n
                        while left > 0:
                            left -= len(self.rfile.read(min(2**20, left)) or b"x" * left)
                    self.close_connection = True  # (a larger body is not read at all)
                    raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the upload is {n / 2**20:.1f} MB; "
                                       f"the limit is {service.max_bytes / 2**20:g} MB")
                body = self.rfile.read(n)
                data, name, _ = _upload(self.headers, body)
                if not data:
                    raise RequestError(HTTPStatus.BAD_REQUEST, "the upload is empty")
                explain = parse_qs(url.query).get("explain", ["0"])[0] in ("1", "true", "yes")
                self._json(HTTPStatus.OK, service.predict(data, name, explain=explain))
            except RequestError as e:
                self._json(e.status, {"error": e.message})
            except ValueError as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})

    return Handler


def make_server(service: GeolocService, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A threading HTTP server for ``service`` (port 0: any free one; ``server.server_port`` says which)."""
    server = ThreadingHTTPServer((host, port), make_handler(service))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    from geoloc.cli import USER_ERRORS, user_message
    from geoloc.inference.cli import load_predictor

    parser = argparse.ArgumentParser(prog="geoloc-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a train.py checkpoint, an exported model.pt or model.onnx")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--refine", default="none", help="as geoloc-predict --refine (checkpoints)")
    parser.add_argument("--decode", default=None, help="as geoloc-predict --decode (checkpoints)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-mb", type=float, default=20.0, help="the largest upload (default 20 MB)")
    parser.add_argument("--max-megapixels", type=float, default=40.0, help="the largest image (default 40 MP)")
    args = parser.parse_args(argv)
    try:
        predictor = load_predictor(args.model, refine=args.refine, topk=args.topk, device=args.device,
                                   explain=True, decode=args.decode)
    except (ImportError, *USER_ERRORS) as e:
        if os.environ.get("GEOLOC_DEBUG"):
            raise
        print(f"geoloc-serve: {user_message(e) or e}", file=sys.stderr)
        return 2
    service = GeolocService(predictor, max_bytes=int(args.max_mb * 2**20),
                            max_pixels=int(args.max_megapixels * 1e6))
    server = make_server(service, args.host, args.port)
    print(f"geoloc-serve: {args.model} on http://{args.host}:{server.server_port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
