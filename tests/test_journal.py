"""The daemon's journal on its own: one row per input in flight, outcomes by error kind, sends
queued with their input, schema 1 journals migrated, and a corrupt or locked journal named."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from cxr_edge import errors
from cxr_edge.daemon.journal import InputState, Journal, JournalError, SendState
from cxr_edge.errors import ErrorKind
from cxr_edge.daemon.notify import Watchdog

A, B = "a" * 64, "b" * 64
STAT = (10, 1_000, 2_000, 7)
STAT2 = (10, 1_000, 3_000, 7)  # same size and mtime, new ctime: new bytes written in place


@pytest.fixture
def journal(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite3")
    yield journal
    journal.close()


def test_new_bytes_for_an_input_in_flight_update_its_row_instead_of_adding_one(journal):
    row, work = journal.offer("x.dcm", STAT, A)
    assert work and row.state == "pending"
    again, work = journal.offer("x.dcm", STAT2, B)  # written again before it was processed
    assert again.id == row.id and again.sha256 == B and work
    (claimed,) = journal.claim_due(10)
    during, _ = journal.offer("x.dcm", STAT, A)  # and again while it is processed
    assert during.id == row.id and during.state == "processing"
    # the bytes processed (B) are not the bytes last seen (A): retried, not done
    assert journal.done(claimed.id, B, {"json": "x.json"}) == "pending"
    assert len(journal.all_inputs()) == 1
    (claimed,) = [r for r in journal.all_inputs()]
    assert claimed.sha256 == B  # the latest look at the file, to be confirmed by the next one


def test_done_when_the_bytes_processed_are_the_bytes_last_seen(journal):
    row, _ = journal.offer("x.dcm", STAT, A)
    journal.claim_due(10)
    assert journal.done(row.id, A, {"json": "x.json", "sr": "x.sr.dcm"}, send_to="PACS@h:104") == "done"
    same, work = journal.offer("x.dcm", STAT2, A)  # the same bytes again: nothing to do
    assert same.id == row.id and not work
    assert journal.unchanged_since_finished("x.dcm", STAT2).id == row.id  # no need to hash next time
    assert journal.unchanged_since_finished("x.dcm", STAT) is None
    new, work = journal.offer("x.dcm", STAT, B)  # new bytes under the old name: a new input
    assert work and new.id != row.id
    journal.claim_due(10)
    journal.done(new.id, B, {"json": "x.json"})
    back, work = journal.offer("x.dcm", STAT, A)  # back to the first bytes: the outputs describe B now
    assert work and back.id not in (row.id, new.id)


def test_a_send_is_queued_once_in_the_transaction_that_marks_the_input_done(journal):
    row, _ = journal.offer("x.dcm", STAT, A)
    journal.claim_due(10)
    journal.done(row.id, A, {"json": "x.json", "sr": "/out/x.sr.dcm"}, send_to="PACS@h:104", sr_uid="1.2.3")
    journal.done(row.id, A, {"json": "x.json", "sr": "/out/x.sr.dcm"}, send_to="PACS@h:104", sr_uid="1.2.3")  # recovery
    assert journal.due_sends() == [(1, "/out/x.sr.dcm", "1.2.3", "PACS@h:104", 0, (("/out/x.sr.dcm", "1.2.3"),))]
    other, _ = journal.offer("y.dcm", STAT, B)
    journal.claim_due(10)
    journal.done(other.id, B, {"json": "y.json"}, sr_error={"reason": "no SR"}, send_to="PACS@h:104")
    assert len(journal.due_sends()) == 1  # no SR, nothing to send
    assert journal.status()["done_without_sr"] == 1


@pytest.mark.parametrize("kind, young, expected, retries", [
    ("permanent", False, "failed", 0),
    ("incomplete", True, "pending", 1),  # may still be arriving
    ("incomplete", False, "failed", 0),
    ("transient", False, "pending", 1),
    ("unexpected", False, "pending", 1),
])
def test_failures_are_decided_by_kind(journal, kind, young, expected, retries):
    row, _ = journal.offer("x.dcm", STAT, A)
    journal.claim_due(10)
    assert journal.failed(row.id, A, "stage: reason", kind, None, max_attempts=5, young=young) == expected
    (after,) = journal.all_inputs()
    assert (after.state, after.retries, after.error_kind) == (expected, retries, kind)


def test_transient_failures_do_not_use_up_the_attempts_unexpected_ones_do(journal):
    row, _ = journal.offer("x.dcm", STAT, A)
    for _ in range(20):  # a disk full for a long time
        journal._transaction(lambda db: db.execute("UPDATE inputs SET next_attempt = 0"))
        journal.claim_due(10)
        assert journal.failed(row.id, A, "write: No space left on device", "transient", None, max_attempts=3) == "pending"
    states = []
    for _ in range(3):
        journal._transaction(lambda db: db.execute("UPDATE inputs SET next_attempt = 0"))
        journal.claim_due(10)
        states.append(journal.failed(row.id, A, "inference: boom", "unexpected", None, max_attempts=3))
    assert states == ["pending", "pending", "failed"]


def test_backoff_waits_before_the_next_claim(journal):
    row, _ = journal.offer("x.dcm", STAT, A)
    journal.claim_due(10)
    journal.failed(row.id, A, "read: I/O error", "transient", None, max_attempts=5)
    assert journal.claim_due(10) == []
    assert 0 < journal.next_due_in() <= 1.0


def test_a_refused_entry_is_journaled_once(journal):
    first, work = journal.offer("loop.dcm", STAT, "", refusal="a symbolic link")
    assert not work and first.state == "failed" and first.error == "read: a symbolic link"
    again, _ = journal.offer("loop.dcm", STAT, "", refusal="a symbolic link")
    assert again.id == first.id and len(journal.all_inputs()) == 1
    real, work = journal.offer("loop.dcm", STAT, A)  # replaced by a regular file: a new input
    assert work and real.id != first.id


def test_a_failure_before_reading_does_not_close_a_row_the_intake_has_news_for(journal):
    """The input failed before its bytes were read (deleted and re-created meanwhile), and the
    intake has since recorded new bytes: that outcome is not theirs, the row runs again."""
    journal.offer("x.dcm", STAT, A)
    (claimed,) = journal.claim_due(10)
    journal.offer("x.dcm", STAT2, B)
    assert journal.failed(claimed.id, None, "read: cannot read file: No such file or directory", "permanent", None,
                          max_attempts=5, claimed_version=claimed.version) == "pending"
    (row,) = journal.all_inputs()
    assert (row.sha256, row.attempts, row.error) == (B, 0, None)
    (again,) = journal.claim_due(10) or [None]
    assert again is None or again.sha256 == B


def test_new_bytes_get_a_fresh_attempt_budget(journal):
    row, _ = journal.offer("x.dcm", STAT, A)
    journal.claim_due(10)
    journal.failed(row.id, A, "inference: boom", "unexpected", None, max_attempts=5)
    assert journal.all_inputs()[0].attempts == 1
    journal.offer("x.dcm", STAT2, B)
    (after,) = journal.all_inputs()
    assert (after.attempts, after.retries, after.error, after.version) == (0, 0, None, 1)


def test_sigterm_path_requeues_what_is_left_processing(journal):
    row, _ = journal.offer("x.dcm", STAT, A)
    journal.claim_due(10)
    journal.requeue(row.id)
    assert journal.all_inputs()[0].state == "pending" and journal.in_processing() == []


def test_states_and_kinds_are_enums_stored_and_reported_as_their_plain_text(journal):
    """The sqlite rows and `cxr-edge status --json` keep the words they had before the enums."""
    row, _ = journal.offer("x.dcm", STAT, A)
    assert row.state is InputState.PENDING
    journal.claim_due(10)
    assert journal.failed(row.id, A, "write: No space left on device", ErrorKind.TRANSIENT, None,
                          max_attempts=5) is InputState.PENDING
    raw = journal._db.execute("SELECT state, typeof(state), error_kind, typeof(error_kind) FROM inputs").fetchone()
    assert raw == ("pending", "text", "transient", "text")
    assert errors.TRANSIENT is ErrorKind.TRANSIENT and errors.ERROR_KINDS == tuple(ErrorKind)
    other, _ = journal.offer("y.dcm", STAT, B)
    journal._transaction(lambda db: db.execute("UPDATE inputs SET next_attempt = 0"))
    journal.claim_due(10)
    journal.done(other.id, B, {"json": "y.json", "sr": "/out/y.sr.dcm"}, send_to="PACS@h:104", sr_uid="1.2.3")
    (send,) = journal.due_sends()
    assert (send.id, send.sr_path, send.sr_uid, send.destination, send.attempts) == (1, "/out/y.sr.dcm", "1.2.3",
                                                                                       "PACS@h:104", 0)
    journal.send_result(send.id, SendState.SUPERSEDED, "newer SR", 1)
    report = json.loads(json.dumps(journal.status()))
    assert list(report["inputs"].items()) == [("pending", 0), ("processing", 1), ("done", 1), ("failed", 0)]
    assert list(report["sends"].items()) == [("pending", 0), ("sent", 0), ("failed", 0), ("superseded", 1)]
    assert report["pending_retrying"] == {}  # x.dcm was claimed again: processing, not pending


def test_a_schema_1_journal_is_migrated_keeping_rows_ids_and_sends(tmp_path):
    path = tmp_path / "journal.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE inputs (id INTEGER PRIMARY KEY, relative TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt REAL NOT NULL DEFAULT 0, error TEXT, outputs TEXT, created REAL NOT NULL, updated REAL NOT NULL,
            UNIQUE (relative, sha256));
        CREATE TABLE sends (id INTEGER PRIMARY KEY, input_id INTEGER NOT NULL REFERENCES inputs (id), sr_path TEXT NOT NULL,
            destination TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt REAL NOT NULL DEFAULT 0, error TEXT, updated REAL NOT NULL, UNIQUE (input_id, destination));
        INSERT INTO inputs VALUES (7, 'x.dcm', '/old/cwd/inbox/x.dcm', 10, 1000, 'aaaa', 'done', 1, 0, NULL,
            '{"json": "x.json"}', 1, 1);
        -- schema 1 let a file written in chunks have several rows in flight
        INSERT INTO inputs VALUES (8, 'slow.dcm', 'slow.dcm', 5, 1000, 'bbbb', 'pending', 0, 0, NULL, NULL, 1, 1);
        INSERT INTO inputs VALUES (9, 'slow.dcm', 'slow.dcm', 9, 1001, 'cccc', 'processing', 0, 0, NULL, NULL, 1, 1);
        INSERT INTO sends VALUES (1, 7, 'x.sr.dcm', 'PACS@h:104', 'sent', 1, 0, NULL, 1);
    """)
    db.close()
    journal = Journal(path)
    try:
        row, older, newer = journal.all_inputs()
        assert (row.id, row.relative, row.state, row.outputs) == (7, "x.dcm", "done", {"json": "x.json"})
        assert (older.id, older.state, newer.id, newer.state) == (8, "failed", 9, "processing")  # one in flight
        assert journal.status()["sends"] == {"pending": 0, "sent": 1, "failed": 0, "superseded": 0}
        new, work = journal.offer("x.dcm", STAT, "aaaa")  # the old row still counts
        assert new.id == 7 and not work
    finally:
        journal.close()
    again = Journal(path)  # a second open does not migrate again
    assert again.status()["inputs"]["done"] == 1
    again.close()


def test_a_corrupt_journal_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "journal.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError, match="is corrupt"):
        Journal(path)


def test_a_locked_journal_is_named(tmp_path):
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(JournalError, match="locked"):  # after the busy timeout, not a hang
            Journal(path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_reader_creates_no_file_in_the_state_folder(tmp_path):
    path = tmp_path / "journal.sqlite3"
    writer = Journal(path)
    writer.offer("x.dcm", STAT, A)
    writer.close()  # the last connection: SQLite removes the WAL and its index
    before = sorted(p.name for p in tmp_path.iterdir())
    reader = Journal(path, readonly=True)
    assert reader.status()["inputs"]["pending"] == 1
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_watchdog_is_healthy_only_while_every_part_beats_and_lives():
    now = [100.0]
    dog = Watchdog(stale_after=10, clock=lambda: now[0])
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    dog.beat("main")
    dog.beat("intake")
    dog.watch_thread("listener", thread.is_alive)
    assert dog.unhealthy() == []
    now[0] += 11
    dog.beat("main")
    assert dog.unhealthy() == ["intake"]  # the intake made no progress for longer than stale_after
    dog.beat("intake")
    stop.set()
    thread.join()
    assert dog.unhealthy() == ["listener"]
