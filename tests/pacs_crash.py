"""Run inside a private network namespace (`unshare --net`): SIGKILL `cxr-edge watch --send-to`
mid-batch, restart it, and count the SRs that reach a real Orthanc per source study.

Every source must end with exactly one SR in Orthanc: recovery queues the sends of inputs that
were complete when the daemon died, and an SR made or sent again carries the same SOP Instance
UID (so a re-send is the same instance to the PACS, never a second report).
usage: unshare --net python tests/pacs_crash.py WORKDIR DICOM...   (prints a JSON summary)
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_helpers import DaemonProcess, drop, signal_while_busy, wait_for  # noqa: E402
from pacs_roundtrip import (ORTHANC_DICOM, ORTHANC_HTTP, expected_heatmaps, heatmaps_in_orthanc, rest,  # noqa: E402
                            start_orthanc, stop, wait_port)

SOURCES = 20


def derived_sources(dicoms: list[Path], folder: Path) -> dict[str, Path]:
    """SOURCES DICOMs made from the samples, each its own study: {StudyInstanceUID: path}."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for i in range(SOURCES):
        ds = pydicom.dcmread(dicoms[i % len(dicoms)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"source{i:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        made[str(ds.StudyInstanceUID)] = path
    return made


def sends(journal: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5) as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM sends GROUP BY state").fetchall())


def main(workdir: Path, dicoms: list[Path]) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    workdir.mkdir(parents=True, exist_ok=True)
    orthanc = start_orthanc(workdir)
    daemons = []
    try:
        wait_port(ORTHANC_HTTP)
        wait_port(ORTHANC_DICOM)
        sources = derived_sources(dicoms, workdir / "sources")
        options = ("--send-to", f"ORTHANC@127.0.0.1:{ORTHANC_DICOM}", "--batch-size", "4")
        first = DaemonProcess(workdir, *options).start()
        daemons.append(first)
        journal = first.journal
        for path in sources.values():
            drop(path, first.inbox)
        # the daemon and its decode workers killed with inputs in flight, once 5 are done
        killed_at = Counter(r["state"] for r in signal_while_busy(first, signal.SIGKILL, done_at_least=5,
                                                                   total=SOURCES, to_group=True))
        sent_before = sends(journal).get("sent", 0)
        again = DaemonProcess(workdir, *options).start()
        daemons.append(again)
        wait_for(lambda: again.states() == {"done": SOURCES} and sends(journal) == {"sent": SOURCES},
                 timeout=300, what="every input done and every SR sent")
        assert again.stop() == 0
        srs = rest("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}})
        per_study = Counter(rest(f"/instances/{i}/simplified-tags")["StudyInstanceUID"] for i in srs)
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5) as db:
            attempts = db.execute("SELECT SUM(attempts) FROM sends").fetchone()[0]
        # heatmaps: every one the final records name is in Orthanc once, in its source's study
        expected, found = expected_heatmaps(workdir / "out"), heatmaps_in_orthanc()
        summary = {"sources": SOURCES, "done_when_killed": killed_at.get("done", 0),
                   "heatmaps_expected": len(expected), "heatmaps_in_orthanc": len(found),
                   "heatmaps_as_expected": found == expected,
                   "sent_when_killed": sent_before, "srs_in_orthanc": len(srs), "send_attempts": attempts,
                   "studies_with_one_sr": sum(1 for uid in sources if per_study.get(uid) == 1),
                   "studies_with_more": sorted(uid for uid, n in per_study.items() if n > 1),
                   "srs_outside_the_sources": sorted(set(per_study) - set(sources))}
        print(json.dumps(summary))
        ok = len(srs) == SOURCES and summary["studies_with_one_sr"] == SOURCES and found == expected
        return 0 if ok else 1
    finally:
        for daemon in daemons:
            if daemon.proc.poll() is None:
                os.killpg(daemon.proc.pid, signal.SIGKILL)
                daemon.proc.wait(30)
        stop(orthanc)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]))
