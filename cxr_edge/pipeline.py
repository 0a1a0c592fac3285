"""The one pipeline behind `infer`, `watch` and `bench`.

Source -> Decode + Preprocess (worker processes) -> Batcher -> Backend -> Findings -> Sinks.
Decoding overlaps with inference; a bad input becomes an error record at the stage where it
failed and never stops the run or loses its neighbours.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import PERMANENT, UNEXPECTED, InputError, os_error_kind
from .sources import InputItem

log = logging.getLogger(__name__)


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
    error: dict | None = None  # {"stage", "reason", "kind"} (kinds: cxr_edge.errors)


@dataclass
class Result:
    item: InputItem
    status: str  # "ok" | "error"
    record: dict
    outputs: dict = field(default_factory=dict)

    @property
    def error(self) -> dict | None:
        return self.record.get("error")


def _file_sha256(path: Path, follow_symlinks: bool = True) -> tuple[str, int]:
    """(sha256, size). Without `follow_symlinks` a symbolic link is refused (ELOOP) and only a
    regular file is read: opened non-blocking, so a FIFO put in its place cannot hang the reader."""
    import stat

    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW | os.O_NONBLOCK)
    digest, size = hashlib.sha256(), 0
    with open(os.open(path, flags), "rb") as f:
        if not follow_symlinks and not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise InputError("read", "not a regular file (a FIFO, socket or device)")
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def inbox_entry_refusal(path: Path, info, root: Path) -> str | None:
    """Why the service must not read an inbox entry (`info`: its lstat), or None: only a regular
    file reached without any symbolic link, inside the inbox (no link out of or around it)."""
    import stat

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


def prepare(item: InputItem, params, max_pixels: int, min_side: int = 0, confine: Path | None = None) -> Prepared:
    """Runs in a worker process: hash, decode, preprocess one input. With `confine` (the
    service's inbox) symbolic links are not followed and the file must lie inside it."""
    from .decode import decode_file, require_regular_file
    from .preprocess import preprocess

    prepared = Prepared(item, started_at=time.perf_counter())
    try:
        t0 = prepared.started_at  # decode includes reading and hashing the file
        if confine is not None:
            confined_regular_file(item.path, confine)
        require_regular_file(item.path)  # before hashing: a FIFO would block the worker for ever
        prepared.sha256, prepared.size_bytes = _file_sha256(item.path, follow_symlinks=confine is None)
        decoded = decode_file(item.path, max_pixels=max_pixels, min_side=min_side)
        t1 = time.perf_counter()
        prepared.tensor = preprocess(decoded.pixels, params)
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


def encode_sr(header, findings, identity, uids: dict | None = None) -> tuple[bytes, str, str, float]:
    """Runs in a worker process: build the SR and encode it (~0.5 s of highdicom per SR, which
    would otherwise hold up the batcher on the main thread). Writing it stays on the main thread."""
    from .outputs import dicom_bytes
    from .sr import build_sr

    started = time.perf_counter()
    sr = build_sr(header, findings, identity, **(uids or {}))
    return dicom_bytes(sr), str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID), (time.perf_counter() - started) * 1e3


