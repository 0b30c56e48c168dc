"""Pipeline benchmark: PILATUS 6M frames through `spotfinder serve` with 2 workers, beside the real DISTL.

Two phases, both with `spotfinder replay` writing into the watched folder the way a detector does:
  1. burst: ``--burst`` frames written as fast as possible; frames/s = frames / (last result published -
     first frame complete), the most the pipeline can do;
  2. sustained: frames written at the detector rate (``--rate``, 25 Hz) for ``--seconds``; it keeps up when
     every result arrives, the achieved rate is the written one and latency (file complete -> result on
     the PUB socket) stays flat: p50/p99 and how many took over 1 s.  The CPU each process used in this
     phase is reported per frame and as a share of the machine: service (watcher, dispatcher, collector,
     publisher, HTTP in one process), workers, and the replaying "detector" itself.
Each frame is deleted once its result is published, as a beamline's rolling buffer is archived: on this
virtual machine a file written into memory that was never touched before costs the writer ~10 ms of kernel
time per 6M frame (the host backs the pages on first touch), a cost of the simulated detector that a real
detector's own server pays, not the analysis host; deleted frames leave pages the next ones reuse.
Then the real DISTL (/work/shared/peer/distl_batch, one process) runs on the same frames in the same run,
and its per-frame time is printed beside our per-frame analysis time (proc_ms).

With ``--hdf5`` it measures an EIGER2 16M HDF5 series instead: ``--hdf5-frames`` frames (the real thermolysin
frame and transforms of it) written as the FileWriter writes them (bitshuffle-LZ4 data files of
``--per-file`` frames) and delivered by `spotfinder replay` at ``--rate`` (master first, each data file
written in chunks while its frames are due); frames/s, and latency p50/p99 from the moment a data file is
complete to each of its frames' results on the PUB socket.  The real DISTL runs on the thermolysin CBF.
With ``--swmr`` each data file is written by an SWMR writer instead (`spotfinder replay --swmr`: in place,
frame by frame as each is due, held open meanwhile), and latency runs from each frame's flush to its result.

    /work/venv/bin/python benchmarks/bench_pipeline.py [--frames N] [--workers 2] [--burst 100] [--rate 25]
                                                       [--seconds 12] [--no-verify-md5]
    /work/venv/bin/python benchmarks/bench_pipeline.py --hdf5 [--hdf5-frames 40] [--per-file 10] [--rate 10]
                                                       [--swmr]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import zmq

from peer import REPO, THERMOLYSIN, cpu_name, plain_frames, run_distl, thaumatin_present, thaumatin_workspace

sys.path.insert(0, str(REPO / "tests"))
from service_helpers import free_ports  # noqa: E402  (the tests' one way of picking distinct ports)


def per_frame(distl: dict | None) -> dict | None:
    """The real DISTL's mean seconds per frame, as the pipeline and HTTP benchmarks print it."""
    if distl is None:
        return None
    seconds = list(distl["seconds"].values())
    return {"frames": len(seconds), "seconds_mean": statistics.mean(seconds),
            "seconds_median": statistics.median(seconds)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc."""
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """The largest resident size a live process has had (VmHWM), in MB."""
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (the service's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return found


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class Pipeline:
    """A `spotfinder serve` process on free ports with a SUB socket connected to it."""

    def __init__(self, work: Path, workers: int, verify_md5: bool = True):
        self.watch = work / "watch"
        self.watch.mkdir()
        self.http, pub_port, work_port, results_port = free_ports(4)
        config = work / "bench.yaml"
        self.pub = "tcp://127.0.0.1:%d" % pub_port
        config.write_text("\n".join([
            "watch: [%s]" % self.watch, "pub: %s" % self.pub, "http: 127.0.0.1:%d" % self.http,
            "work_endpoint: tcp://127.0.0.1:%d" % work_port, "results_endpoint: tcp://127.0.0.1:%d" % results_port,
            "workers: %d" % workers, "state_dir: %s" % (work / "state"), "log_level: warning",
            "verify_md5: %s" % str(verify_md5).lower(), ""]))
        serve = [sys.executable, "-m", "spotfinder_daemon.cli", "serve", "--config", str(config)]
        self.process = subprocess.Popen(serve, start_new_session=True)
        self.context = zmq.Context()
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt_string(zmq.SUBSCRIBE, "spotfinder.v1.result.")
        self.sub.connect(self.pub)
        deadline = time.monotonic() + 60
        while self._workers_alive() < workers:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit("the service did not start with %d workers" % workers)
            time.sleep(0.2)

    def _workers_alive(self) -> int:
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/status" % self.http, timeout=2) as reply:
                return json.loads(reply.read())["workers_alive"]
        except OSError:
            return -1

    def run(self, frames: list[str], count: int, rate: float | None, template: str) -> dict:
        """Replay ``count`` frames; per file, when it became complete and when its result arrived."""
        command = [sys.executable, "-m", "spotfinder_daemon.cli", "replay", *frames, "--to", str(self.watch),
                   "--count", str(count), "--template", template]
        if rate:
            command += ["--rate", "%g" % rate]
        workers = children(self.process.pid)
        cpu_before = {pid: cpu_seconds(pid) for pid in [self.process.pid, *workers]}
        reaped_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        log = tempfile.TemporaryFile("w+")  # not a pipe: read only at the end, a long run would fill it
        replay = subprocess.Popen(command, stdout=log, text=True)
        arrived: dict[str, tuple[float, dict]] = {}
        deadline = time.monotonic() + 120 + count * 5
        quiet_since = time.monotonic()
        while len(arrived) < count and time.monotonic() < deadline:
            if replay.poll() is not None and time.monotonic() - quiet_since > 30:
                break  # the replay is over and nothing arrived for 30 s: report what is missing
            if self.sub.poll(200):
                quiet_since = time.monotonic()
                _topic, body = self.sub.recv_multipart()
                message = json.loads(body)
                arrived[message["file"]] = (time.time(), message)
                os.unlink(message["file"])  # a rolling buffer, as at a beamline: see the module's note
        replay.wait()
        log.seek(0)
        written = {record["file"]: record["t_complete"] for record in map(json.loads, log)}
        log.close()
        wall = time.monotonic() - started
        cpu = {pid: cpu_seconds(pid) - before for pid, before in cpu_before.items()}
        worker_rss = max(peak_rss_mb(pid) for pid in workers)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # the replay process, now finished
        replay_cpu = reaped.ru_utime + reaped.ru_stime - reaped_before.ru_utime - reaped_before.ru_stime
        shares = {"service": cpu[self.process.pid], "workers": sum(cpu[pid] for pid in workers), "replay": replay_cpu}
        missing = set(written) - set(arrived)
        if missing:
            raise SystemExit("%d results never arrived, e.g. %s" % (len(missing), sorted(missing)[0]))
        in_order = sorted(written, key=written.get)
        latencies = [arrived[f][0] - written[f] for f in in_order]
        span = max(t for t, _ in arrived.values()) - min(written.values())
        arrivals = sorted(t for t, _ in arrived.values())
        fifth = max(1, count // 5)
        return {"frames": count, "frames_per_s": count / span,
                "published_per_s": (count - 1) / (arrivals[-1] - arrivals[0]) if count > 1 else None,
                # a pipeline that keeps up has the same latency at the end as at the start
                "latency_drift_s": statistics.median(latencies[-fifth:]) - statistics.median(latencies[:fifth]),
                "latency_p50_s": percentile(latencies, 0.5),
                "latency_p99_s": percentile(latencies, 0.99), "over_1s": sum(t > 1.0 for t in latencies),
                "proc_ms_mean": statistics.mean(m["proc_ms"] for _, m in arrived.values()),
                "errors": sum(m["status"] != "ok" for _, m in arrived.values()),
                "worker_peak_rss_mb": worker_rss,
                "cpu_ms_per_frame": {k: 1000.0 * v / count for k, v in shares.items()},
                "cpu_share": {k: v / (wall * os.cpu_count()) for k, v in shares.items()}}

    def run_series(self, master: str, rate: float | None, swmr: bool = False) -> dict:
        """Deliver an HDF5 series with `spotfinder replay`; frames/s and latency from each data file complete
        (``swmr``: each frame flushed) to each of its frames' results."""
        command = [sys.executable, "-m", "spotfinder_daemon.cli", "replay", master, "--to", str(self.watch)]
        if rate:
            command += ["--rate", "%g" % rate]
        if swmr:
            command.append("--swmr")
        log = tempfile.TemporaryFile("w+")
        replay = subprocess.Popen(command, stdout=log, text=True)
        expected = sum(1 for _ in series_frames(master))
        arrived: dict[int, tuple[float, dict]] = {}
        deadline = time.monotonic() + 120 + expected * 10
        while len(arrived) < expected and time.monotonic() < deadline:
            if self.sub.poll(200):
                _topic, body = self.sub.recv_multipart()
                message = json.loads(body)
                arrived[message["frame_index"]] = (time.time(), message)
        replay.wait()
        log.seek(0)
        complete = {}  # frame index -> when its data file was complete (SWMR: when the frame was flushed)
        for record in map(json.loads, log):
            if record.get("kind") == "frame":
                complete[record["frame"]] = record["t_complete"]
            elif record.get("kind") == "data" and not swmr:
                complete.update(dict.fromkeys(range(*record["frames"]), record["t_complete"]))
        log.close()
        missing = sorted(set(complete) - set(arrived))
        if missing:
            raise SystemExit("%d results never arrived, e.g. frame %d" % (len(missing), missing[0]))
        latencies = [arrived[i][0] - complete[i] for i in sorted(complete)]
        span = max(t for t, _ in arrived.values()) - min(complete.values())
        return {"frames": expected, "frames_per_s": expected / span, "latency_p50_s": percentile(latencies, 0.5),
                "latency_p99_s": percentile(latencies, 0.99),
                "proc_ms_mean": statistics.mean(m["proc_ms"] for _, m in arrived.values()),
                "errors": sum(m["status"] != "ok" for _, m in arrived.values())}

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
        self.sub.close(linger=0)
        self.context.term()




def series_frames(master: str):
    from spotfinder_core import nexus

    series = nexus.open_series(master)
    return range(series.count)


def eiger_series(work: Path, count: int, per_file: int) -> tuple[str, str]:
    """(master, the thermolysin CBF as a plain file): ``count`` EIGER2 16M frames, the real one and transforms of
    it (counts scaled, the image turned), written as the FileWriter writes them."""
    import numpy as np

    from spotfinder_core import nexus, read_frame

    cbf = str(plain_frames([THERMOLYSIN], work)[THERMOLYSIN.name[:-3]])
    pixels = read_frame(cbf, verify_md5=False).pixels
    frames = []
    for k in range(count):
        frame = np.where(pixels > 0, pixels * (1 + k % 4), pixels)
        frames.append(frame[::-1, ::-1] if k % 8 >= 4 else frame)
    (work / "source").mkdir()
    master = nexus.write_series(str(work / "source"), "therm", frames, nimages_per_file=per_file,
                                geometry=nexus.cbf_geometry(cbf), dtype=np.uint32)
    return master, cbf


def main_hdf5(args) -> int:
    if not THERMOLYSIN.is_file():
        print("benchmark skipped: %s not found" % THERMOLYSIN, file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-hdf5-") as tmp:
        work = Path(tmp)
        master, cbf = eiger_series(work, args.hdf5_frames, args.per_file)
        pipeline = Pipeline(work, args.workers, not args.no_verify_md5)
        try:
            figures = pipeline.run_series(master, args.rate, args.swmr)
        finally:
            pipeline.close()
        distl = per_frame(run_distl([cbf]))
    ours_s = figures["proc_ms_mean"] / 1000.0
    print("EIGER2 16M HDF5 series (thermolysin and transforms), %d frames, %d per data file, delivered at %g "
          "frames/s%s; %d workers, %d cores (%s; CPU shared with other work: figures are indicative)"
          % (figures["frames"], args.per_file, args.rate, " by an SWMR writer" if args.swmr else "", args.workers,
             os.cpu_count(), cpu_name()))
    print("  results published at %.2f frames/s" % figures["frames_per_s"])
    print("  latency p50 %.3f s, p99 %.3f s (%s -> result on PUB)" % (
        figures["latency_p50_s"], figures["latency_p99_s"], "frame flushed" if args.swmr else "data file complete"))
    print("  analysis per frame (ours, HDF5): %6.3f s mean proc_ms" % ours_s)
    if distl:
        print("  real DISTL per frame (the CBF): %6.3f s mean (%d frame, one process)"
              % (distl["seconds_mean"], distl["frames"]))
        print("  ours / DISTL per frame:         %6.2f x" % (ours_s / distl["seconds_mean"]))
    if figures["errors"]:
        print("  WARNING: %d error results" % figures["errors"])
    if args.json:
        print(json.dumps({"hdf5": figures, "rate": args.rate, "swmr": args.swmr, "distl": distl}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=19, help="distinct 6M frames to use (default 19)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--burst", type=int, default=100, help="burst phase: frames written at once (default 100)")
    parser.add_argument("--rate", type=float, help="sustained phase: frames/s written (default 25; with --hdf5: 3)")
    parser.add_argument("--seconds", type=float, default=12.0, help="sustained phase: how long (default 12 s)")
    parser.add_argument("--no-verify-md5", action="store_true", help="run the service with verify_md5: false")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object too")
    parser.add_argument("--hdf5", action="store_true", help="an EIGER2 16M HDF5 series instead (see above)")
    parser.add_argument("--hdf5-frames", type=int, default=40, help="with --hdf5: frames in the series (default 40)")
    parser.add_argument("--per-file", type=int, default=10, help="with --hdf5: frames per data file (default 10)")
    parser.add_argument("--swmr", action="store_true", help="with --hdf5: data files written by an SWMR writer")
    args = parser.parse_args()
    if args.hdf5:
        args.rate = args.rate or 3.0
        return main_hdf5(args)
    args.rate = args.rate or 25.0
    if not thaumatin_present():
        return 0
    with thaumatin_workspace("bench-pipeline-", args.frames) as (work, frames):
        pipeline = Pipeline(work, args.workers, not args.no_verify_md5)
        try:
            burst = pipeline.run(frames, args.burst, None, "burst_#####.cbf")
            sustained = pipeline.run(frames, round(args.rate * args.seconds), args.rate, "paced_#####.cbf")
        finally:
            pipeline.close()
        distl = per_frame(run_distl(frames))
    ours_s = sustained["proc_ms_mean"] / 1000.0
    print("PILATUS 6M, %d distinct frames, %d workers, %d cores, Content-MD5 %s" % (
        len(frames), args.workers, os.cpu_count(), "not checked" if args.no_verify_md5 else "checked"))
    print("  burst (%d frames):         %6.2f frames/s" % (burst["frames"], burst["frames_per_s"]))
    print("  sustained, written at %g Hz for %g s (%d frames): results published at %.2f frames/s, none lost"
          % (args.rate, args.seconds, sustained["frames"], sustained["published_per_s"]))
    print("    latency p50 %.3f s, p99 %.3f s, %d frames over 1 s, drift %+.3f s from the first fifth to the last"
          " (file complete -> result on PUB)" % (sustained["latency_p50_s"], sustained["latency_p99_s"],
                                                 sustained["over_1s"], sustained["latency_drift_s"]))
    print("    CPU per frame: %s" % ", ".join("%s %.1f ms (%.0f%% of the machine)"
                                               % (k, v, 100 * sustained["cpu_share"][k])
                                               for k, v in sustained["cpu_ms_per_frame"].items()))
    print("    largest worker resident size: %.0f MB" % sustained["worker_peak_rss_mb"])
    print("  analysis per frame (ours): %6.3f s mean proc_ms" % ours_s)
    if distl:
        print("  real DISTL per frame:      %6.3f s mean (%d frames, one process)"
              % (distl["seconds_mean"], distl["frames"]))
        print("  ours / DISTL per frame:    %6.2f x" % (ours_s / distl["seconds_mean"]))
        print("  pipeline burst frames/s vs DISTL 1 process: %.2f x" % (burst["frames_per_s"] * distl["seconds_mean"]))
    if burst["errors"] or sustained["errors"]:
        print("  WARNING: %d error results" % (burst["errors"] + sustained["errors"]))
    if args.json:
        print(json.dumps({"burst": burst, "sustained": sustained, "rate": args.rate, "distl": distl}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
