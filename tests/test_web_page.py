"""The live page in a real browser: Debian's chromium, headless, driven over the DevTools protocol.

The service runs for real with one worker (so results arrive in acquisition order); the test watches the heat
map's cells light up (a MutationObserver in the page), hovers the plot to read the frames' numbers from uPlot's
legend, checks the cells' colours in a screenshot, and fails on any error in the browser's console.  Skipped,
with the reason, where chromium is not installed (.ci/run installs it where it can).
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from service_helpers import make_service, python_command, wait_for  # noqa: F401 (fixture)
from shared_data import real_files
from spotfinder_daemon.collections import NO_RESULT, Grid, cell_fractions, colour
from test_collections import SPOTS, post, write_frames

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=1400,1800",
         "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1")
THAUMATIN = tuple("thaumatin_grid_dls_i24_pilatus3_6m/thau_3_2_%04d.cbf.bz2" % n for n in range(1, 20))

# Records, in the page, each heat-map cell the moment it first shows a result.
RECORD_LIGHTING = """
window.__lit = [];
new MutationObserver((changes) => {
  for (const change of changes) {
    const cell = change.target;
    if (cell.classList && cell.classList.contains("done") && !cell.dataset.seen) {
      cell.dataset.seen = "1";
      window.__lit.push([Number(cell.dataset.row), Number(cell.dataset.col), Number(cell.dataset.cell)]);
    }
  }
}).observe(document.getElementById("heatmap"), {attributes: true, attributeFilter: ["class"], subtree: true});
true
"""


class Browser:
    """One headless chromium page over the DevTools protocol (websocket-client), its console collected."""

    def __init__(self, profile: str):
        import websocket

        if not os.access(CHROMIUM, os.X_OK):
            pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does it as root)")
        self.process = subprocess.Popen([CHROMIUM, *FLAGS, "--user-data-dir=" + profile, "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = os.path.join(profile, "DevToolsActivePort")
        wait_for(lambda: os.path.exists(port_file) and open(port_file).read().split("\n")[0], 30, "chromium")
        port = int(open(port_file).read().split("\n")[0])
        with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port, timeout=10) as reply:
            target = next(t for t in json.loads(reply.read()) if t["type"] == "page")
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Runtime", "Log", "Page"):
            self.call(domain + ".enable")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError("%s: %s" % (method, message["error"]))
                return message["result"]
            self.events.append(message)

    def evaluate(self, expression: str):
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            raise AssertionError("%s: %s" % (expression[:80], reply["exceptionDetails"]))
        return reply["result"].get("value")

    def wait(self, expression: str, timeout: float, what: str):
        return wait_for(lambda: self.evaluate(expression), timeout, what, interval=0.1)

    def screenshot(self):
        from PIL import Image

        data = self.call("Page.captureScreenshot", format="png")["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def console_errors(self) -> list[str]:
        self.evaluate("1")  # collect what is waiting
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert", "warning"):
                errors.append(json.dumps(params["args"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append("%s %s" % (params["entry"]["text"], params["entry"].get("url", "")))
        return errors

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            os.killpg(self.process.pid, 9)
            self.process.wait(10)


@pytest.fixture
def browser(tmp_path):
    made = Browser(str(tmp_path / "chromium-profile"))
    yield made
    made.close()


def open_page(browser: Browser, service) -> None:
    browser.call("Page.navigate", url="http://127.0.0.1:%d/" % service.http_port)
    browser.wait("document.readyState === 'complete' && !!window.spotfinderPage", 20, "the page")
    browser.wait("document.getElementById('live').textContent === 'live'", 20, "the event stream")


def watch_grid(browser: Browser, cells: int) -> None:
    browser.wait("document.querySelectorAll('#heatmap .cell').length === %d" % cells, 20, "the heat map's cells")
    assert browser.evaluate(RECORD_LIGHTING)


def legend_at(browser: Browser, number: int) -> list[str]:
    """uPlot's legend values with the cursor over image ``number`` (a real mouse move over the plot)."""
    x, y = browser.evaluate("""(() => { const u = spotfinderPage.plot, r = u.over.getBoundingClientRect();
        const x = Math.min(Math.max(u.valToPos(%d, 'x'), 1), r.width - 1);
        return [r.left + x, r.top + r.height / 2]; })()""" % number)
    browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    time.sleep(0.1)
    return browser.evaluate("Array.from(document.querySelectorAll('.u-legend .u-value')).map(e => e.textContent)")


CELL_CENTRES = """Array.from(document.querySelectorAll('#heatmap .cell')).map(c => {
    const r = c.getBoundingClientRect(); return [Number(c.dataset.row), Number(c.dataset.col),
    r.left + r.width / 2, r.top + r.height / 2]; })"""


def cell_colours(browser: Browser) -> tuple[dict[tuple[int, int], tuple[int, int, int]], object]:
    """Each heat-map cell's colour in a screenshot, at its centre (taken again if the layout moved meanwhile),
    and the screenshot."""
    for _ in range(10):
        boxes = browser.evaluate(CELL_CENTRES)
        image = browser.screenshot()
        if browser.evaluate(CELL_CENTRES) == boxes:
            return {(row, col): image.getpixel((round(x), round(y))) for row, col, x, y in boxes}, image
    raise AssertionError("the heat map kept moving")


