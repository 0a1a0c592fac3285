"""Errors that become per-input error records: each names the stage and a specific reason.

Every error record also carries a `kind`, so that a service decides what to do by kind, never by
message text:
- permanent: the input itself cannot be processed; retrying the same bytes gives the same answer.
- incomplete: the input looks cut short; a file still being written looks the same, so a
  service retries it while the file is young.
- transient: the environment failed (disk full, I/O error, permission); retried until it clears.
- unexpected: something failed that should not have (a backend exception, a decoder process
  that died); retried a bounded number of times.
"""

import errno
from enum import StrEnum


class ErrorKind(StrEnum):
    """A str: records, the journal and metric labels keep the plain values."""

    PERMANENT = "permanent"
    INCOMPLETE = "incomplete"
    TRANSIENT = "transient"
    UNEXPECTED = "unexpected"


# Module-level aliases of the members: the call sites that import them keep working.
PERMANENT, INCOMPLETE = ErrorKind.PERMANENT, ErrorKind.INCOMPLETE
TRANSIENT, UNEXPECTED = ErrorKind.TRANSIENT, ErrorKind.UNEXPECTED
ERROR_KINDS = tuple(ErrorKind)

# Conditions of the machine, not of the input: they clear (space freed, permission fixed, the
# NFS server back) and the same input then succeeds.
TRANSIENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOMEM,
    errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.EMFILE, errno.ENFILE, errno.EINTR,
})


# The input's own doing: retrying the same name gives the same answer.
PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG,
                              errno.EFBIG, errno.EINVAL})


def os_error_kind(exc: OSError) -> ErrorKind:
    """Transient for the machine's conditions, permanent for the input's own; anything else (a
    network file system's ENOTCONN, EHOSTDOWN...) is unexpected: retried a bounded number of times."""
    if exc.errno in TRANSIENT_ERRNOS:
        return TRANSIENT
    return PERMANENT if exc.errno in PERMANENT_ERRNOS else UNEXPECTED


class CxrEdgeError(Exception):
    """Base class for errors cxr-edge reports to the user."""


class InputError(CxrEdgeError):
    """An input that cannot be processed, for a reason that will not change on retry (unless it
    is `incomplete`: cut short, perhaps still arriving)."""

    def __init__(self, stage: str, reason: str, kind: ErrorKind = PERMANENT):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason
        self.kind = kind


class DecodeError(InputError):
    def __init__(self, reason: str, incomplete: bool = False):
        super().__init__("decode", reason, INCOMPLETE if incomplete else PERMANENT)


class ModelPackageError(CxrEdgeError):
    """A model package that is missing, malformed or fails its sha256 check."""
