"""Running `cxr-edge watch` as a real process in tests, and reading what it left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


STARTED: list["DaemonProcess"] = []


def live_processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every process still running (zombies do not count)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if fields[0] != "Z":
            found.append((int(stat.parent.name), int(fields[1]), int(fields[2])))
    return found


def live_processes_in_group(pgid: int) -> list[int]:
    return [pid for pid, _, group in live_processes() if group == pgid]


def kill_leftovers() -> None:
    """Kill every daemon a test started (and its decode workers), even after a failed assert,
    so no process outlives the test and holds pytest's output open."""
    while STARTED:
        proc = STARTED.pop().proc
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is the daemon + workers
        except ProcessLookupError:
            pass
        proc.wait(30)


class NotifySocket:
    """The systemd side of sd_notify: an abstract AF_UNIX datagram socket that keeps every
    message the daemon sends (READY=1, STATUS=, WATCHDOG=1, RELOADING=1, STOPPING=1)."""

    def __init__(self):
        self.address = f"@cxr-edge-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                return self.messages

    def count(self, text: str) -> int:
        return sum(text in message for message in self.poll())

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    def __init__(self, root: Path, *extra: str, env: dict | None = None, cwd: Path | None = None):
        self.inbox, self.out = root / "inbox", root / "out"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.log_path = root / f"daemon-{time.monotonic_ns()}.log"
        self.notify = NotifySocket()
        self.args = [sys.executable, "-m", "cxr_edge", "watch", str(self.inbox), "--out", str(self.out),
                     "--settle", "0.5", "--workers", "2",
                     "--min-side", "32",  # the bursts use NIH's 64 px thumbnails (fast), below the default 128
                     *map(str, extra)]
        self.env = {**os.environ, "NOTIFY_SOCKET": self.notify.address, **(env or {})}
        self.proc = None
        self.cwd = cwd

    def launch(self) -> "DaemonProcess":
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd, start_new_session=True)
        STARTED.append(self)
        return self

    def start(self) -> "DaemonProcess":
        """Launch and wait for READY=1 (the model warmed up, the inbox watched)."""
        self.launch()
        wait_for(lambda: self.notify.count("READY=1") or self.proc.poll() is not None, 120, what="READY=1")
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        return self

    def exited(self, timeout: float = 60.0) -> int:
        """Wait for the process to end on its own; its exit status."""
        code = self.proc.wait(timeout)
        self.log.close()
        self.notify.close()
        return code

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout)
        self.log.close()
        self.notify.poll()
        self.notify.close()
        return self.proc.returncode

    @property
    def journal(self) -> Path:
        return self.out / ".cxr-edge" / "journal.sqlite3"

    def states(self) -> dict[str, int]:
        if not self.journal.exists():
            return {}
        with sqlite3.connect(f"file:{self.journal}?mode=ro", uri=True, timeout=5) as db:
            return dict(db.execute("SELECT state, COUNT(*) FROM inputs GROUP BY state").fetchall())

    def rows(self) -> list[dict]:
        with sqlite3.connect(f"file:{self.journal}?mode=ro", uri=True, timeout=5) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM inputs ORDER BY id")]

    def text(self) -> str:
        return self.log_path.read_text()


def signal_while_busy(daemon: DaemonProcess, signum: int, done_at_least: int = 1, total: int | None = None,
                      to_group: bool = False, timeout: float = 300.0) -> list[dict]:
    """Deliver `signum` at a moment the daemon is in the middle of its work: some inputs claimed
    and not finished ('processing') and at least `done_at_least` done. Returns the journal's rows
    at that moment, which are exactly the rows the signal meets: the daemon's process group (it
    and its decode workers) is frozen with SIGSTOP while the journal is read, and only then
    signalled, so nothing here depends on how fast the machine is. The signal goes to the daemon
    alone (as systemd's KillMode=mixed sends SIGTERM, or the OOM killer picks one process) or,
    with `to_group`, to the daemon and its workers; then the group runs on (SIGKILL: the daemon
    is waited for). Fails if the daemon finished all `total` inputs before such a moment came."""
    group = daemon.proc.pid  # started in a session of its own: its pid is the group's id
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        os.killpg(group, signal.SIGSTOP)
        rows = daemon.rows() if daemon.journal.exists() else []
        states = [r["state"] for r in rows]
        if "processing" in states and states.count("done") >= done_at_least:
            if to_group:
                os.killpg(group, signum)
            else:
                os.kill(daemon.proc.pid, signum)  # a signal other than SIGKILL waits for SIGCONT
            try:
                os.killpg(group, signal.SIGCONT)
            except ProcessLookupError:  # nothing of the group is left
                pass
            if signum == signal.SIGKILL:
                daemon.proc.wait(30)
            return rows
        os.killpg(group, signal.SIGCONT)
        if total is not None and states.count("done") + states.count("failed") >= total:
            raise AssertionError(f"the daemon finished all {total} inputs before it could be caught mid-work")
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for the daemon to be mid-work "
                         f"with {done_at_least} done")


def drop(source: Path, inbox: Path, name: str | None = None) -> Path:
    """Deliver a file the atomic way: temp name in the inbox, then rename."""
    target = inbox / (name or source.name)
    tmp = inbox / f".{target.name}.part"
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return target


def outputs(out: Path, suffix: str = ".json") -> list[Path]:
    return sorted(p for p in out.rglob(f"*{suffix}") if ".cxr-edge" not in p.parts)


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".part") or p.name.endswith(".tmp")]


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in outputs(out)]
