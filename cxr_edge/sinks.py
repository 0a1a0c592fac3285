"""Sinks: where an input's findings go besides its JSON record (the DICOM SR here; heatmaps in
heatmap_sink.py), behind one small interface the batcher drives.

For each input the batcher asks every sink that `accepts` it to `start` its expensive work
(in a worker process, so the batcher never waits on it), then, once that is done, to `write`
its file next to the JSON record. The JSON record is written last by `RecordWriter`: its
presence marks a complete set of outputs, and a record that cannot be written takes the
sinks' files back with it.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .atomic import atomic_write, atomic_write_json
from .errors import PERMANENT, CxrEdgeError, os_error_kind
from .prepare import Prepared

log = logging.getLogger(__name__)


@dataclass
class Inference:
    """One input after the model: what every sink writes from."""

    prepared: Prepared
    findings: list  # [cxr_edge.findings.Finding], in label order
    timings_ms: dict
    stem: Path  # output path without suffix: OUT/<sanitized relative path>
    maps: object = None  # np.ndarray [L, rows, columns]: the class maps, when heatmaps were asked for


@dataclass
class Written:
    """A sink's output for one input: its files and the entry under the record's `outputs`."""

    paths: list[Path]
    entry: dict
    work_ms: float = 0.0  # building the output, wherever it ran (shows in the `write` timing)


class SinkFailure(CxrEdgeError):
    """A sink could not write its output. `kind` permanent: the findings are written without
    this output, with the reason; any other kind (a full disk) fails the whole input, to be retried."""

    def __init__(self, reason: str, kind: str = PERMANENT):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


class Sink:
    name = "sink"  # the record's `outputs` key; a failure is recorded under `<name>_error`
    label = "output"  # what the output is called in reasons and logs

    def accepts(self, inference: Inference) -> bool:
        return True

    def start(self, inference: Inference, pool) -> Future | None:
        """Begin the expensive part off the main thread (pool: workers.WorkerPool); None: nothing to do."""
        return None

    def write(self, inference: Inference, work) -> Written:
        """Write the output (`work`: the started future's result, or None when it was lost
        with a crashed worker: do it here then). Raises SinkFailure for a failure of its own
        kind; anything else it raises (or its started work raised) goes through `failure`."""
        raise NotImplementedError

    def abandon(self, inference: Inference) -> None:
        """This sink's output could not be made (recorded as `<name>_error`): remove what an
        earlier run left for this input, so that the folder holds what the record names."""

    def discard(self, work) -> None:
        """The input failed before this sink's `write`: undo what its started work left on disk
        (a sink whose work only returns bytes has nothing to undo)."""

    def failure(self, exc: BaseException) -> SinkFailure:
        """Why no output was made, in words that name attributes, never their values: our own
        errors are worded that way; a library's message may quote a header value, so only its
        type. Permanent: the findings are written without this output."""
        if isinstance(exc, SinkFailure):
            return exc
        if isinstance(exc, CxrEdgeError):
            return SinkFailure(str(exc))
        if isinstance(exc, OSError):
            return SinkFailure(f"cannot write the {self.label}: {exc.strerror or type(exc).__name__}")
        return SinkFailure(f"cannot build the {self.label} ({type(exc).__name__})")


# --- the DICOM SR -----------------------------------------------------------------------------
def sr_uids(input_sha256: str | None, identity) -> dict:
    """The SR's series and SOP Instance UIDs, derived from the input's bytes and the model: the
    same input read by the same model gives the same SR UID, so an SR made again (a redo after a
    crash, a re-send) is the same instance to the PACS, never a second report."""
    from pydicom.uid import generate_uid

    if not input_sha256:
        return {}
    seed = [input_sha256, identity.name, identity.version, identity.sha256]
    return {"series_instance_uid": generate_uid(entropy_srcs=[*seed, "series"]),
            "sop_instance_uid": generate_uid(entropy_srcs=[*seed, "instance"])}


@dataclass(frozen=True)
class EncodedSR:
    data: bytes
    sop_instance_uid: str
    series_instance_uid: str
    build_ms: float


def encode_sr(header, findings, identity, uids: dict | None = None) -> EncodedSR:
    """Build the SR and encode it (in a worker process)."""
    from .outputs import dicom_bytes
    from .sr import build_sr

    started = time.perf_counter()
    sr = build_sr(header, findings, identity, **(uids or {}))
    return EncodedSR(dicom_bytes(sr), str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID),
                     (time.perf_counter() - started) * 1e3)


class SRSink(Sink):
    """A TID 1500 Structured Report for every DICOM input: OUT/<stem>.sr.dcm."""

    name = "sr"
    label = "SR"
    suffix = ".sr.dcm"

    def __init__(self, model_info: dict):
        self.model_info = model_info  # package.describe(): the model as the SR names it

    @cached_property
    def identity(self):
        """sr.ModelIdentity, made on first use: a run without DICOM inputs never imports highdicom."""
        from .sr import ModelIdentity

        return ModelIdentity(self.model_info["name"], self.model_info["version"], self.model_info["sha256"])

    def accepts(self, inference: Inference) -> bool:
        return inference.prepared.dicom_header is not None

    def warm(self, labels) -> None:
        """Build the SR template (sr_template) now, ~0.5 s of highdicom: called before the
        worker pool forks, every worker inherits it instead of building it on its first SR."""
        from .sr_template import template_for

        template_for(self.identity, list(labels))

    def _args(self, inference: Inference) -> tuple:
        prepared = inference.prepared
        return prepared.dicom_header, inference.findings, self.identity, sr_uids(prepared.sha256, self.identity)

    def start(self, inference: Inference, pool) -> Future:
        return pool.submit(encode_sr, *self._args(inference))

    def write(self, inference: Inference, work: EncodedSR | None) -> Written:
        sr = work or encode_sr(*self._args(inference))  # highdicom refusing the content: see failure()
        path = inference.stem.with_name(inference.stem.name + self.suffix)
        try:
            atomic_write(path, sr.data)
        except OSError as exc:
            # a full disk fails the whole input, to be retried; a folder in the SR's place does not
            raise SinkFailure(self.failure(exc).reason, os_error_kind(exc)) from exc
        entry = {"path": str(path), "sop_instance_uid": sr.sop_instance_uid,
                 "series_instance_uid": sr.series_instance_uid}
        return Written([path], entry, sr.build_ms)


# --- the JSON record --------------------------------------------------------------------------
class RecordWriter:
    """OUT/<stem>.json: the findings record (or the error record) of every input."""

    suffix = ".json"

    def path_for(self, stem: Path) -> Path:
        return stem.with_name(stem.name + self.suffix)

    def write(self, stem: Path, record: dict) -> Path:
        path = self.path_for(stem)
        atomic_write_json(path, record)
        return path

