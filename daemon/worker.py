"""A worker process: PULL a job, analyse the frame it names, PUSH the result; stateless, catches everything.

It receives jobs (:class:`~spotfinder_daemon.protocol.Job`) and sends the collector its reports: ``Ready`` once,
``Started`` when it takes a job (so the service knows who holds which frame), ``Result``, a ``Heartbeat``
every second from a thread with its own socket (so a long frame does not make the worker look dead), and
``Bye`` as it leaves.  A job that cannot be read is answered with an error result when its lane and id can
be, else dropped with a log line.  A job names its frame by file and ``index`` (the frame of an HDF5
series, None for a CBF).

A job may ask for DISTL's text as well (``reply``: ``body`` for the GET text, ``post`` for the short POST
text, used by on-demand HTTP queries): it is formatted here, where the live Result with its details is.

A job with ``roots`` names a frame that must really lie in those folders: the worker opens it once (never
blocking: a FIFO is refused, not waited on), asks the kernel where the *opened* file is, and analyses that
open file through a link in its own private folder, so what is analysed is what was checked, whatever
symlinks change meanwhile.  A refused frame gets an error result from :data:`~spotfinder_daemon.protocol.REFUSALS`.

A job carries the worker's budget for its frame.  Memory (``budget_mb``): the process's data segment
(RLIMIT_DATA: heap and private writable mappings, which numpy's large arrays are) may not grow past it, so a
frame needing more raises MemoryError and becomes the error result "out of memory (budget N MB)".  RLIMIT_DATA,
not RLIMIT_AS: the address space also counts the libraries mapped read-only (~260 MB here), which have nothing
to do with a frame.  The worker goes on when the frame's arrays were freed; but numba does not free what a
kernel had allocated when an allocation inside it fails (measured: 100-220 MB each time, until good frames no
longer fit), so after such a frame (glibc's count of allocated bytes tells) the worker answers and leaves, and
its pool starts a fresh one.

Time (``budget_s``): a thread watches the running frame; past the budget it sends the error result "took
longer than the budget of N s" and ends the process, since code running in a numba kernel cannot be
interrupted and a frame that slow may never end.  The result goes out first, so the service takes it as the
frame's answer (no re-send) and its pool starts a fresh worker.  The service's own ``frame_timeout_s`` stays
for workers that stop answering at all (one stuck in native code holding the GIL cannot run this thread).

Run by the service (``python -m spotfinder_daemon.worker``) or on other hosts by ``spotfinder worker --connect HOST``.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fnmatch
import functools
import logging
import os
import resource
import signal
import stat
import sys
import tempfile
import threading
import time

import zmq

from spotfinder_core import Result, analyse, nexus
from spotfinder_core.image import FrameError
from spotfinder_core.analysis import retain_freed_memory, warm_up
from spotfinder_core.report import format_bcsb, format_body, format_post

from . import protocol
from .logs import setup_logging
from .roll import HOST, new_worker_id

log = logging.getLogger("spotfinder.worker")

# Test hook: a worker exits abruptly on frames whose file name matches this pattern, the way a crash in
# native code would.  It lets the tests prove that a frame which kills workers ends as "failed".
CRASH_HOOK = "SPOTFINDER_TEST_CRASH_ON"
# Test hook: a worker sleeps instead of analysing frames whose file name matches this pattern, the way a frame
# stuck in endless work would.  It lets the tests prove that the time budget answers such a frame once.
STALL_HOOK = "SPOTFINDER_TEST_STALL_ON"
STALL_S = 3600.0
KEPT_BY_CACHES = 16 << 20  # bytes a frame may leave allocated in the library's caches (geometry tables)
BUDGET_CHECK_S = 0.1  # how often the watch thread looks at the running frame's deadline


FORMATTERS = {"body": format_body, "post": format_post, "bcsb": format_bcsb}


class Refused(Exception):
    """The frame is not a readable regular file inside the job's roots; the text is one of protocol.REFUSALS."""


@contextlib.contextmanager
def opened_inside(path: str, roots: tuple[str, ...], scratch: str):
    """A name for the very file opened at ``path`` (a link in the private folder ``scratch`` to its open
    descriptor, with ``path``'s base name so a compressed frame keeps its suffix); Refused unless that file
    is a regular file that really lies inside ``roots``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        raise Refused(protocol.REFUSALS["missing"]) from None
    try:
        descriptor = "/proc/self/fd/%d" % fd
        if not protocol.inside(os.readlink(descriptor), roots):
            raise Refused(protocol.REFUSALS["outside"])
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Refused(protocol.REFUSALS["missing"])
        link = os.path.join(scratch, os.path.basename(path) or "frame")
        os.symlink(descriptor, link)
        try:
            yield link
        finally:
            os.unlink(link)
    finally:
        os.close(fd)


def limit_memory(budget_mb: int | None) -> None:
    """Hold this process's data segment to ``budget_mb`` (None: as far as the hard limit lets it grow)."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = hard if budget_mb is None else budget_mb << 20
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


OUT_OF_MEMORY = "out of memory"  # analyse()'s error for a MemoryError


