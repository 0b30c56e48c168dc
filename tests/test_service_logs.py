"""Log lines: one per event, and an error's last stack frames kept on that line."""
from __future__ import annotations

import logging
import sys

from spotfinder_daemon.logs import _LineFormatter


def test_an_error_keeps_its_last_stack_frames_on_one_line():
    def inner():
        raise ValueError("boom\nsecond line")

    try:
        inner()
    except ValueError:
        record = logging.LogRecord("spotfinder.service", logging.CRITICAL, __file__, 1, "internal error", None,
                                   exc_info=sys.exc_info())
    line = _LineFormatter(journal=False).format(record)
    assert "\n" not in line and line.endswith("ValueError: boom | second line")
    assert line.startswith("CRITICAL spotfinder.service: internal error | at test_service_logs.py:")
    assert "in inner | ValueError: boom" in line
