"""The one atomic writer: every file cxr-edge leaves behind is whole or absent, also after a crash.

Write to a temp file in the same folder, fsync it, rename it over the target, fsync the folder
(without that last step a power cut can forget the rename). Folders (a model package) are
staged beside the target and renamed into place the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc; else set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | Callable[[BinaryIO], object], *,
                 temp_prefix: str | None = None, temp_suffix: str = ".part", sync_dir: bool = True) -> None:
    """Write `data` (bytes, or a function that writes to a binary file, e.g. torch.save) to
    `path` so that readers see the old file or the new one, never part of one. The temp file
    is `<temp_prefix><random><temp_suffix>` (default `.<name>.<random>.part`), created with
    O_EXCL (never through a link someone planted). `sync_dir=False` leaves the rename to the
    caller's next synced write in the same folder (one folder fsync for a set of files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}." if temp_prefix is None else temp_prefix
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=temp_suffix)
    try:
        # mkstemp makes 0600; give what open() would (0666 less the umask), so a site's UMask
        # (the unit sets 0027) decides who may read results that carry patient data (the SR).
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def sweep_temp_files(folder: str | Path) -> int:
    """Remove the temp files atomic_write leaves when its process is killed mid-write (`.<name>.<random>.part`
    anywhere under `folder`); the count. Only for a folder no one else is writing to (hold its lock)."""
    removed = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            if name.startswith(".") and name.endswith(".part"):
                Path(parent, name).unlink(missing_ok=True)
                removed += 1
    return removed


def strict_json(obj, **kwargs) -> str:
    """JSON as RFC 8259 defines it: NaN or Infinity raise ValueError instead of being written."""
    return json.dumps(obj, allow_nan=False, **kwargs)


def atomic_write_json(path: str | Path, obj, **kwargs) -> None:
    atomic_write(path, (strict_json(obj, indent=2, **kwargs) + "\n").encode())


def staging_dir(target: str | Path) -> Path:
    """An empty sibling folder to build `target` in (a leftover from a crash is cleared)."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_dir(staging: Path, target: str | Path, replace: bool = False) -> None:
    """Rename a finished staging folder to `target`. With `replace` an existing target is moved
    aside first and removed after: at every instant `target` is the old or the new folder (or,
    for the moment between two renames, absent), never half of one."""
    target = Path(target)
    for folder in (staging, *staging.rglob("*")):
        if folder.is_dir():
            fsync_dir(folder)
    old = None
    if replace and target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    staging.rename(target)  # fails if target exists (and is not an empty folder): nothing replaced
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
