"""How cxr-edge calls Polygraphy: its log lines go to Python logging, and torch stays out.

- Polygraphy prints to stdout by default, which would corrupt `cxr-edge bench --json -`; here
  its logger (and TensorRT's, which Polygraphy routes through it) writes to the Python logger
  "Polygraphy", warnings and worse only. TensorRT's build and load errors arrive only as log
  lines, so `polygraphy_calls()` also collects the errors logged inside it, for the exception.
- Polygraphy asks "is this a torch tensor?" of every array it touches, and answers by importing
  torch whenever torch is installed (polygraphy.util.array.is_torch; IterationResult does it
  too). cxr-edge never passes torch tensors and never imports torch (DESIGN.md), so inside
  `polygraphy_calls()` torch is hidden: a None entry in sys.modules makes `import torch` fail,
  and Polygraphy takes torch as absent.
"""

from __future__ import annotations

import contextlib
import logging
import sys

LOGGER_NAME = "Polygraphy"  # the Python logger Polygraphy writes to once told to


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _route_polygraphy_logs() -> None:
    from polygraphy.logger import G_LOGGER

    if not G_LOGGER.use_python_logging_system:
        G_LOGGER.colors = False
        G_LOGGER.module_severity = G_LOGGER.WARNING
        G_LOGGER.use_python_logging_system = True


@contextlib.contextmanager
def torch_hidden():
    """`import torch` fails inside (unless torch was imported before: then nothing to keep out)."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None
    try:
        yield
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


@contextlib.contextmanager
def polygraphy_calls():
    """Run Polygraphy code; yields the list of error messages logged meanwhile."""
    _route_polygraphy_logs()
    collect = _Collect()
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(collect)
    try:
        with torch_hidden():
            yield collect.messages
    finally:
        logger.removeHandler(collect)


def error_text(exc: BaseException, errors: list[str]) -> str:
    """One line: the exception and the errors logged before it (TensorRT's reasons)."""
    parts = [str(exc).strip() or type(exc).__name__, *(e.strip() for e in errors if e.strip() not in str(exc))]
    return " ".join("; ".join(parts).split())
