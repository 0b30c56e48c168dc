"""The service under faults: a damaged ledger, a second service on the same state folder, a full or read-only
disk under the ledger, a worker that hangs before it joins, two services on one host.

Real service processes, real workers, real sockets on 127.0.0.1; the disk tests mount a real 2 MB tmpfs.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from service_helpers import (child_env, free_ports, make_service, python_command, received, receiver, subscribe,
                             wait_for)

__all__ = ["make_service", "subscribe"]  # fixtures used by name


def serve_once(service, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``spotfinder serve`` for a service that is expected to refuse to start."""
    return subprocess.run(python_command("serve", "--config", str(service.config)), capture_output=True, text=True,
                          env=child_env(), timeout=timeout)


def test_a_damaged_ledger_stops_the_start_with_one_line_and_exit_2(make_service):
    service = make_service()
    state = service.tmp / "state"
    state.mkdir()
    (state / "ledger.sqlite3").write_bytes(b"")  # zero length: a new ledger would re-use every seq
    refused = serve_once(service)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines() == [
        "spotfinder: error: ledger %s is damaged: it is empty or not a ledger; move it away to start a new ledger "
        "(the watched frames are then analysed and published again, under a new ledger id)"
        % (state / "ledger.sqlite3")]


def test_a_second_service_is_refused_though_the_pid_file_was_deleted(make_service):
    first = make_service(workers=1).start()
    os.unlink(first.tmp / "state" / "spotfinder.pid")
    second = make_service(workers=1, state_dir=first.settings["state_dir"])
    refused = serve_once(second)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines() == ["spotfinder: error: state folder %s is in use by another service (pid ?)"
                                           % first.settings["state_dir"]]
    first.wait_status(lambda s: s["state"] == "serving" and s["healthy"], what="the first service serving on")
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 2 MB tmpfs for the state folder; skipped where it cannot be mounted (it needs root)."""
    mount_point = tmp_path / "state"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, timeout=10)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a 2 MB tmpfs for the state folder: %s" % (mounted.stderr.strip() or "not root"))
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=10)


def fill(folder: Path) -> Path:
    """A file that takes every free block of the folder's file system."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_under_the_ledger_holds_frames_until_space_returns(small_disk, make_service, make_frame, tmp_path):
    """(A read-only remount cannot be made under the service's open files here: the kernel refuses it as busy.
    The ledger's refusals of a read-only database are tested in test_service_ledger.)"""
    notify = receiver(str(tmp_path / "notify"))
    service = make_service(state_dir=str(small_disk), workers=1)
    service.start(env=child_env(NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="1000000"))
    make_frame(str(service.watch / "before_00001.cbf"))
    service.wait_status(lambda s: s["frames_done"] == 1 and s["healthy"], 20, "the first frame done")
    filler = fill(small_disk)
    frames = [str(service.watch / ("held_%05d.cbf" % n)) for n in range(1, 6)]
    for seed, path in enumerate(frames):
        make_frame(path, seed=seed)

    refused = service.wait_status(lambda s: s["ledger_error"], 20, "the ledger refusing writes")
    assert not refused["healthy"] and refused["health"].startswith("the ledger cannot be written")
    assert "database or disk is full" in refused["ledger_error"]
    received(notify)
    time.sleep(2.0)  # two watchdog intervals: no WATCHDOG=1, the reason in STATUS=
    held = received(notify)
    assert held and not any("WATCHDOG=1" in m for m in held), held
    assert all(m.startswith("STATUS=unhealthy: the ledger cannot be written") for m in held), held
    assert service.process.poll() is None and service.status()["frames_done"] == 1

    filler.unlink()
    service.wait_status(lambda s: s["healthy"] and s["frames_done"] == 6 and s["ledger_error"] is None, 30,
                        "every held frame done once the ledger takes writes")
    wait_for(lambda: any("WATCHDOG=1" in m for m in received(notify)), 5, "the watchdog petted again")
    record = service.results_record()
    assert sorted(r["file"] for r in record) == sorted(frames + [str(service.watch / "before_00001.cbf")])
    stored = service.get("/results?since=0")["results"]  # results and collection messages: no seq lost
    assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1)) and len(record) == 6
    assert "the ledger refuses writes" in service.log.read_text()
    service.signal(signal.SIGTERM)
    assert service.wait(30) == 0


