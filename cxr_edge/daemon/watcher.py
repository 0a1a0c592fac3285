"""Finds complete files in the inbox: inotify events (watchdog), a full scan at start-up, and a
rescan every `rescan` seconds (inotify can overflow; an observer can die).

A file is offered when it looks complete: renamed into the inbox (the atomic way to deliver), or
unchanged in size and mtime for `settle` seconds. Temp names (`*.part`, `*.tmp`, dotfiles) are
never offered; their final rename is. Entries that are not regular files (links, FIFOs, devices)
are offered at once: the daemon journals them as refused, and never opens them.

Nothing here may stop the intake: every entry is handled on its own, and an entry that fails is
retried later. `on_ready(path)` returns None when the entry is dealt with, or the seconds after
which to offer it again (a full journal disk, an unreadable file).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..sources import is_candidate

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    size: int = -1
    mtime_ns: int = -1
    since: float = 0.0  # monotonic time of the last change seen
    renamed: bool = False
    not_before: float = 0.0  # monotonic: a retry waits until then


class InboxWatcher:
    def __init__(self, inbox: Path, on_ready, settle: float = 2.0, poll: float = 0.1, rescan: float = 60.0,
                 heartbeat=None):
        self.inbox, self.on_ready, self.settle, self.poll, self.rescan = Path(inbox), on_ready, settle, poll, rescan
        self.heartbeat = heartbeat or (lambda: None)
        self._candidates: dict[Path, Candidate] = {}
        self._offered: dict[Path, tuple[int, int, int]] = {}  # entries dealt with: (size, mtime, ctime) then
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rescan_now = threading.Event()  # a folder arrived: its files bring no events of their own
        self._observer = None
        self._thread = None

    def _interesting(self, path: Path) -> bool:
        try:
            relative = path.relative_to(self.inbox)
        except ValueError:
            return False
        return bool(relative.parts) and is_candidate(path) and not any(p.startswith(".") for p in relative.parts)

    def seen(self, path: str | Path, renamed: bool = False, scanned: bool = False) -> None:
        path = Path(path)
        if not self._interesting(path):
            return
        with self._lock:
            previous = self._candidates.get(path)
            if scanned and previous is not None:
                return  # already settling: a scan must not restart its clock
            self._candidates[path] = Candidate(since=time.monotonic(),
                                               renamed=renamed or bool(previous and previous.renamed),
                                               not_before=previous.not_before if previous else 0.0)

    def start(self) -> None:
        self._start_observer()  # events from here on; the scan below covers what came before
        self.scan()
        self._thread = threading.Thread(target=self._settle_loop, name="inbox-settle", daemon=True)
        self._thread.start()

    def _start_observer(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_created(self, event):
                if event.is_directory:
                    watcher._rescan_now.set()
                else:
                    watcher.seen(event.src_path)

            def on_modified(self, event):
                if not event.is_directory:
                    watcher.seen(event.src_path)

            def on_closed(self, event):  # IN_CLOSE_WRITE: the writer is done
                watcher.seen(event.src_path)

            def on_moved(self, event):
                if event.is_directory:
                    watcher._rescan_now.set()
                else:
                    watcher.seen(event.dest_path, renamed=True)

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.inbox), recursive=True)
        self._observer.start()

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def scan(self) -> int:
        """Every entry in the inbox (what arrived while the daemon was down, or events lost).
        Links to folders are listed, never entered; an unreadable folder is skipped and logged."""
        count, present = 0, set()

        def unreadable(exc: OSError) -> None:
            log.error("cannot list a folder of the inbox: %s", exc.strerror or type(exc).__name__)

        for folder, dirs, files in os.walk(self.inbox, onerror=unreadable):
            self.heartbeat()  # a big inbox takes a while: progress, not a stall
            links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in links)
            for name in sorted(files + links):
                path = Path(folder) / name
                try:
                    info = os.lstat(path)
                except OSError:
                    continue
                present.add(path)
                if self._offered.get(path) == (info.st_size, info.st_mtime_ns, info.st_ctime_ns):
                    continue  # dealt with and unchanged since
                self.seen(path, scanned=True)
                count += 1
        self._offered = {p: v for p, v in self._offered.items() if p in present}  # moved or deleted since
        return count

    def _settle_loop(self) -> None:
        last_scan = time.monotonic()
        while not self._stop.wait(self.poll):
            self.heartbeat()
            now = time.monotonic()
            if now - last_scan >= self.rescan or self._rescan_now.is_set():
                last_scan = now
                self._rescan_now.clear()
                self._guarded(self.scan)
            if self._observer is not None and not self._observer.is_alive() and not self._stop.is_set():
                log.error("the inbox observer stopped; starting a new one (the rescan covers the gap)")
                self._guarded(self._start_observer)
            for path in self._ready(now):
                self._offer(path)
                self.heartbeat()

    def _ready(self, now: float) -> list[Path]:
        ready = []
        with self._lock:
            for path, c in list(self._candidates.items()):
                if now < c.not_before:
                    continue
                try:
                    info = os.lstat(path)
                except FileNotFoundError:  # renamed away or deleted before it settled
                    del self._candidates[path]
                    continue
                except OSError:  # offered as it is: the daemon journals why it cannot be read
                    del self._candidates[path]
                    ready.append(path)
                    continue
                if stat.S_ISDIR(info.st_mode):  # folders are walked, not offered
                    del self._candidates[path]
                    continue
                if not stat.S_ISREG(info.st_mode):  # a link, FIFO, device: refused at once, never opened
                    del self._candidates[path]
                    ready.append(path)
                    continue
                if (info.st_size, info.st_mtime_ns) != (c.size, c.mtime_ns):
                    c.size, c.mtime_ns, c.since = info.st_size, info.st_mtime_ns, now
                    if not c.renamed:
                        continue
                if c.renamed or now - c.since >= self.settle:
                    del self._candidates[path]
                    ready.append(path)
        return ready

    def _offer(self, path: Path) -> None:
        try:
            info = os.lstat(path)
            identity = (info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        except OSError:
            identity = None
        try:
            retry_in = self.on_ready(path)
        except Exception as exc:  # never lose the intake over one entry: offer it again later
            log.error("could not take an inbox entry (%s); will try again", type(exc).__name__)
            retry_in = 30.0
        if retry_in is None:
            if identity is not None:
                self._offered[path] = identity
            return
        with self._lock:
            if path not in self._candidates:
                self._candidates[path] = Candidate(since=time.monotonic(), renamed=True,
                                                   not_before=time.monotonic() + retry_in)

    def _guarded(self, work) -> None:
        try:
            work()
        except Exception as exc:
            log.error("inbox watcher: %s", type(exc).__name__)

    def pending(self) -> int:
        with self._lock:
            return len(self._candidates)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
