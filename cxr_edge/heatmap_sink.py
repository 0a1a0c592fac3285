"""The heatmap sink: for each flagged finding, a PNG overlay next to the JSON record and, for a
DICOM input, a Secondary Capture in the source's study (the daemon sends it with the SR).

    OUT/<stem>.heatmap.<finding>.png   every input with maps (PNG, JPEG and DICOM)
    OUT/<stem>.heatmap.<finding>.dcm   DICOM inputs

The maps come with the logits (Runner.maps_output); the pictures are drawn, encoded and
written atomically in a worker process (cxr_edge.heatmaps, cxr_edge.heatmap_dicom): only their
names come back to the main process, before the JSON record is written. A finding flagged
before but not now loses its old files, so the folder holds the set the JSON record names.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import os_error_kind
from .labels import NO_FINDING
from .sinks import Inference, Sink, SinkFailure, Written

SUFFIX = ".heatmap"


@dataclass(frozen=True)
class HeatmapJob:
    """What a worker needs to draw one input's heatmaps: nothing but pixels, numbers and UIDs."""

    display: np.ndarray  # uint8 (h, w)
    source_shape: tuple[int, int]
    resize: str  # the preprocessing contract's: how the model's window lies on the image
    maps: dict  # label -> [rows, columns] class map, flagged findings only
    findings: list  # cxr_edge.findings.Finding of those labels
    model: object  # sr.ModelIdentity
    header: object | None  # the DICOM source header (None: a PNG/JPEG input, no DICOM output)
    series_instance_uid: str | None
    sop_instance_uids: dict  # label -> SOP Instance UID (DICOM inputs)


@dataclass(frozen=True)
class DrawnSet:
    """The maps drawn and written for one input: the record's entries, the files, the time."""

    entries: list  # {"label", "png", "peak", and for DICOM "dicom", "sop_instance_uid"}
    paths: list  # [Path] written
    build_ms: float
    dicom_error: str | None = None  # why a DICOM input got PNGs only (a source no valid instance can reference)
    series_instance_uid: str | None = None  # of its Secondary Captures, when it has some


def draw_heatmaps(job: HeatmapJob, paths: dict) -> DrawnSet:
    """Draw, encode and write (atomically) every map of one input, in a worker process: the
    pictures never cross back to the main process, which only writes the JSON record.
    `paths`: label -> (PNG path, DICOM path). On any failure what was written is removed."""
    from .heatmap_dicom import SCSource
    from .heatmaps import caption_for, heat_on_display, overlay, peak, png_bytes, rgb
    from .sr_source import SRSourceError

    started = time.perf_counter()
    entries, written = [], []
    source, dicom_error = None, None
    if job.header is not None:  # a source no valid instance can reference (an invalid UID): PNGs only
        try:
            source = SCSource.of(job.header)
        except SRSourceError as exc:
            dicom_error = f"no heatmap DICOM (PNGs only): {exc}"
    try:
        for number, finding in enumerate(job.findings, start=1):
            class_map = job.maps[finding.label]
            png_path, dicom_path = paths[finding.label]
            heat = heat_on_display(class_map, job.source_shape, job.display.shape, job.resize)
            picture = overlay(job.display, heat, caption_for(finding, job.model.name, job.model.version))
            # the JSON record, written after into the same folder, syncs the folder for these renames
            atomic_write(png_path, png_bytes(picture), sync_dir=False)
            written.append(png_path)
            entry = {"label": finding.label, "png": str(png_path),
                     "peak": peak(class_map, job.source_shape, job.resize).to_json()}
            if source is not None:
                from .heatmap_dicom import build_heatmap_sc
                from .outputs import dicom_bytes

                uid = job.sop_instance_uids[finding.label]
                try:
                    sc = build_heatmap_sc(source, rgb(picture), finding.label, finding.probability, job.model,
                                          job.series_instance_uid, uid, number)
                except SRSourceError as exc:  # content highdicom refuses: PNGs only, for all of them
                    source, dicom_error = None, f"no heatmap DICOM (PNGs only): {exc}"
                    for done in entries:
                        Path(done.pop("dicom")).unlink(missing_ok=True)
                        done.pop("sop_instance_uid")
                    written = [path for path in written if path.suffix != ".dcm"]
                else:
                    atomic_write(dicom_path, dicom_bytes(sc), sync_dir=False)
                    written.append(dicom_path)
                    entry.update(dicom=str(dicom_path), sop_instance_uid=uid)
            if source is None:
                dicom_path.unlink(missing_ok=True)  # an earlier run's, which the record no longer names
            entries.append(entry)
    except BaseException:
        for path in written:
            Path(path).unlink(missing_ok=True)
        raise
    series = job.series_instance_uid if source is not None and entries else None
    return DrawnSet(entries, written, (time.perf_counter() - started) * 1e3, dicom_error, series)


