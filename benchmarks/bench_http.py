"""On-demand HTTP benchmark: DISTL's legacy GET on PILATUS 6M frames through `spotfinder serve`, beside the real DISTL.

A service with N workers (default 2) and the decompressed thaumatin frames as its data root answers
`GET /spotfinder/distl.signal_strength?distl.image=FRAME` at a few client concurrencies (up to the stock cctbx
client example's 48 callers, no delay); for each, the requests/s, the p50/p99 latency (request sent -> whole
reply read) of the answered ones, and how many were refused with 503 (the service's default settings: queries
wait by their expected time, as Apache's clients did).  Then the real DISTL (/work/shared/peer/distl_batch,
one process) runs on the same frames in the same run, and its per-frame time is printed beside ours.
``--overload S`` then offers three times what the workers can do for S seconds: how many are answered in
time, how fast the rest are refused, whether /status stays answerable, and the service's resident memory.

    .venv/bin/python benchmarks/bench_http.py [--frames N] [--requests N] [--concurrency 1 2 8 48]
                                              [--overload 60] [--json]
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from bench_pipeline import free_ports, per_frame, percentile
from peer import run_distl, thaumatin_present, thaumatin_workspace

WARM_UP_REQUESTS = 4  # the first frame in each worker compiles the numba kernels


class Service:
    """A `spotfinder serve` process on free ports whose data root is ``frames``; it watches nothing."""

    def __init__(self, work: Path, frames: Path, workers: int):
        self.port, pub_port, work_port, results_port = free_ports(4)
        config = work / "bench-http.yaml"
        config.write_text("\n".join([
            "data_root: [%s]" % frames, "http: 127.0.0.1:%d" % self.port, "pub: tcp://127.0.0.1:%d" % pub_port,
            "work_endpoint: tcp://127.0.0.1:%d" % work_port, "results_endpoint: tcp://127.0.0.1:%d" % results_port,
            "workers: %d" % workers, "state_dir: %s" % (work / "state"),
            "log_level: warning", ""]))
        serve = [sys.executable, "-m", "spotfinder_daemon.cli", "serve", "--config", str(config)]
        self.process = subprocess.Popen(serve, start_new_session=True)
        deadline = time.monotonic() + 60
        while self._workers_alive() < workers:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit("the service did not start with %d workers" % workers)
            time.sleep(0.2)

    def _get(self, target: str, timeout: float = 120) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", target)
            reply = connection.getresponse()
            return reply.status, reply.read()
        finally:
            connection.close()

    def _workers_alive(self) -> int:
        try:
            return json.loads(self._get("/status", 2)[1])["workers_alive"]
        except OSError:
            return -1

    def query(self, frame: str) -> tuple[int, float]:
        """(status, seconds) of one legacy GET."""
        started = time.perf_counter()
        status, _ = self._get("/spotfinder/distl.signal_strength?distl.image=" + quote(frame))
        return status, time.perf_counter() - started

    def proc_seconds(self) -> float:
        """Mean analysis time per on-demand frame in the workers, from /metrics."""
        text = self._get("/metrics")[1].decode()
        values = {}
        for line in text.splitlines():
            for name in ("sum", "count"):
                if line.startswith('spotfinder_frame_seconds_%s{lane="ondemand"}' % name):
                    values[name] = float(line.split()[-1])
        return values["sum"] / values["count"]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)


def load(service: Service, frames: list[str], requests: int, concurrency: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(lambda i: service.query(frames[i % len(frames)]), range(requests)))
    wall = time.perf_counter() - started
    latencies = [seconds for status, seconds in replies if status == 200]
    return {"concurrency": concurrency, "requests": requests, "ok": len(latencies),
            "refused_503": sum(status == 503 for status, _ in replies), "requests_per_s": requests / wall,
            "latency_p50_s": percentile(latencies, 0.5) if latencies else None,
            "latency_p99_s": percentile(latencies, 0.99) if latencies else None}


def memory_mb(pid: int) -> dict[str, float]:
    """The resident size now and at its peak (VmRSS, VmHWM) of a process, in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/%d/status" % pid).read_text().splitlines())
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM")}


