"""`search serve`: the JSON API over HTTP (bad requests answered, the server keeps serving) and the page in a
real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): pick or upload a reference, type a
modification, see the result images."""
from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.request

import pytest

from search.index import GalleryError, GalleryIndex, IndexConfig, build_index
from search.search import Searcher
from search.serve import make_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# CI installs chromium and sets this: there a missing browser fails the test instead of skipping it
REQUIRE_BROWSER = os.environ.get("CIR_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="module")
def server(toy_world, tiny_stage1_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "idx"
    build_index(IndexConfig(images=str(toy_world / "bench" / "cirr" / "dev"), output=str(out),
                            checkpoint=str(tiny_stage1_export)))
    searcher = Searcher(GalleryIndex(out), str(tiny_stage1_export))
    httpd = make_server(searcher, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, searcher
    httpd.shutdown()
    httpd.server_close()


def _url(httpd, path: str) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}{path}"


def _post(httpd, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(_url(httpd, "/api/search"), data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_api_answers_bad_requests_and_keeps_serving(server):
    httpd, searcher = server
    assert _post(httpd, b"not json")[0] == 400
    status, reply = _post(httpd, json.dumps({"text": "  ", "reference_row": 1}).encode())
    assert status == 400 and "empty" in reply["error"]
    status, reply = _post(httpd, json.dumps({"image": "aGVsbG8=", "text": "red"}).encode())  # "hello"
    assert status == 400 and "not a usable image" in reply["error"]
    assert _post(httpd, json.dumps({"text": "red", "k": 0}).encode())[0] == 400
    # an unknown key is named, not ignored ({"reference": ...} was answered as a text-only search; issue 44)
    status, reply = _post(httpd, json.dumps({"reference": "toy_000001.png", "text": "make it red"}).encode())
    assert status == 400 and "unknown request key(s) ['reference']" in reply["error"]
    status, reply = _post(httpd, json.dumps({"reference_row": 1, "text": "make it red", "k": 5}).encode())
    assert status == 200
    assert reply["results"] == searcher.search(reference_row=1, text="make it red", k=5)["results"]
    with urllib.request.urlopen(_url(httpd, "/thumb/0"), timeout=30) as thumb:
        assert thumb.headers["Content-Type"] == "image/jpeg" and thumb.read()[:2] == b"\xff\xd8"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(_url(httpd, "/thumb/99999"), timeout=30)
    assert err.value.code == 404


def test_a_deep_body_and_a_silent_client_do_not_hurt_the_server(server, monkeypatch):
    """#23: a deeply nested JSON body dropped the connection (RecursionError); a client that stops mid-request
    held a server thread forever (no socket timeout)."""
    import socket

    from search import serve

    httpd, _ = server
    status, reply = _post(httpd, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in reply["error"]
    assert serve._Handler.timeout == serve.SOCKET_TIMEOUT > 0
    monkeypatch.setattr(serve._Handler, "timeout", 0.5)
    with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=10) as silent:
        silent.sendall(b"POST /api/search HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # and then nothing
        silent.settimeout(10)
        assert silent.recv(1024) == b""  # the server gave up on it and closed the connection
    assert _post(httpd, json.dumps({"reference_row": 1, "text": "red", "k": 2}).encode())[0] == 200


def test_a_taken_port_is_a_clear_error(server):
    httpd, searcher = server
    with pytest.raises(GalleryError, match=f"port {httpd.server_address[1]} .* is in use"):
        make_server(searcher, "127.0.0.1", httpd.server_address[1])


def _launch(playwright):
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        # no sandbox as root; no background networking: this machine has no internet to reach
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run"])


def playwright_api():
    """Playwright's sync API with Debian's chromium there; else a skip (a failure where CI requires the browser)."""
    if not os.path.exists(CHROMIUM):
        if REQUIRE_BROWSER:
            pytest.fail(f"chromium is required here (CIR_REQUIRE_BROWSER=1) and {CHROMIUM} is missing")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); `make test` installs it as root")
    return pytest.importorskip("playwright.sync_api")


def test_page_in_headless_chromium(server, toy_world):
    sync_api = playwright_api()
    httpd, searcher = server
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page()
        page.goto(_url(httpd, "/"))
        page.wait_for_selector("#picker img")
        assert f"{len(searcher.index)} images" in page.inner_text("#info")

        # pick a gallery image, type a modification: the grid shows what the API ranks, images loaded
        page.click("#picker img[data-row='3']")
        page.fill("#text", "add a small red circle")
        page.fill("#k", "6")
        page.click("#search")
        page.wait_for_selector(".result img")
        names = page.eval_on_selector_all(".result .name", "els => els.map(e => e.textContent)")
        expected = searcher.search(reference_row=3, text="add a small red circle", k=6)["results"]
        assert names == [r["name"] for r in expected]
        page.wait_for_function("[...document.querySelectorAll('.result img')].every(i => i.complete)")
        widths = page.eval_on_selector_all(".result img", "els => els.map(e => e.naturalWidth)")
        assert len(widths) == 6 and all(w > 0 for w in widths)

        # a bad query shows the server's message; the next good one still works
        page.click("#clear")
        page.fill("#text", "   ")
        page.click("#search")
        page.wait_for_function("document.querySelector('#error').textContent.length > 0")
        assert "empty" in page.inner_text("#error")

        # upload a reference file: an image-only query (empty text) leaves the same image out
        upload = toy_world / "bench" / "cirr" / "dev" / searcher.index.names[4]
        page.set_input_files("#upload", str(upload))
        page.wait_for_selector("#preview img")
        page.fill("#text", "")
        page.click("#search")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('image_only')")
        assert searcher.index.names[4] in page.inner_text("#status")  # "the reference ... is left out"
        assert page.inner_text("#error") == ""
        assert page.locator(".result img").count() == 6
        browser.close()
