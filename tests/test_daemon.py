"""`cxr-edge watch` as a real process: exactly once through SIGKILL, slow writers, bad files,
SIGTERM, SIGHUP, systemd notify and metrics. The PACS round trip is in test_pacs.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
import urllib.request

import pytest

from .conftest import NIH_TINY64, SAMPLES
from .daemon_helpers import (DaemonProcess, drop, kill_leftovers, live_processes_in_group, outputs, records,
                             signal_while_busy, temp_files, wait_for)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def no_daemon_outlives_its_test():
    yield
    kill_leftovers()


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_burst_with_sigkill_then_restart_processes_every_file_exactly_once(tmp_path):
    images = sorted(NIH_TINY64.joinpath("images").glob("*.png"))[:200]
    daemon = DaemonProcess(tmp_path, "--batch-size", "8").start()
    for image in images:  # a burst: 200 files renamed into the inbox as fast as they can be copied
        drop(image, daemon.inbox)
    # the daemon killed while inputs are in flight, after at least 40 are done
    signal_while_busy(daemon, signal.SIGKILL, done_at_least=40, total=200)
    wait_for(lambda: not live_processes_in_group(daemon.proc.pid), timeout=15,
             what="the decode workers to exit after their daemon was killed")

    restarted = DaemonProcess(tmp_path, "--batch-size", "8").start()
    wait_for(lambda: restarted.states() == {"done": 200}, timeout=300, what="all 200 done after restart")
    assert restarted.stop() == 0

    jsons = outputs(restarted.out)
    assert len(jsons) == 200  # one per input, no duplicates under other names
    assert temp_files(restarted.out) == [] and temp_files(restarted.inbox) == []
    by_sha = {r["input"]["sha256"]: r for r in records(restarted.out)}
    assert set(by_sha) == {sha256(p) for p in images}  # every input, exactly once
    assert all(r["status"] == "ok" for r in by_sha.values())
    rows = restarted.rows()
    assert len(rows) == 200 and {r["state"] for r in rows} == {"done"}
    for row in rows:  # the journal agrees with the files
        assert json.loads(row["outputs"])["json"] in {str(p) for p in jsons}
        assert by_sha[row["sha256"]]["input"]["relative_path"] == row["relative"]


def test_a_file_written_slowly_is_not_taken_before_it_is_complete(tmp_path):
    source = SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm"
    data = source.read_bytes()
    daemon = DaemonProcess(tmp_path, "--settle", "3.0").start()
    target = daemon.inbox / "slow.dcm"
    chunks = 6
    with open(target, "wb") as f:  # written in place, in chunks, pausing far less than --settle
        for i in range(chunks):
            f.write(data[i * len(data) // chunks : (i + 1) * len(data) // chunks])
            f.flush()
            time.sleep(0.4)
            assert outputs(daemon.out) == [] and daemon.states() == {}, "taken while still being written"
    record_path = wait_for(lambda: outputs(daemon.out), timeout=60, what="the slow file's outputs")[0]
    record = json.loads(record_path.read_text())
    assert record["status"] == "ok" and record["input"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert len(outputs(daemon.out, ".sr.dcm")) == 1
    # outputs are written before the journal marks the input done
    wait_for(lambda: daemon.states() == {"done": 1}, timeout=30, what="the journal to mark it done")
    assert daemon.stop() == 0


def test_bad_files_get_error_records_and_do_not_stop_the_daemon(tmp_path):
    from pydicom.data import get_testdata_file

    daemon = DaemonProcess(tmp_path).start()  # the default --max-attempts: permanent failures are not retried
    good = SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.dcm").write_text("not an image\n" * 10)
    (bad / "empty.dcm").write_bytes(b"")
    (bad / "cut.dcm").write_bytes(good.read_bytes()[:3000])
    shutil.copy(get_testdata_file("CT_small.dcm"), bad / "ct.dcm")
    for path in sorted(bad.iterdir()):
        target = drop(path, daemon.inbox)
        os.utime(target, (time.time() - 3600,) * 2)  # old: a cut file is not still arriving
    drop(SAMPLES / "nih" / "00000100_000.png", daemon.inbox)
    wait_for(lambda: sum(daemon.states().values()) == 5 and daemon.states().get("pending", 0) == 0
             and daemon.states().get("processing", 0) == 0, timeout=120, what="all five finished")
    assert daemon.states() == {"done": 1, "failed": 4}
    assert {r["retries"] for r in daemon.rows() if r["state"] == "failed"} == {0}  # tried once, never again
    assert {r["error_kind"] for r in daemon.rows() if r["state"] == "failed"} == {"permanent", "incomplete"}
    reasons = {r["input"]["relative_path"]: r["error"]["reason"] for r in records(daemon.out) if r["status"] == "error"}
    assert "not a DICOM file" in reasons["notes.dcm"] and "empty file" in reasons["empty.dcm"]
    assert "truncated" in reasons["cut.dcm"] and "modality CT" in reasons["ct.dcm"]
    assert daemon.proc.poll() is None  # still serving
    drop(SAMPLES / "nih" / "00001873_000.png", daemon.inbox)
    wait_for(lambda: daemon.states().get("done") == 2, what="a good file after the bad ones")
    assert daemon.stop() == 0


def test_sigterm_drains_the_batch_and_exits_0(tmp_path):
    images = sorted(NIH_TINY64.joinpath("images").glob("*.png"))[200:240]
    daemon = DaemonProcess(tmp_path).start()
    for image in images:
        drop(image, daemon.inbox)
    at_sigterm = signal_while_busy(daemon, signal.SIGTERM, done_at_least=5, total=len(images))
    in_flight = {r["id"] for r in at_sigterm if r["state"] == "processing"}
    assert daemon.proc.wait(120) == 0  # the limit only guards against a hang
    assert daemon.notify.count("STOPPING=1") == 1
    rows = {r["id"]: r for r in daemon.rows()}
    assert {rows[i]["state"] for i in in_flight} == {"done"}  # the in-flight work was finished, not abandoned
    assert "processing" not in {r["state"] for r in rows.values()}
    assert temp_files(daemon.out) == []
    done = [r for r in rows.values() if r["state"] == "done"]
    assert sorted(json.loads(r["outputs"])["json"] for r in done) == [str(p) for p in outputs(daemon.out)]
    for record in records(daemon.out):  # every output complete
        assert record["status"] == "ok" and len(record["findings"]) == 14
    daemon.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_systemd_notify_watchdog_metrics_and_sighup_reload(tmp_path):
    port = _free_port()
    daemon = DaemonProcess(tmp_path, "--metrics-port", port, env={"WATCHDOG_USEC": "1000000"}).start()
    notified = daemon.notify
    wait_for(lambda: notified.count("WATCHDOG=1"), timeout=30, what="WATCHDOG=1")
    drop(SAMPLES / "nih" / "00000100_000.png", daemon.inbox)
    wait_for(lambda: daemon.states().get("done") == 1, what="one done")
    wait_for(lambda: notified.count("STATUS=done 1"), timeout=30, what="STATUS with the count")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in ('cxr_edge_inputs_total{result="ok"} 1.0', "cxr_edge_stage_seconds_bucket", "cxr_edge_queue_depth",
                 "cxr_edge_batch_size_count"):
        assert name in metrics, name
    daemon.proc.send_signal(signal.SIGHUP)  # sd_notify's reload protocol: RELOADING=1, then READY=1
    wait_for(lambda: notified.count("RELOADING=1") and notified.count("READY=1") == 2, timeout=60, what="the reload")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'cxr_edge_reloads_total{result="ok"} 1.0' in metrics
    drop(SAMPLES / "nih" / "00001873_000.png", daemon.inbox)
    wait_for(lambda: daemon.states().get("done") == 2, what="a file after the reload")
    assert daemon.stop() == 0
    assert any("STOPPING=1" in m for m in notified.messages)


def test_status_command_reads_the_journal(tmp_path):
    daemon = DaemonProcess(tmp_path).start()
    drop(SAMPLES / "nih" / "00000100_000.png", daemon.inbox)
    (tmp_path / "junk.dcm").write_text("junk")
    drop(tmp_path / "junk.dcm", daemon.inbox)
    wait_for(lambda: daemon.states() == {"done": 1, "failed": 1}, what="one done, one failed")
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "status", "--out", str(daemon.out), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["inputs"]["done"] == 1 and status["inputs"]["failed"] == 1
    assert "not a DICOM file" in status["last_errors"][0]["error"]
    assert daemon.stop() == 0
    # the same file again (same name, same bytes, new mtime) is not processed twice, even after a restart
    os.utime(daemon.inbox / "00000100_000.png")
    (row,) = [r for r in daemon.rows() if r["relative"] == "00000100_000.png"]
    again = DaemonProcess(tmp_path).start()
    # the start-up scan hashes it (its stat changed) and records the new stat on the done row
    mtime = (daemon.inbox / "00000100_000.png").stat().st_mtime_ns
    wait_for(lambda: [r["mtime_ns"] for r in again.rows() if r["id"] == row["id"]] == [mtime], what="the scan to see it")
    assert again.stop() == 0
    assert again.states() == {"done": 1, "failed": 1} and len(outputs(again.out)) == 2


def test_recovery_keeps_an_sr_failure_on_record(tmp_path):
    """Killed after writing the findings of a source that can have no SR (invalid UID), before
    journaling them: the restart finds the outputs complete, marks the input done and keeps the
    SR's failure, so `status` still counts it as done without an SR (and nothing is sent)."""
    from cxr_edge.backends import create_backend
    from cxr_edge.daemon.journal import Journal, identity_of
    from cxr_edge.daemon.service import Daemon, DaemonConfig
    from cxr_edge.manifest import ModelPackage
    from cxr_edge.pipeline import Pipeline
    from cxr_edge.prepare import file_sha256
    from cxr_edge.sources import InputItem

    from . import realworld_corpus

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    source = realworld_corpus._edited(realworld_corpus.RSNA, inbox / "a.dcm", SOPInstanceUID="1.2.03.abc")
    package = ModelPackage.load()
    with create_backend(package, threads=1) as backend:
        (result,) = Pipeline(package, backend, out, workers=1).run([InputItem(source, source.relative_to(inbox))])
    assert result.status == "ok" and result.record.sr_error.stage == "sr"
    (tmp_path / "state").mkdir()
    journal = Journal(tmp_path / "state" / "journal.sqlite3")
    journal.offer("a.dcm", identity_of(source.stat()), file_sha256(source)[0])
    (row,) = journal.claim_due(1)  # "processing" when the process died
    daemon = Daemon(DaemonConfig(inbox=inbox, out=out, state_dir=tmp_path / "state"))
    daemon.journal = journal
    daemon._recover()
    report = journal.status()
    journal.close()
    assert report["inputs"]["done"] == 1 and report["done_without_sr"] == 1, report
    assert report["last_errors"][0]["error"].startswith("sr: source SOP Instance UID (0008,0018)"), report
    assert report["sends"] == {"pending": 0, "sent": 0, "failed": 0, "superseded": 0}


