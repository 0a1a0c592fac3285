"""`cxr-edge infer` as a function: find the inputs, pick the artifact, run the pipeline once over
them, write summary.jsonl. The command line only parses options and prints."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .errors import CxrEdgeError, ModelPackageError
from .pipeline import RunSettings

log = logging.getLogger(__name__)


@dataclass
class InferRun:
    results: list  # [pipeline.Result], sorted by input
    skipped: list[Path]
    seconds: float
    summary_path: Path
    model: dict = field(default_factory=dict)
    backend: dict = field(default_factory=dict)

    @cached_property
    def lines(self) -> list[dict]:
        """summary.jsonl's lines, one per input (also the --json summary's `results`)."""
        from .records import summary_line

        return [summary_line(r.record, r.outputs) for r in self.results]

    @property
    def failed(self) -> list:
        return [r for r in self.results if r.status != "ok"]

    @property
    def without_sr(self) -> list:
        """Findings written, the SR could not be (a subset of the succeeded)."""
        return [r for r in self.results if r.status == "ok" and r.record.sr_error]

    def summary(self) -> dict:
        n = len(self.results)
        return {
            "inputs": n,
            "succeeded": n - len(self.failed),
            "succeeded_without_sr": len(self.without_sr),
            "failed": len(self.failed),
            "skipped": len(self.skipped),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(n / self.seconds, 2) if self.seconds > 0 else None,
            "summary_file": str(self.summary_path),
            "model": self.model,
            "backend": self.backend,
            "results": self.lines,
        }


def plan(inputs: list[str], out: Path, settings: RunSettings):
    """(items, skipped, package, selection), or CxrEdgeError for a usage or configuration problem."""
    from .sources import discover

    items, skipped = discover(list(inputs))
    if not items:
        raise CxrEdgeError("no input files found (looked for DICOM, PNG and JPEG files)")
    package, selection = model_and_output(out, settings)
    for path in skipped:
        log.debug("skipped (not an image by its name): %s", path)
    return items, skipped, package, selection


def model_and_output(out: Path, settings: RunSettings):
    """(package, selection) for the settings, and the output folder made (what `infer` and
    `backfill` check before any work), or CxrEdgeError."""
    from .backends import select_backend
    from .manifest import ModelPackage

    package = ModelPackage.load(settings.model_dir)
    selection = select_backend(package, settings.backend, settings.precision)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CxrEdgeError(f"cannot create output folder {out}: {exc.strerror or type(exc).__name__}") from exc
    return package, selection


def run(items, skipped, package, selection, out: Path, settings: RunSettings, on_result=None) -> InferRun:
    """Process every item once; `on_result(result)` as each finishes (a progress display)."""
    from .atomic import atomic_write, strict_json
    from .backends import create_backend
    from .pipeline import Pipeline, heatmaps_wanted
    from .workers import WorkerPool, default_workers

    workers = settings.workers or default_workers()
    heatmaps = heatmaps_wanted(settings.heatmaps, package)  # refused before any work when asked for in vain
    # The worker processes are forked before the runner starts its threads.
    with WorkerPool(workers, package.preprocess_params, min_side=settings.min_side) as pool:
        runner = create_backend(package, selection.backend, selection.precision, selection.artifact,
                                threads=settings.threads, max_batch=settings.batch_size)
        try:
            runner.activate()
        except CxrEdgeError:
            raise
        except Exception as exc:  # a runtime refusing an artifact whose sha256 matched (corrupt when built)
            raise ModelPackageError(f"{package.root}: cannot load the {selection.artifact} artifact with "
                                    f"{selection.backend}: {type(exc).__name__}: {exc}") from exc
        try:
            log.info("backend %s, %s artifact %r: %s", selection.backend, selection.precision, selection.artifact,
                     selection.reason)
            log.info("model %s %s, %d inputs, %d decode workers", package.name, package.version, len(items), workers)
            heatmaps = heatmaps and heatmaps_wanted(settings.heatmaps, package, runner)
            pipeline = Pipeline(package, runner, out, workers=workers, max_batch=settings.batch_size,
                                max_delay_ms=settings.max_delay_ms, write_sr=settings.write_sr, heatmaps=heatmaps)
            started = time.perf_counter()
            results = pipeline.run(items, on_result=on_result, pool=pool)
            elapsed = time.perf_counter() - started
        finally:
            runner.deactivate()
    results.sort(key=lambda r: r.item.relative.as_posix())  # completion order varies run to run
    done = InferRun(results, skipped, elapsed, out / "summary.jsonl", pipeline.model_info, pipeline.backend_info)
    atomic_write(done.summary_path, "".join(strict_json(line) + "\n" for line in done.lines).encode())
    return done