def out_of_memory(budget_mb: int | None) -> str:
    return OUT_OF_MEMORY if budget_mb is None else "%s (budget %d MB)" % (OUT_OF_MEMORY, budget_mb)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2():
    """glibc's mallinfo2, looked up once (it is asked twice a frame); None off glibc 2.33+."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    return mallinfo2


def allocated_bytes() -> int | None:
    """Bytes the C allocator has handed out and not had back (numpy's and numba's arrays live there), without
    the freed memory glibc keeps for the next frame, which the process's size includes; None off glibc 2.33+."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def gave_back(allocated_before: int | None) -> bool:
    """Whether the arrays allocated since ``allocated_before`` (see :func:`allocated_bytes`) were all freed,
    within what caches may keep; False when the allocator cannot tell."""
    allocated_after = allocated_bytes()
    return (allocated_before is not None and allocated_after is not None
            and allocated_after <= allocated_before + KEPT_BY_CACHES)


def answer(job: protocol.Job, result: Result) -> tuple[dict, str | None]:
    """A job's result as it is sent: the result's fields, and its text if the job asks for one (DISTL's, which
    numbers a frame of an HDF5 series by its index)."""
    formatter = FORMATTERS.get(job.reply)
    return result.as_dict(), formatter(nexus.distl_numbered(result)) if formatter else None


def series_inside(opened: str, index: int | None, roots: tuple[str, ...]) -> str:
    """The real path of an opened HDF5 file, to read frame ``index`` of it by; Refused unless the data file
    holding that frame lies inside ``roots`` too.

    An HDF5 master names its data files relative to its own folder, so it is read by its real path (which
    :func:`opened_inside` checked), not through the private link; its data files are checked by path before
    the reader opens them (a narrower guarantee than the single open of a CBF frame).
    """
    real = os.path.realpath(opened)
    try:
        data = nexus.open_series(real).data_file_of(0 if index is None else index)
    except FrameError:
        return real  # the reader says what is wrong, as the frame's error
    if not protocol.inside(os.path.realpath(data.path), roots):
        raise Refused(protocol.REFUSALS["outside"])
    return real


def analyse_job(job: protocol.Job, scratch: str) -> tuple[dict, str | None]:
    """The result of one job, and its text if the job asks for one; any exception becomes an error result.
    ``scratch``: the worker's private folder for :func:`opened_inside`."""
    path, index = job.frame.path, job.frame.index
    limit_memory(job.budget_mb)
    try:
        if job.roots is None:
            result = analyse(path, job.params, verify_md5=job.verify_md5, index=index)
        else:
            with opened_inside(path, job.roots, scratch) as opened:
                if nexus.is_hdf5(opened):
                    opened = series_inside(opened, index, job.roots)
                result = analyse(opened, job.params, shown_as=path, verify_md5=job.verify_md5, index=index)
        if result.error == OUT_OF_MEMORY:
            result.error = out_of_memory(job.budget_mb)
            log.warning("%s: %s", path, result.error)
        return answer(job, result)
    except Refused as refused:
        log.warning("refused %s: %s", path, refused)
        return Result.failure(path, str(refused), index).as_dict(), None
    except MemoryError:  # past the budget outside analyse() (opening, formatting): the same verdict
        log.warning("%s: %s", path, out_of_memory(job.budget_mb))
        return answer(job, Result.failure(path, out_of_memory(job.budget_mb), index))
    except Exception as exc:  # a bug or a bad parameter must cost one frame, not the worker
        log.error("analysis of %s raised %s: %s", path, type(exc).__name__, exc)
        return answer(job, Result.failure(path, "analysis raised %s: %s" % (type(exc).__name__, exc), index))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Running:
    """The job a worker is analysing, when it started (wall clock, for its reports) and its time budget's
    deadline (``time.monotonic()``; None: no budget)."""

    job: protocol.Job
    t_start: float
    deadline: float | None


