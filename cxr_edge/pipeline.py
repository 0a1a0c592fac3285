"""The batcher behind `infer`, `watch` and `bench`.

Source -> prepare (workers.WorkerPool: decode + preprocess in worker processes) -> this dynamic
batcher -> runner -> calibrated findings -> sinks (sinks.py: the SR; the JSON record last).
Decoding overlaps with inference; a bad input becomes an error record at the stage where it
failed and never stops the run or loses its neighbours.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import PERMANENT, UNEXPECTED, os_error_kind
from .prepare import Prepared
from .records import FindingsRecord, StageError, Status, error_record, findings_record
from .heatmap_sink import HeatmapSink
from .sinks import Inference, RecordWriter, Sink, SRSink
from .sources import InputItem
from .workers import WorkerPool, default_workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    """How `infer` and `watch` run the pipeline: which model and artifact, how it batches, what it writes."""

    model_dir: str | None = None  # None: the bundled package
    backend: str = "auto"
    precision: str = "fp32"
    batch_size: int = 8
    max_delay_ms: float = 20.0
    workers: int | None = None  # decode processes (None: the CPU cores)
    threads: int | None = None  # inference threads (None: the CPU cores)
    write_sr: bool = True
    min_side: int | None = None  # None: limits.MIN_SIDE
    heatmaps: bool | None = None  # None: when the model has class maps; True: required; False: none


def heatmaps_wanted(setting: bool | None, package, runner=None) -> bool:
    """Whether to draw heatmaps (RunSettings.heatmaps: None = when the model can). Asked
    for (True) from a model without class maps is a CxrEdgeError saying why; left to the default,
    it is off, with the reason in the log. With `runner` (active): its artifact must have them too."""
    from .errors import CxrEdgeError

    if setting is False:
        return False
    spec = package.heatmap_spec
    if spec is None:
        problem = (f"the model package {package.name} {package.version} has no class maps (its manifest has no "
                   "`heatmaps`; `cxr-edge add-class-maps` adds them to a model whose head allows exact maps)")
    elif runner is not None and not runner.provides(spec.output):
        problem = (f"the {runner.artifact_key} artifact has no {spec.output!r} output (built before class maps "
                   "were added: build it again with `cxr-edge build-engine`)")
    elif runner is not None and not _fits(runner.output_shape(spec.output), (len(package.labels), *spec.grid)):
        problem = (f"the {runner.artifact_key} artifact's {spec.output!r} output is not [batch, labels, rows, "
                   f"columns] = [*, {len(package.labels)}, {spec.grid[0]}, {spec.grid[1]}] as the manifest's "
                   "`heatmaps` says")
    else:
        return True
    if setting:
        raise CxrEdgeError(f"--heatmaps: {problem}")
    log.info("heatmaps off: %s", problem)
    return False


def _fits(shape: tuple | None, expected: tuple) -> bool:
    """A [batch, *expected] output; a dynamic dimension (None) fits anything but the rank."""
    return shape is not None and len(shape) == 1 + len(expected) and all(
        found is None or found == wanted for found, wanted in zip(shape[1:], expected))


@dataclass
class Result:
    item: InputItem
    status: Status
    record: FindingsRecord  # as written to OUT/<stem>.json
    outputs: dict = field(default_factory=dict)  # {"json": path, "sr": path, ...}

    @property
    def error(self) -> StageError | None:
        return self.record.error


@dataclass
class _Waiting:
    """An inferred input whose sinks are still working in the pool."""

    inference: Inference
    started: dict[str, Future]  # sink name -> its started work


class Pipeline:
    """Worker pool + dynamic batcher + runner + sinks.

    A batch runs when it is full (`max_batch`), when its oldest input has waited `max_delay_ms`,
    or when nothing else is coming, as in Triton's dynamic batcher.
    """

    def __init__(self, package, runner, out_dir: Path, *, workers: int | None = None, max_batch: int = 8,
                 max_delay_ms: float = 20.0, write_sr: bool = True, heatmaps: bool = False,
                 sinks: list[Sink] | None = None, log_names: bool = True):
        self.package, self.runner, self.out_dir = package, runner, Path(out_dir)
        self.workers = workers or default_workers()
        self.max_batch, self.max_delay = max_batch, max_delay_ms / 1e3
        self.writer = OutputWriter(package, package.describe(runner.artifact_sha256), runner.describe(), out_dir,
                                   write_sr=write_sr, heatmaps=heatmaps, sinks=sinks, log_names=log_names)
        self.model_info, self.backend_info, self.sinks = self.writer.model_info, self.writer.backend_info, self.writer.sinks
        # a heatmap sink needs the class maps (the runner fetches them with the logits) and a
        # small copy of each image (the workers keep one)
        self.heatmaps = self.writer.heatmaps

    def run(self, items: list[InputItem], on_result=None, pool: WorkerPool | None = None,
            heartbeat=None) -> list[Result]:
        """Process every item; `on_result(result)` is called as each one's outputs are written,
        `heartbeat()` at every turn of the loop (at least every max delay), so a supervisor sees progress."""
        results = []

        def emit(result: Result) -> None:
            results.append(result)
            if on_result:
                on_result(result)

        from .heatmaps import DISPLAY_SIDE

        own_pool = pool is None
        pool = pool or WorkerPool(self.workers, self.package.preprocess_params)
        # set on every run: a runner or pool may serve pipelines with and without heatmaps (bench)
        self.runner.maps_output = self.package.heatmap_spec.output if self.heatmaps else None
        pool.display_side = DISPLAY_SIDE if self.heatmaps else 0
        ready: list[tuple[Prepared, float]] = []
        window = 2 * self.workers + self.max_batch
        waiting: list[_Waiting] = []

        def run_batch(batch) -> None:
            for result in self._run_batch(batch, pool, waiting):
                emit(result)
            # back-pressure: when the sinks are the bottleneck, wait for some before inferring more
            while len(waiting) > window:
                for result in self._finish(waiting, block=True):
                    emit(result)

        try:
            for prepared in pool.prepared(items, window=window, tick=self.max_delay):
                if heartbeat:
                    heartbeat()
                if prepared is not None:
                    if prepared.error:
                        emit(self.writer.error(prepared, **prepared.error))
                    else:
                        ready.append((prepared, time.perf_counter()))
                while len(ready) >= self.max_batch or (ready and time.perf_counter() - ready[0][1] >= self.max_delay):
                    batch, ready = ready[: self.max_batch], ready[self.max_batch :]
                    run_batch(batch)
                for result in self._finish(waiting, block=False):
                    emit(result)
            while ready:
                batch, ready = ready[: self.max_batch], ready[self.max_batch :]
                run_batch(batch)
            while waiting:
                for result in self._finish(waiting, block=True):
                    emit(result)
        finally:
            if own_pool:
                pool.close()
        return results

    # --- stages ---------------------------------------------------------------------------------
    def _run_batch(self, batch: list[tuple[Prepared, float]], pool: WorkerPool, waiting: list[_Waiting]) -> list[Result]:
        """Infer one batch and start its inputs' sinks; inputs with no sink work are written now."""
        started = time.perf_counter()
        try:
            logits = self.runner.infer(np.stack([p.tensor for p, _ in batch]))
        except Exception as exc:  # the runner failing is reported per input, not fatal to the run
            log.error("inference failed for a batch of %d: %s", len(batch), exc)
            return [self.writer.error(p, "inference", f"{type(exc).__name__}: {exc}", UNEXPECTED) for p, _ in batch]
        inferred = time.perf_counter()
        maps = self.runner.last_maps
        split = self.runner.last_timings.split() if self.runner.last_timings else {}
        rows = self.writer.findings_rows(logits)
        postprocess_ms = (time.perf_counter() - inferred) * 1e3
        results = []
        for row, ((prepared, arrived), findings) in enumerate(zip(batch, rows)):
            if findings is None:
                results.append(self.writer.error(prepared, *NON_FINITE))
                continue
            # batch stages are the batch's times: each of its inputs waits for all of it
            timings = dict(prepared.timings_ms)
            timings["queue"] = (started - arrived) * 1e3
            timings["inference_batch"] = (inferred - started) * 1e3
            timings.update(split)
            timings["postprocess"] = postprocess_ms
            timings["batch_size"] = len(batch)
            inference = Inference(prepared, findings, timings, self.writer.stem(prepared),
                                  maps[row] if maps is not None else None)
            started_work = {sink.name: future for sink in self.sinks if sink.accepts(inference)
                            for future in [sink.start(inference, pool)] if future is not None}
            if started_work:
                waiting.append(_Waiting(inference, started_work))
            else:
                results.append(self.writer.write(inference, {}))
        return results

    def _finish(self, waiting: list[_Waiting], block: bool) -> list[Result]:
        """Write the outputs of every input whose sinks' work is done (with `block`, wait for one)."""
        if block and waiting:
            wait([f for w in waiting for f in w.started.values()], return_when=FIRST_COMPLETED)
        done = [w for w in waiting if all(f.done() for f in w.started.values())]
        for w in done:
            waiting.remove(w)
        return [self.writer.write(w.inference, w.started) for w in done]