def test_an_input_the_daemon_died_on_three_times_is_failed_not_taken_again(tmp_path):
    """A poison input (the daemon is killed or OOM-killed each time it takes it) must not block
    the queue in a restart loop: after three claims that never finished, recovery fails it."""
    from cxr_edge.daemon.journal import Journal
    from cxr_edge.daemon.service import POISON_CLAIMS, Daemon, DaemonConfig

    (tmp_path / "state").mkdir()
    journal = Journal(tmp_path / "state" / "journal.sqlite3")
    row, _ = journal.offer("poison.dcm", (1, 1, 1, 1), "a" * 64)
    journal.offer("next.dcm", (1, 1, 1, 2), "b" * 64)
    daemon = Daemon(DaemonConfig(inbox=tmp_path / "inbox", out=tmp_path / "out", state_dir=tmp_path / "state"))
    daemon.journal = journal
    for _ in range(POISON_CLAIMS):
        assert [r.relative for r in journal.claim_due(1)] == ["poison.dcm"]  # oldest first: always the poison
        daemon._recover_in_flight()  # the daemon died; the restart recovers
    (poison, following) = journal.all_inputs()
    assert poison.state == "failed" and f"stopped {POISON_CLAIMS} times" in poison.error
    assert [r.relative for r in journal.claim_due(1)] == ["next.dcm"]  # the queue moves on
    journal.close()


