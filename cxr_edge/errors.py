"""Errors that become per-input error records: each names the stage and a specific reason."""


class CxrEdgeError(Exception):
    """Base class for errors cxr-edge reports to the user."""


class InputError(CxrEdgeError):
    """An input that cannot be processed, for a reason that will not change on retry."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


class DecodeError(InputError):
    def __init__(self, reason: str):
        super().__init__("decode", reason)


class ModelPackageError(CxrEdgeError):
    """A model package that is missing, malformed or fails its sha256 check."""
