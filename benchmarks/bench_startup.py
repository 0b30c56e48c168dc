"""Start-up of `spotfinder serve`: seconds until it answers, is healthy and has published its first result.

    python benchmarks/bench_startup.py [--workers 2] [--rounds 1]

A first start after a fresh install finds numba's cache empty and compiles every kernel in each worker
before the worker joins; later starts load them.  Each round starts the service twice on the same empty
numba cache folder (``NUMBA_CACHE_DIR``, a new one each round): once cold (compiling), then warm.  A PILATUS
6M frame is written into the watched folder as soon as the process has been started.  Printed per start:
seconds until ``/status`` answers, until it says ``serving`` (systemd's READY), until the frame's result
arrives on the PUB socket, the largest peak resident size of a worker (compiling costs memory the analysis does
not), the states ``/status`` went through and the log lines that say what it was doing;
beside them the real DISTL's whole-process time for the same frame (``../shared/peer/distl``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import zmq
from bench_oneshot import DISTL, timed
from bench_pipeline import children, peak_rss_mb
from peer import DISTL_VENV, REPO, cpu_name, thaumatin_present, thaumatin_workspace

sys.path.insert(0, str(REPO / "tests"))
from service_helpers import free_ports  # noqa: E402  (the tests' one way of picking distinct ports)

TIMEOUT_S = 300.0


def status(port: int) -> dict | None:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/status" % port, timeout=2) as reply:
            return json.loads(reply.read())
    except OSError:
        return None


def start_once(work: Path, frame: str, workers: int, cache: Path) -> dict:
    """One start of the service, timed from the moment the process is started."""
    for name in ("watch", "state"):
        shutil.rmtree(work / name, ignore_errors=True)
    watch = work / "watch"
    watch.mkdir()
    http, pub_port, work_port, results_port = free_ports(4)
    config = work / "startup.yaml"
    pub = "tcp://127.0.0.1:%d" % pub_port
    config.write_text("\n".join([
        "watch: [%s]" % watch, "pub: %s" % pub, "http: 127.0.0.1:%d" % http,
        "work_endpoint: tcp://127.0.0.1:%d" % work_port, "results_endpoint: tcp://127.0.0.1:%d" % results_port,
        "workers: %d" % workers, "state_dir: %s" % (work / "state"), "log_level: info", ""]))
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt_string(zmq.SUBSCRIBE, "spotfinder.v1.result.")
    sub.connect(pub)
    log = open(work / "serve.log", "w+")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "spotfinder_daemon.cli", "serve", "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    shutil.copyfile(frame, work / "incoming.cbf")
    os.replace(work / "incoming.cbf", watch / Path(frame).name)  # complete at once, as a detector's rename
    marks: dict[str, float] = {}
    states: list[str] = []
    try:
        while "result" not in marks or "serving" not in marks:
            now = time.monotonic() - started
            if now > TIMEOUT_S or process.poll() is not None:
                raise SystemExit("the service did not start within %.0f s (exit %s); log: %s"
                                 % (TIMEOUT_S, process.poll(), work / "serve.log"))
            if "result" not in marks and sub.poll(100):
                _topic, body = sub.recv_multipart()
                marks["result"] = time.monotonic() - started
                if json.loads(body)["status"] != "ok":
                    raise SystemExit("the first result is an error: %s" % body[:300])
            snapshot = status(http)
            if snapshot is not None:
                marks.setdefault("answers", time.monotonic() - started)
                if not states or states[-1] != snapshot["state"]:
                    states.append(snapshot["state"])
                if snapshot["state"] == "serving":
                    marks.setdefault("serving", time.monotonic() - started)
        workers_mb = max((peak_rss_mb(pid) for pid in children(process.pid)), default=float("nan"))
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
        sub.close(linger=0)
        context.term()
        log.seek(0)
        lines = [line.rstrip() for line in log if "worker" not in line or "kernel" in line or "compil" in line]
        log.close()
    return {**marks, "states": states, "log": lines[:8], "worker_peak_mb": workers_mb}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args(argv)
    if not thaumatin_present():
        return 0
    with thaumatin_workspace("bench-startup-", 1) as (work, frames):
        frame = frames[0]
        print("CPU: %s, %d cores; %d workers; frame %s" % (cpu_name(), os.cpu_count(), args.workers, Path(frame).name))
        runs: dict[str, list[dict]] = {"cold": [], "warm": []}
        distl = []
        for _ in range(args.rounds):
            cache = Path(tempfile.mkdtemp(prefix="numba-cache-", dir=work))
            for kind in ("cold", "warm"):
                runs[kind].append(start_once(work, frame, args.workers, cache))
            if DISTL_VENV.is_dir():
                distl.append(timed([str(DISTL), frame])[0])
        for kind, results in runs.items():
            print()
            print("%s start (numba cache %s):" % (kind, "empty" if kind == "cold" else "filled by the cold start"))
            for what, label in (("answers", "/status answers"), ("serving", "serving (READY)"),
                                ("result", "first result published")):
                values = [r[what] for r in results]
                print("  %-24s %6.2f s  %s" % (label, statistics.median(values), " ".join("%.2f" % v for v in values)))
            print("  largest worker peak resident size: %.0f MB" % max(r["worker_peak_mb"] for r in results))
            print("  states seen: %s" % " -> ".join(results[-1]["states"]))
            for line in results[-1]["log"]:
                print("  log: %s" % line[:150])
        if distl:
            print()
            print("the real DISTL, one frame, whole process: %.2f s (median of %d)" % (statistics.median(distl),
                                                                                  len(distl)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
