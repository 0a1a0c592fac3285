"""`cxr-edge watch` under faults, as real processes: links, FIFOs and devices in the inbox, files
written in place slower than --settle, new bytes under an old name, two daemons, broken set-ups,
a full disk, a restart from elsewhere, and SIGHUP with broken packages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SAMPLES
from .daemon_helpers import DaemonProcess, drop, kill_leftovers, outputs, records, wait_for

pytestmark = pytest.mark.slow
PNG = SAMPLES / "nih" / "00000100_000.png"
PNG2 = SAMPLES / "nih" / "00001873_000.png"
DICOM = SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm"


@pytest.fixture(autouse=True)
def no_daemon_outlives_its_test():
    yield
    kill_leftovers()


def sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_links_fifos_and_devices_never_stall_the_intake(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(PNG2, outside / "secret.png")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "loop.dcm").symlink_to("loop.dcm")  # a symlink loop (ELOOP)
    (inbox / "dirloop").symlink_to(".")  # a folder loop
    os.mkfifo(inbox / "fifo.dcm")  # opening it would block for ever
    (inbox / "zero.dcm").symlink_to("/dev/zero")  # reading it never ends
    (inbox / "outside.png").symlink_to(outside / "secret.png")  # a link out of the inbox
    (inbox / "around").symlink_to(outside, target_is_directory=True)
    with open(os.path.join(os.fsencode(inbox), b"latin\xe9.png"), "wb") as f:  # a name that is not UTF-8
        f.write(PNG.read_bytes())
    daemon = DaemonProcess(tmp_path, env={"WATCHDOG_USEC": "1000000"}).start()
    os.mkfifo(inbox / "late.dcm")  # one more while it runs (an inotify event, not the scan)
    drop(PNG, daemon.inbox)
    refused = {"loop.dcm", "dirloop", "fifo.dcm", "zero.dcm", "outside.png", "around", "late.dcm", "latin\\xe9.png"}
    wait_for(lambda: daemon.states() == {"done": 1, "failed": len(refused)}, timeout=60, what="all entries journaled")
    rows = {r["relative"]: r for r in daemon.rows()}
    assert {name for name, r in rows.items() if r["state"] == "failed"} == refused
    for name in ("loop.dcm", "zero.dcm", "outside.png", "dirloop", "around"):
        assert rows[name]["error"].startswith("read: a symbolic link"), rows[name]
    assert rows["fifo.dcm"]["error"] == rows["late.dcm"]["error"] == "read: not a regular file (a FIFO, socket or device)"
    assert rows["latin\\xe9.png"]["error"] == "read: a file name that is not valid UTF-8 (not taken: rename it)"
    assert sha256(PNG2) not in {r["input"]["sha256"] for r in records(daemon.out)}  # nothing read through a link
    pings = daemon.notify.count("WATCHDOG=1")
    wait_for(lambda: daemon.notify.count("WATCHDOG=1") > pings + 1, timeout=10, what="watchdog pings to go on")
    drop(PNG2, daemon.inbox, "after.png")
    wait_for(lambda: daemon.states().get("done") == 2, what="a file after the bad entries")
    assert daemon.stop() == 0
    again = DaemonProcess(tmp_path).start()  # the start-up scan meets them all again: no stall, no new rows
    drop(PNG, again.inbox, "third.png")
    wait_for(lambda: again.states().get("done") == 3, what="a file after a restart")
    assert again.stop() == 0
    assert again.states() == {"done": 3, "failed": len(refused)}


class FakePacs:
    """A pynetdicom Storage SCP that counts what it receives, by SOP Instance UID."""

    def __init__(self):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import ComprehensiveSRStorage

        self.received: list[str] = []
        ae = AE(ae_title="FAKEPACS")
        ae.add_supported_context(ComprehensiveSRStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])

        def store(event):
            self.received.append(str(event.dataset.SOPInstanceUID))
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
        self.port = self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_file_written_in_place_slower_than_settle_is_one_input_one_output_one_send(tmp_path):
    pacs = FakePacs()
    try:
        daemon = DaemonProcess(tmp_path, "--send-to", f"FAKEPACS@127.0.0.1:{pacs.port}").start()  # --settle 0.5
        data = DICOM.read_bytes()
        target = daemon.inbox / "slow.dcm"
        with open(target, "wb") as f:  # 3 chunks, 1.5 s apart: each chunk settles and is offered
            for i in range(3):
                f.write(data[i * len(data) // 3: (i + 1) * len(data) // 3])
                f.flush()
                if i < 2:
                    first = wait_for(lambda: daemon.rows(), timeout=30, what="the partial file to be offered")
                    wait_for(lambda: daemon.rows()[0]["sha256"] == sha256(target), timeout=30,
                             what="the row to take the new bytes")
        wait_for(lambda: daemon.states() == {"done": 1}, timeout=60, what="the complete file done")
        wait_for(lambda: pacs.received, timeout=60, what="the SR at the PACS")
        assert daemon.stop() == 0  # the sender has finished: nothing more can arrive
        (row,) = daemon.rows()
        assert row["id"] == first[0]["id"] and row["sha256"] == sha256(DICOM)  # one row, the final bytes
        assert len(outputs(daemon.out)) == 1 and len(outputs(daemon.out, ".sr.dcm")) == 1
        (record,) = records(daemon.out)
        assert record["status"] == "ok" and record["input"]["sha256"] == sha256(DICOM)
        assert pacs.received == [record["outputs"]["sr"]["sop_instance_uid"]]  # one SR, sent once
    finally:
        pacs.close()


def test_new_bytes_with_the_same_name_size_and_mtime_are_a_new_input(tmp_path):
    import pydicom

    daemon = DaemonProcess(tmp_path).start()
    target = drop(DICOM, daemon.inbox, "study.dcm")
    wait_for(lambda: daemon.states() == {"done": 1}, what="the first version")
    first = records(daemon.out)[0]
    ds = pydicom.dcmread(DICOM)
    uid = str(ds.SOPInstanceUID)
    ds.SOPInstanceUID = uid[:-1] + ("1" if uid[-1] != "1" else "2")  # same length: same size
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert len(buffer.getvalue()) == target.stat().st_size
    before = target.stat()
    with open(target, "r+b") as f:  # rewritten in place, then its mtime set back
        f.write(buffer.getvalue())
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    wait_for(lambda: daemon.states() == {"done": 2}, what="the new bytes processed")
    assert daemon.stop() == 0
    (second,) = records(daemon.out)
    assert second["input"]["sha256"] == sha256(target) != first["input"]["sha256"]
    assert second["dicom"]["sop_instance_uid"] == ds.SOPInstanceUID


def test_a_second_daemon_on_the_same_state_folder_exits_2(tmp_path):
    first = DaemonProcess(tmp_path).start()
    second = DaemonProcess(tmp_path).launch()
    assert second.exited(60) == 2
    lines = second.text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: another cxr-edge watch (pid"), lines
    assert not second.notify.messages  # never READY
    drop(PNG, first.inbox)
    wait_for(lambda: first.states() == {"done": 1}, what="the first daemon still working")
    assert first.stop() == 0


def _corrupt_journal(root: Path) -> list[str]:
    state = root / "out" / ".cxr-edge"
    state.mkdir(parents=True)
    (state / "journal.sqlite3").write_bytes(b"\x00not a database" * 512)
    return []


def _state_under_a_file(root: Path) -> list[str]:
    (root / "blocker").write_text("a file where a folder should be")
    return ["--state-dir", str(root / "blocker" / "state")]


def _bad_model(root: Path) -> list[str]:
    package = root / "model"
    package.mkdir()
    (package / "manifest.json").write_text('{"format": "cxr-edge-model"}')
    return ["--model", str(package)]


@pytest.mark.parametrize("breaks, phrase", [
    (_corrupt_journal, "is corrupt"),
    (_state_under_a_file, "cannot write to"),
    (_bad_model, "model"),
])
def test_a_broken_setup_fails_before_ready_in_one_line(tmp_path, breaks, phrase):
    extra = breaks(tmp_path)
    daemon = DaemonProcess(tmp_path, *extra).launch()
    assert daemon.exited(120) == 2
    lines = daemon.text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and phrase in lines[0], lines
    assert not any("READY=1" in m for m in daemon.notify.messages)


def test_a_locked_journal_fails_before_ready_in_one_line(tmp_path):
    from cxr_edge.daemon.journal import Journal

    state = tmp_path / "out" / ".cxr-edge"
    state.mkdir(parents=True)
    Journal(state / "journal.sqlite3").close()
    holder = sqlite3.connect(state / "journal.sqlite3", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another program holding a write transaction
    try:
        daemon = DaemonProcess(tmp_path).launch()
        assert daemon.exited(120) == 2
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    lines = daemon.text().strip().splitlines()
    assert len(lines) == 1 and "is locked by another process" in lines[0], lines


def test_a_restart_from_another_working_directory_finds_its_pending_inputs(tmp_path):
    """The journal keeps paths relative to the inbox: a daemon started with relative paths from
    one folder, then from another, finds the same inputs (they used to fail as "vanished")."""
    from cxr_edge.daemon.journal import Journal, identity_of

    first = DaemonProcess(tmp_path, cwd=tmp_path)
    first.args[first.args.index(str(first.inbox))] = "inbox"
    first.args[first.args.index(str(first.out))] = "out"
    first.start()
    drop(PNG, first.inbox, "0.png")
    wait_for(lambda: first.states() == {"done": 1}, what="the first input")
    assert first.stop() == 0
    drop(PNG2, first.inbox, "1.png")  # journaled, then the daemon died before processing it
    journal = Journal(first.out / ".cxr-edge" / "journal.sqlite3")
    journal.offer("1.png", identity_of((first.inbox / "1.png").stat()), sha256(PNG2))
    journal.close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = DaemonProcess(tmp_path, cwd=elsewhere)
    again.args[again.args.index(str(again.inbox))] = "../inbox"
    again.args[again.args.index(str(again.out))] = "../out"
    again.start()
    wait_for(lambda: again.states() == {"done": 2}, what="the pending input done")
    assert again.stop() == 0
    assert len(again.rows()) == 2 and {r["input"]["sha256"] for r in records(again.out)} == {sha256(PNG), sha256(PNG2)}


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (the suite runs as root in CI) to fill up; unmounted whatever happens."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"needs to mount a tmpfs (root with CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        kill_leftovers()  # nothing may hold the mount
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(folder: Path) -> Path:
    """Fill the file system to the last byte."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_pauses_the_work_and_it_resumes_when_space_returns(tmp_path, tmpfs):
    daemon = DaemonProcess(tmp_path)
    daemon.out = tmpfs / "out"  # outputs and the journal on the small disk
    daemon.args[daemon.args.index(str(tmp_path / "out"))] = str(daemon.out)
    daemon.start()
    drop(PNG, daemon.inbox, "before.png")
    wait_for(lambda: daemon.states() == {"done": 1}, what="one done before the disk fills")
    filler = _fill(tmpfs)
    for i in range(4):
        drop(PNG2 if i % 2 else PNG, daemon.inbox, f"full{i}.png")
    # the daemon says it is waiting (the journal cannot be written, or outputs wait for space)
    wait_for(lambda: daemon.notify.count("STATUS=paused") or daemon.notify.count("waiting for a transient"),
             timeout=60, what="the daemon to report the full disk")
    assert daemon.proc.poll() is None
    filler.unlink()
    wait_for(lambda: daemon.states() == {"done": 5}, timeout=120, what="all done once space returned")
    assert daemon.stop() == 0
    assert len(outputs(daemon.out)) == 5 and all(r["status"] == "ok" for r in records(daemon.out))
    # the heatmaps written on the full disk: every one the records name, nothing half-written or unnamed
    named = {m["png"] for r in records(daemon.out) for m in r["outputs"]["heatmaps"]["maps"]}
    assert named and {str(p) for p in daemon.out.rglob("*.heatmap.*")} == named


