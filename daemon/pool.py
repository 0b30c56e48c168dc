"""Local worker processes: start N, notice the ones that die, start replacements.

Used by the service and by ``spotfinder worker`` on other hosts.  The pool names each process it starts
(``--id``, see :mod:`spotfinder_daemon.roll`), so deaths match the roll and the ledger by id, never by a pid the
kernel may have recycled.  Each worker exits by itself if we disappear (``--parent``), so a killed service
leaves no orphans.

A worker says nothing until it has loaded (or compiled) its kernels; one that has not joined within its start
allowance is hung (:meth:`WorkerPool.not_joined`): the service kills it and a fresh one starts.  Each such
kill doubles that slot's allowance until a worker joins, so a host slower than the allowance still gets its
workers instead of killing them in a loop.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection

from .roll import new_worker_id

log = logging.getLogger("spotfinder.pool")

RESTART_BACKOFF_S = 1.0  # a worker that dies at once is not restarted in a tight loop


class WorkerPool:
    def __init__(self, *, count: int, work_endpoint: str, results_endpoint: str, heartbeat_s: float = 1.0,
                 log_level: str = "info", start_allowance_s: float = 60.0):
        self.count = count
        self.start_allowance_s = start_allowance_s
        self.command = [sys.executable, "-m", "spotfinder_daemon.worker", "--work", work_endpoint,
                        "--results", results_endpoint, "--heartbeat", str(heartbeat_s), "--parent", str(os.getpid()),
                        "--log-level", log_level]
        self.processes: list[subprocess.Popen | None] = [None] * count
        self.ids: list[str | None] = [None] * count
        self.started_at = [0.0] * count
        self.joined = [False] * count  # the slot's worker has been heard from
        self.missed_starts = [0] * count  # workers killed in a row for not joining in time
        self.paused = False  # maintenance (SIGUSR2): workers asked to stop and not restarted
        self.stopping = False  # the service is shutting down: nothing is restarted any more

    def _spawn(self, slot: int) -> None:
        self.ids[slot] = new_worker_id()
        self.processes[slot] = subprocess.Popen(self.command + ["--id", self.ids[slot]], stdin=subprocess.DEVNULL)
        self.started_at[slot] = time.monotonic()
        self.joined[slot] = False
        log.info("started worker %s (pid %d)", self.ids[slot], self.processes[slot].pid)

    def start(self) -> None:
        for slot in range(self.count):
            self._spawn(slot)

    def running(self) -> dict[str, int]:
        """Worker id -> pid of the local workers still running."""
        return {self.ids[slot]: p.pid for slot, p in enumerate(self.processes) if p is not None and p.poll() is None}

    def not_joined(self, heard: Collection[str]) -> list[str]:
        """The running local workers not ``heard`` from (not on the roll) since they started, for longer than
        their slot's allowance; each counts as a missed start."""
        now, late = time.monotonic(), []
        for slot, process in enumerate(self.processes):
            if process is None or process.poll() is not None or self.joined[slot]:
                continue
            if self.ids[slot] in heard:
                self.joined[slot], self.missed_starts[slot] = True, 0
            elif now - self.started_at[slot] > self.start_allowance_s * 2 ** self.missed_starts[slot]:
                self.missed_starts[slot] += 1
                late.append(self.ids[slot])
        return late

    def kill(self, worker_id: str) -> bool:
        """SIGKILL a hung local worker (reap() then reports it and starts a fresh one); False if not ours."""
        pid = self.running().get(worker_id)
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        return True

    def reap(self) -> list[tuple[str, int, int]]:
        """(worker id, pid, exit code) of workers that exited since the last call; replacements are started."""
        dead = []
        for slot, process in enumerate(self.processes):
            if process is not None and process.poll() is not None:
                dead.append((self.ids[slot], process.pid, process.returncode))
                self.processes[slot] = None
            if (self.processes[slot] is None and not self.paused and not self.stopping
                    and time.monotonic() - self.started_at[slot] >= RESTART_BACKOFF_S):
                self._spawn(slot)
        return dead

    def pause(self, paused: bool) -> None:
        """Ask every worker to stop after its current frame and keep them stopped (True), or let them be
        restarted (False).  Returns at once: reap() notices them leaving."""
        self.paused = paused
        if paused:
            for process in self.processes:
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (each finishes its current frame), then SIGKILL what is still running after ``timeout``."""
        self.stopping = True
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
