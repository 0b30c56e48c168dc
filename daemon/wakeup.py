"""A wake-up pipe: other threads make a file descriptor readable so the main loop's poller returns.

Both ends are non-blocking and a full pipe is already a pending wake-up, so :meth:`Wakeup.notify` never
blocks, however many events arrive before the main thread drains them.
"""
from __future__ import annotations

import os


class Wakeup:
    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        """Readable while a wake-up is pending (for the main loop's poller)."""
        return self._read

    def notify(self) -> None:
        try:
            os.write(self._write, b"!")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    def clear(self) -> None:
        """Drain pending wake-ups; call before taking the events, so none is missed."""
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)