def sr_failure(exc: BaseException) -> str:
    """Why an SR could not be made, in words that name attributes, never their values: our own
    errors are worded that way; a library's message may quote a header value, so only its type."""
    from .errors import CxrEdgeError

    if isinstance(exc, CxrEdgeError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"cannot write the SR: {exc.strerror or type(exc).__name__}"
    return f"cannot build the SR ({type(exc).__name__})"


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


def _init_worker() -> None:
    import signal

    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the process pool
    # Ctrl-C and SIGHUP reach the whole process group, but stopping and reloading are the main
    # process's business: it drains, then closes the pool. SIGTERM stays fatal, so a broken
    # pool can still terminate its workers.
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    quiet_dicom_warnings()


class DecodePool:
    """Worker processes that decode in parallel; survives a worker that crashes.

    When a worker dies (a decoder segfault, the OOM killer) every in-flight input fails with it.
    Those inputs are retried one at a time, so the input that kills a worker again is named and
    its neighbours still get processed.
    """

    def __init__(self, workers: int, params, max_pixels: int | None = None, min_side: int | None = None,
                 confine: Path | None = None):
        from .limits import DEFAULT_MAX_PIXELS, MIN_SIDE

        self.workers, self.params, self.max_pixels = workers, params, max_pixels or DEFAULT_MAX_PIXELS
        self.min_side = MIN_SIDE if min_side is None else min_side
        self.confine = confine  # the service's inbox: no symbolic links, nothing outside it
        # fork before any backend threads exist is safe and fast; fall back where unavailable
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self._context = multiprocessing.get_context(method)
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=self._context, initializer=_init_worker)

    def submit(self, item: InputItem) -> Future:
        return self._submit(prepare, item, self.params, self.max_pixels, self.min_side, self.confine)

    def submit_sr(self, header, findings, identity, uids: dict | None = None) -> Future:
        return self._submit(encode_sr, header, findings, identity, uids)

    def _submit(self, fn, *args) -> Future:
        try:
            return self._executor.submit(fn, *args)
        except BrokenProcessPool:  # a worker died after the last result was collected
            log.warning("the worker pool is broken; starting a new one")
            self.restart()
            return self._executor.submit(fn, *args)

    def restart(self) -> None:
        # A broken pool's survivors may be blocked writing a result nobody reads: kill them, or
        # the executor's manager thread waits on them forever (and so does interpreter exit).
        for process in list((self._executor._processes or {}).values()):
            process.kill()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def prepared(self, items: list[InputItem], window: int, tick: float | None = None):
        """Yield Prepared for every item as it completes, keeping `window` in flight.

        With `tick`, also yields None when nothing completed for `tick` seconds, so the caller
        can flush a partly filled batch (the batcher's max queue delay).
        """
        queue = list(reversed(items))
        suspects: list[InputItem] = []  # in flight when a worker died: retried one at a time
        running: dict[Future, InputItem] = {}
        while queue or suspects or running:
            limit = 1 if suspects or any(f.suspect for f in running) else window
            while len(running) < limit and (suspects or queue):
                from_suspects = bool(suspects)
                item = suspects.pop() if from_suspects else queue.pop()
                future = self.submit(item)
                future.suspect = from_suspects
                running[future] = item
            done, _ = wait(running, timeout=tick, return_when=FIRST_COMPLETED)
            if not done:
                yield None
                continue
            broken = False
            for future in done:
                item = running.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    broken = True
                    if future.suspect:
                        yield Prepared(item, error={"stage": "decode", "kind": UNEXPECTED,  # or the OOM killer
                                                    "reason": "the decoder process crashed on this file"})
                    else:
                        suspects.append(item)
            if broken:
                log.warning("a decode worker died; retrying %d in-flight input(s) one at a time", len(running) + len(suspects))
                for future, item in running.items():
                    suspects.append(item)
                running.clear()
                self.restart()


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class Pipeline:
    """Decode pool + dynamic batcher + backend + sinks (JSON, DICOM SR).

    A batch runs when it is full (`max_batch`), when its oldest input has waited `max_delay_ms`,
    or when nothing else is coming, as in Triton's dynamic batcher.
    """

    def __init__(self, package, backend, out_dir: Path, *, workers: int | None = None, max_batch: int = 8,
                 max_delay_ms: float = 20.0, write_sr: bool = True, log_names: bool = True):
        self.package, self.backend, self.out_dir = package, backend, Path(out_dir)
        self.workers = workers or default_workers()
        self.max_batch, self.max_delay = max_batch, max_delay_ms / 1e3
        self.write_sr = write_sr
        self.log_names = log_names  # the daemon logs journal ids instead: file names may carry patient data
        self.labels, self.thresholds, self.temperatures = package.labels, package.thresholds, package.temperatures
        self.model_info = {
            "name": package.name,
            "version": package.version,
            "sha256": backend.artifact_sha256,
            "architecture": package.manifest.get("architecture", {}).get("timm_name"),
            "preprocessing": f"{package.manifest['preprocessing']['contract']}/v{package.manifest['preprocessing']['version']}",
        }
        self.backend_info = backend.describe()

    @cached_property
    def identity(self):
        """The model as the SR names it (imported on first use: PNG-only runs never load highdicom)."""
        from .sr import ModelIdentity

        return ModelIdentity(self.model_info["name"], self.model_info["version"], self.model_info["sha256"])

    def run(self, items: list[InputItem], on_result=None, pool: DecodePool | None = None,
            heartbeat=None) -> list[Result]:
        """Process every item; `on_result(result)` is called as each one finishes, `heartbeat()`
        at every turn of the loop (at least every max delay), so a supervisor sees progress."""
        results = []

        def emit(result: Result) -> None:
            results.append(result)
            if on_result:
                on_result(result)

        own_pool = pool is None
        pool = pool or DecodePool(self.workers, self.package.preprocess_params)
        ready: list[tuple[Prepared, float]] = []
        window = 2 * self.workers + self.max_batch
        pending: dict[Future, tuple] = {}  # SRs being built in the pool

        def run_batch(batch) -> None:
            for result in self._run_batch(batch, pool, pending):
                emit(result)
            # back-pressure: when SRs are the bottleneck, wait for some before inferring more
            while len(pending) > window:
                for result in self._finish_srs(pending, block=True):
                    emit(result)

        try:
            for prepared in pool.prepared(items, window=window, tick=self.max_delay):
                if heartbeat:
                    heartbeat()
                if prepared is not None:
                    if prepared.error:
                        emit(self._error(prepared, **prepared.error))
                    else:
                        ready.append((prepared, time.perf_counter()))
                while len(ready) >= self.max_batch or (ready and time.perf_counter() - ready[0][1] >= self.max_delay):
                    batch, ready = ready[: self.max_batch], ready[self.max_batch :]
                    run_batch(batch)
                for result in self._finish_srs(pending, block=False):
                    emit(result)
            while ready:
                batch, ready = ready[: self.max_batch], ready[self.max_batch :]
                run_batch(batch)
            while pending:
                for result in self._finish_srs(pending, block=True):
                    emit(result)
        finally:
            if own_pool:
                pool.close()
        return results

    # --- stages ---------------------------------------------------------------------------------
    def _run_batch(self, batch: list[tuple[Prepared, float]], pool: DecodePool, pending: dict) -> list[Result]:
        """Infer one batch; inputs without an SR are written now, the others go to `pending`."""
        from .findings import calibrated_probabilities, findings_for_row

        started = time.perf_counter()
        try:
            logits = self.backend.infer(np.stack([p.tensor for p, _ in batch]))
        except Exception as exc:  # the backend failing is reported per input, not fatal to the run
            log.error("inference failed for a batch of %d: %s", len(batch), exc)
            return [self._error(p, "inference", f"{type(exc).__name__}: {exc}", UNEXPECTED) for p, _ in batch]
        inferred = time.perf_counter()
        # the backend's own split (h2d / compute / d2h); None where it does not apply (CPU)
        split = {k: v for k, v in (getattr(self.backend, "last_timings_ms", None) or {}).items() if v is not None}
        probabilities = calibrated_probabilities(logits, self.temperatures)
        # A probability outside [0, 1] or NaN is not a result (and not valid JSON): that input fails.
        sane = np.isfinite(probabilities).all(axis=1) & (probabilities >= 0).all(axis=1) & (probabilities <= 1).all(axis=1)
        rows = [findings_for_row(self.labels, row, self.thresholds) if ok else None for row, ok in zip(probabilities, sane)]
        postprocess_ms = (time.perf_counter() - inferred) * 1e3
        results = []
        for (prepared, arrived), findings in zip(batch, rows):
            if findings is None:
                results.append(self._error(prepared, "inference", "the model produced non-finite probabilities "
                                                                  "(NaN or infinity) for this image"))
                continue
            # batch stages are the batch's times: each of its inputs waits for all of it
            timings = dict(prepared.timings_ms)
            timings["queue"] = (started - arrived) * 1e3
            timings["inference_batch"] = (inferred - started) * 1e3
            timings.update(split)
            timings["postprocess"] = postprocess_ms
            timings["batch_size"] = len(batch)
            if self.write_sr and prepared.dicom_header is not None:
                uids = sr_uids(prepared.sha256, self.identity)
                pending[pool.submit_sr(prepared.dicom_header, findings, self.identity, uids)] = (prepared, findings, timings)
            else:
                results.append(self._write(prepared, findings, timings))
        return results

    def _finish_srs(self, pending: dict, block: bool) -> list[Result]:
        """Write the outputs of every input whose SR is ready (with `block`, wait for one)."""
        done = wait(pending, return_when=FIRST_COMPLETED)[0] if block else [f for f in pending if f.done()]
        results = []
        for future in done:
            prepared, findings, timings = pending.pop(future)
            try:
                sr = future.result()
            except (BrokenProcessPool, CancelledError):
                log.warning("a worker died while building an SR; building it on the main thread")
                results.append(self._write(prepared, findings, timings))
                continue
            except Exception as exc:  # an SR that cannot be built: the findings are written all the same
                results.append(self._write(prepared, findings, timings, sr_error=sr_failure(exc)))
                continue
            results.append(self._write(prepared, findings, timings, sr))
        return results

    def _write(self, prepared: Prepared, findings, timings: dict, sr: tuple | None = None,
               sr_error: str | None = None) -> Result:
        """Write the SR (encoded in a worker: `sr`; else built here), then the JSON.

        The findings never depend on the SR: when it cannot be built or written, the JSON is
        written all the same and records why (`sr_error`). `write` is the work of it: building the
        SR (wherever that ran) and writing the files; time the SR spent queued in the pool shows
        in `end_to_end` only."""
        from .atomic import atomic_write, atomic_write_json
        from .outputs import output_stem
        from .records import findings_record

        started = time.perf_counter() - (sr[3] / 1e3 if sr else 0.0)
        stem = self.out_dir / output_stem(prepared.item.relative)
        json_path = stem.with_name(stem.name + ".json")
        record = findings_record(prepared, findings, self.model_info, self.backend_info, timings)
        outputs = {}
        if self.write_sr and prepared.dicom_header is not None and sr_error is None:
            sr_path = stem.with_name(stem.name + ".sr.dcm")
            try:
                data, sop_uid, series_uid, _ = sr or encode_sr(prepared.dicom_header, findings, self.identity,
                                                               sr_uids(prepared.sha256, self.identity))
                atomic_write(sr_path, data)
                outputs["sr"] = str(sr_path)
                record["outputs"]["sr"] = {"path": str(sr_path), "sop_instance_uid": sop_uid,
                                           "series_instance_uid": series_uid}
            except OSError as exc:
                if os_error_kind(exc) != PERMANENT:  # a full disk: the whole input is retried, not done without SR
                    return self._error(prepared, "write", f"cannot write the SR: {exc.strerror or type(exc).__name__}",
                                       os_error_kind(exc))
                sr_error = sr_failure(exc)
            except Exception as exc:  # highdicom refusing the content
                sr_error = sr_failure(exc)
        if sr_error is not None:
            record["sr_error"] = {"stage": "sr", "reason": sr_error}
        finished = time.perf_counter()
        record["timings_ms"]["write"] = round((finished - started) * 1e3, 3)
        if prepared.started_at is not None:  # decode start -> outputs written
            record["timings_ms"]["end_to_end"] = round((finished - prepared.started_at) * 1e3, 3)
        try:
            # The JSON goes last: its presence marks a complete set of outputs.
            atomic_write_json(json_path, record)
        except (OSError, ValueError) as exc:  # disk full, read-only: report, go on
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            for path in outputs.values():  # no half set of outputs: all or nothing
                Path(path).unlink(missing_ok=True)
            kind = os_error_kind(exc) if isinstance(exc, OSError) else UNEXPECTED
            return self._error(prepared, "write", f"cannot write outputs: {reason}", kind)
        if sr_error is not None and self.log_names:
            log.warning("%s: findings written, SR not: %s", prepared.item.relative.as_posix(), sr_error)
        return Result(prepared.item, "ok", record, {"json": str(json_path), **outputs})

    def _error(self, prepared: Prepared, stage: str, reason: str, kind: str = PERMANENT) -> Result:
        from .atomic import atomic_write_json
        from .outputs import output_stem
        from .records import error_record

        record = error_record(prepared, stage, reason, self.model_info, self.backend_info, kind)
        if self.log_names:
            log.warning("%s: %s failed: %s", prepared.item.relative.as_posix(), stage, reason)
        outputs = {}
        stem = self.out_dir / output_stem(prepared.item.relative)
        json_path = stem.with_name(stem.name + ".json")
        try:
            atomic_write_json(json_path, record)
            outputs["json"] = str(json_path)
        except OSError as exc:
            log.error("%s: cannot write error record: %s", json_path if self.log_names else "an input",
                      exc.strerror or type(exc).__name__)
        return Result(prepared.item, "error", record, outputs)
