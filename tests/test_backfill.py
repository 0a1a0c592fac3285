"""`cxr-edge backfill` on a real Ray cluster: a head started on loopback by these tests (2 CPUs,
token authentication), the command line as the driver. Same records as `infer`, resumable,
exactly one output set per input when a Ray worker is killed mid-run."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cxr_edge.labels import LABELS

from .conftest import SAMPLES
from .daemon_helpers import live_processes

pytest.importorskip("ray", reason="the ray extra (pip install 'cxr-edge[ray]')")
pq = pytest.importorskip("pyarrow.parquet", reason="the ray extra brings pyarrow")

MARKER = "CXR_EDGE_TEST_RAY"  # in the environment of every process of the test cluster


@dataclass
class Cluster:
    address: str
    env: dict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_processes(marker: str) -> list[int]:
    """Every live process of the test cluster (Ray's daemons and workers inherit its environment)."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for pid, _, _ in live_processes():
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


def _stop_cluster(marker: str) -> None:
    """`ray stop` would stop every Ray on the machine: stop only ours, and wait until it is gone."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 30)):
        for pid in _cluster_processes(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _cluster_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _cluster_processes(marker):
            return
    raise AssertionError(f"Ray processes outlived the test cluster: {_cluster_processes(marker)}")


@pytest.fixture(scope="module")
def cluster():
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    marker = secrets.token_hex(8)
    temp = tempfile.mkdtemp(prefix="cxr-ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, MARKER: marker, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_TMPDIR": temp, "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    try:
        subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp],
                       env=env, check=True, capture_output=True, timeout=180)
        yield Cluster(f"127.0.0.1:{port}", env)
    finally:
        _stop_cluster(marker)
        shutil.rmtree(temp, ignore_errors=True)


def backfill(cluster: Cluster, *args: str, rc: int | None = 0, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "backfill", *args, "--address", cluster.address, "--json"],
                          capture_output=True, text=True, timeout=600, env=env or cluster.env)
    if rc is not None:
        assert proc.returncode == rc, proc.stderr[-4000:]
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def records(out: Path) -> dict[str, dict]:
    return {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("*.json")}


def bad_inputs(folder: Path) -> None:
    """Files `infer` turns into error records, one per stage of failure."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    data = (SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (folder / "notes.dcm").write_text("this is a text file, not DICOM\n" * 20)
    (folder / "empty.png").write_bytes(b"")
    cv2.imwrite(str(folder / "thumbnail.png"), np.full((64, 64), 128, np.uint8))  # below --min-side


def test_same_records_as_local_infer(cluster, tmp_path):
    """Every record equal to `infer`'s: probabilities within 1e-6, the same positives and outputs,
    the same error records for bad inputs; a row per input in findings.parquet."""
    inputs = tmp_path / "inputs"
    shutil.copytree(SAMPLES, inputs / "samples")
    bad_inputs(inputs / "bad")
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "infer", str(inputs / "samples"), str(inputs / "bad"),
                           "--out", str(local)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = backfill(cluster, str(inputs / "samples"), str(inputs / "bad"), "--out", str(ray_out), rc=1)
    assert (summary["inputs"], summary["processed"], summary["failed"], summary["already_done"]) == (13, 13, 4, 0)

    expected, found = records(local), records(ray_out)
    assert set(found) == set(expected) and len(found) == 13
    worst = 0.0
    for name, want in expected.items():
        got = found[name]
        assert got["status"] == want["status"], name
        assert got["input"] == want["input"] and got["dicom"] == want["dicom"] and got["model"] == want["model"]
        if want["status"] == "ok":
            assert got["positive_findings"] == want["positive_findings"], name
            pairs = zip(want["findings"] + [want["no_finding"]], got["findings"] + [got["no_finding"]])
            worst = max(worst, *(abs(a["probability"] - b["probability"]) for a, b in pairs))
            assert bool(got["outputs"].get("sr")) == bool(want["outputs"].get("sr")), name
            assert [m["label"] for m in got["outputs"]["heatmaps"]["maps"]] == \
                [m["label"] for m in want["outputs"]["heatmaps"]["maps"]], name
        else:
            assert got["error"] == want["error"], name
    assert worst <= 1e-6
    # the same files, beside the summary each command writes
    local_files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()} - {"summary.jsonl"}
    ray_files = {p.relative_to(ray_out).as_posix() for p in ray_out.rglob("*") if p.is_file()}
    assert ray_files - {"findings.parquet", ".cxr-edge-backfill.lock"} == local_files

    table = pq.read_table(ray_out / "findings.parquet").to_pylist()
    assert [row["relative_path"] for row in table] == sorted(r["input"]["relative_path"] for r in expected.values())
    for row in table:
        record = found[row["relative_path"] + ".json"]
        assert row["status"] == record["status"] and row["sha256"] == record["input"]["sha256"]
        if record["status"] == "ok":
            assert row["positive_findings"] == record["positive_findings"]
            assert row[LABELS[1]] == next(f["probability"] for f in record["findings"] if f["label"] == LABELS[1])
            assert row["sop_instance_uid"] == (record["dicom"] or {}).get("sop_instance_uid")
            assert row["sr_path"] == record["outputs"].get("sr", {}).get("path")
        else:
            assert (row["error_stage"], row["error_reason"]) == (record["error"]["stage"], record["error"]["reason"])
            assert row[LABELS[1]] is None


