"""Writing outputs safely: atomic files, sanitized names, the per-input JSON record."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path, PurePath

SCHEMA = "cxr-edge/findings"
SCHEMA_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_component(name: str) -> str:
    """One path component made of [A-Za-z0-9._-] only, never hidden, never '.' or '..'."""
    cleaned = _UNSAFE.sub("_", name).lstrip(".") or "_"
    return cleaned[:200]


def output_stem(relative: PurePath) -> PurePath:
    """Relative input path -> sanitized relative output stem (keeps the folder structure)."""
    return PurePath(*(sanitize_component(part) for part in relative.parts))


def _umask() -> int:
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        # mkstemp makes 0600; give what open() would (0666 less the umask), so a site's UMask
        # (the unit sets 0027) decides who may read results that carry patient data (the SR).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strict_json(obj, **kwargs) -> str:
    """JSON as RFC 8259 defines it: NaN or Infinity raise ValueError instead of being written."""
    return json.dumps(obj, allow_nan=False, **kwargs)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (strict_json(obj, indent=2, sort_keys=False) + "\n").encode())


def dicom_bytes(dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
