"""Prometheus metrics of one service (its own registry, so tests and several services never share counters).

Counters are updated from the main thread (frames, errors) and the HTTP threads (requests); the gauges are
read when ``/metrics`` is scraped.  prometheus_client is thread-safe for all of these.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

FRAME_SECONDS_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("spotfinder_http_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=registry)
        self.frames = Counter("spotfinder_frames", "Frames finished, by lane (watch or ondemand) and outcome "
                              "(ok, error: the analysis refused the frame, failed: the service gave up on it)",
                              ["lane", "outcome"], registry=registry)
        self.frame_seconds = Histogram("spotfinder_frame_seconds", "Analysis time of one frame in its worker",
                                       ["lane"], buckets=FRAME_SECONDS_BUCKETS, registry=registry)
        self.errors = Counter("spotfinder_errors", "Service errors, by kind", ["kind"], registry=registry)
        self.ondemand_queue = Gauge("spotfinder_ondemand_queue_depth", "On-demand queries waiting for a worker",
                                    registry=registry)
        self.ondemand_in_flight = Gauge("spotfinder_ondemand_in_flight", "On-demand queries at a worker",
                                        registry=registry)
        self.ondemand_expected_wait = Gauge(
            "spotfinder_ondemand_expected_wait_seconds", "How long a query arriving now would wait for a worker "
            "(queries ahead x recent time per frame / workers; +Inf with no worker)", registry=registry)
        self.ondemand_admit_limit = Gauge(
            "spotfinder_ondemand_admit_limit", "Queries that may wait (queued or at a worker) before more are "
            "refused with 503", registry=registry)
        self.queue = Gauge("spotfinder_queue_depth", "Watched frames queued for a worker", registry=registry)
        self.in_flight = Gauge("spotfinder_in_flight", "Watched frames at a worker", registry=registry)
        self.workers = Gauge("spotfinder_workers_alive", "Workers heard from recently", registry=registry)

    def watch_lane(self, depth: Callable[[], int], in_flight: Callable[[], int], expected_wait_s: Callable[[], float],
                   admit_limit: Callable[[], int]) -> None:
        """Read the on-demand lane's gauges from the lane itself at each scrape."""
        self.ondemand_queue.set_function(depth)
        self.ondemand_in_flight.set_function(in_flight)
        self.ondemand_expected_wait.set_function(expected_wait_s)
        self.ondemand_admit_limit.set_function(admit_limit)

    def frame(self, lane: str, result: dict | None) -> None:
        """Count a finished frame; ``None`` = the service gave up on it.  Never raises: a worker's odd
        ``proc_ms`` (not a number) is left out of the histogram."""
        if result is None:
            self.frames.labels(lane, "failed").inc()
            return
        self.frames.labels(lane, "ok" if result.get("status") == "ok" else "error").inc()
        proc_ms = result.get("proc_ms")
        if isinstance(proc_ms, (int, float)) and not isinstance(proc_ms, bool) and proc_ms >= 0:
            self.frame_seconds.labels(lane).observe(proc_ms / 1000.0)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