def test_path_lists_and_a_rerun_that_only_does_what_is_left(cluster, tmp_path):
    """A CSV list (relative, absolute, missing and repeated entries); the second run hashes
    every input and redoes only the ones whose outputs are incomplete or whose bytes changed."""
    archive = tmp_path / "archive"
    shutil.copytree(SAMPLES / "nih", archive / "2019")
    shutil.copytree(SAMPLES / "dicom", archive / "2020")
    pngs = sorted(p.relative_to(archive).as_posix() for p in (archive / "2019").glob("*.png"))
    dicoms = sorted(str(p) for p in (archive / "2020").glob("*.dcm"))  # absolute entries
    listing = archive / "list.csv"
    listing.write_text("path,study\n" + "".join(f"{p},x\n" for p in [*pngs, *dicoms, pngs[0], "", "2021/missing.dcm"]))
    out = tmp_path / "out"

    first = backfill(cluster, "--list", str(listing), "--out", str(out), rc=1)
    assert (first["inputs"], first["failed"], first["skipped"]) == (10, 1, 2)  # the repeat and the blank row
    missing = json.loads((out / "2021" / "missing.dcm.json").read_text())
    assert missing["error"]["stage"] == "read" and "No such file" in missing["error"]["reason"]
    assert (out / "2019" / f"{Path(pngs[0]).name}.json").is_file()  # relative entries: named under the list's folder
    assert (out / "2020" / "rsna_cr_pa_jpeg_baseline_mono2.dcm.sr.dcm").is_file()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}

    # what a crash or a changed archive leaves: an SR gone, a file rewritten with other bytes
    (out / "2020" / "rsna_cr_pa_jpeg_baseline_mono2.dcm.sr.dcm").unlink()
    changed = archive / pngs[1]
    changed.write_bytes((archive / pngs[2]).read_bytes())
    second = backfill(cluster, "--list", str(listing), "--out", str(out), rc=1)
    assert (second["inputs"], second["processed"], second["already_done"]) == (10, 3, 7)  # the missing file is redone
    redone = {p for p, mtime in before.items() if p.stat().st_mtime_ns != mtime}
    assert {p.relative_to(out).as_posix() for p in redone} == {
        f"{pngs[1]}.json", "2020/rsna_cr_pa_jpeg_baseline_mono2.dcm.json", "2021/missing.dcm.json"}
    assert (out / "2020" / "rsna_cr_pa_jpeg_baseline_mono2.dcm.sr.dcm").is_file()
    assert json.loads((out / f"{pngs[1]}.json").read_text())["input"]["sha256"] == \
        json.loads((out / f"{pngs[2]}.json").read_text())["input"]["sha256"]  # the new bytes' record
    table = pq.read_table(out / "findings.parquet").to_pylist()
    assert len(table) == 10 and sum(row["from_earlier_run"] for row in table) == 7


