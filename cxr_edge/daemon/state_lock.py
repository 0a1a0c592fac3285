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
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CxrEdgeError(f"another cxr-edge watch (pid {holder}) is running with the state folder "
                                   f"{state_dir}; one daemon per state folder") from None
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
