"""A worker process: PULL a job, analyse the frame it names, PUSH the result; stateless, catches everything.

Messages to the collector (JSON, one frame each): ``ready`` once, ``started`` when it takes a job (so the
service knows who holds which frame), ``result``, and a ``heartbeat`` every second from a thread with its
own socket, so a long frame does not make the worker look dead.

A job may ask for DISTL's text as well (``reply``: ``body`` for the GET text, ``post`` for the short POST
text, used by on-demand HTTP queries): it is formatted here, where the live Result with its details is.

Run by the service (``python -m spotfinder_daemon.worker``) or on other hosts by ``spotfinder worker --connect HOST``.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import signal
import sys
import threading
import time

import zmq

from spotfinder_core import Params, Result, analyse
from spotfinder_core.analysis import retain_freed_memory, warm_up
from spotfinder_core.report import format_body, format_post

from .logs import setup_logging
from .roll import HOST, new_worker_id

log = logging.getLogger("spotfinder.worker")

# Test hook: a worker exits abruptly on frames whose file name matches this pattern, the way a crash in
# native code would.  It lets the tests prove that a frame which kills workers ends as "failed".
CRASH_HOOK = "SPOTFINDER_TEST_CRASH_ON"


def _plain(value):
    """JSON for the numpy scalars an analysis may leave in its result."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError("%s is not JSON serializable" % type(value).__name__)


def encode(message: dict) -> bytes:
    return json.dumps(message, default=_plain).encode()


FORMATTERS = {"body": format_body, "post": format_post}


def analyse_job(job: dict) -> tuple[dict, str | None]:
    """The result of one job, and its text if the job asks for one; any exception becomes an error result."""
    path = job["path"]
    formatter = FORMATTERS.get(job.get("reply"))
    try:
        params = Params({k: tuple(v) if isinstance(v, list) else v for k, v in (job.get("params") or {}).items()})
        result = analyse(path, params, verify_md5=job.get("verify_md5", True))
        return result.as_dict(), formatter(result) if formatter else None
    except Exception as exc:  # a bug or a bad parameter must cost one frame, not the worker
        log.error("analysis of %s raised %s: %s", path, type(exc).__name__, exc)
        result = Result.failure(path, "analysis raised %s: %s" % (type(exc).__name__, exc))
        return result.as_dict(), formatter(result) if formatter else None


class Worker:
    def __init__(self, work_endpoint: str, results_endpoint: str, heartbeat_s: float = 1.0,
                 parent_pid: int | None = None, worker_id: str | None = None):
        self.id = worker_id or new_worker_id()
        self.work_endpoint = work_endpoint
        self.results_endpoint = results_endpoint
        self.heartbeat_s = heartbeat_s
        self.parent_pid = parent_pid
        self.busy: int | None = None
        self.stopping = threading.Event()
        self.context = zmq.Context()

    def _results_socket(self) -> zmq.Socket:
        push = self.context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 5000)
        push.connect(self.results_endpoint)
        return push

    def _send(self, sock: zmq.Socket, kind: str, **fields) -> None:
        message = {"type": kind, "worker": self.id, "pid": os.getpid(), "host": HOST, **fields}
        try:
            data = encode(message)
        except (TypeError, ValueError) as exc:  # an unencodable result costs its frame, never the worker
            if kind != "result":
                raise
            log.error("result for %s cannot be encoded: %s", message["result"].get("file"), exc)
            message["result"] = Result.failure(message["result"].get("file") or "?",
                                               "result cannot be encoded as JSON: %s" % exc).as_dict()
            data = encode(message)
        sock.send(data)

    def _heartbeats(self) -> None:
        sock = self._results_socket()
        try:
            while not self.stopping.wait(self.heartbeat_s):
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    log.error("the service (pid %d) is gone; worker exits", self.parent_pid)
                    os._exit(1)
                self._send(sock, "heartbeat", busy=self.busy)
        finally:
            sock.close(linger=0)

    def run(self) -> int:
        pull = self.context.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 1)  # hoard nothing: a frame waits in the dispatcher, not here
        pull.setsockopt(zmq.LINGER, 0)
        pull.connect(self.work_endpoint)
        results = self._results_socket()
        retain_freed_memory()
        try:  # compile the kernels before saying ready, so no query waits for the first frame's compilation
            log.debug("kernels ready in %.2f s", warm_up())
        except Exception as exc:
            log.warning("warm-up failed (%s: %s); the first frame will compile the kernels", type(exc).__name__, exc)
        self._send(results, "ready")
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        crash_pattern = os.environ.get(CRASH_HOOK)
        log.info("worker %s pulling from %s, results to %s", self.id, self.work_endpoint, self.results_endpoint)
        try:
            while not self.stopping.is_set():
                if not pull.poll(200):
                    continue
                job = pull.recv_json()
                self.busy = job["id"]
                t_start = time.time()
                self._send(results, "started", id=job["id"], t_start=t_start)
                if crash_pattern and fnmatch.fnmatch(os.path.basename(job["path"]), crash_pattern):
                    os._exit(86)
                result, text = analyse_job(job)
                extra = {} if text is None else {"text": text}
                self._send(results, "result", id=job["id"], t_start=t_start, result=result, **extra)
                self.busy = None
        finally:
            self.stopping.set()
            pull.close()
            self._send(results, "bye")
            results.close()  # LINGER lets the last result reach the collector
            self.context.term()
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spotfinder_daemon.worker", description="One spot-finding worker process.")
    parser.add_argument("--work", required=True, help="dispatcher endpoint to PULL jobs from")
    parser.add_argument("--results", required=True, help="collector endpoint to PUSH results to")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    parser.add_argument("--parent", type=int, help="exit when this process (the service) is gone")
    parser.add_argument("--id", help="the worker's id (default: a new HOST:UUID)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    worker = Worker(args.work, args.results, args.heartbeat, args.parent, args.id)
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())  # finish the current frame, then leave
    signal.signal(signal.SIGINT, lambda *_: worker.stopping.set())
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