def _ray_workers(title: str) -> list[int]:
    """Ray workers whose process title (Ray sets it to ray::<what it runs>) starts with `title`."""
    found = []
    for pid, _, _ in live_processes():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title.encode()):
                found.append(pid)
        except OSError:
            continue
    return found


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_worker_loses_nothing_and_duplicates_nothing(cluster, tmp_path):
    """SIGKILL the model replica once the first record is on disk, then a decode or write task:
    Ray restarts them and runs their blocks again; every input ends with exactly one output set."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for copy in range(8):
        for png in sorted((SAMPLES / "nih").glob("*.png")):
            shutil.copy(png, inbox / f"{png.stem}_{copy}.png")
        shutil.copy(SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm", inbox / f"rsna_{copy}.dcm")
    out = tmp_path / "out"
    driver = subprocess.Popen([sys.executable, "-m", "cxr_edge", "backfill", str(inbox), "--out", str(out),
                               "--address", cluster.address, "--block-rows", "4", "--json"],
                              env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: next(out.rglob("*.json"), None), 300, "the first record")
        actors = _ray_workers("ray::MapWorker(MapBatches(ModelStage))")
        assert len(actors) == 1
        os.kill(actors[0], signal.SIGKILL)
        done_at_kill = len(list(out.rglob("*.json")))
        tasks = _wait_for(lambda: _ray_workers("ray::MapBatches(write_outputs)")
                          or _ray_workers("ray::MapBatches(read_and_prepare)"), 300, "a decode or write task")
        os.kill(tasks[0], signal.SIGKILL)
        stdout, stderr = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 0, stderr[-4000:]
    assert done_at_kill < 56  # the replica died mid-run
    summary = json.loads(stdout)
    assert (summary["inputs"], summary["succeeded"], summary["failed"]) == (56, 56, 0)

    assert_one_output_set_each(out, 56)


def assert_one_output_set_each(out: Path, inputs: int) -> None:
    """Every input succeeded, and the folder holds exactly the files its records name: no second
    SR, no orphan heatmap, no temp file; one table row per input."""
    found = records(out)
    assert len(found) == inputs
    named = {"findings.parquet", ".cxr-edge-backfill.lock"}
    for name, record in found.items():
        assert record["status"] == "ok"
        named.add(name)
        named.update(Path(p).relative_to(out).as_posix() for p in [record["outputs"].get("sr", {}).get("path"),
                                                                    *_heatmap_files(record)] if p)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == named
    table = pq.read_table(out / "findings.parquet").column("relative_path").to_pylist()
    assert len(table) == len(set(table)) == inputs


def test_ctrl_c_then_a_rerun_completes_the_rest(cluster, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for copy in range(6):
        for png in sorted((SAMPLES / "nih").glob("*.png")):
            shutil.copy(png, inbox / f"{png.stem}_{copy}.png")
    out = tmp_path / "out"
    driver = subprocess.Popen([sys.executable, "-m", "cxr_edge", "backfill", str(inbox), "--out", str(out),
                               "--address", cluster.address, "--block-rows", "4"],
                              env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: next(out.rglob("*.json"), None), 300, "the first record")
        driver.send_signal(signal.SIGINT)
        _, stderr = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode != 0
    assert not (out / "findings.parquet").exists()  # written at the end of a whole run only
    done_before = len(records(out))
    summary = backfill(cluster, str(inbox), "--out", str(out))
    # a task the interrupted job had running may still have finished an input after the count
    assert summary["already_done"] >= done_before and summary["already_done"] + summary["processed"] == 36
    assert_one_output_set_each(out, 36)


def _heatmap_files(record: dict) -> list[str]:
    maps = (record["outputs"].get("heatmaps") or {}).get("maps") or []
    return [m[key] for m in maps for key in ("png", "dicom") if m.get(key)]


def test_a_second_backfill_on_the_same_output_folder_is_refused(tmp_path):
    """Two drivers would each redo the other's inputs: the folder's lock is taken before Ray starts."""
    from cxr_edge.backfill import LOCK_NAME
    from cxr_edge.daemon.state_lock import lock_folder

    out = tmp_path / "out"
    out.mkdir()
    fd = lock_folder(out, LOCK_NAME, "test", "test")
    try:
        proc = subprocess.run([sys.executable, "-m", "cxr_edge", "backfill", str(SAMPLES / "nih"), "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
    finally:
        os.close(fd)
    assert proc.returncode == 2
    assert "another cxr-edge backfill" in proc.stderr and "one backfill per output folder" in proc.stderr
    assert not (out / "findings.parquet").exists()