def overload(service: Service, frames: list[str], seconds: float, frame_s: float, workers: int) -> dict:
    """Open-loop load at three times what the workers can do: one request every 1/rate s, each on its own
    thread (a slow reply never slows the arrivals), and a /status probe every 0.25 s beside it."""
    rate = 3 * workers / frame_s
    replies: list[tuple[int, float]] = []
    status_s: list[float] = []
    done = threading.Event()

    def one(frame: str) -> None:
        try:
            replies.append(service.query(frame))
        except OSError:
            replies.append((-1, math.inf))

    def probe() -> None:
        while not done.wait(0.25):
            started = time.perf_counter()
            status_s.append(time.perf_counter() - started if service._get("/status", 10)[0] == 200 else math.inf)

    before = memory_mb(service.process.pid)
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    callers, begin = [], time.monotonic()
    for n in range(int(rate * seconds)):
        time.sleep(max(0.0, begin + n / rate - time.monotonic()))
        callers.append(threading.Thread(target=one, args=(frames[n % len(frames)],), daemon=True))
        callers[-1].start()
    for caller in callers:
        caller.join(180)
    done.set()
    prober.join(15)
    after = memory_mb(service.process.pid)
    answered = [t for status, t in replies if status == 200]
    refused = [t for status, t in replies if status == 503]
    return {"rate": rate, "seconds": seconds, "requests": len(replies), "ok": len(answered),
            "refused_503": len(refused), "other": len(replies) - len(answered) - len(refused),
            "ok_p99_s": percentile(answered, 0.99), "ok_max_s": max(answered),
            "refused_max_s": max(refused, default=0.0), "status_max_s": max(status_s),
            "service_rss_mb": (before["VmRSS"], after["VmRSS"]), "service_peak_mb": after["VmHWM"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=19, help="distinct 6M frames to use (default 19)")
    parser.add_argument("--requests", type=int, default=100, help="requests per concurrency level (default 100)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 8, 48])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overload", type=float, metavar="S", default=0.0,
                        help="then offer three times what the workers can do for S seconds (e.g. 60)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object too")
    args = parser.parse_args()
    if not thaumatin_present():
        return 0
    with thaumatin_workspace("bench-http-", args.frames) as (work, frames):
        service = Service(work, work / "frames", args.workers)
        try:
            for frame in frames[:WARM_UP_REQUESTS]:
                service.query(frame)
            levels = [load(service, frames, args.requests, c) for c in args.concurrency]
            ours_s = service.proc_seconds()
            flood = overload(service, frames, args.overload, ours_s, args.workers) if args.overload else None
        finally:
            service.close()
        distl = per_frame(run_distl(frames))
    print("PILATUS 6M on-demand GETs, %d frames, %d workers, %d cores" % (len(frames), args.workers, os.cpu_count()))
    for level in levels:
        print("  concurrency %2d: %6.2f requests/s   p50 %6.3f s   p99 %6.3f s   (%d/%d answered 200, %d refused 503)"
              % (level["concurrency"], level["requests_per_s"], level["latency_p50_s"] or 0.0,
                 level["latency_p99_s"] or 0.0, level["ok"], level["requests"], level["refused_503"]))
    if flood:
        print("  overload: %.1f requests/s offered for %.0f s (3x the workers): %d answered 200 "
              "(p99 %.2f s, max %.2f s), %d refused 503 at once (max %.3f s), %d other; /status max %.3f s; "
              "service resident %.0f -> %.0f MB (peak %.0f MB)"
              % (flood["rate"], flood["seconds"], flood["ok"], flood["ok_p99_s"], flood["ok_max_s"],
                 flood["refused_503"], flood["refused_max_s"], flood["other"], flood["status_max_s"],
                 *flood["service_rss_mb"], flood["service_peak_mb"]))
    print("  analysis per frame (ours, in the worker): %6.3f s" % ours_s)
    if distl:
        print("  real DISTL per frame (one process):       %6.3f s (%d frames)"
              % (distl["seconds_mean"], distl["frames"]))
        print("  ours / DISTL per frame:                   %6.2f x" % (ours_s / distl["seconds_mean"]))
        best = max(level["requests_per_s"] for level in levels)
        print("  best requests/s vs DISTL frames/s (1 process): %.2f x" % (best * distl["seconds_mean"]))
    if args.json:
        print(json.dumps({"levels": levels, "overload": flood, "ours_proc_s": ours_s, "distl": distl}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
