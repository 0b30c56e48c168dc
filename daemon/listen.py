"""The smallest control-software client: subscribe to the PUB socket, print each message as a JSON line.

It needs no part of the analysis: the topic prefix comes from the caller (``spotfinder listen --topic``), not
from the publisher module, which loads the frame reader and numpy.
"""
from __future__ import annotations

import json
import sys
import time

import zmq


def listen(endpoint: str, *, topic: str, count: int | None = None, timeout: float | None = None,
           out=sys.stdout) -> int:
    """Print message bodies until ``count`` were printed or nothing arrived for ``timeout`` s; how many."""
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)  # never drop on our side: a listener wants every message
    sub.setsockopt(zmq.RECONNECT_IVL, 100)
    sub.setsockopt_string(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    printed = 0
    last = time.monotonic()
    try:
        while count is None or printed < count:
            if not sub.poll(100):
                if timeout is not None and time.monotonic() - last > timeout:
                    break
                continue
            parts = sub.recv_multipart()
            last = time.monotonic()
            try:
                body = json.loads(parts[-1])
            except ValueError:
                continue
            out.write(json.dumps(body) + "\n")
            out.flush()
            printed += 1
    except KeyboardInterrupt:
        pass
    finally:
        sub.close(linger=0)
        context.term()
    return printed
