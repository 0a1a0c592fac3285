"""No patient / study header value ever leaves the process.

A corpus of real radiographs (tests/privacy_corpus.py) whose every patient, study, series and
equipment attribute holds MARKER (valid values, malformed values, non-ASCII names, and the marker
inside malformed technical attributes) is run through `cxr-edge infer` and `cxr-edge watch`.
The marker must appear nowhere: not in stdout / stderr / logs (also at DEBUG), the JSON records,
summary.jsonl, the journal's raw database bytes, `cxr-edge status` (text and JSON), /metrics, or
any output file name, nor the heatmap PNGs. The DICOM outputs, the SR (*.sr.dcm) and the heatmap
Secondary Captures (*.heatmap.<finding>.dcm), are the ones allowed to carry patient attributes
(a PACS files them under the patient), so only those files are not searched.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from .conftest import SAMPLES
from .daemon_helpers import DaemonProcess, drop, kill_leftovers, wait_for
from .privacy_corpus import CANINE, EXPECT, MARKER, RSNA, build, markers_in

NEEDLE = MARKER.lower()


# --- helpers ---------------------------------------------------------------------------------------

def leaks(data: str | bytes, where: str) -> list[str]:
    """Every occurrence of the marker (case-insensitive), with ±80 characters of context."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data  # latin-1: one char per byte
    low, found, start = text.lower(), [], 0
    while (i := low.find(NEEDLE, start)) >= 0:
        context = text[max(0, i - 80): i + len(NEEDLE) + 80]
        found.append(f"{where}: …{context!r}…")
        start = i + 1
    return found


def leaks_in_tree(root: Path) -> list[str]:
    """The marker in any file name, or in the bytes of any file except the DICOM outputs."""
    found = []
    for path in sorted(root.rglob("*")):
        found += leaks(str(path.relative_to(root)), f"file name {path.relative_to(root)}")
        if path.is_file() and not is_dicom_output(path):
            found += leaks(path.read_bytes(), str(path.relative_to(root)))
    return found


def is_dicom_output(path: Path) -> bool:
    """An SR or a heatmap's Secondary Capture: filed under the patient, so it names the patient."""
    return path.name.endswith(".sr.dcm") or (".heatmap." in path.name and path.suffix == ".dcm")


def assert_no_leaks(found: list[str]) -> None:
    """Fail naming every place the marker reached (at most 3 hits shown per place)."""
    by_place: dict[str, list[str]] = {}
    for hit in found:
        by_place.setdefault(hit.split(": …", 1)[0], []).append(hit)
    shown = [f"{place}: {len(hits)} hit(s)\n  " + "\n  ".join(hits[:3]) for place, hits in by_place.items()]
    assert not found, f"{MARKER} left the process in {len(found)} place(s):\n" + "\n".join(shown)


def assert_srs_carry_the_marker(out: Path) -> None:
    """Positive control: the SRs (the one output allowed to) carry the patient's name, so the
    marker really went through the pipeline, and a search that finds nothing elsewhere means something."""
    srs = list(out.rglob("*.sr.dcm"))
    assert srs and any(NEEDLE.encode() in p.read_bytes().lower() for p in srs), "no SR carries the marker"