def test_a_worker_that_hangs_before_it_joins_is_replaced_and_capacity_reported_degraded(make_service, subscribe):
    service = make_service(workers=2, worker_start_s=2.0)
    subscriber = subscribe(service.pub, "spotfinder.v1.heartbeat.")
    service.start(wait_workers=0)  # HTTP answers once the workers are started, before they have loaded kernels
    victim = service.status()["workers"][0]
    os.kill(victim["pid"], signal.SIGSTOP)  # hung while it starts: it never says a word
    degraded = service.wait_status(lambda s: s["workers_alive"] == 1, 20, "the other worker joined")
    assert not next(w for w in degraded["workers"] if w["id"] == victim["id"])["alive"], "joined before SIGSTOP"
    assert degraded["degraded"] and degraded["workers_configured"] == 2
    assert degraded["healthy"] and degraded["health"] == "degraded: 1 of 2 workers alive"
    wait_for(lambda: any(m["degraded"] and m["workers_configured"] == 2 for m in subscriber.messages), 10,
             "a heartbeat reporting the degraded capacity")
    # killed after worker_liveness_s (3) + worker_start_s (2) from its start, and replaced
    replaced = service.wait_status(lambda s: s["workers_alive"] == 2 and victim["id"] not in
                                   [w["id"] for w in s["workers"]], 20, "the hung worker replaced")
    assert not replaced["degraded"] and replaced["health"] == "ok"
    assert "worker %s has not joined 5 s after it started: killed as hung" % victim["id"] in service.log.read_text()


def flags_only_service(tmp_path: Path, name: str, watch: Path, started: list) -> tuple[int, str]:
    """``spotfinder serve`` with flags only, every other setting its default; (HTTP port, state folder)."""
    pub, http = free_ports(2)
    state = tmp_path / name
    log = open(tmp_path / ("%s.log" % name), "wb")
    started.append(subprocess.Popen(python_command("serve", "--state-dir", str(state), "--pub",
                                                   "tcp://127.0.0.1:%d" % pub, "--http", "127.0.0.1:%d" % http,
                                                   "--watch", str(watch), "--workers", "1"),
                                    stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True))
    log.close()
    return http, str(state)


def get_json(port: int, path: str) -> dict | None:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as reply:
            return json.loads(reply.read())
    except OSError:
        return None


def test_two_services_with_their_own_state_folders_share_a_host(tmp_path, make_frame):
    """Local workers talk over ipc:// sockets in the state folder by default: no fixed TCP port to collide on."""
    started: list[subprocess.Popen] = []
    try:
        services = []
        for name in ("one", "two"):
            watch = tmp_path / ("watch-" + name)
            watch.mkdir()
            services.append((flags_only_service(tmp_path, name, watch, started), watch))
        for (http, state), watch in services:
            make_frame(str(watch / "shot_00001.cbf"))
            wait_for(lambda port=http: (get_json(port, "/status") or {}).get("frames_done") == 1, 60,
                     "a frame done by the service of " + state)
            assert {"work", "results"} <= set(os.listdir(state))  # the sockets
        assert all(p.poll() is None for p in started)
        for process in started:
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
    finally:
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def test_remote_workers_connect_to_a_service_that_binds_tcp(make_service, make_frame):
    work_port, results_port = free_ports(2)
    service = make_service(workers=0, work_endpoint="tcp://127.0.0.1:%d" % work_port,
                           results_endpoint="tcp://127.0.0.1:%d" % results_port).start(wait_workers=0)
    remote = subprocess.Popen(python_command("worker", "--connect", "127.0.0.1", "--work-port", str(work_port),
                                             "--results-port", str(results_port), "--processes", "1"),
                              env=child_env(), start_new_session=True)
    try:
        service.wait_status(lambda s: s["workers_alive"] == 1, 60, "the remote worker joined")
        make_frame(str(service.watch / "remote_00001.cbf"))
        (result,) = wait_for(lambda: service.results_record(), 30, "the frame's result")
        assert result["status"] == "ok" and result["file"] == str(service.watch / "remote_00001.cbf")
    finally:
        os.killpg(remote.pid, signal.SIGKILL)
        remote.wait(10)
