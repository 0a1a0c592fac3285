"""Output names: one output set per input, whatever the input names (issue #10 item 6).

Sanitizing a name to [A-Za-z0-9._-] maps many names to one (`a b.png`, `a_b.png`, `a\\nb.png`);
`output_stem` adds a hash of the original relative path whenever it changed a name, and
`discover` keeps two inputs that meet apart. Checked on the function, on `discover`, and on real
`cxr-edge infer` runs over real sample X-rays copied under colliding names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path, PurePath, PurePosixPath

import pytest

from cxr_edge.outputs import HASH_HEX, MARKER, OUTPUT_SUFFIXES, RUN_FILES, name_hash, output_stem
from cxr_edge.sources import discover

from .conftest import SAMPLES

NAME_MAX = 255
HASHED = re.compile(rf"^[A-Za-z0-9._-]+{re.escape(MARKER)}[0-9a-f]{{{HASH_HEX}}}(\.[A-Za-z0-9]+)?$")
PREFIX = "p" * 200

UNCHANGED = [
    "00000100_000.png", "a_b.dcm", "_.dcm", "IM-0001-0001.dcm", "DICOM", "scan.tar.gz",
    "1.2.840.113619.2.55.3.604688119.969.1268071029.320.dcm", "nih/00000100_000.png",
    "site-A/2024_01/study.1/IM0001", "x" * 200, "a..b.png", "a.json.png", "summary.jsonl",
]
TRICKY = [
    "a b.png", "a_b.png", "a\nb.png", "a\tb.png", "a  b.png", "a__b.png", "ä.png", "a\u0308.png", "_.png", "é.png",
    "e\u0301.png", "\udcff.png", "\udcfe.png", "b\udcff.png", "\ud800.png", ".png", "..png", ".hidden", "hidden",
    "..", "...", "a~b.png", "a_b.png.json", "a_b~" + name_hash("a b.png") + ".png",  # a real name dressed as a hashed one
    PREFIX + "q" * 46 + ".png", PREFIX + "q" * 47 + ".png", PREFIX + "r" * 46 + ".png", PREFIX, PREFIX + "s",
    "x y/1.png", "x_y/1.png", "x\ty/1.png", "x y/1 .png", "x_y/1_.png", "x y/z w/1.png", "x_y/z_w/1.png",
    PREFIX + "a/1.png", PREFIX + "b/1.png", "é/1.png", "_/1.png", ".git/1.png", "git/1.png",
    "a", "a.json/b", "a.sr.dcm/b", "a.json_/b", "summary.jsonl/1.png", "summary.jsonl_/1.png", "sub/summary.jsonl/1.png",
    "nih/00000100_000.png", "nih/00000100_000.png ", "NIH/00000100_000.png",
]


def output_files(stem: PurePath) -> list[PurePath]:
    return [stem.with_name(stem.name + suffix) for suffix in OUTPUT_SUFFIXES]


# --- output_stem: the rule ------------------------------------------------------------------------
@pytest.mark.parametrize("name", UNCHANGED)
def test_names_that_need_no_sanitizing_are_kept(name):
    assert output_stem(PurePath(name)) == PurePath(name)
    assert MARKER not in str(output_stem(PurePath(name)))


def test_changed_names_get_the_documented_hash_before_their_suffix():
    digest = hashlib.sha256(b"a b.dcm").hexdigest()[:10]
    assert output_stem(PurePath("a b.dcm")) == PurePath(f"a_b~{digest}.dcm")
    digest = hashlib.sha256("x y/ä.png".encode()).hexdigest()[:10]
    assert output_stem(PurePath("x y/ä.png")) == PurePath(f"x_y/_~{digest}.png")
    # undecodable bytes in a file name (Python's surrogateescape) are hashed as those bytes
    assert name_hash(os.fsdecode(b"in/\xff.dcm")) == hashlib.sha256(b"in/\xff.dcm").hexdigest()[:10]
    # a name cut to 200 characters keeps its suffix and the hash
    long = output_stem(PurePath("q" * 300 + ".dicom"))
    assert len(long.name) == 200 and long.name.endswith(".dicom") and HASHED.match(long.name)


def test_output_stem_is_pure_and_deterministic():
    for name in TRICKY + UNCHANGED:
        assert output_stem(PurePath(name)) == output_stem(PurePath(name)) == output_stem(PurePosixPath(name))
    # the same relative path as the daemon's journal stores it (a POSIX string) gives the same stem
    assert output_stem(PurePath("in box/a b.dcm")) == output_stem(PurePath(PurePath("in box", "a b.dcm").as_posix()))
    # computed in another process (another PYTHONHASHSEED): same answer, nothing depends on state
    code = ("import sys, json; from pathlib import PurePath; from cxr_edge.outputs import output_stem; "
            "print(json.dumps([str(output_stem(PurePath(n))) for n in json.loads(sys.stdin.read())]))")
    names = TRICKY + UNCHANGED
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(names), capture_output=True, text=True,
                          env={**os.environ, "PYTHONHASHSEED": "123"}, check=True)
    assert json.loads(proc.stdout) == [str(output_stem(PurePath(n))) for n in names]


def test_different_names_never_share_outputs():
    names = TRICKY + UNCHANGED
    stems = {name: output_stem(PurePath(name)) for name in names}
    assert len(set(stems.values())) == len(set(names)), "two inputs would share an output stem"
    files = {f for stem in stems.values() for f in output_files(stem)}
    folders = {parent for stem in stems.values() for parent in stem.parents if parent != PurePath(".")}
    assert not files & folders, "an output file would be a folder of another input's outputs"
    assert not {PurePath(run_file) for run_file in RUN_FILES} & (files | folders)
    for name, stem in stems.items():
        assert not stem.is_absolute() and ".." not in stem.parts
        assert all(not part.startswith(".") and re.fullmatch(r"[A-Za-z0-9._~-]+", part) for part in stem.parts)
        for f in output_files(stem):
            assert all(len(part.encode()) <= NAME_MAX for part in f.parts), (name, f)
        assert (MARKER in stem.name) == (stem != PurePath(name)), name
        if MARKER in stem.name:
            assert HASHED.match(stem.name), stem.name
            assert MARKER not in str(stem.parent)


# --- discover: two inputs that meet ------------------------------------------------------------------
def _png(path: Path, variant: int = 0) -> Path:
    """A real NIH sample X-ray at `path`, one pixel changed by `variant` (distinct bytes per copy)."""
    import cv2

    image = cv2.imread(str(SAMPLES / "nih" / "00000100_000.png"), cv2.IMREAD_UNCHANGED)
    image.flat[0] = (int(image.flat[0]) + variant) % 256
    ok, data = cv2.imencode(".png", image)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())
    return path


def test_discover_keeps_inputs_that_meet_apart(tmp_path):
    for folder in ("a", "b", "c"):
        (tmp_path / folder / "scans" / "sub").mkdir(parents=True)
        (tmp_path / folder / "x.dcm").write_bytes(b"x")
        (tmp_path / folder / "scans" / "sub" / "1.png").write_bytes(b"x")
        (tmp_path / folder / "scans" / "2.png").write_bytes(b"x")
    inputs = [tmp_path / "a" / "x.dcm", tmp_path / "b" / "x.dcm", tmp_path / "a" / "scans", tmp_path / "b" / "scans",
              tmp_path / "a" / "x.dcm"]  # the same file twice: still two output sets, not one overwritten
    items, _ = discover(inputs)
    relatives = [item.relative.as_posix() for item in items]
    hb, hscans = name_hash((tmp_path / "b" / "x.dcm").as_posix()), name_hash((tmp_path / "b" / "scans").as_posix())
    assert relatives[:3] == ["x.dcm", f"x-{hb}.dcm", "scans/2.png"]
    # the second `scans` folder is kept together under one hashed name
    assert relatives[4:6] == [f"scans-{hscans}/2.png", f"scans-{hscans}/sub/1.png"]
    assert relatives[6] == f"x-{name_hash((tmp_path / 'a' / 'x.dcm').as_posix())}.dcm"
    stems = [output_stem(item.relative) for item in items]
    assert len(set(stems)) == len(items) == 7
    assert discover(inputs)[0] == items  # stable from run to run


def test_discover_never_lets_two_items_share_a_stem(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "x y.png").write_bytes(b"x")
    (inbox / "x y.png").write_bytes(b"x")
    # a name made to look like what `x y.png` given a second time would become
    taken = f"x y-{name_hash((inbox / 'x y.png').as_posix())}.png"
    (other / taken).write_bytes(b"x")
    items, _ = discover([other / taken, other / "x y.png", inbox / "x y.png"])
    assert len({output_stem(item.relative) for item in items}) == 3


def test_discover_checks_the_output_stems_themselves(tmp_path, monkeypatch):
    """Even with a stem function that lets names meet (the old one, without the hash), no two
    items of one run share an output stem: the later one gets the hash of its absolute path."""
    from cxr_edge import sources
    from cxr_edge.outputs import sanitize_component

    monkeypatch.setattr(sources, "output_stem", lambda rel: PurePath(*(sanitize_component(p) for p in rel.parts)))
    for name in ("a b.png", "a_b.png", "a\nb.png"):
        (tmp_path / name).write_bytes(b"x")
    items, _ = discover([tmp_path])
    stems = [sources.output_stem(item.relative) for item in items]
    assert len(set(stems)) == 3
    assert [item.path.name for item in items] == ["a\nb.png", "a b.png", "a_b.png"]  # sorted
    assert stems == [PurePath(tmp_path.name, f"a_b{tag}.png") for tag in
                     ("", f"-{name_hash((tmp_path / 'a b.png').as_posix())}", f"-{name_hash((tmp_path / 'a_b.png').as_posix())}")]


# --- cxr-edge infer on real images with colliding names -------------------------------------------------
def colliding_inputs(root: Path) -> tuple[list[Path], dict[Path, str]]:
    """Real X-rays under names that sanitize alike; (command-line inputs, {file: expected relative path})."""
    inbox = root / "inbox"
    names = ["a b.png", "a_b.png", "a\nb.png", "ä.png", "_.png", "a~b.png", PREFIX + "q" * 46 + ".png",
             PREFIX + "q" * 47 + ".png", "x y/1.png", "x_y/1.png", "x.json/1.png", "00000100_000.png"]
    expected = {}
    for i, name in enumerate(names):
        expected[_png(inbox / name, i + 1)] = f"inbox/{name}"
    weird = _png(Path(os.fsdecode(os.fsencode(inbox) + b"/\xff.png")), 20)  # not UTF-8: bytes as they are
    expected[weird] = "inbox/" + weird.name
    summary_folder = _png(root / "run" / "summary.jsonl" / "1.png", 21)  # an input folder named like the run file
    expected[summary_folder] = "summary.jsonl/1.png"
    first, second = _png(root / "c1" / "x.png", 22), _png(root / "c2" / "x.png", 23)  # two inputs that meet
    expected[first] = "x.png"
    expected[second] = f"x-{name_hash(second.as_posix())}.png"
    return [inbox, summary_folder.parent, first, second], expected


def run_infer(inputs: list[Path], out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "infer", *map(str, inputs), "--out", str(out), "--json",
                           "--no-sr"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_infer_writes_one_output_set_per_input_whatever_the_names(tmp_path):
    inputs, expected = colliding_inputs(tmp_path / "in")
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    summary = run_infer(inputs, out1)
    assert summary["inputs"] == summary["succeeded"] == len(expected)

    jsons = sorted(p for p in out1.rglob("*.json"))
    assert len(jsons) == len(expected), [p.relative_to(out1).as_posix() for p in jsons]
    seen = set()
    for path in jsons:
        record = json.loads(path.read_text())
        source = Path(record["input"]["path"])
        assert source in expected and source not in seen, path
        seen.add(source)
        assert record["input"]["relative_path"] == expected[source]  # describes its own input...
        assert record["input"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()  # ...and its bytes
        stem = output_stem(PurePath(expected[source]))
        assert path.relative_to(out1) == stem.with_name(stem.name + ".json")
        assert all(len(os.fsencode(part)) <= NAME_MAX for part in path.relative_to(out1).parts)
    assert seen == set(expected)

    # names left unchanged by sanitizing are kept as they were
    assert (out1 / "inbox" / "00000100_000.png.json").is_file()
    assert (out1 / "inbox" / "a_b.png.json").is_file() and (out1 / "inbox" / "_.png.json").is_file()
    assert (out1 / "inbox" / "x_y" / "1.png.json").is_file() and (out1 / "x.png.json").is_file()
    # the run's own file is the run summary, not an input's folder
    lines = [json.loads(line) for line in (out1 / "summary.jsonl").read_text().splitlines()]
    assert len(lines) == len(expected) and {line["path"] for line in lines} == {str(p) for p in expected}
    assert sorted({line["outputs"]["json"] for line in lines}) == sorted(str(p) for p in jsons)

    # the same inputs give the same names on the next run
    run_infer(inputs, out2)
    names = lambda out: sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names(out1) == names(out2)