def _no_constants(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json(text: str, where: str):
    try:
        return json.loads(text, parse_constant=_no_constants)
    except ValueError as exc:
        raise AssertionError(f"{where} is not strict JSON: {exc}") from None


def plain_env() -> dict:
    """No TTY anywhere (pipes), plain log lines, and a wide console so rich never folds a word."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env.update(COLUMNS="400", TERM="dumb", NO_COLOR="1")
    return env


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_edge", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=plain_env(), timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus") / "studies"
    files = build(folder, {"rsna": SAMPLES / "dicom" / RSNA, "canine": SAMPLES / "dicom" / CANINE})
    assert [p.name for p in files] == list(EXPECT)
    return folder


def test_the_corpus_really_carries_the_marker(corpus):
    """Each file holds the marker where it should (dcmdump reads it), and no file name does."""
    from .conftest import need_tool

    need_tool("dcmdump")
    for path in sorted(corpus.iterdir()):
        assert NEEDLE not in path.name.lower()
        lines = "\n".join(markers_in(path))
        for keyword in ("PatientName", "PatientID", "PatientBirthDate" if "malformed" in path.name else "StudyID",
                        "AccessionNumber", "InstitutionName", "ReferringPhysicianName", "StudyDescription"):
            assert keyword in lines, f"{path.name}: {keyword} does not hold the marker"
    variant = {
        "rsna_malformed_patient.dcm": ("PatientBirthDate", "StudyTime", "PatientAge", "PatientSex", "StudyDate"),
        "rsna_bad_modality.dcm": ("Modality",),
        "canine_bad_photometric.dcm": ("PhotometricInterpretation",),
        "rsna_bad_window.dcm": ("WindowCenter", "WindowWidth"),
        "canine_bad_frames.dcm": ("NumberOfFrames",),
        "rsna_bad_uids.dcm": ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"),
        "canine_bad_transfer_syntax.dcm": ("TransferSyntaxUID",),
        "rsna_utf8_name.dcm": ("ISO_IR 192",),
        "canine_iso2022_name.dcm": ("ISO 2022 IR 87",),
    }
    for name, keywords in variant.items():
        text = "\n".join(markers_in(corpus / name)) + (corpus / name).read_bytes().decode("latin-1")
        for keyword in keywords:
            assert keyword in text, f"{name}: {keyword}"


# --- cxr-edge infer -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def infer_runs(corpus, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """`cxr-edge infer` on the corpus twice: at the default log level and at DEBUG (-v)."""
    runs = {}
    for level in ("info", "debug"):
        out = tmp_path_factory.mktemp(f"infer-{level}") / "out"
        verbose = ["-v"] if level == "debug" else []
        runs[level] = (cli(*verbose, "infer", str(corpus), "--out", str(out), "--json"), out)
    return runs


@pytest.mark.parametrize("level", ["info", "debug"])
def test_infer_never_lets_the_marker_out(infer_runs, level):
    proc, out = infer_runs[level]
    # 1: the corpus has refused files (each with its error record), never a usage error
    assert proc.returncode == 1, proc.stderr[-3000:]
    found = leaks(proc.stdout, "stdout") + leaks(proc.stderr, f"stderr ({level} log)") + leaks_in_tree(out)
    assert_no_leaks(found)
    assert_srs_carry_the_marker(out)
    summary = strict_json(proc.stdout, "stdout (--json summary)")
    assert summary["inputs"] == len(EXPECT)
    if level == "debug":
        assert " DEBUG " in proc.stderr, "the -v run did not log at DEBUG"


def test_infer_records_are_strict_json_and_refusals_name_the_attribute(infer_runs):
    _, out = infer_runs["info"]
    for path in out.rglob("*.json"):
        strict_json(path.read_text(), str(path))
    lines = [strict_json(line, "summary.jsonl") for line in (out / "summary.jsonl").read_text().splitlines()]
    assert len(lines) == len(EXPECT)
    records = {p.name.removesuffix(".json"): strict_json(p.read_text(), str(p)) for p in out.rglob("*.json")}
    assert set(records) == set(EXPECT)
    problems = []
    for name, expected in EXPECT.items():
        record = records[name]
        error = record.get("error") or {}
        if record["status"] == "error":
            reason = error.get("reason") or ""
            if not reason or not error.get("stage"):
                problems.append(f"{name}: error record without stage / reason: {error}")
            elif "unexpected" in reason.lower():
                problems.append(f"{name}: generic reason, names no attribute: {reason!r}")
        if expected == "ok":
            if record["status"] != "ok":
                problems.append(f"{name}: valid patient values but status {record['status']}: {error}")
            elif not Path(record["outputs"]["sr"]["path"]).is_file():
                problems.append(f"{name}: valid patient values but no SR: {record.get('sr_error')}")
        elif isinstance(expected, tuple):
            words = expected[1]
            if record["status"] != "error":
                problems.append(f"{name}: expected refusal, got status {record['status']}")
            elif not any(w in (error.get("reason") or "").lower() for w in words):
                problems.append(f"{name}: reason should name {' / '.join(words)}: {error.get('reason')!r}")
    assert not problems, "\n".join(problems)


# --- cxr-edge watch -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_daemon_outlives_its_test():
    yield
    kill_leftovers()


@pytest.mark.slow
def test_daemon_never_lets_the_marker_out(corpus, tmp_path, no_daemon_outlives_its_test):
    port = _free_port()
    daemon = DaemonProcess(tmp_path, "--metrics-port", port, "--max-attempts", "1", env=plain_env())
    daemon.args[3:3] = ["-v"]  # `cxr-edge -v watch …`: DEBUG logs
    daemon.start()
    for path in sorted(corpus.iterdir()):
        drop(path, daemon.inbox)  # copy under a temp name, then rename into the inbox

    def finished():
        states = daemon.states()
        return (sum(states.values()) == len(EXPECT) and not states.get("pending") and not states.get("processing")
                and states)

    states = wait_for(finished, timeout=120, what=f"all {len(EXPECT)} inputs done or failed")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    status_text = cli("status", "--out", str(daemon.out), timeout=60)
    status_json = cli("status", "--out", str(daemon.out), "--json", timeout=60)
    assert status_text.returncode == 0 and status_json.returncode == 0, status_text.stderr + status_json.stderr
    report = strict_json(status_json.stdout, "status --json")
    assert report["inputs"]["done"] + report["inputs"]["failed"] == len(EXPECT)
    # rsna_bad_uids.dcm: findings, no SR (its UIDs are invalid): done, counted apart, in the metrics
    assert report["done_without_sr"] >= 1, report
    assert "cxr_edge_sr_failures_total " in metrics, metrics
    journal_live = {p.name: p.read_bytes() for p in daemon.journal.parent.glob("journal.sqlite3*")}
    assert daemon.stop() == 0, daemon.text()[-3000:]

    found = leaks(daemon.text(), "daemon log (-v)") + leaks(metrics, "/metrics")
    found += leaks(status_text.stdout + status_text.stderr, "cxr-edge status")
    found += leaks(status_json.stdout + status_json.stderr, "cxr-edge status --json")
    for name, data in journal_live.items():  # while running (WAL not yet checkpointed) ...
        found += leaks(data, f"{name} (while running)")
    found += leaks_in_tree(daemon.out)  # ... and after SIGTERM: the journal, JSON, anything but SRs
    assert_no_leaks(found)
    assert_srs_carry_the_marker(daemon.out)
    assert " DEBUG " in daemon.text(), "the daemon did not log at DEBUG"
    assert states.get("done", 0) >= sum(1 for e in EXPECT.values() if e == "ok"), states
    for path in (p for p in daemon.out.rglob("*.json") if ".cxr-edge" not in p.parts):
        strict_json(path.read_text(), str(path))


def test_raster_metadata_and_folder_names_stay_inside(tmp_path):
    """PNG / JPEG carry text too (EXIF ImageDescription, PNG tEXt): it reaches no log line (at
    DEBUG). Folder names are often patients' names: `infer` names its inputs in its log and
    records (the user gave them), but a decoder's message does not carry them into a reason."""
    from PIL import Image, PngImagePlugin

    folder = tmp_path / "DOE_JOHN"
    folder.mkdir()
    with Image.open(SAMPLES / "nih" / "00001873_000.png") as image:
        gray = image.convert("L").resize((256, 256))
    exif = Image.Exif()
    exif[0x010E] = f"{MARKER} chest"  # ImageDescription
    gray.save(folder / "exif.jpg", "JPEG", exif=exif)
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", f"patient {MARKER}")
    gray.save(folder / "text.png", "PNG", pnginfo=text)
    (folder / "broken.png").write_bytes((folder / "text.png").read_bytes()[:200])
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "cxr_edge", "-v", "infer", str(folder), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=plain_env())
    assert done.returncode == 1, done.stderr[-3000:]  # broken.png is refused
    record = strict_json((out / folder.name / "broken.png.json").read_text(), "broken.png.json")
    assert record["error"]["reason"].startswith("corrupt or truncated PNG"), record
    assert "DOE_JOHN" not in record["error"]["reason"] and str(tmp_path) not in record["error"]["reason"]
    assert_no_leaks(leaks(record["error"]["reason"], "error reason") + leaks(done.stderr, "infer -v stderr")
                    + leaks(done.stdout, "infer stdout"))
