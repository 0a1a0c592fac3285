"""The durable journal of every input the daemon sees (SQLite, WAL).

An input is identified by its path relative to the inbox and its content hash: the same bytes
under the same name are processed once, ever; new bytes under an old name are a new input.
States: pending -> processing -> done | failed (permanent) | pending again (transient, with
backoff). SR sends to the PACS are queued here too, and retried until the PACS accepts them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS inputs (
    id INTEGER PRIMARY KEY,
    relative TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    error TEXT,
    outputs TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (relative, sha256)
);
CREATE INDEX IF NOT EXISTS inputs_state ON inputs (state, next_attempt);
CREATE TABLE IF NOT EXISTS sends (
    id INTEGER PRIMARY KEY,
    input_id INTEGER NOT NULL REFERENCES inputs (id),
    sr_path TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    error TEXT,
    updated REAL NOT NULL,
    UNIQUE (input_id, destination)
);
"""
STATES = ("pending", "processing", "done", "failed")


@dataclass
class Row:
    id: int
    relative: str
    path: str
    size: int
    mtime_ns: int
    sha256: str
    state: str
    attempts: int
    error: str | None
    outputs: dict | None


def backoff(attempts: int, base: float = 2.0, cap: float = 300.0) -> float:
    return min(cap, base ** max(0, attempts - 1))


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: the SCP and sender threads write too.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed state survives power loss
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args=()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _rows(self, sql: str, args=()) -> list[Row]:
        with self._lock:
            found = self._db.execute(
                f"SELECT id, relative, path, size, mtime_ns, sha256, state, attempts, error, outputs FROM inputs {sql}",
                args).fetchall()
        return [Row(*r[:9], json.loads(r[9]) if r[9] else None) for r in found]

    # --- inputs ---------------------------------------------------------------------------------
    def known_by_stat(self, relative: str, size: int, mtime_ns: int) -> Row | None:
        """A finished input with this name, size and mtime: skip it without hashing it again."""
        rows = self._rows("WHERE relative = ? AND size = ? AND mtime_ns = ? AND state IN ('done', 'failed')",
                          (relative, size, mtime_ns))
        return rows[0] if rows else None

    def register(self, relative: str, path: str, size: int, mtime_ns: int, sha256: str) -> Row:
        """The row for this input, created as pending if it is new."""
        now = time.time()
        self._write("INSERT OR IGNORE INTO inputs (relative, path, size, mtime_ns, sha256, state, created, updated) "
                    "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)", (relative, path, size, mtime_ns, sha256, now, now))
        return self._rows("WHERE relative = ? AND sha256 = ?", (relative, sha256))[0]

    def claim_due(self, limit: int) -> list[Row]:
        """Pending inputs whose retry time has come, marked processing (attempts + 1)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            ids = [r[0] for r in self._db.execute(
                "SELECT id FROM inputs WHERE state = 'pending' AND next_attempt <= ? ORDER BY id LIMIT ?",
                (time.time(), limit))]
            self._db.executemany("UPDATE inputs SET state = 'processing', attempts = attempts + 1, updated = ? "
                                 "WHERE id = ?", [(time.time(), i) for i in ids])
            self._db.execute("COMMIT")
        return self._rows(f"WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids) if ids else []

    def done(self, row_id: int, outputs: dict, sr_error: dict | None = None) -> None:
        """Done; `sr_error` (the record's) is kept as the error of an input whose findings were
        written without their SR, so that `status` counts and shows it."""
        note = f"sr: {sr_error['reason']}" if sr_error else None
        self._write("UPDATE inputs SET state = 'done', error = ?, outputs = ?, updated = ? WHERE id = ?",
                    (note, json.dumps(outputs), time.time(), row_id))

    def failed(self, row_id: int, error: str, outputs: dict | None, retry: bool, attempts: int,
               max_attempts: int) -> str:
        """Transient errors go back to pending with backoff until max_attempts; then, or for a
        permanent error, the input is failed for good. Returns the new state."""
        state = "pending" if retry and attempts < max_attempts else "failed"
        self._write("UPDATE inputs SET state = ?, error = ?, outputs = ?, next_attempt = ?, updated = ? WHERE id = ?",
                    (state, error, json.dumps(outputs) if outputs else None, time.time() + backoff(attempts),
                     time.time(), row_id))
        return state

    def in_processing(self) -> list[Row]:
        return self._rows("WHERE state = 'processing'")

    def requeue(self, row_id: int) -> None:
        self._write("UPDATE inputs SET state = 'pending', next_attempt = 0, updated = ? WHERE id = ?", (time.time(), row_id))

    def next_due_in(self) -> float | None:
        with self._lock:
            found = self._db.execute("SELECT MIN(next_attempt) FROM inputs WHERE state = 'pending'").fetchone()[0]
        return None if found is None else max(0.0, found - time.time())

    def all_inputs(self) -> list[Row]:
        return self._rows("ORDER BY id")

    # --- sends ----------------------------------------------------------------------------------
    def queue_send(self, input_id: int, sr_path: str, destination: str) -> None:
        self._write("INSERT INTO sends (input_id, sr_path, destination, state, updated) VALUES (?, ?, ?, 'pending', ?) "
                    "ON CONFLICT (input_id, destination) DO UPDATE SET sr_path = excluded.sr_path, state = 'pending', "
                    "next_attempt = 0", (input_id, sr_path, destination, time.time()))

    def due_sends(self, limit: int = 16) -> list[tuple[int, str, str, int]]:
        with self._lock:
            return self._db.execute("SELECT id, sr_path, destination, attempts FROM sends WHERE state = 'pending' "
                                    "AND next_attempt <= ? ORDER BY id LIMIT ?", (time.time(), limit)).fetchall()

    def send_result(self, send_id: int, ok: bool, error: str | None, attempts: int) -> None:
        self._write("UPDATE sends SET state = ?, attempts = ?, error = ?, next_attempt = ?, updated = ? WHERE id = ?",
                    ("sent" if ok else "pending", attempts, error, time.time() + backoff(attempts, cap=60.0),
                     time.time(), send_id))

    # --- status ---------------------------------------------------------------------------------
    def status(self, recent: int = 5) -> dict:
        with self._lock:
            inputs = dict(self._db.execute("SELECT state, COUNT(*) FROM inputs GROUP BY state").fetchall())
            without_sr = self._db.execute("SELECT COUNT(*) FROM inputs WHERE state = 'done' AND error IS NOT NULL"
                                          ).fetchone()[0]
            sends = dict(self._db.execute("SELECT state, COUNT(*) FROM sends GROUP BY state").fetchall())
            errors = self._db.execute("SELECT relative, error, updated FROM inputs WHERE error IS NOT NULL "
                                      "ORDER BY updated DESC LIMIT ?", (recent,)).fetchall()
            send_errors = self._db.execute("SELECT sr_path, error, attempts FROM sends WHERE error IS NOT NULL "
                                           "AND state = 'pending' ORDER BY updated DESC LIMIT ?", (recent,)).fetchall()
            now = time.time()
            done_in = {window: self._db.execute("SELECT COUNT(*) FROM inputs WHERE state = 'done' AND updated >= ?",
                                                (now - window,)).fetchone()[0] for window in (60, 3600)}
        return {
            "journal": str(self.path),
            "inputs": {s: inputs.get(s, 0) for s in STATES},
            "done_without_sr": without_sr,  # findings written, the SR could not be (counted in done)
            "sends": {s: sends.get(s, 0) for s in ("pending", "sent")},
            "last_errors": [{"input": r, "error": e, "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))}
                            for r, e, t in errors],
            "send_errors": [{"sr": p, "error": e, "attempts": a} for p, e, a in send_errors],
            "throughput_per_minute": {"last_minute": done_in[60], "last_hour": round(done_in[3600] / 60, 2)},
        }
