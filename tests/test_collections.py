"""Collections against the real service: announced and unannounced, a snaked grid, a missing and a failed
frame, a restart in the middle, many at once; ``collection`` messages on PUB and in /results, the JSON and PNG
routes."""
from __future__ import annotations

import http.client
import io
import json
import subprocess
import urllib.error
import urllib.request

import pytest

from service_helpers import make_service, python_command, subscribe, wait_for  # noqa: F401 (fixtures)
from spotfinder_core.simulate import Scene, random_spots, write_cbf
from spotfinder_daemon.collections import Grid, collection_id
from spotfinder_daemon.status import EVENT_STREAMS

# A known pattern on a 5 x 4 grid: frame k (0-based, acquisition order) holds SPOTS[k] spots.
SPOTS = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 30, 28, 26, 24, 22, 20, 5, 3, 1, 0]


def write_frames(folder, name: str, numbers, spots=lambda n: 4) -> list[str]:
    """Simulated PILATUS 300K frames ``name_#####.cbf`` written into place (renamed: complete at once)."""
    paths = []
    for n in numbers:
        scene = Scene(seed=n)
        scene.spots = random_spots(scene, spots(n))
        path = folder / ("%s_%05d.cbf" % (name, n))
        write_cbf(str(folder / (".%s.tmp" % path.name)), scene)
        (folder / (".%s.tmp" % path.name)).rename(path)
        paths.append(str(path))
    return paths


def post(service, path: str, data: dict) -> tuple[int, dict]:
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (service.http_port, path),
                                     data=json.dumps(data).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def collection_messages(subscriber, key: str, event: str | None = None) -> list[dict]:
    return [m for m in list(subscriber.messages) if m["type"] == "collection" and m["collection"] == key
            and (event is None or m["event"] == event)]


def wait_end(subscriber, key: str, timeout: float = 60) -> dict:
    try:
        return wait_for(lambda: (collection_messages(subscriber, key, "end") or [None])[-1], timeout,
                        "the end of %s" % key)
    except AssertionError:
        print(json.dumps(collection_messages(subscriber, key), indent=1))
        raise


def test_grid_placement_snake_order():
    grid = Grid(rows=5, cols=4, snaked=True, fast="col")
    assert [grid.place(k) for k in range(8)] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 3), (1, 2), (1, 1), (1, 0)]
    vertical = Grid(rows=3, cols=2, snaked=True, fast="row")
    assert [vertical.place(k) for k in range(6)] == [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (0, 1)]
    assert Grid(rows=2, cols=2, snaked=False).place(2) == (1, 0)
    assert grid.place(20) is None