class Worker:
    def __init__(self, *, work_endpoint: str, results_endpoint: str, heartbeat_s: float = 1.0,
                 parent_pid: int | None = None, worker_id: str | None = None):
        self.id = worker_id or new_worker_id()
        self.work_endpoint = work_endpoint
        self.results_endpoint = results_endpoint
        self.heartbeat_s = heartbeat_s
        self.parent_pid = parent_pid
        self.busy: protocol.JobKey | None = None
        self.running: Running | None = None
        self.answering = threading.Lock()  # held by whoever answers the running job: the loop or the watch
        self.stopping = threading.Event()
        self.context = zmq.Context()

    def _results_socket(self) -> zmq.Socket:
        push = self.context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 5000)
        push.connect(self.results_endpoint)
        return push

    def _send(self, sock: zmq.Socket, kind: type[protocol.Report], **fields) -> None:
        report = kind(worker=self.id, pid=os.getpid(), host=HOST, **fields)
        try:
            data = protocol.encode(report)
        except (TypeError, ValueError) as exc:  # an unencodable result costs its frame, never the worker
            if kind is not protocol.Result:
                raise
            path = report.result.get("file") or "?"
            log.error("result for %s cannot be encoded: %s", path, exc)
            failure = Result.failure(path, "result cannot be encoded as JSON: %s" % exc)
            data = protocol.encode(dataclasses.replace(report, result=failure.as_dict()))
        sock.send(data)

    def _refuse(self, sock: zmq.Socket, error: protocol.ProtocolError, data: bytes) -> None:
        """A job that cannot be read: an error result if we know which job it was, else only a log line."""
        if error.job is None:
            log.error("dropped a job that cannot be read (%s): %.200r", error, data)
            return
        log.error("job %s %d cannot be read: %s", error.job.lane, error.job.id, error)
        failure = Result.failure("?", "the job cannot be read: %s" % error)
        self._send(sock, protocol.Result, lane=error.job.lane, id=error.job.id, result=failure.as_dict())

    def _heartbeats(self) -> None:
        sock = self._results_socket()
        try:
            while not self.stopping.wait(self.heartbeat_s):
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    log.error("the service (pid %d) is gone; worker exits", self.parent_pid)
                    os._exit(1)
                self._send(sock, protocol.Heartbeat, busy=self.busy)
        finally:
            sock.close(linger=0)

    def _watch_time_budget(self) -> None:
        """Answer the running job with an error result once it is past its time budget, then end the process:
        the loop, waiting for the lock to send its own result, never does."""
        while True:
            time.sleep(BUDGET_CHECK_S)
            with self.answering:
                running = self.running
                if running is None or running.deadline is None or time.monotonic() < running.deadline:
                    continue
                job = running.job
                log.error("%s took longer than the budget of %g s: answered as an error; this worker leaves and "
                          "a fresh one takes its place", job.frame.path, job.budget_s)
                overran = Result.failure(job.frame.path, "took longer than the budget of %g s" % job.budget_s,
                                         job.frame.index)
                result, text = answer(job, overran)
                context = zmq.Context()  # its own, so term() waits until this one result is sent
                sock = context.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 5000)
                sock.connect(self.results_endpoint)
                self._send(sock, protocol.Result, lane=job.lane, id=job.id, t_start=running.t_start, result=result,
                           text=text)
                sock.close()
                context.term()
                os._exit(0)

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
        self._send(results, protocol.Ready)
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._watch_time_budget, name="time-budget", daemon=True).start()
        crash_pattern, stall_pattern = os.environ.get(CRASH_HOOK), os.environ.get(STALL_HOOK)
        scratch = tempfile.TemporaryDirectory(prefix="spotfinder-worker-")  # 0700: nobody else can swap its links
        log.info("worker %s pulling from %s, results to %s", self.id, self.work_endpoint, self.results_endpoint)
        try:
            while not self.stopping.is_set():
                if not pull.poll(200):
                    continue
                data = pull.recv()
                try:
                    job = protocol.decode_job(data)
                except protocol.ProtocolError as exc:
                    self._refuse(results, exc, data)
                    continue
                self.busy = job.key
                t_start = time.time()
                self._send(results, protocol.Started, lane=job.lane, id=job.id, t_start=t_start)
                if crash_pattern and fnmatch.fnmatch(os.path.basename(job.frame.path), crash_pattern):
                    os._exit(86)
                deadline = None if job.budget_s is None else time.monotonic() + job.budget_s
                with self.answering:
                    self.running = Running(job=job, t_start=t_start, deadline=deadline)
                if stall_pattern and fnmatch.fnmatch(os.path.basename(job.frame.path), stall_pattern):
                    time.sleep(STALL_S)
                allocated_before = allocated_bytes()
                result, text = analyse_job(job, scratch.name)
                with self.answering:
                    self.running = None
                self._send(results, protocol.Result, lane=job.lane, id=job.id, t_start=t_start, result=result,
                           text=text)
                self.busy = None
                if str(result.get("error")).startswith(OUT_OF_MEMORY) and not gave_back(allocated_before):
                    log.warning("the arrays of %s were not all freed (%s bytes allocated, %s before it); this "
                                "worker leaves and a fresh one takes its place", job.frame.path, allocated_bytes(),
                                allocated_before)
                    self.stopping.set()
        finally:
            self.stopping.set()
            pull.close()
            self._send(results, protocol.Bye)
            results.close()  # LINGER lets the last result reach the collector
            self.context.term()
            scratch.cleanup()
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spotfinder_daemon.worker",
                                     description="One spot-finding worker process.")
    parser.add_argument("--work", required=True, help="dispatcher endpoint to PULL jobs from")
    parser.add_argument("--results", required=True, help="collector endpoint to PUSH results to")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    parser.add_argument("--parent", type=int, help="exit when this process (the service) is gone")
    parser.add_argument("--id", help="the worker's id (default: a new HOST:UUID)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    worker = Worker(work_endpoint=args.work, results_endpoint=args.results, heartbeat_s=args.heartbeat,
                    parent_pid=args.parent, worker_id=args.id)
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())  # finish the current frame, then leave
    signal.signal(signal.SIGINT, lambda *_: worker.stopping.set())
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
