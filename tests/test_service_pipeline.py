"""End to end: replay frames into a watched folder and check what the PUB socket publishes.

Real service process, real workers, real sockets on 127.0.0.1, real PILATUS 300K frames.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error

import pytest

from spotfinder_daemon.replay import replay
from service_helpers import (assert_exactly_once, assert_seq_increasing, child_env, make_service, python_command,
                             large_frames, real_frames, subscribe, wait_for)

__all__ = ["make_service", "subscribe"]  # fixtures used by name


def start_replay(frames, to, **options) -> tuple[threading.Thread, list[str]]:
    """Replay on a thread; returns it and the list the written file names are appended to."""
    written: list[str] = []

    class Lines(io.StringIO):
        def write(self, text):
            written.extend(json.loads(line)["file"] for line in text.splitlines() if line.strip())
            return len(text)

    thread = threading.Thread(target=replay, args=(frames, str(to)), kwargs={**options, "out": Lines()}, daemon=True)
    thread.start()
    return thread, written


def process_exists(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as exited)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stored_messages(subscriber) -> list[dict]:
    """What the subscriber received that has a seq: everything but heartbeats."""
    return [m for m in subscriber.messages if m["type"] != "heartbeat"]


def expected_files(watch, count: int, template: str = "frame_#####.cbf") -> list[str]:
    return [str(watch / template.replace("#####", "%05d" % n)) for n in range(1, count + 1)]


def test_every_frame_published_exactly_once_with_increasing_seq(make_service, subscribe):
    frames = real_frames()
    service = make_service()
    subscriber = subscribe(service.pub)
    service.start()
    thread, _ = start_replay(frames, service.watch, rate=20, count=12, template="frame_#####.cbf", chunks=3)
    results = subscriber.settled_results(service, 12, 30)
    thread.join(10)

    assert_exactly_once(results, expected_files(service.watch, 12))
    assert_seq_increasing(stored_messages(subscriber))
    first = min(results, key=lambda r: r["image_number"])
    assert first["status"] == "ok", first
    assert first["schema"] == "spotfinder.v1" and first["type"] == "result"
    assert first["collection"] == str(service.watch / "frame_#####.cbf")
    assert subscriber.topics[subscriber.messages.index(first)] == "spotfinder.v1.result." + first["collection"]
    for key in ("seq", "time", "host", "file", "image_number", "status", "error", "spot_total", "t_seen", "t_done",
                "queue_ms", "proc_ms", "worker", "method1_resolution", "total_integrated_signal"):
        assert key in first, key
    assert sorted(r["image_number"] for r in results) == list(range(1, 13))
    assert all(r["t_seen"] <= r["t_done"] for r in results)

    heartbeats = [m for m in subscriber.messages if m["type"] == "heartbeat"]
    assert heartbeats and {"queue_depth", "workers_alive", "frames_per_s", "frames_done", "frames_failed",
                           "last_seq", "ledger"} <= set(heartbeats[-1])
    # heartbeats spend no seq: the seqs a subscriber sees, results and errors, run 1, 2, 3... without a gap,
    # and every heartbeat names the newest of them, of the ledger every message names
    stored = [m for m in subscriber.messages if m["type"] != "heartbeat"]
    assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
    assert all("seq" not in h and (h["last_seq"] == 0 or h["last_seq"] in {m["seq"] for m in stored})
               for h in heartbeats)
    assert {m["ledger"] for m in subscriber.messages} == {service.get("/results")["ledger"]}
    wait_for(lambda: [m for m in subscriber.messages if m["type"] == "heartbeat"][-1]["last_seq"] == len(stored), 5,
             "a heartbeat naming the last result")

    status = service.wait_status(lambda s: s["frames_done"] == 12, what="12 frames done")
    assert status["frames_failed"] == 0
    assert len(status["workers"]) == 2 and all(w["alive"] and w["pid"] > 0 for w in status["workers"])
    assert {r["worker"] for r in results} <= {w["id"] for w in status["workers"]}

    # a late joiner gets the results it missed from the ledger over HTTP, the same bodies as on PUB
    midway = sorted(r["seq"] for r in results)[5]
    missed = [m for m in service.get("/results?since=%d" % midway)["results"] if m["type"] == "result"]
    assert [m["seq"] for m in missed] == sorted(r["seq"] for r in results if r["seq"] > midway)
    assert missed[0] == next(r for r in results if r["seq"] == missed[0]["seq"])
    # the page size is clamped to 1..1000 and a negative since is refused (collection messages are stored too)
    assert len(service.get("/results?since=0&limit=-1")["results"]) == 1
    everything = service.get("/results?since=0&limit=100000")
    assert len(everything["results"]) == everything["last_seq"] >= 12
    with pytest.raises(urllib.error.HTTPError) as refused:
        service.get("/results?since=-1")
    assert refused.value.code == 400

    service.signal(signal.SIGTERM)
    assert service.wait(30) == 0


@pytest.mark.parametrize("mode", ["atomic", "slow_chunks", "polling"])
def test_frames_renamed_into_place_or_written_slowly(make_service, subscribe, mode):
    frames = real_frames()
    service = make_service(polling=mode == "polling", poll_interval_s=0.2)
    subscriber = subscribe(service.pub)
    service.start()
    options = {"atomic": dict(rate=20, atomic=True), "slow_chunks": dict(rate=2, chunks=5),
               "polling": dict(rate=4, chunks=4)}[mode]
    thread, _ = start_replay(frames, service.watch, count=5, template="frame_#####.cbf", **options)
    results = subscriber.settled_results(service, 5, 30)
    thread.join(10)

    assert_exactly_once(results, expected_files(service.watch, 5))
    # a frame dispatched before it was complete would come back as a truncation error
    assert [r["status"] for r in results] == ["ok"] * 5, [r["error"] for r in results]
    assert not [name for name in os.listdir(service.watch) if name.startswith(".")]


def busy_worker(service) -> dict | None:
    """A worker analysing a watched frame (``busy`` names a job of lane ``watch``), per /status."""
    return next((w for w in service.status()["workers"] if (w["busy"] or {}).get("lane") == "watch"), None)


def test_worker_killed_with_sigkill_mid_frame_loses_nothing(make_service, subscribe):
    count = 60  # a backlog that outlasts a few kills and their replacements (24 drained in ~1 s at 45 ms a frame)
    frames = large_frames()
    service = make_service()
    subscriber = subscribe(service.pub)
    service.start()
    # a backlog (as fast as possible, in one piece): every worker always holds a frame, one more at its socket
    thread, _ = start_replay(frames, service.watch, count=count, template="frame_#####.cbf", chunks=1)
    wait_for(lambda: len(subscriber.results()) >= 2, 30, "2 results")
    victims, resent = [], []
    while not resent and len(victims) < 5:  # kill busy workers until one dies holding a frame
        victim = wait_for(lambda: busy_worker(service), 20, "a busy worker")
        os.kill(victim["pid"], signal.SIGKILL)
        victims.append(victim["pid"])
        error = wait_for(lambda worker=victim["id"]: next((m for m in subscriber.messages if m["type"] == "error"
                                                         and m.get("worker") == worker), None),
                         20, "the worker's death reported")
        assert "exited with code -9" in error["error"], error
        resent = error["frames"]
        service.wait_status(lambda s: s["workers_alive"] == 2, 20, "a replacement worker")
    results = subscriber.settled_results(service, count, 90)
    thread.join(10)

    assert resent, "no worker was killed while it held a frame"
    assert_exactly_once(results, expected_files(service.watch, count))
    assert_seq_increasing(stored_messages(subscriber))
    by_file = {r["file"]: r for r in results}
    assert all(by_file[path]["tries"] == 1 and by_file[path]["status"] == "ok" for path in resent), resent
    status = service.status()
    assert not set(victims) & {w["pid"] for w in status["workers"]}


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_service_restarted_mid_run_loses_nothing(make_service, subscribe, how):
    frames = real_frames()
    service = make_service()
    subscriber = subscribe(service.pub)
    service.start()
    thread, _ = start_replay(frames, service.watch, rate=10, count=30, template="frame_#####.cbf", chunks=2)
    wait_for(lambda: len(subscriber.results()) >= 8, 30, "8 results")
    old_workers = [w["pid"] for w in service.status()["workers"]]
    service.signal(how)
    code = service.wait(30)
    assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL)
    # no orphans: workers leave with the service, also when it was killed (they watch their parent)
    wait_for(lambda: not any(process_exists(pid) for pid in old_workers), 10, "the old workers to exit")
    first_log = service.log.read_text()
    time.sleep(1.0)  # frames keep arriving while the service is down
    service.start()
    wait_for(lambda: len(subscriber.results()) >= 30, 60, "30 results")
    thread.join(10)
    service.wait_idle()
    record = service.results_record()

    assert_exactly_once(record, expected_files(service.watch, 30))
    assert all(r["status"] == "ok" for r in record), [r["error"] for r in record if r["status"] != "ok"]
    assert_seq_increasing(stored_messages(subscriber))
    if how == signal.SIGTERM:  # a clean stop publishes all it stored; a SIGKILL may lose what was being sent
        assert_exactly_once(subscriber.results(), expected_files(service.watch, 30))
        assert "stopped:" in first_log and "handed back to the ledger" in first_log
    else:
        assert "stopped:" not in first_log
    assert "catching up on" in service.log.read_text()
    service.wait_status(lambda s: s["frames_done"] == 30, what="30 frames done")


def test_frames_already_present_are_caught_up_at_start(make_service, subscribe):
    frames = real_frames()
    service = make_service()
    replay(frames, str(service.watch), template="early_#####.cbf", out=io.StringIO())
    subscriber = subscribe(service.pub)
    service.start()
    results = subscriber.settled_results(service, 4, 30)
    assert_exactly_once(results, expected_files(service.watch, 4, "early_#####.cbf"))


def test_incomplete_corrupt_and_vanished_frames_give_error_results(make_service, subscribe):
    frames = real_frames()
    service = make_service()
    subscriber = subscribe(service.pub)
    service.start()
    watch = service.watch
    data = open(frames[0], "rb").read()
    (watch / "truncated_00001.cbf").write_bytes(data[: len(data) // 2])
    with open(watch / "vanishing_00001.cbf", "wb") as fh:
        fh.write(data[:1000])
        fh.flush()
        time.sleep(0.5)
        os.unlink(watch / "vanishing_00001.cbf")
    corrupt = bytearray(data)
    corrupt[-20000:-10000] = os.urandom(10000)  # complete binary section, wrong content
    (watch / "corrupt_00001.cbf").write_bytes(bytes(corrupt))
    (watch / "good_00001.cbf").write_bytes(data)
    results = {os.path.basename(r["file"]): r for r in subscriber.settled_results(service, 4, 30)}

    assert sorted(results) == ["corrupt_00001.cbf", "good_00001.cbf", "truncated_00001.cbf", "vanishing_00001.cbf"]
    assert results["good_00001.cbf"]["status"] == "ok"
    assert results["truncated_00001.cbf"]["status"] == "error"
    assert "truncated: binary section has" in results["truncated_00001.cbf"]["error"]
    assert "vanished" in results["vanishing_00001.cbf"]["error"]
    assert results["corrupt_00001.cbf"]["status"] == "error" and results["corrupt_00001.cbf"]["error"]
    # the service gave up on two; the corrupt one was analysed and refused by the analysis
    service.wait_status(lambda s: s["frames_failed"] == 2 and s["frames_done"] == 2, what="2 failed, 2 done")


def test_verify_md5_off_reaches_the_workers_with_each_job(make_service, subscribe):
    """With verify_md5: false a frame whose Content-MD5 is wrong (its pixels are fine) is analysed."""
    import re

    frames = real_frames()
    service = make_service(verify_md5=False)
    subscriber = subscribe(service.pub)
    service.start()
    data = open(frames[0], "rb").read()
    (service.watch / "wrongmd5_00001.cbf").write_bytes(re.sub(rb"Content-MD5: \S+", b"Content-MD5: AAAA", data))
    (result,) = subscriber.settled_results(service, 1, 30)
    assert result["status"] == "ok" and result["spot_total"] > 0


def test_a_frame_that_kills_its_workers_is_failed_after_max_tries(make_service, subscribe):
    frames = real_frames()
    service = make_service(max_tries=2)
    subscriber = subscribe(service.pub)
    service.start(env=child_env(SPOTFINDER_TEST_CRASH_ON="poison_*"))
    data = open(frames[0], "rb").read()
    (service.watch / "poison_00001.cbf").write_bytes(data)
    (service.watch / "fine_00001.cbf").write_bytes(data)
    results = {os.path.basename(r["file"]): r for r in subscriber.settled_results(service, 2, 40)}

    assert sorted(results) == ["fine_00001.cbf", "poison_00001.cbf"]
    assert results["fine_00001.cbf"]["status"] == "ok"
    assert results["poison_00001.cbf"]["status"] == "error"
    assert "died" in results["poison_00001.cbf"]["error"]
    service.wait_status(lambda s: s["workers_alive"] == 2, 20, "workers replaced")


def test_listen_prints_json_lines_and_stop_stops_the_service(make_service):
    frames = real_frames()
    service = make_service()
    listener = subprocess.Popen(python_command("listen", service.pub, "--topic", "spotfinder.v1.result.",
                                               "--count", "3", "--timeout", "30"),
                                stdout=subprocess.PIPE, env=child_env(), start_new_session=True)
    try:
        service.start()
        written = subprocess.run(python_command("replay", *frames[:3], "--to", str(service.watch), "--rate", "20",
                                                "--template", "cli_#####.cbf"),
                                 capture_output=True, text=True, env=child_env(), timeout=30)
        assert written.returncode == 0, written.stderr
        assert [json.loads(line)["file"] for line in written.stdout.splitlines()] == \
            expected_files(service.watch, 3, "cli_#####.cbf")
        out, _ = listener.communicate(timeout=30)
    finally:
        listener.kill()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert sorted(m["file"] for m in lines) == expected_files(service.watch, 3, "cli_#####.cbf")

    stopped = subprocess.run(python_command("stop", "--state-dir", service.settings["state_dir"]),
                             capture_output=True, text=True, env=child_env(), timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert service.wait(5) == 0
    again = subprocess.run(python_command("stop", "--state-dir", service.settings["state_dir"]),
                           capture_output=True, text=True, env=child_env(), timeout=60)
    assert again.returncode == 1 and "no service is running" in again.stderr


def test_a_frame_recreated_under_its_name_is_analysed_again(make_service, subscribe):
    frames = real_frames()
    service = make_service(reconcile_interval_s=0.5)
    subscriber = subscribe(service.pub)
    service.start()
    frame = service.watch / "shot_00001.cbf"
    frame.write_bytes(open(frames[0], "rb").read())
    first = subscriber.wait_results(1, 30)[0]
    frame.unlink()
    frame.write_bytes(open(frames[2], "rb").read())  # the shot collected again: a new file, the same name
    results = subscriber.settled_results(service, 2, 30)
    assert [r["file"] for r in results] == [str(frame)] * 2
    assert results[1]["seq"] > first["seq"] and results[1]["spot_total"] != first["spot_total"]
    time.sleep(1.5)  # reconciliations pass: the same file is not analysed a third time
    assert len(service.results_record()) == 2
