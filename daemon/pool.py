"""Local worker processes: start N, notice the ones that die, start replacements.

Used by the service and by ``spotfinder worker`` on other hosts.  Each worker is its own process group
member of ours and exits by itself if we disappear (``--parent``), so a killed service leaves no orphans.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger("spotfinder.pool")

RESTART_BACKOFF_S = 1.0  # a worker that dies at once is not restarted in a tight loop


class WorkerPool:
    def __init__(self, count: int, work_endpoint: str, results_endpoint: str, heartbeat_s: float = 1.0,
                 log_level: str = "info"):
        self.count = count
        self.command = [sys.executable, "-m", "daemon.worker", "--work", work_endpoint, "--results", results_endpoint,
                        "--heartbeat", str(heartbeat_s), "--parent", str(os.getpid()), "--log-level", log_level]
        self.processes: list[subprocess.Popen | None] = [None] * count
        self.started_at = [0.0] * count
        self.paused = False  # maintenance / test hook: workers stopped and not restarted

    @staticmethod
    def worker_id(pid: int) -> str:
        """The id a local worker reports (``host:pid``), so deaths can be matched to ledger entries."""
        return "%s:%d" % (socket.gethostname(), pid)

    def _spawn(self, slot: int) -> None:
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.processes[slot] = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL)
        self.started_at[slot] = time.monotonic()
        log.info("started worker pid %d", self.processes[slot].pid)

    def start(self) -> None:
        for slot in range(self.count):
            self._spawn(slot)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p is not None and p.poll() is None]

    def reap(self) -> list[tuple[int, int]]:
        """(pid, exit code) of workers that died since the last call; replacements are started."""
        dead = []
        for slot, process in enumerate(self.processes):
            if process is not None and process.poll() is not None:
                dead.append((process.pid, process.returncode))
                self.processes[slot] = None
            if (self.processes[slot] is None and not self.paused
                    and time.monotonic() - self.started_at[slot] >= RESTART_BACKOFF_S):
                self._spawn(slot)
        return dead

    def pause(self, paused: bool) -> None:
        """Stop all workers and keep them stopped (True), or let them be restarted (False)."""
        self.paused = paused
        if paused:
            self.stop(timeout=5.0)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (each finishes its current frame), then SIGKILL what is still running after ``timeout``."""
        running = [p for p in self.processes if p is not None and p.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for process in running:
            try:
                process.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time; killed", process.pid)
                process.kill()
                process.wait()