def _copy_package(target: Path) -> Path:
    from cxr_edge.manifest import DEFAULT_PACKAGE

    shutil.copytree(DEFAULT_PACKAGE, target)
    return target


def _edit_manifest(package: Path, edit) -> None:
    path = package / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_sighup_with_a_broken_package_keeps_the_old_model_preprocessing_and_workers(tmp_path):
    package = _copy_package(tmp_path / "package")
    daemon = DaemonProcess(tmp_path, "--model", package).start()
    notified = daemon.notify

    def reload(expect_ready: int) -> None:
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: notified.count("READY=1") == expect_ready, timeout=60, what="the reload to end")

    def process(name: str) -> dict:
        drop(PNG, daemon.inbox, name)
        wait_for(lambda: (daemon.out / f"{name}.json").exists(), what=name)
        return json.loads((daemon.out / f"{name}.json").read_text())

    before = process("before.png")
    # 1: new preprocessing and an artifact that fails its sha256 check
    original = (package / "manifest.json").read_text()
    _edit_manifest(package, lambda m: m["preprocessing"].update(size=m["preprocessing"]["size"] + 14))
    artifact = next(p for p in package.rglob("*.onnx"))
    saved = artifact.read_bytes()
    artifact.write_bytes(saved[:-10] + b"0123456789")
    reload(2)
    assert notified.count("reload failed") == 1
    after_bad_sha = process("after_bad_sha.png")
    # 2: a manifest without calibration temperatures
    artifact.write_bytes(saved)
    (package / "manifest.json").write_text(original)
    _edit_manifest(package, lambda m: m["calibration"].pop("temperatures"))
    reload(3)
    assert notified.count("reload failed") == 2
    after_no_temps = process("after_no_temps.png")
    for record in (after_bad_sha, after_no_temps):  # the old model and preprocessing, the same answer
        assert record["model"] == before["model"]
        assert [f["probability"] for f in record["findings"]] == [f["probability"] for f in before["findings"]]
    # 3: a good package with a new version is taken
    (package / "manifest.json").write_text(original)
    _edit_manifest(package, lambda m: m.update(version="2.0-test"))
    reload(4)
    assert notified.count("reload failed") == 2
    assert process("after_good.png")["model"]["version"] == "2.0-test"
    assert daemon.proc.poll() is None and daemon.stop() == 0


def test_listener_leftovers_are_removed_at_start_and_nobody_elses(tmp_path):
    from cxr_edge.daemon import dicom_net

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    prefix = dicom_net.RECEIVING_PREFIX
    (inbox / f"{prefix}1.2.3.4.abcd.part").write_bytes(b"half an instance")
    (inbox / ".someone-else.dcm.part").write_bytes(b"another writer, mid-copy")
    daemon = DaemonProcess(tmp_path).start()
    assert not (inbox / f"{prefix}1.2.3.4.abcd.part").exists()
    assert (inbox / ".someone-else.dcm.part").exists()
    assert daemon.stop() == 0


def test_status_reads_a_stopped_daemons_journal_without_creating_files(tmp_path):
    daemon = DaemonProcess(tmp_path).start()
    drop(PNG, daemon.inbox)
    wait_for(lambda: daemon.states() == {"done": 1}, what="one done")
    assert daemon.stop() == 0
    state = daemon.out / ".cxr-edge"
    before = sorted(p.name for p in state.iterdir())
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "status", "--out", str(daemon.out), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["inputs"]["done"] == 1, proc.stderr
    assert sorted(p.name for p in state.iterdir()) == before
