"""systemd's notify protocol (sd_notify) without libsystemd: READY, STATUS, WATCHDOG, STOPPING.

The watchdog pings only while the main loop keeps beating, so a hung daemon is restarted by
systemd (WatchdogSec) instead of being kept alive by a healthy helper thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
        return True
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)
        return False


class Watchdog:
    """Sends WATCHDOG=1 at half of WatchdogSec while `beat()` keeps being called."""

    def __init__(self):
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        self.interval = usec / 2e6 if usec else None
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = None

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def start(self) -> None:
        if self.interval:
            self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if time.monotonic() - self._last_beat < 2 * self.interval:
                notify("WATCHDOG=1")

    def stop(self) -> None:
        self._stop.set()
