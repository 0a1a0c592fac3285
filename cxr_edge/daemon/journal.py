"""The durable journal of every input the daemon sees (SQLite, WAL).

An input is its bytes (sha256) under its path relative to the inbox. While an input is pending
or processing it has exactly one row, whatever happens to the file: new bytes written in place
update that row (retried with the new bytes' hash) instead of adding a second one, and its
outcome counts only when the bytes processed are the bytes last seen. Once done or failed, a
row is history: the same bytes under the same name are not processed again, new bytes under
an old name are a new input (a new row). States: pending -> processing -> done | failed |
pending again (retried by error kind, see cxr_edge.errors). SR sends to the PACS are queued in
the same transaction that marks an input done, and retried until the PACS accepts them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from ..errors import INCOMPLETE, PERMANENT, TRANSIENT, CxrEdgeError, ErrorKind

SCHEMA_VERSION = 3  # 2: stat identity; 3: a send carries every DICOM object of an input (SR + heatmaps)
INPUTS = """
CREATE TABLE IF NOT EXISTS inputs (
    id INTEGER PRIMARY KEY,
    relative TEXT NOT NULL,          -- POSIX path relative to the inbox
    path TEXT NOT NULL,              -- schema 1 kept an absolute path here; now the relative path
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL DEFAULT 0,
    inode INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT NOT NULL,            -- '' while unknown (not readable yet, not a regular file)
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,  -- failures counted against --max-attempts
    retries INTEGER NOT NULL DEFAULT 0,   -- every retry, for the backoff
    claims INTEGER NOT NULL DEFAULT 0,    -- times taken for processing: a daemon dying on it each time shows here
    version INTEGER NOT NULL DEFAULT 0,   -- bumped whenever the intake records new bytes or a new stat
    next_attempt REAL NOT NULL DEFAULT 0,
    error TEXT,
    error_kind TEXT,
    outputs TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
)"""
SCHEMA = INPUTS + """;
CREATE UNIQUE INDEX IF NOT EXISTS inputs_one_active ON inputs (relative) WHERE state IN ('pending', 'processing');
CREATE INDEX IF NOT EXISTS inputs_by_relative ON inputs (relative, id);
CREATE INDEX IF NOT EXISTS inputs_state ON inputs (state, next_attempt);
CREATE INDEX IF NOT EXISTS inputs_state_updated ON inputs (state, updated);
CREATE TABLE IF NOT EXISTS sends (
    id INTEGER PRIMARY KEY,
    input_id INTEGER NOT NULL REFERENCES inputs (id),
    sr_path TEXT NOT NULL,           -- the first object (the SR when there is one)
    sop_instance_uid TEXT,           -- its UID: another one at sr_path supersedes it
    objects TEXT,                    -- JSON [[path, SOP Instance UID], ...]: all of them, SR first (NULL: sr_path alone)
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    error TEXT,
    updated REAL NOT NULL,
    UNIQUE (input_id, destination)
);
"""


class InputState(StrEnum):
    """An input's state. The values are the text stored in inputs.state (and spelled in the SQL
    here), shown by `cxr-edge status`: never rename one."""

    PENDING = "pending"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class SendState(StrEnum):
    """An SR send's state, stored in sends.state like InputState."""

    PENDING = "pending"  # to be sent, or retried with backoff
    SENT = "sent"
    FAILED = "failed"  # the SR file is gone or unreadable
    SUPERSEDED = "superseded"  # a newer version of the input replaced the SR: its own send carries it


FINISHED = (InputState.DONE, InputState.FAILED)
COLUMNS = ("id, relative, size, mtime_ns, ctime_ns, inode, sha256, state, attempts, retries, claims, version, error, "
           "error_kind, outputs")


class JournalError(CxrEdgeError):
    """The journal cannot be opened: corrupt, locked, unreadable."""


@dataclass
class Row:
    id: int
    relative: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    sha256: str
    state: InputState
    attempts: int
    retries: int
    claims: int
    version: int
    error: str | None
    error_kind: str | None  # an ErrorKind's value, as the caller gave it
    outputs: dict | None

    def __post_init__(self):
        self.state = InputState(self.state)

    @property
    def identity(self) -> tuple[int, int, int, int]:
        return self.size, self.mtime_ns, self.ctime_ns, self.inode


