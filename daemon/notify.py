"""sd_notify: tell systemd (Type=notify) that the service is ready, alive, stopping; a no-op elsewhere.

The protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(a leading ``@`` names an abstract socket).  With ``WatchdogSec=`` systemd sets ``$WATCHDOG_USEC``; the
main loop sends ``WATCHDOG=1`` every half of that, and only while the pipeline is healthy.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("spotfinder.notify")


class Notifier:
    def __init__(self, *, environ: dict | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """One notification, e.g. ``send(READY=1, STATUS="...")``; False if it could not be delivered."""
        if not self.address:
            return False
        payload = "\n".join("%s=%s" % (k, v) for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self.address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address.replace("\0", "@"), exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING=1, STATUS=status)
