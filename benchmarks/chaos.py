"""Chaos benchmark: replay frames into `spotfinder serve` while its workers and the service itself are killed.

`spotfinder serve` (2 workers, a state folder in a temporary folder) watches a folder that `spotfinder replay`
fills with ``--count`` frames at ``--rate`` Hz.  Meanwhile, at seeded random moments, a random worker is
SIGKILLed every 1-3 s, the service process alone is SIGKILLed ``--service-kills`` times (its workers exit by
themselves once their parent is gone: the worker's ``--parent`` check) and restarted on the same state folder
after a random pause, and once the service is SIGSTOPped for a few seconds, then SIGCONTed.  A SUB socket
records every message; ZeroMQ reconnects it to each restarted service by itself.

Once every frame is written and the service has drained, the stored record (``GET /results?since=0``, paged)
gives: frames with a result, frames lost (written, no result), frames duplicated (more than one stored
result for the same file in the same ledger), PUB messages missed (stored seqs, per ledger id, the subscriber
never saw: a service killed between its commit and its send misses them, as documented), error results by
cause, and the latency from file complete to stored result (``t_complete`` -> ``t_done``, p50/p99).
The real DISTL's per-frame time is printed beside our mean ``proc_ms`` when its peer is set up.

Frames (``--frames``): ``pilatus300k`` (default, fast: the four PILATUS 300K frames of ../shared/data/real),
``thaumatin`` (PILATUS3 6M frames), or ``simulated`` (PILATUS 300K frames with spots, also used when the real
ones are absent).  Frames are kept until the end (no rolling buffer), so a re-analysis of any of them is seen.

    .venv/bin/python benchmarks/chaos.py [--count 400] [--rate 10] [--frames pilatus300k|thaumatin|simulated]
                                         [--service-kills 3] [--seed 13] [--json]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import zmq

from bench_pipeline import children, per_frame, percentile
from peer import REAL, cpu_name, run_distl, thaumatin_frames, thaumatin_present

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from service_helpers import free_ports  # noqa: E402  (the tests' one way of picking distinct ports)

PILATUS_300K = [REAL / "small_molecule_dls_i19_pilatus_300k" / "ximg2700_00001.cbf",
                REAL / "small_molecule_dls_i19_pilatus_300k" / "ximg2701_00001.cbf",
                REAL / "blank_dls_i19_pilatus_300k" / "omega_scan.cbf",
                REAL / "blank_dls_i19_pilatus_300k" / "phi_scan_001.cbf"]
WORKERS = 2
START_TIMEOUT_S = 90.0  # a worker compiles its kernels when numba's cache is stale: 14 s on a free core
HTTP_TIMEOUT_S = 5.0


def source_frames(kind: str, into: Path) -> tuple[str, list[str]]:
    """(description, source frame paths) for ``--frames``; simulated frames when the real ones are absent."""
    if kind == "thaumatin" and thaumatin_present():
        return "PILATUS3 6M thaumatin", thaumatin_frames(into)
    if kind == "pilatus300k" and all(path.exists() for path in PILATUS_300K):
        return "PILATUS 300K (2 small-molecule, 2 blank)", [str(path) for path in PILATUS_300K]
    from spotfinder_core.simulate import Scene, random_spots, write_cbf

    paths = []
    for seed in range(4):
        scene = Scene(seed=100 + seed)
        scene.spots = random_spots(scene, 40)
        paths.append(str(into / ("sim_%04d.cbf" % (seed + 1))))
        write_cbf(paths[-1], scene)
    return "simulated PILATUS 300K", paths


class Service:
    """`spotfinder serve` on fixed free ports and one state folder, started again after each kill."""

    def __init__(self, work: Path):
        self.watch = work / "watch"
        self.watch.mkdir()
        self.http, pub_port, work_port, results_port = free_ports(4)
        self.pub = "tcp://127.0.0.1:%d" % pub_port
        self.config = work / "chaos.yaml"
        self.config.write_text("\n".join([
            "watch: [%s]" % self.watch, "pub: %s" % self.pub, "http: 127.0.0.1:%d" % self.http,
            "work_endpoint: tcp://127.0.0.1:%d" % work_port, "results_endpoint: tcp://127.0.0.1:%d" % results_port,
            "workers: %d" % WORKERS, "state_dir: %s" % (work / "state"), "log_level: error", ""]))
        self.started: list[subprocess.Popen] = []  # every service process, each the leader of its own group

    @property
    def process(self) -> subprocess.Popen:
        return self.started[-1]

    def start(self) -> None:
        """Start the service and wait until its workers have joined; a start refused while the killed one's
        workers still hold on (state folder lock, ports) is tried again, within START_TIMEOUT_S."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            serve = [sys.executable, "-m", "spotfinder_daemon.cli", "serve", "--config", str(self.config)]
            self.started.append(subprocess.Popen(serve, start_new_session=True, stdin=subprocess.DEVNULL))
            while self.process.poll() is None and self.workers_alive() < WORKERS:
                if time.monotonic() > deadline:
                    raise SystemExit("the service did not start with %d workers in %.0f s" % (WORKERS, START_TIMEOUT_S))
                time.sleep(0.2)
            if self.process.poll() is None:
                return
            if time.monotonic() > deadline:
                raise SystemExit("the service exits at start (code %d)" % self.process.returncode)
            time.sleep(0.5)

    def get(self, path: str) -> dict | None:
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.http, path), timeout=HTTP_TIMEOUT_S) as reply:
                return json.loads(reply.read())
        except OSError:
            return None

    def workers_alive(self) -> int:
        status = self.get("/status")
        return -1 if status is None else status["workers_alive"]

    def stored(self) -> list[dict]:
        """Every stored message (results and service errors), paged through /results."""
        messages: list[dict] = []
        since = 0
        while True:
            page = self.get("/results?since=%d&limit=1000" % since)
            if page is None:
                raise SystemExit("GET /results did not answer in %.0f s" % HTTP_TIMEOUT_S)
            if not page["results"]:
                return messages
            messages += page["results"]
            since = page["results"][-1]["seq"]

    def kill_worker(self, rng: random.Random) -> bool:
        workers = children(self.process.pid)
        if not workers:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(rng.choice(workers), signal.SIGKILL)
            return True
        return False

    def kill(self) -> None:
        """SIGKILL the service process alone: its workers notice their parent is gone and exit."""
        self.process.kill()
        self.process.wait(HTTP_TIMEOUT_S)

    def pause(self, seconds: float) -> None:
        self.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            self.process.send_signal(signal.SIGCONT)

    def orphans(self) -> int:
        """Processes left in the groups of killed services: workers that did not exit once their parent was gone."""
        killed = {process.pid for process in self.started[:-1]}
        left = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                left += int(stat.read_text().rsplit(")", 1)[1].split()[2]) in killed
            except (OSError, ValueError):
                continue
        return left

    def close(self) -> None:
        """Stop the running service gracefully, then kill every process group ever started (orphaned workers
        of a killed service included)."""
        if self.started and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        for process in self.started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Subscriber(threading.Thread):
    """Records every message the PUB socket sends, across service restarts (ZeroMQ reconnects by itself)."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.seen: list[dict] = []
        self.halt = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        context = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt_string(zmq.SUBSCRIBE, "spotfinder.v1.")
        sub.connect(self.endpoint)
        self.ready.set()
        try:
            while not self.halt.is_set():
                if sub.poll(100):
                    _topic, body = sub.recv_multipart()
                    self.seen.append(json.loads(body))
        finally:
            sub.close(linger=0)
            context.term()


def chaos(service: Service, replay: subprocess.Popen, rng: random.Random, span_s: float, service_kills: int,
          t0: float) -> dict:
    """Kill workers and the service at random until the replay is over and the scheduled service kills and
    stop are done (a restart that takes long may push them past the replay's end); the faults done."""
    now = time.monotonic()
    service_kill_at = sorted(now + rng.uniform(0.1, 0.9) * span_s for _ in range(service_kills))
    stop_at = now + rng.uniform(0.1, 0.9) * span_s
    next_worker_kill = now + rng.uniform(1.0, 3.0)
    done = {"worker_kills": 0, "service_kills": 0, "service_stops": 0, "stopped_s": 0.0, "down_s": 0.0,
            "timeline": []}  # (seconds since the replay started, what): to tie an error result to its fault
    while replay.poll() is None or service_kill_at or stop_at is not None:
        now = time.monotonic()
        if service_kill_at and now >= service_kill_at[0]:
            service_kill_at.pop(0)
            done["timeline"].append((round(time.time() - t0, 2), "service SIGKILLed"))
            service.kill()
            done["service_kills"] += 1
            pause = rng.uniform(0.5, 3.0)
            time.sleep(pause)
            down_from = time.monotonic() - pause
            done["timeline"].append((round(time.time() - t0, 2), "service restarted"))
            service.start()
            done["down_s"] += time.monotonic() - down_from
            done["timeline"].append((round(time.time() - t0, 2), "service up with %d workers" % WORKERS))
        elif stop_at is not None and now >= stop_at:
            stop_at = None
            seconds = rng.uniform(2.0, 5.0)
            done["timeline"].append((round(time.time() - t0, 2), "service SIGSTOPped for %.1f s" % seconds))
            service.pause(seconds)
            done["service_stops"] += 1
            done["stopped_s"] += seconds
        elif now >= next_worker_kill:
            done["worker_kills"] += service.kill_worker(rng)
            next_worker_kill = now + rng.uniform(1.0, 3.0)
        else:
            time.sleep(0.05)
    return done


def drain(service: Service, written: set[str], timeout_s: float) -> float:
    """Wait until every written frame has a stored result (or ``timeout_s``); seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        done = {m["file"] for m in service.stored() if m["type"] == "result"}
        if written <= done:
            break
        time.sleep(1.0)
    return time.monotonic() - started


def anonymous(error: str) -> str:
    """A service error without the worker's id and pid, so that the same fault is counted as one cause."""
    return re.sub(r"^worker \S+ \(pid \d+\)", "a worker", error)


def figures(written: set[str], stored: list[dict], seen: list[dict], t0: float) -> dict:
    """What the record says about the run: losses, duplicates, PUB misses, error causes, latency."""
    results = [m for m in stored if m["type"] == "result"]
    per_file = collections.Counter((m["ledger"], m["file"]) for m in results)
    first = {}
    for message in results:
        first.setdefault(message["file"], message)
    seen_seqs = collections.defaultdict(set)
    for message in seen:
        if "seq" in message:
            seen_seqs[message["ledger"]].add(message["seq"])
    missed = collections.Counter(m["ledger"] for m in stored if m["seq"] not in seen_seqs[m["ledger"]])
    latencies = [m["t_done"] - m["t_complete"] for m in first.values()
                 if m["t_done"] is not None and m["t_complete"] is not None]
    proc_ms = [m["proc_ms"] for m in first.values() if m["status"] == "ok" and m["proc_ms"] is not None]
    return {"frames_written": len(written), "frames_with_result": len(written & set(first)),
            "frames_lost": len(written - set(first)), "lost_examples": sorted(written - set(first))[:3],
            "frames_duplicated": sum(count > 1 for count in per_file.values()),
            "stored_messages": len(stored), "ledgers": len({m["ledger"] for m in stored}),
            "pub_missed": sum(missed.values()), "pub_missed_per_ledger": dict(missed),
            "error_results": dict(collections.Counter(m["error"] for m in results if m["status"] != "ok")),
            "error_frames": [(os.path.basename(m["file"]), round(m["t_seen"] - t0, 2))
                             for m in results if m["status"] != "ok"][:10],
            "service_errors": dict(collections.Counter(anonymous(m["error"]) for m in stored if m["type"] == "error")),
            "latency_p50_s": percentile(latencies, 0.5) if latencies else None,
            "latency_p99_s": percentile(latencies, 0.99) if latencies else None,
            "latency_max_s": max(latencies) if latencies else None,
            "proc_ms_mean": statistics.mean(proc_ms) if proc_ms else None}


def run(args: argparse.Namespace, work: Path) -> dict:
    (work / "frames").mkdir()
    described, sources = source_frames(args.frames, work / "frames")
    rng = random.Random(args.seed)
    service = Service(work)
    subscriber = Subscriber(service.pub)
    replay = None
    log = tempfile.TemporaryFile("w+")  # replay's one line per frame: read at the end
    try:
        subscriber.start()
        subscriber.ready.wait(HTTP_TIMEOUT_S)
        service.start()
        command = [sys.executable, "-m", "spotfinder_daemon.cli", "replay", *sources, "--to", str(service.watch),
                   "--count", str(args.count), "--rate", "%g" % args.rate, "--template", "chaos_#####.cbf"]
        replay = subprocess.Popen(command, stdout=log, text=True, start_new_session=True, stdin=subprocess.DEVNULL)
        started, t0 = time.monotonic(), time.time()
        done = chaos(service, replay, rng, args.count / args.rate, args.service_kills, t0)
        replay_s = time.monotonic() - started
        if replay.returncode:
            raise SystemExit("spotfinder replay exited with code %d" % replay.returncode)
        log.seek(0)
        written = {record["file"] for record in map(json.loads, log)}
        drained_s = drain(service, written, args.drain_timeout)
        time.sleep(1.0)  # the last results' PUB sends follow their commit
        stored = service.stored()
        orphans = service.orphans()
    finally:
        subscriber.halt.set()
        if replay is not None and replay.poll() is None:
            os.killpg(replay.pid, signal.SIGKILL)
            replay.wait()
        service.close()
        subscriber.join(HTTP_TIMEOUT_S)
        log.close()
    distl = per_frame(run_distl(sources)) if args.distl else None
    return {"frames": described, "count": args.count, "rate": args.rate, "seed": args.seed,
            "workers": WORKERS, "cpu": cpu_name(), "cores": os.cpu_count(), "replay_s": replay_s,
            "drain_s": drained_s, "orphaned_workers_left": orphans,
            **done, **figures(written, stored, subscriber.seen, t0), "distl": distl}


def report(result: dict) -> None:
    print("chaos: %d frames of %s at %g Hz into `spotfinder serve` (%d workers), seed %d; %s, %d cores"
          % (result["count"], result["frames"], result["rate"], result["workers"], result["seed"], result["cpu"],
             result["cores"]))
    print("  faults: %d workers SIGKILLed, service SIGKILLed %d times (down %.1f s in all), SIGSTOPped %d times"
          " (%.1f s)" % (result["worker_kills"], result["service_kills"], result["down_s"], result["service_stops"],
                         result["stopped_s"]))
    print("    %s" % "; ".join("+%.1f s %s" % event for event in result["timeline"]))
    print("  replay took %.1f s, drain %.1f s; workers of killed services still running at the end: %d"
          % (result["replay_s"], result["drain_s"], result["orphaned_workers_left"]))
    print("  frames written %d, with a stored result %d, lost %d, duplicated %d"
          % (result["frames_written"], result["frames_with_result"], result["frames_lost"],
             result["frames_duplicated"]))
    if result["lost_examples"]:
        print("    lost, e.g. %s" % ", ".join(result["lost_examples"]))
    print("  stored messages %d in %d ledger(s); PUB messages missed %d %s"
          % (result["stored_messages"], result["ledgers"], result["pub_missed"], result["pub_missed_per_ledger"]))
    print("  error results %d" % sum(result["error_results"].values()))
    for cause, count in result["error_results"].items():
        print("    %4d x %s" % (count, cause))
    if result["error_frames"]:
        print("    frames (first seen at +s): %s" % ", ".join("%s (+%s)" % frame for frame in result["error_frames"]))
    print("  service error messages %d" % sum(result["service_errors"].values()))
    for cause, count in result["service_errors"].items():
        print("    %4d x %s" % (count, cause))
    if result["latency_p50_s"] is not None:
        print("  latency file complete -> stored result: p50 %.3f s, p99 %.3f s, max %.3f s"
              % (result["latency_p50_s"], result["latency_p99_s"], result["latency_max_s"]))
    if result["proc_ms_mean"] is not None:
        print("  analysis per frame (ours): %.3f s mean proc_ms" % (result["proc_ms_mean"] / 1000.0))
    if result["distl"]:
        print("  real DISTL per frame:      %.3f s mean (%d frames, one process)"
              % (result["distl"]["seconds_mean"], result["distl"]["frames"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=400, help="frames to replay (default 400)")
    parser.add_argument("--rate", type=float, default=10.0, help="frames/s written (default 10)")
    parser.add_argument("--frames", choices=("pilatus300k", "thaumatin", "simulated"), default="pilatus300k")
    parser.add_argument("--service-kills", type=int, default=3, help="times the service is SIGKILLed (default 3)")
    parser.add_argument("--seed", type=int, default=13, help="seed of the fault schedule (default 13)")
    parser.add_argument("--drain-timeout", type=float, default=180.0,
                        help="seconds to wait for the last results after the replay (default 180)")
    parser.add_argument("--no-distl", dest="distl", action="store_false", help="do not run the real DISTL")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object too")
    args = parser.parse_args()
    if args.count < 1 or args.rate <= 0:
        parser.error("--count must be at least 1 and --rate positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # like Ctrl-C: through run()'s cleanup
    try:
        with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
            result = run(args, Path(tmp))
    except KeyboardInterrupt:
        print("interrupted: every process the run started is stopped", file=sys.stderr)
        return 130
    report(result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