def test_a_send_whose_sr_was_replaced_or_removed_is_not_retried_for_ever(tmp_path):
    import pydicom

    from cxr_edge.daemon.service import Daemon, DaemonConfig

    daemon = Daemon(DaemonConfig(inbox=tmp_path / "inbox", out=tmp_path / "out", state_dir=tmp_path / "state"))
    sr = tmp_path / "x.sr.dcm"
    dataset = pydicom.Dataset()
    dataset.SOPInstanceUID = "1.2.3.4"
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dataset.save_as(sr, enforce_file_format=True)
    assert daemon._send_one([(sr, "1.2.3.5")], "PACS@127.0.0.1:1") == ("superseded", "a newer version of the input "
                                                                                        "replaced the SR")
    state, problem = daemon._send_one([(tmp_path / "gone.sr.dcm", "1.2.3.4")], "PACS@127.0.0.1:1")
    assert state == "failed" and "gone" in problem and str(tmp_path) not in problem
    # a heatmap sent with the SR: gone or replaced, the whole send stops
    state, problem = daemon._send_one([(sr, "1.2.3.4"), (tmp_path / "x.heatmap.mass.dcm", "1.2.9")], "PACS@127.0.0.1:1")
    assert (state, problem) == ("failed", "a heatmap file is gone")
    state, problem = daemon._send_one([(sr, "1.2.3.4")], "PACS@127.0.0.1:1")  # nobody listens: retried later
    assert state == "pending" and str(tmp_path) not in problem


