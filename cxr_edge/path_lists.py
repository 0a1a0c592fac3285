"""Inputs from a list of paths (CSV or Parquet), as a site exports them from its archive.

Every entry is taken, as a file named on the command line is (a missing or unreadable one gets
an error record when it is read, not a usage error: one bad row of a million stops nothing).
Relative entries are read from ROOT (default: the list's folder). An entry's outputs go under
OUT at its path relative to ROOT, or at its absolute path without the leading `/` when it lies
outside ROOT: names that depend on the entry alone, so a re-run over a longer list finds the
outputs of the first one. The same file listed twice is read once.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path, PurePath

from .errors import CxrEdgeError
from .sources import InputItem, unique_items

DEFAULT_COLUMN = "path"


def read_path_column(list_file: Path, column: str = DEFAULT_COLUMN) -> list[str]:
    """The `column` of a .parquet or .csv file (a header row names the columns)."""
    try:
        if list_file.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            names = pq.read_schema(list_file).names
            if column not in names:
                raise CxrEdgeError(f"{list_file}: no column {column!r} (has: {', '.join(names)}); name it with --path-column")
            return [v for v in pq.read_table(list_file, columns=[column]).column(column).to_pylist()]
        with open(list_file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                raise CxrEdgeError(f"{list_file}: no column {column!r} in its header row "
                                   f"(has: {', '.join(reader.fieldnames or [])}); name it with --path-column")
            return [row[column] for row in reader]
    except CxrEdgeError:
        raise
    except ImportError as exc:
        raise CxrEdgeError(f"{list_file}: reading Parquet needs pyarrow (pip install 'cxr-edge[ray]')") from exc
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise CxrEdgeError(f"cannot read the path list {list_file}: {reason}") from exc


def output_relative(path: str, root: str) -> PurePath:
    """Where an entry's outputs go under OUT (path: absolute and normalized)."""
    if path == root or path.startswith(root.rstrip("/") + "/"):
        return PurePath(os.path.relpath(path, root))
    return PurePath(*PurePath(path).parts[1:])


def items_from_lists(list_files: list[str | Path], root: str | Path | None = None, column: str = DEFAULT_COLUMN,
                     stems: set | None = None) -> tuple[list[InputItem], int]:
    """(items, entries left out: blank or listed before). `stems`: output stems already taken
    (by the command line's inputs), updated."""
    stems = set() if stems is None else stems
    items, left_out, seen = [], 0, set()
    for given in list_files:
        list_file = Path(given)
        if not list_file.is_file():
            raise CxrEdgeError(f"path list not found: {given}")
        base = os.path.normpath(os.path.abspath(root if root is not None else list_file.parent))
        pairs = []
        for entry in read_path_column(list_file, column):
            if entry is None or not str(entry).strip():
                left_out += 1
                continue
            path = os.path.normpath(os.path.join(base, str(entry)))  # an absolute entry stays itself
            if path in seen:
                left_out += 1
                continue
            seen.add(path)
            pairs.append((Path(path), output_relative(path, base)))
        items.extend(unique_items(pairs, stems))
    return items, left_out
