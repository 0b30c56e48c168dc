"""The main loop's timers as one table: each task has a name, an interval and a condition.

The service registers its periodic work (supervising workers, heartbeats, the systemd watchdog, folder
reconciliation, ledger pruning, collections' summaries and ends) here instead of keeping a ``next_*`` variable
per timer, so what runs when is readable in one place and listed in ``/status``.  Intervals count on
``time.monotonic()``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Task:
    name: str
    interval_s: float
    action: Callable[[], object]
    when: Callable[[], bool]
    due: float


class PeriodicTasks:
    def __init__(self):
        self._tasks: list[Task] = []

    def register(self, *, name: str, interval_s: float, action: Callable[[], object],
                 when: Callable[[], bool] = lambda: True, first_due: float = 0.0) -> None:
        """Run ``action`` every ``interval_s`` seconds from ``first_due`` on, at the ticks where ``when()`` holds
        (a task whose condition is false stays due and runs at the first tick it holds)."""
        self._tasks.append(Task(name, interval_s, action, when, first_due))

    def run_due(self, now: float) -> None:
        """Run every task that is due, in registration order."""
        for task in self._tasks:
            if now >= task.due and task.when():
                task.due = now + task.interval_s
                task.action()

    def table(self) -> list[dict]:
        """Name and interval of every task, for ``/status``."""
        return [{"name": task.name, "interval_s": task.interval_s} for task in self._tasks]
