"""Run inside a private network namespace (`unshare --net`): Orthanc + cxr-edge watch + storescu.

Debian's Orthanc 1.10 binds 0.0.0.0 only, so it gets a namespace of its own where 0.0.0.0 is
loopback and nothing else. Sends real chest DICOMs to the daemon's SCP with dcmtk's storescu,
waits for the SRs to arrive in Orthanc, and prints a JSON summary. Exit 0 on success.
usage: unshare --net python tests/pacs_roundtrip.py WORKDIR DICOM...
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ORTHANC_HTTP, ORTHANC_DICOM, DAEMON_PORT = 8042, 4242, 11112


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"port {port} never opened")


def wait_for_failed_sends(journal: Path, count: int, timeout: float = 120.0) -> int:
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if journal.exists():
            with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5) as db:
                failed = db.execute("SELECT COUNT(*) FROM sends WHERE state = 'pending' AND attempts >= 1 "
                                    "AND error IS NOT NULL").fetchone()[0]
            if failed >= count:
                return failed
        time.sleep(0.1)
    raise SystemExit("the SR sends never failed while the PACS was down")


def rest(path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{ORTHANC_HTTP}{path}", data=data),
                                timeout=10) as response:
        return json.loads(response.read())


def expected_heatmaps(out: Path) -> dict[str, str]:
    """{SOP Instance UID: the source's Study Instance UID} of every heatmap the records name."""
    expected = {}
    for record_path in out.rglob("*.json"):
        record = json.loads(record_path.read_text())
        for entry in (record.get("outputs") or {}).get("heatmaps", {}).get("maps", []):
            expected[entry["sop_instance_uid"]] = record["dicom"]["study_instance_uid"]
    return expected


def heatmaps_in_orthanc() -> dict[str, str]:
    """{SOP Instance UID: Study Instance UID} of every Secondary Capture (Modality OT) in Orthanc."""
    found = {}
    for instance in rest("/tools/find", {"Level": "Instance", "Query": {"Modality": "OT"}}):
        tags = rest(f"/instances/{instance}/simplified-tags")
        found[tags["SOPInstanceUID"]] = tags["StudyInstanceUID"]
    return found


def write_orthanc_config(workdir: Path) -> Path:
    """Orthanc as the test PACS: AE ORTHANC, storing whatever it is sent, no HTTP auth (loopback
    of a private network namespace only)."""
    config = workdir / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "cxr-edge-test", "StorageDirectory": str(workdir / "orthanc-db"), "IndexDirectory": str(workdir / "orthanc-db"),
        "DicomAet": "ORTHANC", "DicomPort": ORTHANC_DICOM, "HttpPort": ORTHANC_HTTP, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False, "Plugins": [],
    }))
    return config


def start_orthanc(workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(["Orthanc", str(write_orthanc_config(workdir))], stdout=open(workdir / "orthanc.log", "w"),
                            stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(workdir: Path, dicoms: list[Path]) -> int:
    import pydicom

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from daemon_helpers import DaemonProcess

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    workdir.mkdir(parents=True, exist_ok=True)
    daemon = DaemonProcess(workdir, "--listen", f"CXREDGE@127.0.0.1:{DAEMON_PORT}", "--allow", "MODALITY",
                           "--send-to", f"ORTHANC@127.0.0.1:{ORTHANC_DICOM}")
    orthanc = None
    try:
        daemon.start()  # READY=1: its SCP listens
        intruder = subprocess.run(["storescu", "-aet", "INTRUDER", "-aec", "CXREDGE", "127.0.0.1", str(DAEMON_PORT),
                                   str(dicoms[0])], capture_output=True, text=True)
        sent = subprocess.run(["storescu", "--required", "-aet", "MODALITY", "-aec", "CXREDGE", "127.0.0.1", str(DAEMON_PORT),
                               *map(str, dicoms)], capture_output=True, text=True)
        if sent.returncode != 0:
            raise SystemExit(f"storescu failed: {sent.stderr}")
        # The PACS is down at first: the SR sends must wait in the journal and be retried.
        failed_sends = wait_for_failed_sends(workdir / "out" / ".cxr-edge" / "journal.sqlite3", len(dicoms))
        orthanc = start_orthanc(workdir)
        wait_port(ORTHANC_HTTP)
        sources = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in dicoms}
        deadline = time.monotonic() + 120
        srs = []
        while time.monotonic() < deadline and len(srs) < len(dicoms):
            srs = rest("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}})
            time.sleep(0.2)
        studies = {rest(f"/instances/{i}/simplified-tags")["StudyInstanceUID"] for i in srs}
        # the heatmaps (Secondary Captures) the records name, sent with the SRs: each in its source's study
        expected = expected_heatmaps(workdir / "out")
        deadline = time.monotonic() + 60
        found = {}
        while time.monotonic() < deadline and len(found) < len(expected):
            found = heatmaps_in_orthanc()
            time.sleep(0.2)
        print(json.dumps({"sent": len(dicoms), "srs_in_orthanc": len(srs), "sr_studies": sorted(studies),
                          "heatmaps_expected": len(expected), "heatmaps_in_orthanc": len(found),
                          "heatmaps_in_their_source_study": found == expected,
                          "source_studies": sorted(sources), "intruder_returncode": intruder.returncode,
                          "sends_failed_while_pacs_down": failed_sends,
                          "inbox_files": sorted(p.name for p in (workdir / "inbox").glob("*.dcm"))}))
        return 0 if len(srs) == len(dicoms) and studies == sources else 1
    finally:
        if daemon.proc is not None:
            daemon.stop()
        stop(orthanc)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]))