# A probability outside [0, 1] or NaN is not a result (and not valid JSON): that input fails.
NON_FINITE = ("inference", "the model produced non-finite probabilities (NaN or infinity) for this image")


class OutputWriter:
    """From the model's logits to the files of one input: calibrated findings, every sink's
    output, the JSON record last (or an error record). What `Pipeline` and the Ray backfill
    (backfill.py) share, so that both write the same records."""

    def __init__(self, package, model_info: dict, backend_info: dict, out_dir: Path, *, write_sr: bool = True,
                 heatmaps: bool = False, sinks: list[Sink] | None = None, log_names: bool = True):
        self.out_dir = Path(out_dir)
        self.labels, self.points, self.temperatures = package.labels, package.operating_points, package.temperatures
        self.model_info, self.backend_info = model_info, backend_info
        self.log_names = log_names  # the daemon logs journal ids instead: file names may carry patient data
        if sinks is None:
            sinks = [SRSink(self.model_info)] if write_sr else []
            if heatmaps:  # heatmaps_wanted() said the package and the runner have class maps
                sinks.append(HeatmapSink(self.model_info, self.labels, package.preprocess_params.resize))
        self.sinks = sinks
        self.heatmaps = any(isinstance(sink, HeatmapSink) for sink in self.sinks) and package.heatmap_spec is not None
        self.records = RecordWriter()

    def stem(self, prepared: Prepared) -> Path:
        from .outputs import output_stem

        return self.out_dir / output_stem(prepared.item.relative)

    def findings_rows(self, logits: np.ndarray) -> list:
        """Each row's findings (in label order), or None where its probabilities are not sane."""
        from .findings import calibrated_probabilities, findings_for_row

        probabilities = calibrated_probabilities(logits, self.temperatures)
        sane = np.isfinite(probabilities).all(axis=1) & (probabilities >= 0).all(axis=1) & (probabilities <= 1).all(axis=1)
        return [findings_for_row(self.labels, row, self.points) if ok else None for row, ok in zip(probabilities, sane)]

    def write(self, inference: Inference, started: dict[str, Future]) -> Result:
        """Write every sink's output, then the JSON record (last: its presence marks a complete
        set of outputs). The findings never depend on a sink: when one cannot make its output,
        the JSON is written all the same and records why (`<sink>_error`); when one fails in a
        way that may pass (a full disk), the whole input fails, to be retried, with no output
        left behind. `write` in the timings is the work of it, wherever it ran."""
        prepared = inference.prepared
        wall_started = time.perf_counter()
        work_ms = 0.0
        record = findings_record(prepared, inference.findings, self.model_info, self.backend_info, inference.timings_ms)
        written = []  # paths, to take back if the record cannot be written
        files = {}  # sink name -> its files
        for index, sink in enumerate(self.sinks):
            if not sink.accepts(inference):
                continue
            try:
                output = sink.write(inference, self.work_of(sink, started))
            except Exception as exc:  # its own failure, or a bug: costs its output, never the findings or the run
                failure = sink.failure(exc)
                if failure.kind != PERMANENT:
                    _remove(written)
                    for later in self.sinks[index + 1 :]:  # work already done in the workers (heatmaps on disk)
                        if later.name in started:
                            later.discard(self.work_of(later, started, quiet=True))
                    return self.error(prepared, "write", failure.reason, failure.kind)
                record.output_errors[sink.name] = StageError(sink.name, failure.reason)
                try:
                    sink.abandon(inference)
                except OSError:  # best effort: the record says the output is missing
                    pass
                if self.log_names:
                    log.warning("%s: findings written, %s not: %s", prepared.item.relative.as_posix(),
                                sink.label, failure.reason)
                continue
            work_ms += output.work_ms
            written.extend(output.paths)
            record.outputs[sink.name] = output.entry
            files[sink.name] = [str(path) for path in output.paths]
        finished = time.perf_counter()
        record.timings_ms["write"] = work_ms + (finished - wall_started) * 1e3
        if prepared.started_at is not None:  # decode start -> outputs written
            record.timings_ms["end_to_end"] = (finished - prepared.started_at) * 1e3
        try:
            json_path = self.records.write(inference.stem, record.to_json())
        except (OSError, ValueError) as exc:  # disk full, read-only: report, go on
            _remove(written)  # no half set of outputs: all or nothing
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            kind = os_error_kind(exc) if isinstance(exc, OSError) else UNEXPECTED
            return self.error(prepared, "write", f"cannot write outputs: {reason}", kind)
        # one file: its path (the SR); several: the list (heatmaps)
        outputs = {"json": str(json_path), **{name: paths[0] if name == "sr" else paths for name, paths in files.items()}}
        return Result(prepared.item, Status.OK, record, outputs)

    @staticmethod
    def work_of(sink: Sink, started: dict[str, Future], quiet: bool = False):
        """The sink's finished work (what it raised, raised here; with `quiet`, None); None when
        a crashed worker took it (the sink redoes it here)."""
        future = started.get(sink.name)
        if future is None:
            return None
        try:
            return future.result()
        except (BrokenProcessPool, CancelledError):
            if not quiet:
                log.warning("a worker died while working for the %s sink; redoing it on the main thread", sink.name)
            return None
        except Exception:
            if quiet:
                return None
            raise

    def error(self, prepared: Prepared, stage: str, reason: str, kind: str = PERMANENT) -> Result:
        record = error_record(prepared, stage, reason, self.model_info, self.backend_info, kind)
        if self.log_names:
            log.warning("%s: %s failed: %s", prepared.item.relative.as_posix(), stage, reason)
        outputs = {}
        stem = self.stem(prepared)
        try:
            outputs["json"] = str(self.records.write(stem, record.to_json()))
        except OSError as exc:
            log.error("%s: cannot write error record: %s", self.records.path_for(stem) if self.log_names else "an input",
                      exc.strerror or type(exc).__name__)
        return Result(prepared.item, Status.ERROR, record, outputs)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)