def check_page(browser: Browser, service, collection: dict, grid: Grid) -> None:
    """Lighting order, plot numbers, screenshot colours and a clean console, once every frame is done."""
    count = grid.rows * grid.cols
    lit = browser.wait("window.__lit.length === %d && window.__lit" % count, 120, "every cell lit")
    assert [tuple(cell[:2]) for cell in lit] == [grid.place(k) for k in range(count)]
    assert [cell[2] for cell in lit] == list(range(1, count + 1))

    detail = service.get("/api/v1/collections/%s" % collection["id"])
    frames = detail["frames"]
    assert frames["image_number"] == list(range(1, count + 1))
    browser.wait("spotfinderPage.plot && spotfinderPage.plot.data[0].length === %d" % count, 10, "the plot's data")
    best = detail["best"]["image_number"]
    for number in (1, best, count):
        values = legend_at(browser, number)  # image, spots, good Bragg, resolution
        assert values[0] == str(number)
        assert values[1] == str(frames["spot_total"][number - 1])
        assert values[2] == str(frames["good_bragg_candidates"][number - 1])

    # the facts come with the collection's summaries (at most one each 2 s), not with each result
    facts = browser.wait("document.getElementById('facts').textContent.includes('done: %d of %d') && "
                         "document.getElementById('facts').textContent" % (count, count), 10, "the facts updated")
    assert "best: %d" % best in facts
    browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=1, y=1)
    browser.wait("document.querySelectorAll('#heatmap .cell.done').length === %d" % count, 10, "the cells drawn")
    time.sleep(0.5)
    colours, shot = cell_colours(browser)
    if os.environ.get("SPOTFINDER_SCREENSHOTS"):  # a folder to keep the screenshots in, to look at
        shot.save(os.path.join(os.environ["SPOTFINDER_SCREENSHOTS"], "page-%s.png" % collection["id"]))
    heat = detail["heatmap"]
    fractions = cell_fractions(heat["good_bragg_candidates"], invert=False)
    for row in range(grid.rows):
        for col in range(grid.cols):
            want = colour(fractions[row][col])
            got = colours[(row, col)]
            assert max(abs(a - b) for a, b in zip(got, want)) <= 8, (row, col, got, want)
    best_cell = detail["best"]["cell"]
    luminance = {cell: 0.2126 * r + 0.7152 * g + 0.0722 * b for cell, (r, g, b) in colours.items()}
    assert luminance[(best_cell["row"], best_cell["col"])] == max(luminance.values())

    rows = browser.evaluate("document.querySelectorAll('#latest tbody tr').length")
    assert rows >= min(count, 20)
    assert browser.console_errors() == []


def test_thaumatin_grid_1x19(make_service, browser):  # noqa: F811
    sources = real_files(THAUMATIN, "the 19 real thaumatin grid frames")
    service = make_service(workers=1, collection_quiet_s=60.0).start()
    status, collection = post(service, "/api/v1/collections", {
        "template": str(service.watch / "thau_3_2_####.cbf"), "first": 1, "count": 19,
        "grid": {"rows": 1, "cols": 19, "snaked": False}})
    assert status == 201
    open_page(browser, service)
    watch_grid(browser, 19)
    replay = subprocess.run(python_command("replay", *sources, "--to", str(service.watch), "--rate", "3",
                                           "--atomic", "--template", "thau_3_2_####.cbf"),
                            capture_output=True, timeout=120)
    assert replay.returncode == 0, replay.stderr
    check_page(browser, service, collection, Grid(1, 19, snaked=False))


def test_synthetic_snaked_grid_5x4(make_service, browser):  # noqa: F811
    service = make_service(workers=1, collection_quiet_s=60.0).start()
    status, collection = post(service, "/api/v1/collections", {
        "template": str(service.watch / "raster_#####.cbf"), "first": 1, "count": 20, "dcid": 77,
        "grid": {"rows": 5, "cols": 4, "snaked": True, "fast": "col"}})
    assert status == 201
    open_page(browser, service)
    watch_grid(browser, 20)
    grid = Grid(5, 4, snaked=True)
    for number in range(1, 21):  # after each frame, the screenshot shows exactly the cells so far in snake order
        write_frames(service.watch, "raster", [number], lambda n: SPOTS[n - 1])
        browser.wait("window.__lit.length >= %d" % number, 30, "cell %d lit" % number)
        time.sleep(0.3)  # the page draws at most every 250 ms
        colours = cell_colours(browser)[0]
        lit = {cell for cell, rgb in colours.items() if rgb != NO_RESULT}
        assert lit == {grid.place(k) for k in range(number)}, number
    check_page(browser, service, collection, grid)
    facts = browser.evaluate("document.getElementById('facts').textContent")
    assert "dcid: 77" in facts
    x, y = browser.evaluate("""(() => { const r = document.querySelector('#heatmap .cell[data-cell="6"]')
        .getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()""")
    for kind in ("mousePressed", "mouseReleased"):  # a real click on cell 6: row 2, column 3 of the snake
        browser.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
    info = browser.wait("document.getElementById('cell-info').textContent.startsWith('cell 6')", 5, "the cell")
    assert browser.evaluate("document.getElementById('cell-info').textContent").startswith(
        "cell 6 (row 2, col 3), image 6: %d spots" % service.get("/api/v1/collections/%s" % collection["id"])[
            "frames"]["spot_total"][5])
    assert info
    browser.call("Page.reload")  # a fresh page shows the same from the REST state
    browser.wait("document.querySelectorAll('#heatmap .cell.done').length === 20", 20, "the reloaded heat map")
    assert browser.console_errors() == []


