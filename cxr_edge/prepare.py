"""Worker-side preparation: read, hash, decode and preprocess one input into a model tensor.

Runs in the worker processes of `workers.WorkerPool`; everything here must be picklable and
must never raise for a bad input: a failure becomes `Prepared.error` at the stage it happened.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import PERMANENT, TRANSIENT, UNEXPECTED, InputError, os_error_kind
from .sources import InputItem


@dataclass
class Prepared:
    """What a worker hands back: the model input, or the error that stopped it."""

    item: InputItem
    tensor: np.ndarray | None = None
    format: str | None = None
    info: dict = field(default_factory=dict)
    dicom_header: object | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    timings_ms: dict = field(default_factory=dict)
    started_at: float | None = None  # perf_counter (CLOCK_MONOTONIC: the same clock in every process)
    display: np.ndarray | None = None  # uint8 (h, w), the image shrunk for heatmaps (asked for only)
    source_shape: tuple[int, int] | None = None  # the decoded image's (rows, columns)
    error: dict | None = None  # {"stage", "reason", "kind"} (kinds: cxr_edge.errors)
    earlier: object | None = None  # the record an earlier run left for the same bytes (not decoded again)


def file_identity(info: os.stat_result) -> tuple[int, ...]:
    """What changes when a file's bytes may have: another file in its place, a write, a truncation."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def file_sha256(path: Path, follow_symlinks: bool = True) -> tuple[str, int, tuple[int, ...]]:
    """(sha256, size of what was hashed, the file's identity when it was opened). Without
    `follow_symlinks` a symbolic link is refused (ELOOP) and only a regular file is read: opened
    non-blocking, so a FIFO put in its place cannot hang the reader."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW | os.O_NONBLOCK)
    with open(os.open(path, flags), "rb") as f:
        info = os.fstat(f.fileno())
        if not follow_symlinks and not stat.S_ISREG(info.st_mode):
            raise InputError("read", "not a regular file (a FIFO, socket or device)")
        digest = hashlib.file_digest(f, "sha256")
        return digest.hexdigest(), f.tell(), file_identity(info)


def require_unchanged(path: Path, identity: tuple[int, ...], follow_symlinks: bool) -> None:
    """The decoders open the file again by path: if it changed since it was hashed (a writer
    still at work, a new file renamed over it), the pixels may not be the hashed bytes, and a
    result filed under that hash would be another file's. Transient: read again later."""
    try:
        now = file_identity(os.stat(path, follow_symlinks=follow_symlinks))
    except OSError as exc:
        raise InputError("read", f"cannot read file: {exc.strerror}", os_error_kind(exc)) from exc
    if now != identity:
        raise InputError("read", "the file changed while it was being read", TRANSIENT)


def inbox_entry_refusal(path: Path, info, root: Path) -> str | None:
    """Why the service must not read an inbox entry (`info`: its lstat), or None: only a regular
    file reached without any symbolic link, inside the inbox (no link out of or around it)."""
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        return "a symbolic link (not followed: deliver regular files into the inbox)"
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if not stat.S_ISREG(mode):
        return "not a regular file (a FIFO, socket or device)"
    real_root = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(path.parent), real_root]) != real_root:
        return "reached through a symbolic link to a folder outside the inbox (not followed)"
    return None


