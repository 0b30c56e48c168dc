"""Logging to stderr, one line per event with a level prefix: readable in a terminal and in journald.

Under systemd (``JOURNAL_STREAM`` set) each line starts with the ``<N>`` syslog priority that journald
turns into the entry's level; elsewhere with the level name.  No colour either way.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback

STACK_FRAMES = 3  # of an error's traceback, innermost last: enough to find the bug, still one line
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _LineFormatter(logging.Formatter):
    def __init__(self, journal: bool):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            kind, exc, tb = record.exc_info
            if record.levelno >= logging.ERROR:
                text += "".join(" | at %s:%d in %s" % (os.path.basename(frame.filename), frame.lineno, frame.name)
                                for frame in traceback.extract_tb(tb)[-STACK_FRAMES:])
            text += " | %s: %s" % (kind.__name__, exc)
        text = text.replace("\n", " | ")
        if self.journal:
            return "<%d>%s: %s" % (_SYSLOG_PRIORITY.get(record.levelno, 6), record.name, text)
        return "%s %s: %s" % (record.levelname, record.name, text)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