class HeatmapSink(Sink):
    name = "heatmaps"
    label = "heatmap"

    def __init__(self, model_info: dict, labels, resize: str):
        self.model_info, self.labels, self.resize = model_info, list(labels), resize
        self.slugs = label_slugs(self.labels)

    @cached_property
    def identity(self):
        from .sr import ModelIdentity

        return ModelIdentity(self.model_info["name"], self.model_info["version"], self.model_info["sha256"])

    def paths(self, stem: Path, label: str) -> tuple[Path, Path]:
        """(PNG, DICOM) of one finding's heatmap."""
        return heatmap_paths(stem, self.slugs[label])

    def accepts(self, inference: Inference) -> bool:
        return inference.maps is not None and inference.prepared.display is not None

    def _job(self, inference: Inference) -> HeatmapJob | None:
        from .heatmap_dicom import heatmap_uids
        from .heatmaps import mapped_labels

        labels = mapped_labels(inference.findings)
        if not labels:
            return None
        prepared = inference.prepared
        index = {label: i for i, label in enumerate(self.labels)}
        header = prepared.dicom_header
        series, uids = (heatmap_uids(prepared.sha256 or "", self.identity, labels) if header is not None
                        else (None, {}))
        return HeatmapJob(prepared.display, prepared.source_shape, self.resize,
                          {label: np.asarray(inference.maps[index[label]]) for label in labels},
                          [f for f in inference.findings if f.label in labels], self.identity, header, series, uids)

    def _paths(self, inference: Inference, job: HeatmapJob) -> dict:
        return {f.label: self.paths(inference.stem, f.label) for f in job.findings}

    def start(self, inference: Inference, pool) -> Future | None:
        job = self._job(inference)
        return pool.submit(draw_heatmaps, job, self._paths(inference, job)) if job is not None else None

    def write(self, inference: Inference, work: DrawnSet | None) -> Written:
        """The maps are written by then (in a worker; here, when a crashed worker took its
        work); what is left is removing an earlier version's maps of findings no longer flagged."""
        try:
            if work is None:  # no flagged finding, or a crashed worker's work: redone here
                job = self._job(inference)
                work = draw_heatmaps(job, self._paths(inference, job)) if job is not None else None
            drawn = work or DrawnSet([], [], 0.0)
            self._remove_stale(inference.stem, {entry["label"] for entry in drawn.entries})
        except OSError as exc:
            raise self.failure(exc) from exc
        entry = {"method": "cam", "maps": drawn.entries}
        if drawn.dicom_error:
            entry["dicom_error"] = drawn.dicom_error
        elif drawn.series_instance_uid:
            entry["series_instance_uid"] = drawn.series_instance_uid
        return Written(list(drawn.paths), entry, drawn.build_ms)

    def abandon(self, inference: Inference) -> None:
        for path in every_heatmap_path(inference.stem, self.labels):
            if not path.is_dir():  # a folder planted there is not ours to remove
                path.unlink(missing_ok=True)

    def discard(self, work: DrawnSet | None) -> None:
        for path in (work.paths if work else []):
            Path(path).unlink(missing_ok=True)

    def failure(self, exc: BaseException) -> SinkFailure:
        """As any sink's, except that a full disk (in the worker too) fails the whole input, to be retried."""
        if isinstance(exc, OSError):
            return SinkFailure(super().failure(exc).reason, os_error_kind(exc))
        return super().failure(exc)

    def _remove_stale(self, stem: Path, current: set[str]) -> None:
        """An earlier version of this input may have flagged other findings: their maps go."""
        for label in self.labels:
            if label != NO_FINDING and label not in current:
                for path in self.paths(stem, label):
                    path.unlink(missing_ok=True)


def label_slugs(labels) -> dict[str, str]:
    """label -> its file-name part, distinct even where two labels would slug alike."""
    from .heatmaps import label_slug

    slugs, seen = {}, set()
    for index, label in enumerate(labels):
        slug = label_slug(label)
        slug = slug if slug not in seen else f"{slug}-{index}"
        seen.add(slug)
        slugs[label] = slug
    return slugs


def heatmap_paths(stem: Path, slug: str) -> tuple[Path, Path]:
    base = f"{stem.name}{SUFFIX}.{slug}"
    return stem.with_name(base + ".png"), stem.with_name(base + ".dcm")


def every_heatmap_path(stem: Path, labels) -> list[Path]:
    """Every heatmap file an input may have (the daemon's crash recovery looks at each)."""
    return [path for label, slug in label_slugs(labels).items() if label != NO_FINDING
            for path in heatmap_paths(stem, slug)]