def identity_of(stat) -> tuple[int, int, int, int]:
    """What changes whenever a file's bytes can have changed: size, mtime, and ctime and inode,
    which `touch -d` or `cp -p` cannot set back (new bytes with the same size and mtime)."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


class Send(NamedTuple):
    """One send that is due: an input's DICOM objects (its SR, its heatmaps), in one association."""

    id: int
    sr_path: str  # the first object
    sr_uid: str | None  # its SOP Instance UID
    destination: str
    attempts: int
    objects: tuple = ()  # ((path, SOP Instance UID), ...), the first one included

    @classmethod
    def from_row(cls, send_id, sr_path, sr_uid, destination, attempts, objects) -> "Send":
        listed = tuple((str(path), uid) for path, uid in json.loads(objects)) if objects else ((sr_path, sr_uid),)
        return cls(send_id, sr_path, sr_uid, destination, attempts, listed)


def backoff(attempts: int, base: float = 2.0, cap: float = 300.0) -> float:
    return min(cap, base ** max(0, attempts - 1))


class Journal:
    def __init__(self, path: str | Path, busy_timeout: float = 30.0, readonly: bool = False):
        """`readonly` for readers beside the daemon (`cxr-edge status`): they create no file in
        the state folder (a root-owned WAL index would lock the service's user out)."""
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            # One connection guarded by a lock: the SCP, intake and sender threads write too.
            target = _readonly_uri(self.path) if readonly else str(self.path)
            self._db = sqlite3.connect(target, uri=readonly, check_same_thread=False, isolation_level=None, timeout=5)
            try:
                if readonly:
                    self._db.execute("SELECT COUNT(*) FROM inputs").fetchone()
                else:
                    self._open()
            except BaseException:
                self._db.close()
                raise
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise JournalError(f"journal {self.path} is locked by another process ({text}); "
                                   "is another program holding it open?") from None
            raise JournalError(f"cannot open journal {self.path}: {text}") from None
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"journal {self.path} is corrupt ({exc}); move it away to start "
                               "a new one (inputs in the inbox are then processed again)") from None
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")

    def _open(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a committed state survives power loss
        problems = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"integrity check: {problems[0]}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        old = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'inputs'").fetchone()
        if old and version < 2:
            self._migrate_from_1()
        columns = [r[1] for r in db.execute("PRAGMA table_info(sends)")]
        if columns and "objects" not in columns:  # schema 2: one SR per send
            db.execute("ALTER TABLE sends ADD COLUMN objects TEXT")
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _migrate_from_1(self) -> None:
        """Schema 1 had UNIQUE (relative, sha256) and no stat identity: rebuild the table (SQLite
        cannot drop a constraint), keeping every row and its id (the sends refer to it)."""
        def work(db) -> None:
            db.execute(INPUTS.replace("CREATE TABLE IF NOT EXISTS inputs", "CREATE TABLE inputs_v2"))
            db.execute("INSERT INTO inputs_v2 (id, relative, path, size, mtime_ns, sha256, state, attempts, "
                       "next_attempt, error, outputs, created, updated) SELECT id, relative, relative, size, mtime_ns, "
                       "sha256, state, attempts, next_attempt, error, outputs, created, updated FROM inputs")
            # Schema 1 could hold several rows in flight for one name (a file written in chunks):
            # the newest stays, the older ones are closed, so that one row per name is in flight.
            db.execute("UPDATE inputs_v2 SET state = 'failed', error = 'superseded by newer bytes under the same name', "
                       "error_kind = 'permanent' WHERE state IN ('pending', 'processing') AND id < (SELECT MAX(id) "
                       "FROM inputs_v2 AS newer WHERE newer.relative = inputs_v2.relative AND newer.state IN "
                       "('pending', 'processing'))")
            db.execute("DROP TABLE inputs")
            db.execute("ALTER TABLE inputs_v2 RENAME TO inputs")
            columns = [r[1] for r in db.execute("PRAGMA table_info(sends)")]
            if columns and "sop_instance_uid" not in columns:
                db.execute("ALTER TABLE sends ADD COLUMN sop_instance_uid TEXT")

        self._run_in_transaction(work)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args=()) -> list[Row]:
        with self._lock:
            found = self._db.execute(f"SELECT {COLUMNS} FROM inputs {sql}", args).fetchall()
        return [_row(r) for r in found]

    def _transaction(self, work):
        """Run work(db) in one write transaction."""
        with self._lock:
            return self._run_in_transaction(work)

    def _run_in_transaction(self, work):
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL): keep the real error
                db.execute("ROLLBACK")
            raise
        return result

    def row(self, row_id: int) -> Row | None:
        rows = self._rows("WHERE id = ?", (row_id,))
        return rows[0] if rows else None

    # --- intake ---------------------------------------------------------------------------------
    def unchanged_since_finished(self, relative: str, identity: tuple) -> Row | None:
        """The input last finished under this name, when the file is provably unchanged since
        (same size, mtime, ctime and inode) and nothing is in flight for it: no need to hash."""
        rows = self._rows("WHERE relative = ? ORDER BY id DESC LIMIT 1", (relative,))
        if rows and rows[0].state in FINISHED and rows[0].sha256 and rows[0].identity == tuple(identity):
            return rows[0]
        return None

    def offer(self, relative: str, identity: tuple, sha256: str, refusal: str | None = None) -> tuple[Row, bool]:
        """Record what is now under `relative`: (its row, whether there is work to do).

        - An input in flight under this name takes the new bytes (no second row).
        - The bytes last finished under this name: nothing to do.
        - `refusal` (not a regular file, a link): a failed row with that reason, once.
        - Anything else: a new pending input.
        """
        now = time.time()

        def work(db) -> tuple[int, bool]:
            active = db.execute("SELECT id, sha256, state FROM inputs WHERE relative = ? AND state IN "
                                "('pending', 'processing')", (relative,)).fetchone()
            if active:
                row_id, known, state = active
                if refusal is None and sha256 != known:
                    # new bytes for an input in flight: retried with them, promptly, with a fresh budget
                    db.execute("UPDATE inputs SET sha256 = ?, size = ?, mtime_ns = ?, ctime_ns = ?, inode = ?, "
                               "version = version + 1, attempts = 0, retries = 0, error = NULL, error_kind = NULL, "
                               "next_attempt = CASE WHEN state = 'pending' THEN 0 ELSE next_attempt END, updated = ? "
                               "WHERE id = ?", (sha256, *identity, now, row_id))
                return row_id, True
            last = db.execute("SELECT id, sha256, state, error FROM inputs WHERE relative = ? ORDER BY id DESC LIMIT 1",
                              (relative,)).fetchone()
            last_id, last_sha256, last_state, last_error = last or (None, None, None, None)
            if refusal is not None:
                if last_sha256 == "" and last_state == InputState.FAILED and last_error == f"read: {refusal}":
                    return last_id, False
                cursor = db.execute(
                    "INSERT INTO inputs (relative, path, size, mtime_ns, ctime_ns, inode, sha256, state, error, "
                    "error_kind, created, updated) VALUES (?, ?, ?, ?, ?, ?, '', 'failed', ?, ?, ?, ?)",
                    (relative, relative, *identity, f"read: {refusal}", PERMANENT, now, now))
                return cursor.lastrowid, False
            if sha256 and last_sha256 == sha256:
                db.execute("UPDATE inputs SET size = ?, mtime_ns = ?, ctime_ns = ?, inode = ? WHERE id = ?",
                           (*identity, last_id))
                return last_id, False
            cursor = db.execute(
                "INSERT INTO inputs (relative, path, size, mtime_ns, ctime_ns, inode, sha256, state, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)", (relative, relative, *identity, sha256, now, now))
            return cursor.lastrowid, True

        row_id, work_to_do = self._transaction(work)
        return self.row(row_id), work_to_do

    # --- processing -----------------------------------------------------------------------------
    def claim_due(self, limit: int) -> list[Row]:
        """Pending inputs whose retry time has come, marked processing."""
        def work(db) -> list[int]:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM inputs WHERE state = 'pending' AND next_attempt <= ? ORDER BY id LIMIT ?",
                (time.time(), limit))]
            db.executemany("UPDATE inputs SET state = 'processing', claims = claims + 1, updated = ? WHERE id = ?",
                           [(time.time(), i) for i in ids])
            return ids

        ids = self._transaction(work)
        return self._rows(f"WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids) if ids else []

    def _changed_under_us(self, db, row_id: int, processed_sha256: str | None, claimed_version: int | None,
                          settle: float) -> bool:
        """The bytes processed are not the bytes last seen: the file changed while in flight.
        Retried (not counted) with the processed bytes' hash as the latest known; the outcome
        counts once two looks at the file agree. Without a processed hash (it failed before
        reading), any news from the intake since the claim means the same."""
        known, version = db.execute("SELECT sha256, version FROM inputs WHERE id = ?", (row_id,)).fetchone()
        if processed_sha256:
            if known in ("", processed_sha256):
                return False
        elif claimed_version is None or version == claimed_version:
            return False
        db.execute("UPDATE inputs SET state = 'pending', sha256 = ?, next_attempt = ?, updated = ? WHERE id = ?",
                   (processed_sha256 or known, time.time() + settle, time.time(), row_id))
        return True

    def done(self, row_id: int, processed_sha256: str | None, outputs: dict, sr_error: dict | None = None,
             send_to: str | None = None, settle: float = 0.0, claimed_version: int | None = None,
             sr_uid: str | None = None, objects: list | None = None) -> InputState:
        """Done, and the send of its DICOM objects queued in the same transaction (a crash cannot
        separate them). `objects`: [(path, SOP Instance UID)], SR first (default: the SR alone).
        `sr_error` (the record's) is kept as the error of an input whose findings were written
        without their SR, so that `status` counts and shows it. Returns the new state ('pending'
        when the file changed while it was processed)."""
        note = f"sr: {sr_error['reason']}" if sr_error else None

        def work(db) -> InputState:
            if self._changed_under_us(db, row_id, processed_sha256, claimed_version, settle):
                return InputState.PENDING
            db.execute("UPDATE inputs SET state = 'done', sha256 = CASE WHEN sha256 = '' THEN ? ELSE sha256 END, "
                       "error = ?, error_kind = NULL, outputs = ?, updated = ? WHERE id = ?",
                       (processed_sha256 or "", note, json.dumps(outputs), time.time(), row_id))
            listed = objects if objects is not None else ([(outputs["sr"], sr_uid)] if outputs.get("sr") else [])
            if send_to and listed:
                db.execute("INSERT OR IGNORE INTO sends (input_id, sr_path, sop_instance_uid, objects, destination, state, "
                           "updated) VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                           (row_id, listed[0][0], listed[0][1], json.dumps([list(o) for o in listed]), send_to,
                            time.time()))
            return InputState.DONE

        return self._transaction(work)

    def failed(self, row_id: int, processed_sha256: str | None, error: str, kind: ErrorKind | str,
               outputs: dict | None, max_attempts: int, young: bool = False, settle: float = 0.0,
               claimed_version: int | None = None) -> InputState:
        """Decide by kind: permanent -> failed; transient (disk full, EIO, permission) -> retried
        with backoff until it clears, not counted; incomplete -> retried while the file is young;
        unexpected -> counted, failed after `max_attempts`. Returns the new state."""
        def work(db) -> InputState:
            if self._changed_under_us(db, row_id, processed_sha256, claimed_version, settle):
                return InputState.PENDING
            attempts, retries = db.execute("SELECT attempts, retries FROM inputs WHERE id = ?", (row_id,)).fetchone()
            counted = kind not in (TRANSIENT, INCOMPLETE)
            attempts += counted
            if kind == PERMANENT or (kind == INCOMPLETE and not young) or (counted and attempts >= max_attempts):
                state, delay = InputState.FAILED, 0.0
            else:
                state, delay = InputState.PENDING, backoff(retries + 1, cap=60.0 if kind == TRANSIENT else 300.0)
            db.execute("UPDATE inputs SET state = ?, attempts = ?, retries = ?, error = ?, error_kind = ?, outputs = ?, "
                       "next_attempt = ?, sha256 = CASE WHEN sha256 = '' THEN ? ELSE sha256 END, updated = ? "
                       "WHERE id = ?", (state, attempts, retries + (state == InputState.PENDING), error, kind,
                                        json.dumps(outputs) if outputs else None, time.time() + delay,
                                        processed_sha256 or "", time.time(), row_id))
            return state

        return self._transaction(work)

    def in_processing(self) -> list[Row]:
        return self._rows("WHERE state = 'processing' ORDER BY id")

    def requeue(self, row_id: int) -> None:
        self._transaction(lambda db: db.execute(
            "UPDATE inputs SET state = 'pending', next_attempt = 0, updated = ? WHERE id = ? AND state = 'processing'",
            (time.time(), row_id)))

    def next_due_in(self) -> float | None:
        with self._lock:
            found = self._db.execute("SELECT MIN(next_attempt) FROM inputs WHERE state = 'pending'").fetchone()[0]
        return None if found is None else max(0.0, found - time.time())

    def all_inputs(self) -> list[Row]:
        return self._rows("ORDER BY id")

    # --- sends ----------------------------------------------------------------------------------
    def due_sends(self, limit: int = 16) -> list[Send]:
        """The sends due now."""
        with self._lock:
            found = self._db.execute("SELECT id, sr_path, sop_instance_uid, destination, attempts, objects FROM sends "
                                     "WHERE state = 'pending' AND next_attempt <= ? ORDER BY id LIMIT ?",
                                     (time.time(), limit)).fetchall()
        return [Send.from_row(*r) for r in found]

    def send_result(self, send_id: int, state: SendState, error: str | None, attempts: int) -> None:
        """Record a send's outcome (SendState says what each state means)."""
        self._transaction(lambda db: db.execute(
            "UPDATE sends SET state = ?, attempts = ?, error = ?, next_attempt = ?, updated = ? WHERE id = ?",
            (state, attempts, error, time.time() + backoff(attempts, cap=60.0), time.time(), send_id)))

    # --- status ---------------------------------------------------------------------------------
    def status(self, recent: int = 5) -> dict:
        with self._lock:
            inputs = dict(self._db.execute("SELECT state, COUNT(*) FROM inputs GROUP BY state").fetchall())
            without_sr = self._db.execute("SELECT COUNT(*) FROM inputs WHERE state = 'done' AND error IS NOT NULL"
                                          ).fetchone()[0]
            retrying = dict(self._db.execute("SELECT error_kind, COUNT(*) FROM inputs WHERE state = 'pending' AND "
                                             "error_kind IS NOT NULL GROUP BY error_kind").fetchall())
            sends = dict(self._db.execute("SELECT state, COUNT(*) FROM sends GROUP BY state").fetchall())
            errors = self._db.execute("SELECT relative, error, error_kind, updated FROM inputs WHERE error IS NOT NULL "
                                      "ORDER BY updated DESC LIMIT ?", (recent,)).fetchall()
            send_errors = self._db.execute("SELECT sr_path, error, attempts FROM sends WHERE error IS NOT NULL "
                                           "AND state = 'pending' ORDER BY updated DESC LIMIT ?", (recent,)).fetchall()
            now = time.time()
            done_in = {window: self._db.execute("SELECT COUNT(*) FROM inputs WHERE state = 'done' AND updated >= ?",
                                                (now - window,)).fetchone()[0] for window in (60, 3600)}
        return {
            "journal": str(self.path),
            "inputs": {s: inputs.get(s, 0) for s in InputState},
            "done_without_sr": without_sr,  # findings written, the SR could not be (counted in done)
            "pending_retrying": retrying,  # pending again after an error, by kind (transient: waiting for it to clear)
            "sends": {s: sends.get(s, 0) for s in SendState},
            "last_errors": [{"input": r, "error": e, "kind": k,
                             "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))} for r, e, k, t in errors],
            "send_errors": [{"sr": p, "error": e, "attempts": a} for p, e, a in send_errors],
            "throughput_per_minute": {"last_minute": done_in[60], "last_hour": round(done_in[3600] / 60, 2)},
        }


def _readonly_uri(path: Path) -> str:
    """A reader must not create the WAL or its index: root running `cxr-edge status` would leave
    root-owned files that lock the service's user out. Without a WAL file no daemon is writing
    (SQLite removes it at the last close), so the database is read as immutable, creating
    nothing; with one, the daemon's index exists and is used read-only."""
    from urllib.parse import quote

    wal = path.with_name(path.name + "-wal")
    return f"file:{quote(str(path))}?" + ("mode=ro" if wal.exists() else "mode=ro&immutable=1")


def _row(r) -> Row:
    *fields, outputs = r  # COLUMNS ends with outputs, stored as JSON
    return Row(*fields, outputs=json.loads(outputs) if outputs else None)


def read_status(state_dir: Path) -> dict:
    """`cxr-edge status`: the journal's report, read-only (it must not create files the service's
    user cannot write). Raises CxrEdgeError naming the problem."""
    path = Path(state_dir) / "journal.sqlite3"
    if not path.is_file():
        raise CxrEdgeError(f"no journal in {state_dir}")
    try:
        journal = Journal(path, readonly=True)
        try:
            return journal.status()
        finally:
            journal.close()
    except sqlite3.Error as exc:  # a journal of an older version: the daemon migrates it when it starts
        raise CxrEdgeError(f"cannot read the journal in {state_dir} ({exc}); start `cxr-edge watch` once to upgrade it") from exc