def test_recovery_queues_the_heatmaps_with_the_sr_and_removes_orphans(tmp_path):
    """Killed after writing an input's outputs (SR and heatmaps), before journaling them: the
    restart finds them complete and queues one send of all its DICOM objects, SR first. Killed
    before its JSON: the maps written so far are removed (the redo writes them again)."""
    from cxr_edge.backends import create_backend
    from cxr_edge.daemon.dicom_net import Peer
    from cxr_edge.daemon.journal import Journal, identity_of
    from cxr_edge.daemon.service import Daemon, DaemonConfig
    from cxr_edge.manifest import ModelPackage
    from cxr_edge.pipeline import Pipeline
    from cxr_edge.prepare import file_sha256
    from cxr_edge.sources import InputItem

    from .conftest import SAMPLES

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    source = inbox / "a.dcm"
    source.write_bytes((SAMPLES / "dicom" / "canine_thorax_dx_mono1_small.dcm").read_bytes())
    package = ModelPackage.load()
    with create_backend(package, threads=1) as backend:
        (result,) = Pipeline(package, backend, out, workers=1, heatmaps=True).run(
            [InputItem(source, source.relative_to(inbox))])
    maps = result.record.outputs["heatmaps"]["maps"]
    assert result.status == "ok" and maps, "the canine sample flags nothing: nothing to test"
    (tmp_path / "state").mkdir()
    journal = Journal(tmp_path / "state" / "journal.sqlite3")
    journal.offer("a.dcm", identity_of(source.stat()), file_sha256(source)[0])
    journal.claim_due(1)  # "processing" when the process died
    daemon = Daemon(DaemonConfig(inbox=inbox, out=out, state_dir=tmp_path / "state", send_to=Peer.parse("PACS@h:104")))
    daemon.journal = journal
    daemon._recover()
    (send,) = journal.due_sends()
    assert send.objects == ((result.record.sr["path"], result.record.sr["sop_instance_uid"]),
                            *((m["dicom"], m["sop_instance_uid"]) for m in maps))
    # now as if it died before the JSON: the record is gone, its maps are orphans
    Path(result.outputs["json"]).unlink()
    stray = out / "a.dcm.heatmap.hernia.png"  # and one from nobody's record
    stray.write_bytes(b"x")
    row = journal.all_inputs()[0]
    daemon._remove_orphans(row)
    assert not [p for p in out.iterdir() if ".heatmap." in p.name or p.name.endswith(".sr.dcm")]
    journal.close()
