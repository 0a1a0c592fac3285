"""Finds complete files in the inbox: inotify events (watchdog) plus a full scan at start-up.

A file is taken when it is complete: renamed into the inbox (the atomic way to deliver), or
closed after writing / unchanged in size and mtime for `settle` seconds. Temp names (`*.part`,
`*.tmp`, dotfiles) are never taken; their final rename is.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from ..sources import is_candidate

log = logging.getLogger(__name__)


class InboxWatcher:
    def __init__(self, inbox: Path, on_ready, settle: float = 2.0, poll: float = 0.1):
        self.inbox, self.on_ready, self.settle, self.poll = Path(inbox), on_ready, settle, poll
        self._candidates: dict[Path, tuple[int, int, float, bool]] = {}  # path -> size, mtime, since, renamed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer = None
        self._thread = None

    def _interesting(self, path: Path) -> bool:
        try:
            relative = path.relative_to(self.inbox)
        except ValueError:
            return False
        return is_candidate(path) and not any(part.startswith(".") for part in relative.parts)

    def seen(self, path: str | Path, renamed: bool = False) -> None:
        path = Path(path)
        if not self._interesting(path):
            return
        with self._lock:
            previous = self._candidates.get(path)
            self._candidates[path] = (-1, -1, time.monotonic(), renamed or bool(previous and previous[3]))

    def start(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_created(self, event):
                if not event.is_directory:
                    watcher.seen(event.src_path)

            def on_modified(self, event):
                if not event.is_directory:
                    watcher.seen(event.src_path)

            def on_closed(self, event):  # IN_CLOSE_WRITE: the writer is done
                watcher.seen(event.src_path)

            def on_moved(self, event):
                if not event.is_directory:
                    watcher.seen(event.dest_path, renamed=True)

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.inbox), recursive=True)
        self._observer.start()  # events from here on; the scan below covers what came before
        self.scan()
        self._thread = threading.Thread(target=self._settle_loop, name="inbox-settle", daemon=True)
        self._thread.start()

    def scan(self) -> int:
        """Every file already in the inbox (what arrived while the daemon was down)."""
        count = 0
        for folder, dirs, files in os.walk(self.inbox):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                self.seen(Path(folder) / name)
                count += 1
        return count

    def _settle_loop(self) -> None:
        while not self._stop.wait(self.poll):
            now = time.monotonic()
            ready = []
            with self._lock:
                for path, (size, mtime, since, renamed) in list(self._candidates.items()):
                    try:
                        stat = path.stat()
                    except FileNotFoundError:  # renamed away or deleted before it settled
                        del self._candidates[path]
                        continue
                    if (stat.st_size, stat.st_mtime_ns) != (size, mtime):
                        self._candidates[path] = (stat.st_size, stat.st_mtime_ns, now, renamed)
                        if not renamed:
                            continue
                    if renamed or now - since >= self.settle:
                        del self._candidates[path]
                        ready.append(path)
            for path in ready:
                self.on_ready(path)

    def pending(self) -> int:
        with self._lock:
            return len(self._candidates)

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
