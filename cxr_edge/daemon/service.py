"""`cxr-edge watch`: the unattended service around the same Pipeline as `cxr-edge infer`.

Inbox (watchdog + scans, or the DICOM SCP) -> journal (SQLite) -> Pipeline (decode workers,
dynamic batching, backend, atomic JSON + SR) -> journal -> SR send queue -> PACS.
Exactly once: an input is its bytes under its path relative to the inbox, with one row while it
is in flight; its outputs are complete (JSON written last) or absent; after a crash, inputs
caught mid-flight are checked against their outputs and either marked done (their SR send
queued) or redone. Failures are retried by kind (cxr_edge.errors), never by message text.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from ..atomic import sweep_temp_files
from ..errors import PERMANENT, UNEXPECTED, CxrEdgeError, ModelPackageError
from ..heatmap_sink import every_heatmap_path
from ..labels import LABELS
from ..outputs import output_stem
from ..pipeline import RunSettings
from ..records import FindingsRecord
from ..sources import InputItem
from .dicom_net import Peer, remove_receiving_temp_files
from .journal import Journal, Row, backoff, identity_of
from .notify import Watchdog, notify
from .telemetry import Metrics

log = logging.getLogger(__name__)
DISPOSITIONS = ("leave", "move", "delete")
OWN_THREADS = ("inbox-settle", "sr-sender", "sd-watchdog", "dicom-listener")
POISON_CLAIMS = 3  # an input the daemon died on this many times is failed instead of taken again
STATUS_EVERY = 5.0  # seconds between journal counts for STATUS= and the queue gauges
EXIT_SOFTWARE = 70  # sysexits EX_SOFTWARE: a part of the daemon died; systemd restarts it (Restart=on-failure)


@dataclass
class DaemonConfig:
    inbox: Path
    out: Path
    state_dir: Path
    run: RunSettings = field(default_factory=RunSettings)  # the model, how it batches, what it writes
    settle: float = 2.0  # seconds a non-renamed file must stay unchanged
    max_attempts: int = 5  # for unexpected failures; permanent ones fail at once, transient ones wait
    young_seconds: float = 120.0  # an "incomplete" file younger than this may still be arriving: retry
    disposition: str = "leave"
    processed_dir: Path | None = None
    listen: Peer | None = None
    allowed_callers: list = field(default_factory=list)
    send_to: Peer | None = None
    calling_ae: str = "CXREDGE"
    metrics_port: int | None = None
    chunk: int = 32  # inputs per pipeline run: bounds how long SIGTERM waits for the in-flight work
    rescan: float = 60.0  # seconds between full inbox scans (inotify can drop events)

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.sqlite3"


class Daemon:
    def __init__(self, cfg: DaemonConfig):
        # Absolute from here on: the journal keeps paths relative to the inbox, and a restart
        # from another working directory must find the same files.
        cfg.inbox, cfg.out, cfg.state_dir = (Path(os.path.abspath(p)) for p in (cfg.inbox, cfg.out, cfg.state_dir))
        if cfg.processed_dir is not None:
            cfg.processed_dir = Path(os.path.abspath(cfg.processed_dir))
        self.cfg = cfg
        self.metrics = Metrics()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.reload_requested = threading.Event()
        self.watchdog = Watchdog()
        self.journal: Journal | None = None
        self.exit_code = 0
        self._journal_down_since: float | None = None
        self._refusals_logged: set[int] = set()
        self._last_status: str | None = None
        self._status_at = 0.0

    # --- life cycle -----------------------------------------------------------------------------
    def run(self) -> int:
        from ..prepare import quiet_dicom_warnings
        from .state_lock import lock_state_dir

        cfg = self.cfg
        quiet_dicom_warnings()
        # Everything that can be wrong with the set-up fails here, in one line, before READY.
        self._check_folders()
        self._lock_fd = lock_state_dir(cfg.state_dir)
        self.journal = Journal(cfg.journal_path)
        removed = remove_receiving_temp_files(cfg.inbox)  # the listener's, left mid-write by a crash
        self._recover(removed)
        self.pool, self.pipeline, self.runner = self._build(self._load_package())
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, lambda *_: (self.reload_requested.set(), self.wake.set()))
        import faulthandler  # `kill -USR1 <pid>`: every thread's stack to the log, for a daemon that seems stuck

        faulthandler.register(signal.SIGUSR1, all_threads=True)
        threading.excepthook = self._thread_died
        from .watcher import InboxWatcher

        self.watcher = InboxWatcher(cfg.inbox, self._offer, settle=cfg.settle, rescan=cfg.rescan,
                                    heartbeat=lambda: self.watchdog.beat("intake"))
        servers = []
        try:
            self.watcher.start()
            self.watchdog.watch_thread("intake", self.watcher.alive)
            if cfg.metrics_port:
                from .telemetry import serve

                servers.append(serve(self.metrics, cfg.metrics_port))
            if cfg.listen:
                from .dicom_net import start_scp

                server = start_scp(cfg.listen, cfg.inbox, cfg.allowed_callers, on_received=None)
                servers.append(server)
                alive = getattr(server, "alive", None)
                if alive is not None:
                    self.watchdog.watch_thread("listener", alive)
        except OSError as exc:  # a port in use, an inbox that cannot be watched
            self._close(servers)
            raise CxrEdgeError(f"cannot start: {exc.strerror or exc}") from None
        sender = None
        if cfg.send_to:
            sender = threading.Thread(target=self._send_loop, name="sr-sender", daemon=True)
            sender.start()
        self.watchdog.beat("main")
        self.watchdog.start()
        notify("READY=1")
        log.info("watching %s -> %s (journal %s)", cfg.inbox, cfg.out, cfg.journal_path)
        try:
            self._loop()
        finally:
            notify("STOPPING=1")
            self._close(servers)
            if sender:
                sender.join(timeout=30)
            self._release_in_flight()
            self.journal.close()
            os.close(self._lock_fd)
        if self.exit_code:
            log.error("stopped after a failure (exit %d); systemd restarts the service", self.exit_code)
        else:
            log.info("stopped cleanly")
        return self.exit_code

    def _close(self, servers) -> None:
        self.watcher.stop()
        for server in servers:
            server.shutdown()
            server.server_close()
        self.watchdog.stop()
        self.pool.close()
        self.runner.__exit__(None, None, None)

    def _check_folders(self) -> None:
        """Create the folders and prove each is writable (and the inbox readable), so that a
        wrong owner or a read-only mount stops the start with one line, never a READY daemon
        that fails every write."""
        cfg = self.cfg
        for folder in (cfg.inbox, cfg.out, cfg.state_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd, probe = tempfile.mkstemp(dir=folder, prefix=".cxr-edge-write-check.")
                os.close(fd)
                os.unlink(probe)
            except OSError as exc:
                raise CxrEdgeError(f"cannot write to {folder}: {exc.strerror or type(exc).__name__}") from None
        real_inbox = os.path.realpath(cfg.inbox)
        for name, folder in (("--out", cfg.out), ("--state-dir", cfg.state_dir)):
            if os.path.commonpath([os.path.realpath(folder), real_inbox]) == real_inbox:
                raise CxrEdgeError(f"{name} {folder} is inside the inbox {cfg.inbox}: its files would be taken as inputs")
        try:
            next(iter(os.scandir(cfg.inbox)), None)
        except OSError as exc:
            raise CxrEdgeError(f"cannot read {cfg.inbox}: {exc.strerror or type(exc).__name__}") from None

    def _on_stop(self, signum, frame) -> None:
        log.info("%s: finishing the in-flight batch, then exiting", signal.Signals(signum).name)
        self.stopping.set()
        self.wake.set()

    def _thread_died(self, args) -> None:
        """No thread of ours may die quietly: one that died stops the daemon with a non-zero
        exit, so systemd restarts it (the message names the thread and the exception type only:
        a message may quote a file name). A library's thread (one DICOM association) is logged."""
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread else "?"
        if name not in OWN_THREADS:
            log.error("thread %s failed (%s)", name, args.exc_type.__name__)
            return
        log.critical("thread %s died (%s); stopping so the service is restarted", name, args.exc_type.__name__)
        self.exit_code = EXIT_SOFTWARE
        self.stopping.set()
        self.wake.set()

    # --- the model ------------------------------------------------------------------------------
    def _load_package(self):
        from ..manifest import ModelPackage

        return ModelPackage.load(self.cfg.run.model_dir)

    def _build(self, package):
        """Decode pool + warmed-up backend + pipeline for `package`; nothing half-built is left
        behind when any of it fails."""
        import numpy as np

        from ..backends import create_backend, select_backend
        from ..pipeline import Pipeline, heatmaps_wanted
        from ..sinks import SRSink
        from ..workers import WorkerPool, default_workers

        cfg = self.cfg
        workers = cfg.run.workers or default_workers()
        selection = select_backend(package, cfg.run.backend, cfg.run.precision)
        if cfg.run.write_sr:  # the first study's SR must not wait for a template every worker would build
            try:
                SRSink(package.describe(package.artifact(selection.artifact).sha256)).warm(package.labels)
            except Exception as exc:  # each SR then falls back to highdicom's constructor
                log.warning("cannot prepare the SR template (%s); SRs will be built the slow way", type(exc).__name__)
        # Decode workers are forked before the backend starts its threads.
        pool = WorkerPool(workers, package.preprocess_params, min_side=cfg.run.min_side, confine=cfg.inbox)
        runner = None
        try:
            runner = create_backend(package, selection.backend, selection.precision, selection.artifact,
                                    threads=cfg.run.threads, max_batch=cfg.run.batch_size)
            runner.activate()
            p = package.preprocess_params
            runner.infer(np.zeros((1, p.channels, p.size, p.size), np.float32))  # warm-up before the first study
            pipeline = Pipeline(package, runner, cfg.out, workers=workers, max_batch=cfg.run.batch_size,
                                max_delay_ms=cfg.run.max_delay_ms, write_sr=cfg.run.write_sr,
                                heatmaps=heatmaps_wanted(cfg.run.heatmaps, package, runner), log_names=False)
        except BaseException as exc:
            pool.close()
            if runner is not None:
                runner.deactivate()
            if isinstance(exc, CxrEdgeError) or not isinstance(exc, Exception):
                raise
            # onnxruntime refusing a model whose sha256 matched: one line, not a traceback
            raise ModelPackageError(f"cannot load the model: {type(exc).__name__}") from None
        log.info("model %s %s; backend %s, %s artifact %r: %s", package.name, package.version, selection.backend,
                 selection.precision, selection.artifact, selection.reason)
        return pool, pipeline, runner

    def _reload(self) -> None:
        """SIGHUP: validate the new package and build its pool, backend and pipeline completely,
        then swap; on any failure the old ones stay and serve on."""
        self.reload_requested.clear()
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            built = self._build(self._load_package())
        except Exception as exc:
            reason = str(exc) if isinstance(exc, CxrEdgeError) else type(exc).__name__
            log.error("SIGHUP: model reload failed, keeping the current model: %s", reason)
            self.metrics.reloads.labels(result="failed").inc()
            notify("READY=1\nSTATUS=reload failed; serving the previous model")
            return
        old = self.pool, self.runner
        self.pool, self.pipeline, self.runner = built
        self.watchdog.beat("main")
        try:
            old[0].close()
            old[1].__exit__(None, None, None)
        except Exception as exc:  # the new model serves; the old one's teardown is not worth dying for
            log.error("SIGHUP: closing the previous model failed (%s)", type(exc).__name__)
        self.metrics.reloads.labels(result="ok").inc()
        log.info("SIGHUP: model reloaded: %s %s", self.pipeline.package.name, self.pipeline.package.version)
        notify("READY=1")

    # --- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.watchdog.beat("main")
            if self.reload_requested.is_set():
                self._reload()
            try:
                if self._journal_down_since is not None:
                    self._recover_in_flight()  # the journal failed mid-chunk: settle those rows first
                    log.warning("the journal is writable again after %.0f s", time.monotonic() - self._journal_down_since)
                    self._journal_down_since = None
                rows = self.journal.claim_due(self.cfg.chunk)
                if rows:
                    self._process(rows)
                    continue
                due = self.journal.next_due_in()
                if time.monotonic() - self._status_at >= STATUS_EVERY:
                    self._status_at = time.monotonic()
                    self._status()
            except sqlite3.Error as exc:  # a full or failing disk under the journal: wait, do not die
                self._journal_failed(exc)
                due = backoff(3)
            self.wake.wait(timeout=min(1.0, due) if due is not None else 1.0)
            self.wake.clear()

    def _journal_failed(self, exc: sqlite3.Error) -> None:
        if self._journal_down_since is None:
            self._journal_down_since = time.monotonic()
            log.error("cannot write the journal (%s); processing pauses and resumes when it is writable", exc)
            notify("STATUS=paused: the journal cannot be written")
        self.metrics.journal_errors.inc()

    def _status(self) -> None:
        status = self.journal.status(recent=0)
        inputs = status["inputs"]
        self.metrics.queue_depth.set(inputs["pending"] + self.watcher.pending())
        waiting = status["pending_retrying"].get("transient", 0)
        self.metrics.waiting_transient.set(waiting)
        text = (f"STATUS=done {inputs['done']}, failed {inputs['failed']}, pending {inputs['pending']}"
                + (f" ({waiting} waiting for a transient error to clear)" if waiting else ""))
        if text != self._last_status:  # only news
            self._last_status = text if notify(text) else None

    def _offer(self, path: Path) -> float | None:
        """Called by the watcher for an inbox entry that looks complete: journal it once.
        Returns None when dealt with, else the seconds after which to offer it again."""
        from ..prepare import file_sha256, inbox_entry_refusal

        relative = path.relative_to(self.cfg.inbox).as_posix()
        undecodable = None
        try:
            relative.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8: journaled under an escaped name, refused
            relative = os.fsencode(relative).decode("utf-8", "backslashreplace")
            undecodable = "a file name that is not valid UTF-8 (not taken: rename it)"
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot look at an inbox entry: %s; will try again", exc.strerror)
            return 30.0
        identity = identity_of(info)
        refusal = inbox_entry_refusal(path, info, self.cfg.inbox) or undecodable
        sha256 = ""
        try:
            if refusal is None:
                known = self.journal.unchanged_since_finished(relative, identity)
                if known is not None:
                    self._seen_again(path, known)
                    return None
                try:
                    sha256, _, _ = file_sha256(path, follow_symlinks=False)
                except FileNotFoundError:
                    return None
                except CxrEdgeError as exc:  # replaced by a FIFO or device since the lstat: refused
                    refusal = exc.reason
                except OSError as exc:  # unreadable now (permission, I/O): journaled once it can be read
                    log.warning("an inbox entry cannot be read yet (%s); will try again", exc.strerror or type(exc).__name__)
                    return 30.0
            row, work = self.journal.offer(relative, identity, sha256, refusal)
        except sqlite3.Error as exc:
            self._journal_failed(exc)
            return 10.0
        if refusal is not None:
            if row.id not in self._refusals_logged:  # journaled once, logged once per run
                self._refusals_logged.add(row.id)
                self.metrics.errors.labels(stage="read").inc()
                log.warning("#%d refused: %s", row.id, refusal)
            return None
        if work:
            self.wake.set()
        else:
            self._seen_again(path, row)
        return None

    def _seen_again(self, path: Path, row: Row) -> None:
        if row.state in ("done", "failed"):
            log.info("#%d seen again, already %s", row.id, row.state)
            self._dispose(path, row.relative, row.state, row.identity)

    def _process(self, rows: list[Row]) -> None:
        items = [InputItem(self.cfg.inbox / row.relative, PurePath(row.relative)) for row in rows]
        by_relative = {row.relative: row for row in rows}  # one active row per relative path
        started = time.perf_counter()
        try:
            results = self.pipeline.run(items, pool=self.pool,
                                        on_result=lambda result: self._finish(by_relative[result.item.relative.as_posix()],
                                                                              result),
                                        heartbeat=lambda: self.watchdog.beat("main"))
        except sqlite3.Error as exc:
            self._journal_failed(exc)
            return
        if results:
            log.debug("chunk of %d in %.2f s", len(results), time.perf_counter() - started)

    def _finish(self, row: Row, result) -> None:
        """Record one result as it comes (so a SIGKILL loses at most what is in flight)."""
        self.watchdog.beat("main")
        record = result.record
        processed = record.input_sha256
        timings = record.timings_ms
        for stage in ("decode", "preprocess", "queue", "inference_batch", "write"):
            if stage in timings:
                self.metrics.stage_seconds.labels(stage=stage).observe(timings[stage] / 1e3)
        send_to = str(self.cfg.send_to) if self.cfg.send_to else None
        if result.status == "ok":
            sr_error = record.sr_error.to_json() if record.sr_error else None
            # Findings written, SR not (an invalid source UID, a header highdicom refuses): done,
            # with the reason kept in the journal for `status`, and nothing to send.
            state = self.journal.done(row.id, processed, result.outputs, sr_error, send_to, settle=self.cfg.settle,
                                      claimed_version=row.version, objects=dicom_objects(record))
            if state != "done":
                log.info("#%d changed while it was processed; again with the new bytes", row.id)
                return
            self.metrics.inputs.labels(result="ok").inc()
            if sr_error:
                self.metrics.sr_failures.inc()
                log.warning("#%d findings written without an SR: %s", row.id, sr_error["reason"])
            self.metrics.batch_size.observe(timings.get("batch_size", 1))
            age = time.time() - row.mtime_ns / 1e9
            self.metrics.arrival_to_output_seconds.observe(age)
            uid = (record.dicom or {}).get("sop_instance_uid")
            log.info("#%d done%s", row.id, f" (SOP Instance {uid})" if uid else "")
            self._dispose(self.cfg.inbox / row.relative, row.relative, "done", row.identity)
            return
        error = result.error
        stage, reason, kind = error.stage, error.reason, error.kind or PERMANENT
        state = self.journal.failed(row.id, processed, f"{stage}: {reason}", kind, result.outputs,
                                    self.cfg.max_attempts, young=self._young(row), settle=self.cfg.settle,
                                    claimed_version=row.version)
        if state == "failed":
            self.metrics.errors.labels(stage=stage).inc()
            log.warning("#%d failed: %s: %s", row.id, stage, reason)
            self._dispose(self.cfg.inbox / row.relative, row.relative, "failed", row.identity)
        else:
            self.metrics.retries.labels(kind=kind).inc()
            log.warning("#%d will retry (%s): %s: %s", row.id, kind, stage, reason)

    def _young(self, row: Row) -> bool:
        return time.time() - row.mtime_ns / 1e9 < self.cfg.young_seconds

    def _dispose(self, path: Path, relative: str, state: str, identity: tuple | None = None) -> None:
        """Move or delete a finished input, only if it is still the file that was journaled: new
        bytes renamed in meanwhile are a new input, never disposed of unprocessed."""
        if self.cfg.disposition == "leave":
            return
        try:
            if identity is not None and identity_of(os.lstat(path)) != tuple(identity):
                return
        except OSError:
            return
        try:
            if self.cfg.disposition == "delete":
                path.unlink()
            else:
                target = (self.cfg.processed_dir or self.cfg.state_dir / "processed") / state / output_stem(PurePath(relative))
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), target)
        except (OSError, shutil.Error) as exc:  # shutil's messages quote paths: the type or strerror only
            log.error("cannot %s a processed input: %s", self.cfg.disposition,
                      getattr(exc, "strerror", None) or type(exc).__name__)

    # --- crash recovery -------------------------------------------------------------------------
    def _recover(self, listener_leftovers: int = 0) -> None:
        """After a crash: no temp files, and every input caught mid-flight either done or redone."""
        removed = sweep_temp_files(self.cfg.out)
        recovered, redone = self._recover_in_flight()
        if removed or recovered or redone or listener_leftovers:
            log.warning("recovered from an unclean stop: %d temp files removed (%d of the listener), %d inputs had "
                        "complete outputs, %d will be redone", removed + listener_leftovers, listener_leftovers,
                        recovered, redone)

    def _recover_in_flight(self) -> tuple[int, int]:
        """Rows left 'processing' (a crash, a journal that could not be written): outputs complete
        -> done, with its SR send queued; else pending again (the redo overwrites its outputs)."""
        recovered = redone = 0
        send_to = str(self.cfg.send_to) if self.cfg.send_to else None
        for row in self.journal.in_processing():
            complete = self._complete_outputs(row)
            if complete:
                outputs, sr_error, objects = complete
                self.journal.done(row.id, None, outputs, sr_error, send_to, objects=objects)
                recovered += 1
            elif row.claims >= POISON_CLAIMS:  # the daemon died every time it took this input: stop taking it
                self._remove_orphans(row)
                self.journal.failed(row.id, None, f"decode: the daemon stopped {row.claims} times while processing "
                                    "this input", UNEXPECTED, None, max_attempts=1)
                log.error("#%d failed: the daemon stopped %d times while processing it", row.id, row.claims)
            else:
                self._remove_orphans(row)
                self.journal.requeue(row.id)
                redone += 1
        return recovered, redone

    def _outputs_of(self, row: Row) -> tuple[Path, Path]:
        stem = self.cfg.out / output_stem(PurePath(row.relative))
        return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".sr.dcm")

    def _complete_outputs(self, row: Row) -> tuple[dict, dict | None, list] | None:
        """(outputs, the record's sr_error, its DICOM objects to send) when the row's outputs
        are complete: its JSON record, and every file the record names."""
        json_path, _ = self._outputs_of(row)
        record = FindingsRecord.read(json_path)
        if not record or not record.ok or not row.sha256 or record.input_sha256 != row.sha256:
            return None
        outputs = {"json": str(json_path)}
        if record.sr:
            outputs["sr"] = record.sr["path"]
        maps = record.heatmap_files
        if maps:
            outputs["heatmaps"] = maps
        if not all(Path(path).is_file() for path in [outputs.get("sr"), *maps] if path):
            return None
        return outputs, record.sr_error.to_json() if record.sr_error else None, dicom_objects(record)

    def _remove_orphans(self, row: Row) -> None:
        """The SR and heatmaps written just before the crash, without their JSON, are removed;
        those of the complete outputs of an earlier version of the file (named in its JSON, the
        same instance) are kept. The redo writes its own again."""
        json_path, sr_path = self._outputs_of(row)
        record = FindingsRecord.read(json_path)
        named = {}  # path -> the SOP Instance UID the record gives it (None: a PNG)
        if record and record.ok:
            named.update({path: uid for path, uid in dicom_objects(record)})
            named.update({path: None for path in record.heatmap_files if path not in named})
        stem = json_path.with_name(json_path.name.removesuffix(".json"))
        candidates = [sr_path, *every_heatmap_path(stem, LABELS)]
        for path in candidates:
            if not (path.is_file() or path.is_symlink()):  # absent, or a folder that is not ours
                continue
            if str(path) in named:
                uid = named[str(path)]
                if uid is None or _sop_instance_uid(path) == uid:
                    continue
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # the redo overwrites it, or fails on it with a reason
                log.warning("cannot remove an orphan output: %s", exc.strerror or type(exc).__name__)

    def _release_in_flight(self) -> None:
        """On the way out nothing stays 'processing': the normal path finished every claimed
        row; after a failure, what is left goes back to pending."""
        try:
            for row in self.journal.in_processing():
                self.journal.requeue(row.id)
        except sqlite3.Error as exc:  # the next start recovers them
            log.error("cannot release in-flight inputs: %s", exc)

    # --- SR sending -----------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while not self.stopping.wait(0.5):
            self.watchdog.beat("sender")
            try:
                due = self.journal.due_sends()
            except sqlite3.Error as exc:
                self._journal_failed(exc)
                continue
            for send in due:
                send_id, destination, attempts = send.id, send.destination, send.attempts
                if self.stopping.is_set():
                    return
                state, problem = self._send_one(send.objects, destination)
                self.watchdog.beat("sender")
                try:
                    self.journal.send_result(send_id, state, problem, attempts + 1)
                except sqlite3.Error as exc:  # sent again later: the SR's UID makes that harmless
                    self._journal_failed(exc)
                    break
                self.metrics.sr_sends.labels(result={"pending": "retry"}.get(state, state)).inc()
                if state == "sent" and problem:
                    log.warning("sent to %s, in part: %s", destination, problem)
                elif state == "sent":
                    log.info("SR and heatmaps sent to %s (%d objects)", destination, len(send.objects))
                elif state == "pending":
                    log.warning("SR send to %s failed (attempt %d), will retry: %s", destination, attempts + 1, problem)
                else:
                    log.error("SR send to %s %s: %s", destination, state, problem)

    def _send_one(self, objects, destination: str) -> tuple[str, str | None]:
        """(new send state, why not sent) for one input's objects (SR first, then heatmaps), sent
        together. Network and PACS trouble is retried; a file that is gone or replaced by a newer
        version's is not (the newer version's own send carries it)."""
        from .dicom_net import Peer, send_objects

        for number, (path, uid) in enumerate(objects):
            what = "the SR" if number == 0 and str(path).endswith(".sr.dcm") else "a heatmap"
            try:
                found = _sop_instance_uid(Path(path), strict=True)
            except FileNotFoundError:
                return "failed", f"{what} file is gone"
            except OSError as exc:
                return "pending", f"cannot read {what} file: {exc.strerror or type(exc).__name__}"
            except Exception as exc:  # noqa: BLE001 - not a readable DICOM file any more
                return "failed", f"{what} file is not readable DICOM ({type(exc).__name__})"
            if uid and found != uid:
                return "superseded", f"a newer version of the input replaced {what}"
        try:
            problem, refused = send_objects([Path(path) for path, _ in objects], Peer.parse(destination),
                                            self.cfg.calling_ae)
        except Exception as exc:  # network down, PACS away: retried with backoff; paths stay out of the log
            problem, refused = f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or 'no detail'}", []
        if problem is None and refused:  # sent, but for objects the PACS takes no SOP class of: never retried
            return "sent", f"the PACS does not accept SOP class {', '.join(refused)}: those objects were not sent"
        return ("sent", None) if problem is None else ("pending", problem)


def dicom_objects(record: FindingsRecord) -> list[tuple[str, str | None]]:
    """The DICOM objects of a complete record, as the PACS gets them: the SR, then the heatmaps."""
    objects = [(record.sr["path"], record.sr.get("sop_instance_uid"))] if record.sr.get("path") else []
    return objects + record.heatmap_dicoms


def _sop_instance_uid(path: Path, strict: bool = False) -> str | None:
    """A DICOM file's SOP Instance UID; None when unreadable (with `strict`, the exception)."""
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except Exception:
        if strict:
            raise
        return None
