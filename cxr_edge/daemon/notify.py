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
            # Never block the daemon on its supervisor: a full socket queue drops the message
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
        return True
    except OSError as exc:  # BlockingIOError included
        log.debug("sd_notify failed: %s", exc)
        return False


class Watchdog:
    """Sends WATCHDOG=1 at half of WatchdogSec, and only while every part of the daemon shows
    progress: each registered heartbeat was beaten within `stale_after` seconds and each
    registered thread is alive. A stuck or dead part (an intake thread blocked on a FIFO, a
    sender that died) stops the pings, so systemd restarts the daemon instead of a healthy
    helper thread keeping a broken one alive."""

    def __init__(self, stale_after: float | None = None, clock=time.monotonic):
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        self.interval = usec / 2e6 if usec else None
        self.stale_after = stale_after or (2 * self.interval if self.interval else 60.0)
        self.clock = clock
        self._beats: dict[str, float] = {}
        self._threads: dict[str, object] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def beat(self, name: str = "main") -> None:
        with self._lock:
            self._beats[name] = self.clock()

    def watch_thread(self, name: str, alive) -> None:
        """`alive()` says whether that part is still running (a server thread that only waits)."""
        with self._lock:
            self._threads[name] = alive

    def forget(self, name: str) -> None:
        with self._lock:
            self._beats.pop(name, None)
            self._threads.pop(name, None)

    def unhealthy(self) -> list[str]:
        """The parts that made no progress recently or died."""
        now = self.clock()
        with self._lock:
            stale = [name for name, at in self._beats.items() if now - at > self.stale_after]
            dead = [name for name, alive in self._threads.items() if not alive()]
        return stale + dead

    def start(self) -> None:
        if self.interval:
            self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        reported = False
        while not self._stop.wait(self.interval):
            problems = self.unhealthy()
            if not problems:
                notify("WATCHDOG=1")
                reported = False
            elif not reported:
                log.error("no progress from %s: watchdog pings stop (systemd restarts the service)", ", ".join(problems))
                reported = True

    def stop(self) -> None:
        self._stop.set()
