"""The digit page (`make ui`): its backend alone, then the page in a real headless Chromium.

The browser tests run Debian's Chromium through Playwright (no browser download) against a real
TorchServe serving the session's briefly trained model, with the page's backend started by
`python -m serving.ui start` exactly as `make ui` starts it. Set UI_SCREENSHOTS=docs to refresh
the README's screenshots (docs/ui.png, docs/ui-mobile.png); otherwise they go to a temp folder.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest

from serving import lifecycle
from serving import page as pagelib
from serving.page import PageServer
from serving.page_pictures import find_attribution_map, heatmap_png, strip_data_url
from serving.server import TorchServe, free_port
from training.core.inputs.preprocess import PreprocessError, preprocess_bytes
from training.feedback.models import NOT_A_DIGIT
from training.feedback.store import FeedbackStore

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import ROOT, SAMPLE_7, encode_png, offline_probabilities  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox: CI runs as root, where Chromium refuses its sandbox. The rest keeps a headless run
# from reaching out to the network (updates, sync) on a machine that has none.
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]
PAD = 280  # the canvas's drawing resolution (serving/web/index.html)


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST /api/predict as the page's script does (its Content-Type), with `headers` added or replacing."""
    host, port = url.split("://")[1].strip("/").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", "/api/predict", body, {"Content-Type": "application/octet-stream", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def png_of_data_url(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), url[:40]
    return cv2.imdecode(np.frombuffer(base64.b64decode(url[len(prefix):]), np.uint8), cv2.IMREAD_UNCHANGED)