def test_ten_thousand_frames_are_drawn_in_batches(make_service, browser):  # noqa: F811
    """A 100 x 100 grid's 10,000 results reach the page at once: it draws them in one batched render (the plot
    and the heat map hold all of them), not one render per frame, and stays responsive."""
    service = make_service(workers=1).start()
    key = str(service.watch / "big_#####.cbf")
    status, collection = post(service, "/api/v1/collections", {
        "template": key, "count": 10_000, "grid": {"rows": 100, "cols": 100, "snaked": True}})
    assert status == 201
    open_page(browser, service)
    browser.wait("document.querySelectorAll('#heatmap .cell').length === 10000", 30, "the 100 x 100 heat map")
    before = browser.evaluate("spotfinderPage.renders")
    taken_ms = browser.evaluate("""(() => { const t0 = performance.now(); window.__t0 = t0;
        for (let n = 1; n <= 10000; n++) spotfinderPage.take({type: "result",
        collection: %s, image_number: n, status: "ok", spot_total: n %% 97, good_bragg_candidates: n %% 89,
        method2_resolution: 2 + (n %% 13) / 10, file: "big_" + n + ".cbf"}); return performance.now() - t0; })()"""
                                % json.dumps(key))
    browser.wait("document.querySelectorAll('#heatmap .cell.done').length === 10000", 30, "every cell drawn")
    drawn_ms = browser.evaluate("performance.now() - window.__t0")
    print("10,000 results: taken in %.0f ms, drawn %.0f ms after the first (a figure, not a limit)"
          % (taken_ms, drawn_ms))
    assert browser.evaluate("spotfinderPage.plot.data[0].length") == 10_000
    assert browser.evaluate("spotfinderPage.renders") - before <= 3
    values = legend_at(browser, 5000)  # a pixel holds about ten frames here: the legend names the one it shows
    image = int(values[0].replace(",", ""))
    assert abs(image - 5000) <= 30 and values[1:3] == [str(image % 97), str(image % 89)]
    assert browser.console_errors() == []


def test_the_page_resumes_after_a_service_restart(make_service, browser):  # noqa: F811
    """The event stream ends when the service stops; the browser reconnects by itself with Last-Event-ID and
    the page gets every stored message once: none missed, none twice."""
    service = make_service(workers=1, collection_quiet_s=60.0).start()
    status, collection = post(service, "/api/v1/collections", {
        "template": str(service.watch / "resume_#####.cbf"), "count": 6, "grid": {"rows": 1, "cols": 6}})
    assert status == 201
    open_page(browser, service)
    watch_grid(browser, 6)
    snapshot_seq = browser.evaluate("spotfinderPage.state.lastSeq - spotfinderPage.state.stored")  # the REST state
    write_frames(service.watch, "resume", [1, 2, 3], lambda n: 5 * n)
    browser.wait("window.__lit.length === 3", 30, "three cells lit")
    before = len(browser.events)
    service.signal(15)
    assert service.wait() == 0
    browser.wait("document.getElementById('live').textContent !== 'live'", 20, "the page noticing")
    write_frames(service.watch, "resume", [4, 5, 6], lambda n: 5 * n)  # while it is down: caught up at start
    service.start()
    browser.wait("document.getElementById('live').textContent === 'live'", 30, "the page reconnected")
    browser.wait("window.__lit.length === 6", 60, "every cell lit")
    last_seq = service.wait_status(lambda s: s["frames_done"] == 6, 30, "six frames done")["last_seq"]
    browser.wait("spotfinderPage.state.lastSeq >= %d" % last_seq, 20, "the page up to date")
    stored = browser.evaluate("spotfinderPage.state.stored")
    assert stored == browser.evaluate("spotfinderPage.state.lastSeq") - snapshot_seq  # each seq taken once
    assert [tuple(cell[:2]) for cell in browser.evaluate("window.__lit")] == [(0, k) for k in range(6)]
    # the only complaints allowed: the stream's connection refused while the service was down
    while_down = browser.console_errors()
    browser.events[before:] = [e for e in browser.events[before:] if "/events" not in json.dumps(e)]
    assert browser.console_errors() == [], while_down
