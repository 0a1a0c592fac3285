"""One daemon per state folder: an exclusive lock (flock) held for the daemon's lifetime.

Two daemons on one journal would each take the other's in-flight inputs for crashed ones and
process them again. The lock dies with the process (SIGKILL included), so a stale lock file
never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from ..errors import CxrEdgeError

LOCK_NAME = "daemon.lock"


def lock_state_dir(state_dir: Path, wait: float = 5.0) -> int:
    """The locked file descriptor (keep it open). Waits `wait` seconds for a previous daemon's
    decode workers, which share its lock until they notice their parent died, then fails."""
    return lock_folder(state_dir, LOCK_NAME, "another cxr-edge watch", "one daemon per state folder", wait)


def lock_folder(folder: Path, name: str, holder: str, rule: str, wait: float = 5.0) -> int:
    """An exclusive flock on folder/name, the holder's pid written in it; the open descriptor.
    Fails with a CxrEdgeError naming `holder` (who else has it) and `rule` after `wait` seconds."""
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CxrEdgeError(f"{holder} (pid {pid}) is running with {folder}; {rule}") from None
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