def photo_of(digit: np.ndarray, scale: int = 1) -> bytes:
    """A phone-photo-like JPEG: the digit in dark ink on grey, textured, unevenly lit paper."""
    rng = np.random.default_rng(0)
    h, w, s = 360 * scale, 300 * scale, scale
    yy, xx = np.mgrid[0:h, 0:w]
    paper = 178 + 10 * (xx / w) - 6 * (yy / h)  # light falling across the sheet
    paper += cv2.GaussianBlur(rng.normal(0, 6, (h, w)), (0, 0), 1.5 * s)  # paper fibre
    ink = cv2.resize(np.asarray(digit), (220 * s, 220 * s), interpolation=cv2.INTER_CUBIC).astype(np.float64) / 255
    paper[70 * s : 290 * s, 40 * s : 260 * s] *= 1 - 0.75 * np.clip(ink, 0, 1)
    ok, buffer = cv2.imencode(".jpg", np.clip(paper, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buffer.tobytes()


# --- the backend, no server or browser needed ----------------------------------------------------

def test_data_urls_are_unwrapped_and_bad_ones_refused():
    png = SAMPLE_7.read_bytes()
    assert strip_data_url(png) == png
    assert strip_data_url(b"data:image/png;base64," + base64.b64encode(png)) == png
    with pytest.raises(PreprocessError, match="must be base64-encoded"):
        strip_data_url(b"data:image/png,rawbytes")
    with pytest.raises(PreprocessError, match="base64 is not valid"):
        strip_data_url(b"data:image/png;base64,not*base64")


def test_attribution_map_is_found_by_shape_and_drawn_red_for_and_blue_against():
    attributions = np.zeros((28, 28))
    attributions[3, 4], attributions[10, 20] = 2.0, -1.0
    answer = {"digit": 7, "probabilities": {str(d): 0.1 for d in range(10)}, "attributions": attributions.tolist()}
    key, found = find_attribution_map(answer)
    assert key == "attributions" and np.array_equal(found, attributions)
    assert find_attribution_map({"digit": 7, "rows": [[1, 2]] * 28}) is None
    key, found = find_attribution_map({"digit": 7, "explanation": {"method": "ig", "map": attributions.tolist()}})
    assert key == "explanation" and np.array_equal(found, attributions)
    bgra = png_of_data_url(heatmap_png(attributions))
    assert bgra.shape == (28, 28, 4)
    assert tuple(bgra[3, 4]) == (0, 0, 255, 220)  # the strongest support: opaque red
    assert tuple(bgra[10, 20]) == (255, 0, 0, 110)  # half as strong against: blue, half as opaque
    assert bgra[0, 0, 3] == 0  # no attribution: transparent


def test_backend_refuses_foreign_hosts_big_bodies_and_says_when_torchserve_is_down(tmp_path):
    nothing = f"http://127.0.0.1:{free_port()}"  # no TorchServe listens here
    torchserve = TorchServe(run_dir=tmp_path, model_store=tmp_path, auth=False,
                            addresses={"inference": nothing, "management": nothing, "metrics": nothing})
    page = PageServer(torchserve, quiet=True)
    page.serve_in_thread()
    try:
        status, answer = post(page.url, SAMPLE_7.read_bytes())
        assert (status, answer["kind"]) == (503, "down")
        assert answer["error"].startswith("TorchServe is not answering") and "make serve" in answer["error"]
        status, answer = post(page.url, b"x", {"Content-Length": str(pagelib.MAX_BODY + 1)})
        assert (status, answer["kind"]) == (413, "input")
        status, answer = post(page.url, SAMPLE_7.read_bytes(), {"Host": "rebound.example:80"})
        assert (status, answer["error"]) == (403, "unexpected Host header")
        conn = http.client.HTTPConnection(*page.server_address[:2], timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200 and b'<canvas id="pad"' in resp.read()
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")
        conn.close()
    finally:
        page.shutdown()
        page.server_close()


@pytest.fixture
def no_torchserve_page(tmp_path):
    """The page's backend beside an address where no TorchServe listens: what it forwards gets a 503 "down"."""
    nothing = f"http://127.0.0.1:{free_port()}"
    torchserve = TorchServe(run_dir=tmp_path, model_store=tmp_path, auth=False,
                            addresses={"inference": nothing, "management": nothing, "metrics": nothing})
    page = PageServer(torchserve, quiet=True, client_timeout=1, max_clients=2)
    page.serve_in_thread()
    try:
        yield page
    finally:
        page.shutdown()
        page.server_close()


def posting_one_at_a_time(page: PageServer):
    """`post`, each request once the page has finished the one before: the fixture's page serves at most 2
    clients, and a handler thread still closing its last connection counts as one (a loaded machine then
    answered a third request 503 busy)."""
    def post_when_idle(*args, **kwargs):
        wait_until(lambda: page.busy_clients() == 0)
        return post(*args, **kwargs)
    return post_when_idle


def raw_exchange(page: PageServer, request: bytes) -> bytes:
    """Send raw bytes, then read until the server closes. The 10-s limit only keeps a failing test from
    hanging: a server that keeps the connection open that long is the fault being tested."""
    with socket.create_connection(page.server_address[:2], timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def status_and_body(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_cross_site_requests_never_reach_torchserve(no_torchserve_page):
    """What another web page in the same browser can send is refused before the token is added (OWASP's
    CSRF cheat sheet): a foreign Origin, a Sec-Fetch-Site other than same-origin or none, and the content
    types a page may post without a CORS preflight."""
    page, png = no_torchserve_page, SAMPLE_7.read_bytes()
    own = f"http://127.0.0.1:{page.server_address[1]}"
    post = posting_one_at_a_time(page)
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": f"http://localhost:{page.server_address[1]}"},  # a host name this Host is not
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": own, "Sec-Fetch-Site": "same-site"}):
        status, answer = post(page.url, png, headers)
        assert (status, answer["kind"]) == (403, "client"), headers
        assert answer["error"].startswith("cross-site request refused"), headers
    for content_type in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", None):
        status, answer = post(page.url, png, {"Content-Type": content_type} if content_type else {})
        if content_type is None:  # http.client sends none unless told
            wait_until(lambda: page.busy_clients() == 0)
            status, answer = status_and_body(raw_exchange(page, b"POST /api/predict HTTP/1.1\r\nHost: "
                                                          + own[7:].encode() + b"\r\nContent-Length: 1\r\n\r\nx"))
        assert (status, answer["kind"]) == (415, "client"), content_type
        assert answer["error"] == "send the image as application/octet-stream or image/*", content_type
    # The page's own requests, and tools that send neither header, reach the forwarding step.
    for headers in ({"Origin": own, "Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {},
                    {"Content-Type": "image/png"}):
        assert post(page.url, png, headers)[0] == 503, headers


@pytest.mark.parametrize(("length", "status"), [
    ("-1", 400), ("+5", 400), ("0x10", 400), ("1e3", 400), ("5, 5", 400), ("", 400), (None, 411),
    (str(pagelib.MAX_BODY + 1), 413), ("9" * 5000, 413),
])
def test_content_length_is_parsed_strictly(no_torchserve_page, length, status):
    """`Content-Length: -1` once passed the size check and read until the client closed."""
    page = no_torchserve_page
    header = b"" if length is None else b"Content-Length: " + length.encode() + b"\r\n"
    answer = raw_exchange(page, b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: image/png\r\n"
                                % page.server_address[1] + header + b"\r\n" + b"x" * 10)
    got, body = status_and_body(answer)
    assert (got, body["kind"]) == (status, "input" if status == 413 else "client")


def test_chunked_bodies_and_two_lengths_are_refused(no_torchserve_page):
    page = no_torchserve_page
    head = b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: image/png\r\n" % page.server_address[1]
    chunked = b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
    assert status_and_body(raw_exchange(page, head + chunked))[0] == 411
    wait_until(lambda: page.busy_clients() == 0)  # the fixture's page serves 2 at once; the first may be closing
    assert status_and_body(raw_exchange(page, head + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nxx"))[0] == 400


def test_a_slow_client_is_cut_off_and_extra_clients_are_told_busy(no_torchserve_page):
    """Slow clients hold at most max_clients threads (2 here), each for at most client_timeout per read
    (1 s here): a body that stops is answered 408, headers that never end are cut off, the client after
    max_clients is answered 503 at once, and once the slow ones are gone the page answers again."""
    page = no_torchserve_page
    host = b"Host: 127.0.0.1:%d\r\n" % page.server_address[1]
    # A body that stops after 10 of its 100 bytes: answered 408 once the read times out, not held open.
    status, answer = status_and_body(raw_exchange(
        page, b"POST /api/predict HTTP/1.1\r\n" + host + b"Content-Type: image/png\r\nContent-Length: 100\r\n\r\n"
        + b"x" * 10))
    assert (status, answer["kind"]) == (408, "client")
    # The 408's thread may still be closing: it would take one of the two places. The slow clients below are
    # then given 60 s per read (each connection reads the setting when it starts), so that a loaded machine
    # cannot end them before the third client is refused; closing them ends their threads.
    wait_until(lambda: page.busy_clients() == 0)
    page.client_timeout = 60
    slow = [socket.create_connection(page.server_address[:2], timeout=10) for _ in range(2)]
    try:
        for sock in slow:  # headers that never end, in two handler threads: the limit
            sock.sendall(b"GET /healthz HTTP/1.1\r\n" + host)
        wait_until(lambda: page.busy_clients() == 2)
        status, answer = status_and_body(raw_exchange(page, b"GET /healthz HTTP/1.1\r\n" + host + b"\r\n"))
        assert (status, answer["kind"]) == (503, "busy")
    finally:
        for sock in slow:
            sock.close()
    wait_until(lambda: page.busy_clients() == 0)
    assert raw_exchange(page, b"GET /healthz HTTP/1.1\r\n" + host + b"\r\n").startswith(b"HTTP/1.0 200 ")
    # Back to 1 s: headers that never end are cut off (the connection closed, no answer), the thread freed.
    page.client_timeout = 1
    with socket.create_connection(page.server_address[:2], timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + host)
        began = time.monotonic()
        assert sock.recv(65536) == b""
        assert time.monotonic() - began < 20  # 1 s, not the 60 s above: a bound, not a speed
    wait_until(lambda: page.busy_clients() == 0)


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- a real TorchServe, the page started as `make ui` does, and Chromium --------------------------

@pytest.fixture(scope="module")
def page_url(trained_server):
    """`python -m serving.ui start` beside the test's TorchServe (what `make ui` runs); stopped after."""
    env = {**os.environ, "SERVE_DIR": str(trained_server.run_dir), "MNIST_FEEDBACK_DB": feedback_db(trained_server),
           **{f"{k.upper()}_ADDRESS": v.split("://")[1] for k, v in trained_server.addresses.items()}}
    cmd = [sys.executable, "-m", "serving.ui"]
    out = subprocess.run([*cmd, "start"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    url = re.search(r"page: (http://127\.0\.0\.1:\d+/)", out.stdout).group(1)
    pid = int((trained_server.run_dir / "ui.pid").read_text())
    try:
        yield url
    finally:
        out = subprocess.run([*cmd, "stop"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "page stopped", out
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (trained_server.run_dir / "ui.pid").exists()


def feedback_db(trained_server) -> str:
    """Where the page started by `page_url` stores corrections: beside the test's server, not feedback/."""
    return f"sqlite:///{trained_server.run_dir / 'feedback.db'}"


def chromium_path() -> Path:
    """Debian's Chromium, installed the way `make system-deps` installs the project's packages."""
    if not CHROMIUM.exists() and shutil.which("apt-get"):
        subprocess.run(["make", "-s", "system-deps", "APT_PACKAGES=chromium"], cwd=ROOT, timeout=900, check=False)
    if not CHROMIUM.exists():
        if shutil.which("apt-get"):
            pytest.fail("chromium is missing and `make system-deps` could not install it")
        pytest.skip("no /usr/bin/chromium and no apt-get to install it (Debian's `chromium` package)")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    from playwright.sync_api import sync_playwright  # a dev dependency (pyproject.toml)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(executable), headless=True, args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return ROOT / "docs" if os.environ.get("UI_SCREENSHOTS") == "docs" else tmp_path_factory.mktemp("shots")


def open_page(browser, url: str, **context_options):
    context = browser.new_context(**context_options)
    page = context.new_page()
    responses: list[tuple[str, bytes]] = []

    def record(response) -> None:
        # Every body the browser received over HTTP, read as it arrives (a body can be evicted later).
        # data: and blob: URLs are the page's own copies of those bodies and of the user's files.
        if response.url.startswith("http"):
            responses.append((response.url, response.body()))

    page.on("response", record)
    page.goto(url)
    page.wait_for_selector("#pad")
    return page, responses


def results_shown(page) -> int:
    return int(page.evaluate("document.body.dataset.results"))


def wait_for_answer(page, before: int) -> None:
    """Until a new answer (or error) is shown and nothing is pending: no timed sleep."""
    page.wait_for_function("(before) => document.body.dataset.idle === 'true' "
                           "&& Number(document.body.dataset.results) > before", arg=before, timeout=60_000)


def touch_event(cdp, kind: str, point: tuple[float, float] | None) -> None:
    points = [] if point is None else [{"x": point[0], "y": point[1]}]
    cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})


def draw(page, strokes: list[list[tuple[float, float]]], touch: bool = False) -> None:
    """Strokes through the given points (the pad's 280×280 coordinates), with the mouse or a finger.

    Playwright's touchscreen only taps, so a finger stroke is sent as the browser's own touch
    events through the DevTools protocol: the page sees pointerType "touch", as on a phone.
    """
    page.click("#clear")
    before = results_shown(page)
    box = page.locator("#pad").bounding_box()
    scale = box["width"] / PAD
    path = [[(box["x"] + x * scale, box["y"] + y * scale) for x, y in stroke] for stroke in strokes]
    if touch:
        cdp = page.context.new_cdp_session(page)
        for stroke in path:
            moves = [(a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)  # 6 steps per segment, as the mouse
                     for a, b in itertools.pairwise(stroke) for t in np.linspace(0, 1, 7)[1:]]
            touch_event(cdp, "touchStart", stroke[0])
            for point in moves:
                touch_event(cdp, "touchMove", point)
            touch_event(cdp, "touchEnd", None)
        cdp.detach()
    else:
        for stroke in path:
            page.mouse.move(*stroke[0])
            page.mouse.down()
            for point in stroke[1:]:
                page.mouse.move(*point, steps=6)
            page.mouse.up()
    wait_for_answer(page, before)


def upload(page, name: str, mime: str, data: bytes) -> None:
    before = results_shown(page)
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])
    wait_for_answer(page, before)


def shown(page) -> dict:
    return page.evaluate("""() => ({
        digit: document.querySelector('#answer').hidden ? null : document.querySelector('#digit').textContent,
        message: document.querySelector('#message').textContent,
        error: document.querySelector('#message').classList.contains('error'),
        seen: document.querySelector('#seen').getAttribute('src'),
        bars: document.querySelectorAll('#bars .bar').length,
    })""")


SEVEN = [[(62, 58), (214, 58), (180, 130), (150, 200), (136, 238)]]
ZERO = [[(140 + 62 * np.sin(t), 140 - 92 * np.cos(t)) for t in np.linspace(0, 2 * np.pi, 41)]]


@pytest.mark.slow
def test_page_draws_uploads_and_explains_errors_and_never_leaks_the_token(
        browser, page_url, trained_server, trained_checkpoint, mnist_test_images, screenshots):
    images, labels = mnist_test_images
    page, responses = open_page(browser, page_url, viewport={"width": 1100, "height": 760})

    draw(page, SEVEN)
    assert shown(page)["digit"] == "7", shown(page)
    assert shown(page)["bars"] == 10
    page.screenshot(path=str(screenshots / "ui.png"))
    draw(page, ZERO)
    assert shown(page)["digit"] == "0", shown(page)

    # An MNIST test digit (index 1, a 2) as a 28×28 PNG: the page shows exactly it as the model's input.
    assert int(labels[1]) == 2
    assert offline_probabilities(trained_checkpoint, images[1:2]).argmax(1).item() == 2
    upload(page, "two.png", "image/png", encode_png(images[1]))
    result = shown(page)
    assert result["digit"] == "2", result
    assert np.array_equal(png_of_data_url(result["seen"]), images[1].numpy())

    # A photo-like JPEG of MNIST test digit 4 (index 4): grey textured paper, dark ink.
    assert int(labels[4]) == 4
    upload(page, "photo.jpg", "image/jpeg", photo_of(images[4]))
    assert shown(page)["digit"] == "4", shown(page)
    # The same at 1440×1200: over 1024 px, so the page scales it down before sending.
    with page.expect_request("**/api/predict") as sent:
        upload(page, "big-photo.jpg", "image/jpeg", photo_of(images[4], scale=4))
    assert shown(page)["digit"] == "4", shown(page)
    sent_image = cv2.imdecode(np.frombuffer(sent.value.post_data_buffer, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert sent_image.shape == (1024, 853)  # 1440×1200 scaled to 1024 px on its longer side

    upload(page, "notes.txt", "text/plain", b"seven, I think")
    result = shown(page)
    assert result["error"] and result["digit"] is None
    assert result["message"] == "Could not read a digit: not an image: expected PNG, JPEG, BMP, WebP or HEIC bytes"
    draw(page, SEVEN)  # still works after the error
    assert shown(page)["digit"] == "7"

    keys = json.loads((trained_server.run_dir / "key_file.json").read_text())
    secrets = [keys[kind]["key"] for kind in ("inference", "management", "API")]
    assert trained_server.token("inference") in secrets
    paths = [url.removeprefix(page_url) for url, _ in responses]
    assert {"", "app.js", "style.css"} <= set(paths)
    assert paths.count("api/predict") >= 7  # at least one answer per drawing or upload
    leaked = [url for url, body in responses for s in secrets if s.encode() in body]
    assert leaked == []
    page.context.close()


@pytest.mark.slow
def test_a_drawn_digit_is_corrected_and_stored_with_what_the_model_saw(browser, page_url, trained_server):
    page, _ = open_page(browser, page_url, viewport={"width": 1100, "height": 900})
    draw(page, SEVEN)
    result = shown(page)
    assert result["digit"] == "7" and page.is_visible("#correct") and page.is_disabled("#send-correction")
    page.select_option("#label", "1")  # "that's wrong, it is a 1"
    with page.expect_response("**/api/feedback") as answer:
        page.click("#send-correction")
    assert answer.value.status == 201
    page.wait_for_function("document.querySelector('#correct-status').textContent.startsWith('Thanks')")
    page.select_option("#label", "not a digit")
    page.check("#keep-raw")
    with page.expect_response("**/api/feedback") as answer:
        page.click("#send-correction")
    assert answer.value.status == 201
    page.context.close()

    store = FeedbackStore(feedback_db(trained_server))
    rows = {r.label: r for r in store.rows()}
    store.close()
    assert set(rows) == {1, NOT_A_DIGIT}
    corrected = rows[1]
    assert np.array_equal(np.frombuffer(corrected.image, np.uint8).reshape(28, 28), png_of_data_url(result["seen"]))
    assert (corrected.answer, corrected.source, corrected.raw_image) == (7, "page", None)
    assert corrected.model_name == trained_server.model_name and corrected.model_version  # the header's version
    assert rows[NOT_A_DIGIT].raw_image is not None  # the drawing's PNG, kept because the box was ticked
    assert cv2.imdecode(np.frombuffer(rows[NOT_A_DIGIT].raw_image, np.uint8), cv2.IMREAD_UNCHANGED) is not None


@pytest.mark.slow
def test_page_fits_a_375_px_phone_screen(browser, page_url, screenshots):
    page, _ = open_page(browser, page_url, viewport={"width": 375, "height": 812}, is_mobile=True,
                        has_touch=True, device_scale_factor=1)
    draw(page, SEVEN, touch=True)  # a finger: no page scroll, the stroke lands on the pad
    assert shown(page)["digit"] == "7"
    assert page.evaluate("window.scrollY") == 0
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert page.evaluate("document.querySelector('#pad').getBoundingClientRect().right") <= 375
    page.screenshot(path=str(screenshots / "ui-mobile.png"), full_page=True)
    page.context.close()


@pytest.mark.slow
def test_backend_answers_with_the_digit_the_model_saw(trained_server):
    page = PageServer(trained_server, quiet=True)
    page.serve_in_thread()
    try:
        sample = SAMPLE_7.read_bytes()
        for body in (sample, b"data:image/png;base64," + base64.b64encode(sample)):
            status, answer = post(page.url, body)
            assert (status, answer["digit"]) == (200, 7)
            assert np.array_equal(png_of_data_url(answer["input"]), preprocess_bytes(sample))
        # The handler answers /explanations with the prediction and its Integrated Gradients map: the
        # backend keeps asking there and turns the map into the page's heatmap overlay.
        assert page.backend.explanations is True
        assert answer["heatmap"].startswith("data:image/png;base64,")
        status, answer = post(page.url, b"seven")
        assert (status, answer) == (400, {"error": "not an image: expected PNG, JPEG, BMP, WebP or HEIC bytes",
                                          "kind": "input"})
    finally:
        page.shutdown()
        page.server_close()


@pytest.mark.slow
def test_page_says_when_the_token_is_refused(browser, trained_server, tmp_path):
    # The token file of another server: TorchServe refuses its key, and the page says so.
    (tmp_path / "key_file.json").write_text(json.dumps(
        {kind: {"key": "not-the-key", "expiration time": "2999-01-01T00:00:00"} for kind in ("inference", "API")}))
    stale = TorchServe(run_dir=tmp_path, model_store=trained_server.model_store, addresses=trained_server.addresses)
    server = PageServer(stale, quiet=True)
    server.serve_in_thread()
    try:
        page, _ = open_page(browser, server.url, viewport={"width": 900, "height": 700})
        draw(page, SEVEN)
        result = shown(page)
        assert result["error"] and result["digit"] is None
        assert result["message"].startswith("Bad token: TorchServe refused the inference token")
        page.context.close()
    finally:
        server.shutdown()
        server.server_close()


# --- the page beside a TorchServe whose model can come and go ------------------------------------

@pytest.fixture(scope="module")
def model_api_server(tiny_archive, tmp_path_factory):
    """A real TorchServe on the tiny archive with the model API open, so a test can unregister the model
    and register it again, as a restart or a rollout leaves the server for a while."""
    base = tmp_path_factory.mktemp("ui-model-api")
    shutil.copytree(tiny_archive[1].path.parent, base / "store")
    ts = TorchServe.on_free_ports(base / "run", base / "store", extra_properties={"enable_model_api": "true"})
    ts.start(timeout=120)
    try:
        yield ts
    finally:
        ts.stop()


@pytest.fixture
def page_beside(model_api_server):
    page = PageServer(model_api_server, quiet=True)
    page.serve_in_thread()
    try:
        yield page
    finally:
        page.shutdown()
        page.server_close()


@pytest.mark.slow
def test_explanations_come_back_after_the_model_was_missing(model_api_server, page_beside):
    """One 404 while the model was not registered once switched the heatmap off for the page's lifetime."""
    server, png = model_api_server, SAMPLE_7.read_bytes()
    status, answer = post(page_beside.url, png)
    assert status == 200 and answer["heatmap"].startswith("data:image/png;base64,")
    assert server.request("management", "/models/mnist/1.0", method="DELETE")[0] == 200
    try:
        status, answer = post(page_beside.url, png)
        assert (status, answer["kind"]) == (502, "server") and "HTTP 404" in answer["error"]
    finally:
        status, raw = server.request("management", "/models?url=mnist.mar&initial_workers=1&synchronous=true",
                                     method="POST", timeout=120)
        assert status == 200, raw
    status, answer = post(page_beside.url, png)
    assert status == 200 and answer["heatmap"].startswith("data:image/png;base64,")
    assert page_beside.backend.explanations is True


ANOTHER_SITE = b"""<!doctype html><title>another site</title>
<script>
// What any page open in the same browser can do without a CORS preflight: post bytes in no-cors mode.
async function post(target, bytes, type) {
  const body = type ? new Blob([new Uint8Array(bytes)], { type }) : new Uint8Array(bytes);
  await fetch(target, { method: "POST", mode: "no-cors", body });
}
</script>"""


class AnotherSite(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(ANOTHER_SITE)))
        self.end_headers()
        self.wfile.write(ANOTHER_SITE)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_another_site_in_the_browser_cannot_predict_through_the_page(browser, model_api_server, page_beside):
    """A page on another origin (another port of the same loopback address) posts an image to the page's
    API from the same Chromium: the backend refuses it, and TorchServe gets no request."""
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AnotherSite)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    target = page_beside.url + "api/predict"
    before = lifecycle.metric_sum(lifecycle.scrape(model_api_server), "ts_inference_requests_total")
    context = browser.new_context()
    try:
        other = context.new_page()
        other.goto(f"http://127.0.0.1:{site.server_address[1]}/")
        for content_type in (None, "text/plain", "application/octet-stream"):
            with other.expect_response(target) as answered:
                other.evaluate("([target, bytes, type]) => post(target, bytes, type)",
                               [target, list(SAMPLE_7.read_bytes()), content_type])
            assert answered.value.status == 403, content_type  # opaque to the script, not to the test
        after = lifecycle.metric_sum(lifecycle.scrape(model_api_server), "ts_inference_requests_total")
        assert after == before
        # The page itself, in the same browser, still gets its answers.
        own, _ = open_page(browser, page_beside.url, viewport={"width": 900, "height": 700})
        draw(own, SEVEN)
        assert not shown(own)["error"] and shown(own)["digit"] is not None
        assert lifecycle.metric_sum(lifecycle.scrape(model_api_server), "ts_inference_requests_total") > after
        own.context.close()
    finally:
        context.close()
        site.shutdown()
        site.server_close()
