"""sd_notify over a real datagram socket, alone and from the running service's main loop."""
from __future__ import annotations

import signal
import time
import uuid

from spotfinder_daemon.notify import Notifier
from service_helpers import child_env, make_service, real_frames, received, receiver, wait_for

__all__ = ["make_service"]


def test_notifier_paths_abstract_sockets_and_absence(tmp_path):
    assert not Notifier(environ={}).enabled and Notifier(environ={}).send(READY=1) is False
    path = str(tmp_path / "notify")
    sock = receiver(path)
    assert Notifier(environ={"NOTIFY_SOCKET": path}).ready("up")
    assert received(sock) == ["READY=1\nSTATUS=up"]
    name = "spotfinder-test-%s" % uuid.uuid4().hex
    abstract = receiver("\0" + name)
    assert Notifier(environ={"NOTIFY_SOCKET": "@" + name}).watchdog()
    assert received(abstract) == ["WATCHDOG=1"]
    assert Notifier(environ={"WATCHDOG_USEC": "4000000"}).watchdog_interval_s == 2.0
    assert Notifier(environ={"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None


def test_service_notifies_ready_watchdog_only_while_healthy_and_stopping(make_service, tmp_path):
    """The systemd protocol as a Type=notify unit with WatchdogSec=1 would see it."""
    real_frames()
    path = str(tmp_path / "notify")
    sock = receiver(path)
    service = make_service()
    service.start(env=child_env(NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000"))
    messages = []
    wait_for(lambda: messages.extend(received(sock)) or any(m.startswith("READY=1") for m in messages), 30,
             "READY=1")
    assert not any("WATCHDOG=1" in m for m in messages[:messages.index(
        next(m for m in messages if m.startswith("READY=1")))]), "a watchdog ping came before READY=1"

    received(sock)
    start = time.monotonic()
    time.sleep(3.0)
    pings = sum("WATCHDOG=1" in m for m in received(sock))
    elapsed = time.monotonic() - start
    assert pings >= 2 * int(elapsed) - 1, "%d watchdog pings in %.1f s" % (pings, elapsed)  # half the period

    service.signal(signal.SIGUSR2)  # test hook: stop all local workers -> unhealthy -> no more WATCHDOG=1
    service.wait_status(lambda s: s["workers_alive"] == 0 and not s["healthy"], 10, "paused workers")
    received(sock)
    time.sleep(1.5)
    quiet = received(sock)
    assert quiet and not any("WATCHDOG=1" in m for m in quiet), quiet
    assert any("unhealthy: no live workers" in m for m in quiet)

    service.signal(signal.SIGUSR2)
    wait_for(lambda: any("WATCHDOG=1" in m for m in received(sock)), 15, "watchdog pings after resuming")
    service.signal(signal.SIGTERM)
    assert service.wait(30) == 0
    assert any(m.startswith("STOPPING=1") for m in received(sock))


def test_a_remote_workers_only_service_is_ready_and_petted_while_it_waits_for_its_workers(make_service, tmp_path):
    """workers: 0 answers queries with 503 and says unhealthy until a remote worker joins, but systemd must not
    kill it for that: a restart would bring no worker."""
    path = str(tmp_path / "notify")
    sock = receiver(path)
    service = make_service(workers=0)
    service.start(env=child_env(NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000"))
    messages = []
    wait_for(lambda: messages.extend(received(sock)) or any("WATCHDOG=1" in m for m in messages), 30,
             "READY=1, then WATCHDOG=1")
    assert any(m.startswith("READY=1") for m in messages)
    status = service.wait_status(lambda s: s["state"] == "serving", 10, "the serving state in /status")
    assert not status["healthy"] and status["health"] == "no live workers (workers: 0 and no remote worker)"
    service.signal(signal.SIGTERM)
    assert service.wait(30) == 0