def confined_regular_file(path: Path, root: Path) -> None:
    """The worker's side of inbox_entry_refusal: the entry may have changed since the intake."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise InputError("read", f"cannot read file: {exc.strerror}", os_error_kind(exc)) from exc
    refusal = inbox_entry_refusal(path, info, root)
    if refusal is not None:
        raise InputError("read", refusal)


def display_image(pixels: np.ndarray, side: int) -> np.ndarray:
    """The decoded image (float [0, 1], 1 = bright) as uint8, its longer side `side` pixels:
    what heatmaps are drawn on, small enough to travel between processes, large enough for
    their caption to be read."""
    import cv2

    h, w = pixels.shape
    scale = side / max(h, w)
    if scale != 1.0:
        interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
        pixels = cv2.resize(pixels, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interpolation)
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def prepare(item: InputItem, params, max_pixels: int, min_side: int = 0, confine: Path | None = None,
            display_side: int = 0, earlier=None) -> Prepared:
    """Hash, decode, preprocess one input. With `confine` (the service's inbox) symbolic links
    are not followed and the file must lie inside it; with `display_side`, a small copy of the
    image is kept for heatmaps. With `earlier` (a resumed backfill), `earlier(item, sha256)` is
    asked once the bytes are hashed: what it returns (the record of complete outputs an earlier
    run made from the same bytes) goes to `Prepared.earlier`, and the input is not decoded."""
    from .decode import decode_file, require_regular_file
    from .preprocess import preprocess

    prepared = Prepared(item, started_at=time.perf_counter())
    try:
        t0 = prepared.started_at  # decode includes reading and hashing the file
        if confine is not None:
            confined_regular_file(item.path, confine)
        require_regular_file(item.path)  # before hashing: a FIFO would block the worker for ever
        prepared.sha256, prepared.size_bytes, identity = file_sha256(item.path, follow_symlinks=confine is None)
        if earlier is not None:
            prepared.earlier = earlier(item, prepared.sha256)
            if prepared.earlier is not None:
                return prepared
        decoded = decode_file(item.path, max_pixels=max_pixels, min_side=min_side)
        require_unchanged(item.path, identity, follow_symlinks=confine is None)
        t1 = time.perf_counter()
        prepared.tensor = preprocess(decoded.pixels, params)
        prepared.source_shape = tuple(decoded.pixels.shape)
        if display_side:
            prepared.display = display_image(decoded.pixels, display_side)
        t2 = time.perf_counter()
    except InputError as exc:
        prepared.error = {"stage": exc.stage, "reason": exc.reason, "kind": exc.kind}
        return prepared
    except OSError as exc:
        prepared.error = {"stage": "read", "reason": f"cannot read file: {exc.strerror or exc}",
                          "kind": os_error_kind(exc)}
        return prepared
    except MemoryError:
        prepared.error = {"stage": "decode", "reason": "out of memory while decoding", "kind": UNEXPECTED}
        return prepared
    except Exception as exc:  # a decoder bug must not take the run down; the same bytes fail again
        # its message may quote header values: the reason names the exception type only
        prepared.error = {"stage": "decode", "reason": f"unexpected {type(exc).__name__} while decoding",
                          "kind": PERMANENT}
        return prepared
    prepared.format, prepared.info, prepared.dicom_header = decoded.format, decoded.info, decoded.dicom_header
    prepared.timings_ms = {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3}
    return prepared


def quiet_dicom_warnings() -> None:
    """pydicom/highdicom warnings and log records quote header values (a malformed birth date, a
    name) and file paths: none may reach a log. A filter by module is not enough (pydicom
    attributes its warnings to the caller's frame), so every warning is dropped in the runtime's
    processes, and those libraries' loggers are silenced; what they warn about is checked by
    our own code, which reports attribute names instead."""
    import pydicom.config

    warnings.simplefilter("ignore")
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    for module in ("pydicom", "highdicom", "PIL"):  # PIL logs EXIF / PNG text chunks at DEBUG
        logger = logging.getLogger(module)
        logger.setLevel(logging.CRITICAL + 1)
        logger.propagate = False


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent died (SIGKILL, OOM killer) would linger forever: leave too."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def init_worker() -> None:
    import signal

    from . import preprocess  # noqa: F401 - OpenCV single-threaded (see there), under spawn too

    # Ctrl-C and SIGHUP reach the whole process group, but stopping and reloading are the main
    # process's business: it drains, then closes the pool. SIGTERM stays fatal, so a broken
    # pool can still terminate its workers.
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    quiet_dicom_warnings()
