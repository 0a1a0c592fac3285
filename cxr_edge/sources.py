"""Find the inputs: files as given, folders walked recursively in a stable order."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath

from .errors import CxrEdgeError

# In folders, files are taken by these suffixes (or none: DICOM files often have no suffix).
# A file named explicitly on the command line is always taken.
IMAGE_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".png", ".jpg", ".jpeg", ""})
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".swp")


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


def discover(inputs: list[str | Path]) -> tuple[list[InputItem], list[Path]]:
    """(items to process, files skipped in folders). Missing paths are a usage error."""
    items, skipped, used = [], [], set()
    for given in inputs:
        path = Path(given).absolute()
        if not path.exists():
            raise CxrEdgeError(f"input not found: {given}")
        if path.is_dir():
            base = PurePath(path.name or "input")
            found = []
            for file in _walk(path):
                (found if is_candidate(file) else skipped).append(file)
            pairs = [(file, base / file.relative_to(path)) for file in found]
        else:
            pairs = [(path, PurePath(path.name))]
        for file, relative in pairs:
            unique, n = relative, 2
            while unique in used:  # two inputs with the same folder name: keep outputs apart
                unique = PurePath(f"{relative.parts[0]}-{n}", *relative.parts[1:])
                n += 1
            used.add(unique)
            items.append(InputItem(file, unique))
    return items, skipped
