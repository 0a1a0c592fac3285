"""The runner contract, after Polygraphy's runners: activate/deactivate (a context manager),
`is_active`, `infer(batch) -> logits`, typed timings of the last call, and the class maps of
the last call when `maps_output` names the graph output holding them (heatmaps). Loading the artifact
is a loader's job (a callable that returns verified bytes), not the runner's.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timings:
    """Milliseconds of the last `infer`. h2d / d2h are None where there is no copy to time (CPU)
    or where it was not timed apart (TensorRT without stage timing: compute is the total)."""

    compute_ms: float
    h2d_ms: float | None = None
    d2h_ms: float | None = None

    def split(self) -> dict[str, float]:
        """The stages that were timed, as a findings record's `timings_ms` names them."""
        stages = {"h2d": self.h2d_ms, "compute": self.compute_ms, "d2h": self.d2h_ms}
        return {stage: ms for stage, ms in stages.items() if ms is not None}


@dataclass(frozen=True)
class Outputs:
    """What `infer_impl` returns: logits [B, L]; its own timings (None: the wall time is taken);
    the class maps [B, L, rows, columns] when `maps_output` was asked for."""

    logits: np.ndarray
    timings: Timings | None = None
    maps: np.ndarray | None = None


class Runner(ABC):
    """Runs one artifact on float32 [B, C, H, W] batches and returns logits [B, L]."""

    name: str = "runner"

    def __init__(self, precision: str, artifact_key: str, artifact_sha256: str):
        self.precision, self.artifact_key, self.artifact_sha256 = precision, artifact_key, artifact_sha256
        self.is_active = False
        self.last_timings: Timings | None = None
        self.maps_output: str | None = None  # the graph output to fetch with the logits (heatmaps)
        self.last_maps: np.ndarray | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    def activate(self) -> "Runner":
        if self.is_active:
            raise RuntimeError(f"{self.name} runner is already active")
        self.activate_impl()
        self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.is_active = False
            self.deactivate_impl()

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # --- inference ------------------------------------------------------------------------------
    def infer(self, batch: np.ndarray) -> np.ndarray:
        if not self.is_active:
            raise RuntimeError(f"{self.name} runner is not active: use it as a context manager")
        started = time.perf_counter()
        outputs = self.infer_impl(np.ascontiguousarray(batch, dtype=np.float32))
        self.last_timings = outputs.timings or Timings((time.perf_counter() - started) * 1e3)
        self.last_maps = outputs.maps
        return outputs.logits

    def provides(self, output: str) -> bool:
        """Whether the active artifact has this output (an engine built before class maps has not)."""
        return self.output_shape(output) is not None

    @abstractmethod
    def output_shape(self, output: str) -> tuple | None:
        """The active artifact's shape of this output (None where a dimension is dynamic), or
        None when it has no such output."""

    @abstractmethod
    def activate_impl(self) -> None: ...

    @abstractmethod
    def deactivate_impl(self) -> None: ...

    @abstractmethod
    def infer_impl(self, batch: np.ndarray) -> Outputs:
        """The logits (and the maps when `maps_output` is set), and the timings when the runner
        measures them itself."""

    def describe(self) -> dict:
        """What the findings record says about the runner (no paths, nothing machine-secret)."""
        return {"name": self.name, "precision": self.precision, "artifact": self.artifact_key}
