"""`python -m search serve`: a local web page for searching a gallery index by hand.

A small page of our own on the standard library's threading HTTP server (no web framework to install, nothing
fetched from the internet by the page). Endpoints:

    GET  /                        the page (search/web/search.html)
    GET  /api/info                {"images", "checkpoint", "composed"}
    GET  /api/gallery?offset&limit  gallery rows to pick a reference from: {"total", "items": [{"row", "name"}]}
    GET  /thumb/ROW               the stored JPEG thumbnail of a row
    POST /api/search              {"text"?, "k"?, "reference_row"? | "image"? (base64 or data: URL)}
                                  -> Searcher.search's result, or 400 {"error"} for a bad query

A bad request gets a JSON error and the server keeps serving; searches run one at a time (one model).
"""
from __future__ import annotations

import base64
import binascii
import errno
import json
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlparse

from search.index import GalleryError
from search.search import Searcher

MAX_BODY = 32 << 20  # an uploaded photo, base64-encoded, with room to spare
MAX_K = 200
SOCKET_TIMEOUT = 30  # seconds a connection may sit idle mid-request


def _page() -> bytes:
    return resources.files("search").joinpath("web/search.html").read_bytes()


REQUEST_KEYS = {"text", "k", "image", "reference_row"}


def _query_from_json(body: dict) -> dict:
    """The keyword arguments of Searcher.search from a request body, validated."""
    if not isinstance(body, dict):
        raise GalleryError("the request body must be a JSON object")
    unknown = sorted(set(body) - REQUEST_KEYS)
    if unknown:  # {"reference": ...} would otherwise be answered as a text-only search
        raise GalleryError(f"unknown request key(s) {unknown}: a request has {sorted(REQUEST_KEYS)}")
    text, k = body.get("text"), body.get("k", 12)
    if text is not None and not isinstance(text, str):
        raise GalleryError("'text' must be a string")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise GalleryError(f"'k' must be a whole number from 1 to {MAX_K}")
    image, row = body.get("image"), body.get("reference_row")
    if image is not None and row is not None:
        raise GalleryError("give an uploaded image or a gallery row as the reference, not both")
    if row is not None and (not isinstance(row, int) or isinstance(row, bool)):
        raise GalleryError("'reference_row' must be a whole number")
    data = None
    if image is not None:
        if not isinstance(image, str):
            raise GalleryError("'image' must be a base64 string or a data: URL")
        try:
            data = base64.b64decode(image.split(",", 1)[1] if image.startswith("data:") else image, validate=True)
        except (binascii.Error, IndexError, ValueError) as err:
            raise GalleryError(f"'image' is not valid base64: {err}") from err
        if not data:
            raise GalleryError("the uploaded image is empty")
    return {"image": data, "text": text, "k": k, "reference_row": row}


class _Handler(BaseHTTPRequestHandler):
    searcher: Searcher  # set on the subclass made by make_server
    lock: threading.Lock
    server_version = "cir-search/1"
    timeout = SOCKET_TIMEOUT  # a client that stops sending does not hold a thread forever

    def log_message(self, format: str, *args) -> None:  # one short line per request, on stderr
        sys.stderr.write(f"search serve: {self.address_string()} {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        url = urlparse(self.path)
        index = self.searcher.index
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, _page(), "text/html; charset=utf-8")
        elif url.path == "/api/info":
            self._json(HTTPStatus.OK, {"images": len(index), "checkpoint": self.searcher.checkpoint,
                                       "composed": self.searcher.encoder.cir is not None})
        elif url.path == "/api/gallery":
            params = parse_qs(url.query)
            try:
                offset = max(0, int(params.get("offset", ["0"])[0]))
                limit = min(200, max(1, int(params.get("limit", ["24"])[0])))
            except ValueError:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "offset and limit must be numbers"})
            items = [{"row": r, "name": index.names[r]} for r in range(offset, min(len(index), offset + limit))]
            self._json(HTTPStatus.OK, {"total": len(index), "items": items})
        elif url.path.startswith("/thumb/") and url.path[7:].isdigit() and int(url.path[7:]) < len(index):
            self._send(HTTPStatus.OK, index.thumb(int(url.path[7:])), "image/jpeg")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}"})

    def do_POST(self) -> None:  # noqa: N802
        if urlparse(self.path).path != "/api/search":
            return self._json(HTTPStatus.NOT_FOUND, {"error": "POST /api/search only"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            self.close_connection = True  # the body (if any) is not read
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > MAX_BODY else HTTPStatus.BAD_REQUEST,
                              {"error": f"the request needs a JSON body of at most {MAX_BODY >> 20} MiB"})
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as err:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": f"the body is not JSON: {err}"})
        except RecursionError:  # "[[[[...": nested deeper than the parser goes
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "the body is nested too deeply"})
        try:
            query = _query_from_json(body)
            with self.lock:  # one model, one search at a time
                found = self.searcher.search(**query)
        except GalleryError as err:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        except Exception as err:  # a bug must not take the server down: report it, keep serving
            traceback.print_exc()
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {err!r}"})
        self._json(HTTPStatus.OK, found)


def make_server(searcher: Searcher, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0: any free port), not yet serving."""
    handler = type("Handler", (_Handler,), {"searcher": searcher, "lock": threading.Lock()})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise GalleryError(f"port {port} on {host} is in use: pass another --port") from err
        raise GalleryError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    server.daemon_threads = True
    return server