def test_announced_snaked_grid(make_service, subscribe, tmp_path):  # noqa: F811
    service = make_service(collection_quiet_s=30.0).start()
    subscriber = subscribe(service.pub)
    template = str(service.watch / "grid_#####.cbf")
    status, announced = post(service, "/api/v1/collections", {
        "template": template, "first": 1, "count": 20, "dcid": 4242,
        "grid": {"rows": 5, "cols": 4, "snaked": True, "fast": "col"}})
    assert status == 201 and announced["id"] == collection_id(template) and announced["n_expected"] == 20
    assert post(service, "/api/v1/collections", {"template": "relative_#.cbf"})[0] == 400
    assert post(service, "/api/v1/collections", {"template": template, "grid": {"rows": 0, "cols": 2}})[0] == 400
    assert post(service, "/api/v1/collections", {"template": template, "colour": "red"})[0] == 400
    foreign = urllib.request.Request("http://127.0.0.1:%d/api/v1/collections" % service.http_port, method="POST",
                                     data=json.dumps({"template": template}).encode(),
                                     headers={"Origin": "http://elsewhere.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:  # a web page cannot announce on another site's behalf
        urllib.request.urlopen(foreign, timeout=5)
    assert refused.value.code == 403
    wait_for(lambda: collection_messages(subscriber, template, "start"), 10, "the start")
    write_frames(service.watch, "grid", range(1, 21), lambda n: SPOTS[n - 1])
    end = wait_end(subscriber, template)
    assert end["end_reason"] == "complete" and end["completeness"] == 1.0 and end["missing"] == []
    assert end["dcid"] == 4242 and end["n_done"] == 20 and end["n_failed"] == 0
    bragg = service.get("/api/v1/collections/%s" % announced["id"])["frames"]["good_bragg_candidates"]
    best = bragg.index(max(bragg)) + 1  # the most good Bragg candidates (the earliest of equals)
    assert SPOTS[best - 1] >= 26  # one of the frames drawn with the most spots (frames 11-13)
    best_row, best_col = Grid(5, 4).place(best - 1)
    assert end["best"]["image_number"] == best
    assert end["best"]["cell"] == {"row": best_row, "col": best_col, "cell": best}
    com = end["centre_of_mass"]
    assert 1.5 < com["row"] < 3.0 and 0 <= com["col"] <= 3

    start = collection_messages(subscriber, template, "start")[0]
    results = [m for m in subscriber.results() if m["collection"] == template]
    assert start["seq"] < min(m["seq"] for m in results) and end["seq"] > max(m["seq"] for m in results)
    stored = service.get("/results?since=0")["results"]
    assert [m["seq"] for m in stored if m["type"] == "collection" and m["event"] == "end"] == [end["seq"]]

    detail = service.get("/api/v1/collections/%s" % announced["id"])
    assert detail["frames"]["image_number"] == list(range(1, 21))
    assert _close(detail["frames"]["spot_total"], SPOTS)
    heat, bragg = detail["heatmap"], detail["frames"]["good_bragg_candidates"]
    for k in range(20):
        row, col = Grid(5, 4).place(k)
        assert heat["good_bragg_candidates"][row][col] == bragg[k] and heat["cell"][row][col] == k + 1
    assert heat["cell"][1] == [8, 7, 6, 5]  # the second row runs right to left
    listing = service.get("/api/v1/collections")["collections"]
    assert [c["id"] for c in listing] == [announced["id"]] and listing[0]["state"] == "ended"

    from PIL import Image
    with urllib.request.urlopen("http://127.0.0.1:%d/api/v1/collections/%s/heatmap.png" % (
            service.http_port, announced["id"]), timeout=5) as reply:
        assert reply.headers["Content-Type"] == "image/png"
        image = Image.open(io.BytesIO(reply.read())).convert("RGB")
    size = image.width // 4
    assert image.size == (4 * size, 5 * size)
    brightness = [[sum(image.getpixel((c * size + size // 2, r * size + size // 2))) for c in range(4)]
                  for r in range(5)]
    assert brightness[best_row][best_col] == max(max(line) for line in brightness)  # the best: the brightest
    assert brightness[0][0] == min(min(row) for row in brightness)  # no spots: the darkest
    with urllib.request.urlopen("http://127.0.0.1:%d/api/v1/collections/%s/heatmap.png?by=resolution" % (
            service.http_port, announced["id"]), timeout=5) as reply:
        by_resolution = Image.open(io.BytesIO(reply.read())).convert("RGB")
    resolution = detail["heatmap"]["resolution"]
    sharpest = min((d, r, c) for r, row in enumerate(resolution) for c, d in enumerate(row) if d is not None)
    centre = lambda r, c: sum(by_resolution.getpixel((c * size + size // 2, r * size + size // 2)))  # noqa: E731
    assert centre(sharpest[1], sharpest[2]) == max(centre(r, c) for r in range(5) for c in range(4)
                                                   if resolution[r][c] is not None)  # the smallest d: brightest


def _close(got: list[int], want: list[int], slack: int = 2) -> bool:
    """Spot counts of simulated frames match the spots drawn within ``slack``."""
    return len(got) == len(want) and all(abs(g - w) <= slack for g, w in zip(got, want))


def test_unannounced_missing_and_failed_frames(make_service, subscribe):  # noqa: F811
    service = make_service(collection_quiet_s=3.0).start()
    subscriber = subscribe(service.pub)
    key = str(service.watch / "sweep_#####.cbf")
    write_frames(service.watch, "sweep", [1, 2, 3, 5], lambda n: 10 * n)
    (service.watch / "sweep_00006.cbf").write_bytes(b"###CBF: not a frame at all\n" + b"x" * 4000)
    end = wait_end(subscriber, key)
    assert end["end_reason"] == "quiet" and end["announced"] is False and end["n_expected"] is None
    assert end["missing"] == [[4, 4]] and end["failed"] == [[6, 6]]
    assert (end["n_done"], end["n_failed"], end["first_image"], end["last_image"]) == (4, 1, 1, 6)
    assert end["completeness"] == pytest.approx(4 / 6)
    assert end["best"]["image_number"] == 5 and end["grid"] is None
    assert collection_messages(subscriber, key, "summary")  # sent while the frames arrived
    detail = service.get("/api/v1/collections/%s" % collection_id(key))
    assert detail["frames"]["status"] == ["ok"] * 4 + ["error"] and "heatmap" not in detail
    with pytest.raises(urllib.error.HTTPError) as missing:
        service.get("/api/v1/collections/%s/heatmap.png" % collection_id(key))
    assert missing.value.code == 404

    write_frames(service.watch, "sweep", [4])  # the missing frame arrives late: the collection opens again
    again = wait_for(lambda: len(collection_messages(subscriber, key, "end")) == 2, 30, "a second end")
    assert again
    assert collection_messages(subscriber, key, "end")[-1]["missing"] == []


def test_restart_in_the_middle(make_service, subscribe):  # noqa: F811
    service = make_service(collection_quiet_s=60.0).start()
    subscriber = subscribe(service.pub)
    key = str(service.watch / "rot_#####.cbf")
    assert post(service, "/api/v1/collections", {"template": key, "first": 1, "count": 6})[0] == 201
    write_frames(service.watch, "rot", [1, 2, 3])
    service.wait_status(lambda s: s["frames_done"] == 3, 30, "three frames done")
    service.signal(15)
    assert service.wait() == 0
    service.start()
    before = service.get("/api/v1/collections/%s" % collection_id(key))
    assert before["n_done"] == 3 and before["state"] == "open" and before["missing"] == [[4, 6]]
    write_frames(service.watch, "rot", [4, 5, 6])
    end = wait_end(subscriber, key)
    assert end["end_reason"] == "complete" and end["n_done"] == 6 and end["completeness"] == 1.0
    stored = [m for m in service.get("/results?since=0")["results"] if m["type"] == "collection"]
    assert [m["event"] for m in stored if m["event"] != "summary"] == ["start", "end"]


def test_many_collections_at_once(make_service, subscribe):  # noqa: F811
    service = make_service(collection_quiet_s=60.0).start()
    subscriber = subscribe(service.pub)
    names = ["run%d" % i for i in range(8)]
    for name in names:
        assert post(service, "/api/v1/collections", {"template": str(service.watch / (name + "_%05d.cbf")),
                                                     "count": 3})[0] == 201
    for n in (1, 2, 3):
        for name in names:
            write_frames(service.watch, name, [n])
    for name in names:
        end = wait_end(subscriber, str(service.watch / (name + "_#####.cbf")))
        assert end["n_done"] == 3 and end["end_reason"] == "complete"
    listing = service.get("/api/v1/collections")["collections"]
    assert sorted(c["template"] for c in listing) == sorted(str(service.watch / (n + "_#####.cbf")) for n in names)


def read_events(service, headers: dict, wanted: int, timeout: float = 20,
                until=lambda event_id, body: False) -> list[tuple[str | None, dict]]:
    """(id, message) of the first ``wanted`` messages of GET /events (heartbeats included), or up to the one
    ``until`` holds for."""
    connection = http.client.HTTPConnection("127.0.0.1", service.http_port, timeout=timeout)
    connection.request("GET", "/events", headers=headers)
    reply = connection.getresponse()
    assert reply.status == 200 and reply.headers["Content-Type"] == "text/event-stream"
    events, event_id, data = [], None, None
    try:
        while len(events) < wanted:
            line = reply.fp.readline().decode().rstrip("\n")
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "" and data is not None:
                events.append((event_id, data))
                if until(event_id, data):
                    break
                event_id = data = None
    finally:
        connection.close()
    return events


def test_events_stream_resumes_and_is_capped(make_service):  # noqa: F811
    service = make_service(heartbeat_interval_s=1.0).start()
    write_frames(service.watch, "ev", [1, 2, 3])
    service.wait_status(lambda s: s["frames_done"] == 3, 30, "three frames done")
    record = service.get("/results?since=0")["results"]
    resumed = read_events(service, {"Last-Event-ID": str(record[1]["seq"])}, 3)
    stored = [(event_id, body) for event_id, body in resumed if event_id is not None]
    assert [event_id for event_id, _ in stored] == [str(m["seq"]) for m in record[2:2 + len(stored)]]
    assert [body for _, body in stored] == record[2:2 + len(stored)]  # the same JSON as /results (and PUB)
    beats = read_events(service, {}, 1000, until=lambda event_id, body: body["type"] == "heartbeat")
    assert beats[-1][0] is None  # a heartbeat has no id: nothing to resume from
    assert beats[-1][1]["last_seq"] >= record[-1]["seq"] and beats[-1][1]["frames_done"] == 3

    streams = []
    try:
        for _ in range(EVENT_STREAMS):
            connection = http.client.HTTPConnection("127.0.0.1", service.http_port, timeout=10)
            connection.request("GET", "/events")
            reply = connection.getresponse()  # the reply holds the socket: kept open while it is referenced
            assert reply.status == 200
            streams.append(reply)
        assert service.status()["workers_alive"] >= 1  # queries still answered with every stream taken
        assert not _stream_opens(service)  # the 17th: 503 (never a stream that would hang this test)
    finally:
        for reply in streams:
            reply.close()
    wait_for(lambda: _stream_opens(service), 10, "a stream slot free again")


def test_page_and_its_files_are_served_and_root_queries_stay_distl(make_service):  # noqa: F811
    service = make_service().start()
    base = "http://127.0.0.1:%d" % service.http_port
    with urllib.request.urlopen(base + "/", timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/html")
        assert "frame-ancestors 'none'" in reply.headers["Content-Security-Policy"]
        page = reply.read().decode()
    for name in ("/web/app.js", "/web/style.css", "/web/uPlot.iife.min.js", "/web/uPlot.min.css"):
        assert name in page
        with urllib.request.urlopen(base + name, timeout=5) as reply:
            assert reply.status == 200 and reply.read()
    with urllib.request.urlopen(base + "/web/uPlot.LICENSE", timeout=5) as reply:
        assert b"MIT License" in reply.read()
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(base + "/web/../ledger.sqlite3", timeout=5)
    assert missing.value.code == 404
    # DISTL's server ignored the path: a query on / is still DISTL's query, answered in its text
    with urllib.request.urlopen(base + "/?distl.image=/nowhere/x_0001.cbf", timeout=30) as reply:
        assert reply.headers["Content-Type"] == "text/plain" and b"<html" not in reply.read()


def _stream_opens(service) -> bool:
    """Whether GET /events is answered with a stream (True) or refused as over the cap (503)."""
    connection = http.client.HTTPConnection("127.0.0.1", service.http_port, timeout=5)
    try:
        connection.request("GET", "/events")
        status = connection.getresponse().status
        assert status in (200, 503), status
        return status == 200
    finally:
        connection.close()


def test_hdf5_series_is_one_collection_with_its_count(make_service, subscribe, tmp_path):  # noqa: F811
    source = tmp_path / "cbf"
    source.mkdir()
    frames = write_frames(source, "src", [1, 2, 3, 4, 5], lambda n: 3 * n)
    service = make_service(collection_quiet_s=60.0).start()
    subscriber = subscribe(service.pub)
    replay = subprocess.run(python_command("replay", *frames, "--to", str(service.watch), "--hdf5", "series",
                                           "--per-file", "2"), capture_output=True, timeout=120)
    assert replay.returncode == 0, replay.stderr
    master = str(service.watch / "series_master.h5")
    end = wait_end(subscriber, master)
    assert end["kind"] == "hdf5" and end["master"] == master and end["n_expected"] == 5
    assert end["end_reason"] == "complete" and end["n_done"] == 5 and end["missing"] == []
    assert end["best"]["image_number"] == 5
    detail = service.get("/api/v1/collections/%s" % collection_id(master))
    assert detail["frames"]["image_number"] == [1, 2, 3, 4, 5]
