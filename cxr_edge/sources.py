"""Find the inputs: files as given, folders walked recursively in a stable order."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath

from .errors import CxrEdgeError
from .outputs import name_hash, output_stem, with_hash

# In folders, files are taken by these suffixes (or none: DICOM files often have no suffix).
# A file named explicitly on the command line is always taken.
IMAGE_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".png", ".jpg", ".jpeg", ""})
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".swp")
CLASH_MARKER = "-"  # two inputs that meet: `x.dcm`, `x-<hash of its absolute path>.dcm`


@dataclass(frozen=True)
class InputItem:
    path: Path  # absolute path to read
    relative: PurePath  # where its outputs go under --out (before sanitizing)


def is_candidate(path: Path) -> bool:
    name = path.name
    if name.startswith(".") or name.endswith(TEMP_SUFFIXES):
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES or name == "DICOMDIR"


def _walk(root: Path):
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            yield Path(folder) / name


def _tagged(name: str, digest: str) -> str:
    """`name` with CLASH_MARKER + digest before its suffix, not cut (output_stem cuts names)."""
    return with_hash(name, digest, marker=CLASH_MARKER, limit=len(name) + len(CLASH_MARKER) + len(digest))


def discover(inputs: list[str | Path]) -> tuple[list[InputItem], list[Path]]:
    """(items to process, files skipped in folders). Missing paths are a usage error.

    An item's relative path is the given file's name, or the given folder's name and the path
    below it. Two inputs that meet (`infer a/x.dcm b/x.dcm`, two folders named alike) keep their
    outputs apart: the later one's name gets `-` + the first 10 hex digits of the sha256 of its
    absolute path before its suffix (`x-<hash>.dcm`, `scans-<hash>/...`). Then no two items may
    share an output stem (`output_stem`); one that still would (two names that differ only in a
    way sanitizing hides, where a hashed name is taken already) gets the hash of its own absolute
    path on its file name. Case-insensitive output file systems are out of scope: there `A.png`
    and `a.png` still meet."""
    items, skipped = [], []
    tops: set[str] = set()  # first components taken by earlier inputs
    stems: set[PurePath] = set()  # output stems taken in this run
    for given in inputs:
        path = Path(given).absolute()
        try:
            exists, is_dir = path.exists(), path.is_dir()
        except OSError as exc:
            raise CxrEdgeError(f"input not usable: {given}: {exc.strerror or type(exc).__name__}") from exc
        if not exists:
            raise CxrEdgeError(f"input not found: {given}")
        name = Path(os.path.normpath(path)).name or "input"  # `..` names its folder, `/` is "input"
        top, n = name, 0
        while top in tops:
            top = _tagged(name, name_hash(path.as_posix() + (f"\n{n}" if n else "")))
            n += 1
        tops.add(top)
        if is_dir:
            found = []
            for file in _walk(path):
                (found if is_candidate(file) else skipped).append(file)
            pairs = [(file, PurePath(top, *file.relative_to(path).parts)) for file in found]
        else:
            pairs = [(path, PurePath(top))]
        items.extend(unique_items(pairs, stems))
    return items, skipped


def unique_items(pairs, stems: set[PurePath]):
    """InputItems for (file, relative) pairs whose output stems are unique among `stems` (updated):
    one that would meet a stem taken gets the hash of its absolute path on its file name."""
    for file, relative in pairs:
        unique, n = relative, 0
        while output_stem(unique) in stems:
            digest = name_hash(file.as_posix() + (f"\n{n}" if n else ""))
            unique = relative.with_name(_tagged(relative.name, digest))
            n += 1
        stems.add(output_stem(unique))
        yield InputItem(file, unique)
