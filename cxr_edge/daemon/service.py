"""`cxr-edge watch`: the unattended service around the same Pipeline as `cxr-edge infer`.

Inbox (watchdog + start-up scan, or the DICOM SCP) -> journal (SQLite) -> Pipeline (decode
workers, dynamic batching, backend, atomic JSON + SR) -> journal -> SR send queue -> PACS.
Exactly once: an input is (relative path, sha256); its outputs are complete (JSON written last)
or absent; after a crash, inputs caught mid-flight are checked against their outputs and either
marked done or redone.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from ..errors import CxrEdgeError
from ..limits import MIN_SIDE
from ..outputs import output_stem
from ..sources import InputItem
from .dicom_net import Peer
from .journal import Journal, Row
from .notify import Watchdog, notify
from .telemetry import BATCH_BUCKETS, Metrics

log = logging.getLogger(__name__)
TRANSIENT_STAGES = ("read", "inference", "write")
DISPOSITIONS = ("leave", "move", "delete")


@dataclass
class DaemonConfig:
    inbox: Path
    out: Path
    state_dir: Path
    model: str | None = None
    backend: str = "auto"
    precision: str = "fp32"
    max_batch: int = 8
    max_delay_ms: float = 20.0
    workers: int | None = None
    threads: int | None = None
    settle: float = 2.0  # seconds a non-renamed file must stay unchanged
    max_attempts: int = 5
    young_seconds: float = 120.0  # a "truncated" file younger than this may still be arriving: retry
    disposition: str = "leave"
    processed_dir: Path | None = None
    write_sr: bool = True
    min_side: int = MIN_SIDE
    listen: Peer | None = None
    allowed_callers: list[str] = field(default_factory=list)
    send_to: Peer | None = None
    calling_ae: str = "CXREDGE"
    metrics_port: int | None = None
    chunk: int = 32  # inputs per pipeline run: bounds how long SIGTERM waits for the in-flight work

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.sqlite3"


class Daemon:
    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        self.metrics = Metrics()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.reload_requested = threading.Event()
        self.watchdog = Watchdog()
        self.journal: Journal | None = None

    # --- life cycle -----------------------------------------------------------------------------
    def run(self) -> int:
        from ..pipeline import DecodePool, default_workers, quiet_dicom_warnings

        cfg = self.cfg
        quiet_dicom_warnings()
        for path in (cfg.inbox, cfg.out, cfg.state_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(cfg.journal_path)
        self._recover()
        self.workers = cfg.workers or default_workers()
        package = self._load_package()
        # Decode workers are forked before the backend starts its threads.
        self.pool = DecodePool(self.workers, package.preprocess_params, min_side=cfg.min_side)
        self.pipeline = self._make_pipeline(package)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, lambda *_: (self.reload_requested.set(), self.wake.set()))
        from .watcher import InboxWatcher

        self.watcher = InboxWatcher(cfg.inbox, self._offer, settle=cfg.settle)
        self.watcher.start()
        servers = []
        if cfg.metrics_port:
            from .telemetry import serve

            servers.append(serve(self.metrics, cfg.metrics_port))
        if cfg.listen:
            from .dicom_net import start_scp

            servers.append(start_scp(cfg.listen, cfg.inbox, cfg.allowed_callers, on_received=None))
        sender = None
        if cfg.send_to:
            sender = threading.Thread(target=self._send_loop, name="sr-sender", daemon=True)
            sender.start()
        self.watchdog.start()
        notify("READY=1")
        log.info("watching %s -> %s (journal %s)", cfg.inbox, cfg.out, cfg.journal_path)
        try:
            self._loop()
        finally:
            notify("STOPPING=1")
            self.watcher.stop()
            for server in servers:
                server.shutdown()
            self.watchdog.stop()
            self.pool.close()
            self.runner.__exit__(None, None, None)
            if sender:
                sender.join(timeout=10)
            self.journal.close()
        log.info("stopped cleanly")
        return 0

    def _on_stop(self, signum, frame) -> None:
        log.info("%s: finishing the in-flight batch, then exiting", signal.Signals(signum).name)
        self.stopping.set()
        self.wake.set()

    def _load_package(self):
        from ..manifest import ModelPackage

        return ModelPackage.load(self.cfg.model)

    def _make_pipeline(self, package):
        import numpy as np

        from ..backends import create_backend, select_backend
        from ..pipeline import Pipeline

        selection = select_backend(package, self.cfg.backend, self.cfg.precision)
        runner = create_backend(package, selection.backend, selection.precision, selection.artifact, threads=self.cfg.threads)
        runner.__enter__()
        p = package.preprocess_params
        runner.infer(np.zeros((1, p.channels, p.size, p.size), np.float32))  # warm-up before the first study
        log.info("model %s %s; backend %s, %s artifact %r: %s", package.name, package.version, selection.backend,
                 selection.precision, selection.artifact, selection.reason)
        self.runner = runner
        return Pipeline(package, runner, self.cfg.out, workers=self.workers, max_batch=self.cfg.max_batch,
                        max_delay_ms=self.cfg.max_delay_ms, write_sr=self.cfg.write_sr, log_names=False)

    def _reload(self) -> None:
        self.reload_requested.clear()
        old_runner = self.runner
        try:
            package = self._load_package()
            if package.preprocess_params != self.pipeline.package.preprocess_params:
                self.pool.close()
                from ..pipeline import DecodePool

                self.pool = DecodePool(self.workers, package.preprocess_params, min_side=self.cfg.min_side)
            self.pipeline = self._make_pipeline(package)
        except CxrEdgeError as exc:  # keep serving with the old model
            self.runner = old_runner
            log.error("SIGHUP: model reload failed, keeping the current model: %s", exc)
            return
        old_runner.__exit__(None, None, None)
        log.info("SIGHUP: model reloaded")

    # --- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.watchdog.beat()
            if self.reload_requested.is_set():
                self._reload()
            rows = self.journal.claim_due(self.cfg.chunk)
            if rows:
                self._process(rows)
                continue
            due = self.journal.next_due_in()
            self._status()
            self.wake.wait(timeout=min(1.0, due) if due is not None else 1.0)
            self.wake.clear()

    def _status(self) -> None:
        status = self.journal.status(recent=0)
        inputs = status["inputs"]
        self.metrics.set("cxr_edge_queue_depth", inputs["pending"] + self.watcher.pending(),
                         help="inputs seen but not yet processed")
        notify(f"STATUS=done {inputs['done']}, failed {inputs['failed']}, pending {inputs['pending']}")

    def _offer(self, path: Path) -> None:
        """Called by the watcher for a complete file: journal it once."""
        try:
            stat = path.stat()
            relative = path.relative_to(self.cfg.inbox).as_posix()
            known = self.journal.known_by_stat(relative, stat.st_size, stat.st_mtime_ns)
            if known is None:
                from ..pipeline import _file_sha256

                sha256, _ = _file_sha256(path)
                known = self.journal.register(relative, str(path), stat.st_size, stat.st_mtime_ns, sha256)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read a new input: %s", exc.strerror or exc)
            return
        if known.state in ("done", "failed"):
            log.info("#%d seen again, already %s", known.id, known.state)
            self._dispose(path, known.relative, known.state)
        else:
            self.wake.set()

    def _process(self, rows: list[Row]) -> None:
        by_path = {row.path: row for row in rows}
        items = []
        for row in rows:
            if Path(row.path).is_file():
                items.append(InputItem(Path(row.path), PurePath(row.relative)))
            else:
                self.journal.failed(row.id, "input file vanished before it was processed", None, False, 1, 1)
        started = time.perf_counter()
        results = self.pipeline.run(items, pool=self.pool)
        for result in results:
            self._finish(by_path[str(result.item.path)], result)
        if results:
            log.debug("chunk of %d in %.2f s", len(results), time.perf_counter() - started)

    def _finish(self, row: Row, result) -> None:
        record = result.record
        timings = record.get("timings_ms", {})
        for stage in ("decode", "preprocess", "queue", "inference_batch", "write"):
            if stage in timings:
                self.metrics.observe("cxr_edge_stage_seconds", timings[stage] / 1e3, {"stage": stage},
                                     help="time per input and stage")
        if result.status == "ok":
            sr_error = record.get("sr_error")
            # Findings written, SR not (an invalid source UID, a header highdicom refuses): done,
            # with the reason kept in the journal for `status`, and nothing to send.
            self.journal.done(row.id, result.outputs, sr_error)
            self.metrics.inc("cxr_edge_inputs", labels={"result": "ok"}, help="inputs processed")
            if sr_error:
                self.metrics.inc("cxr_edge_sr_failures", help="inputs whose findings were written without their SR")
                log.warning("#%d findings written without an SR: %s", row.id, sr_error["reason"])
            self.metrics.observe("cxr_edge_batch_size", timings.get("batch_size", 1), buckets=BATCH_BUCKETS,
                                 help="inference batch sizes")
            try:
                age = time.time() - row.mtime_ns / 1e9
                self.metrics.observe("cxr_edge_arrival_to_output_seconds", age, help="file mtime to outputs written")
            except (TypeError, ValueError):
                pass
            uid = (record.get("dicom") or {}).get("sop_instance_uid")
            log.info("#%d done%s", row.id, f" (SOP Instance {uid})" if uid else "")
            if self.cfg.send_to and "sr" in result.outputs:
                self.journal.queue_send(row.id, result.outputs["sr"], str(self.cfg.send_to))
            self._dispose(Path(row.path), row.relative, "done")
            return
        error = result.error or {}
        stage, reason = error.get("stage", "?"), error.get("reason", "?")
        self.metrics.inc("cxr_edge_errors", labels={"stage": stage}, help="failed inputs by stage")
        retry = stage in TRANSIENT_STAGES or (stage == "decode" and "truncated" in reason and self._young(row))
        state = self.journal.failed(row.id, f"{stage}: {reason}", result.outputs, retry, row.attempts, self.cfg.max_attempts)
        log.warning("#%d %s: %s: %s", row.id, "will retry" if state == "pending" else "failed", stage, reason)
        if state == "failed":
            self._dispose(Path(row.path), row.relative, "failed")

    def _young(self, row: Row) -> bool:
        return time.time() - row.mtime_ns / 1e9 < self.cfg.young_seconds

    def _dispose(self, path: Path, relative: str, state: str) -> None:
        if self.cfg.disposition == "leave" or not path.exists():
            return
        try:
            if self.cfg.disposition == "delete":
                path.unlink()
            else:
                target = (self.cfg.processed_dir or self.cfg.state_dir / "processed") / state / output_stem(PurePath(relative))
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), target)
        except OSError as exc:
            log.error("cannot %s a processed input: %s", self.cfg.disposition, exc.strerror or exc)

    # --- crash recovery -------------------------------------------------------------------------
    def _recover(self) -> None:
        """After a crash: no temp files, and every input caught mid-flight either done or redone."""
        removed = 0
        for folder, _, files in os.walk(self.cfg.out):
            for name in files:
                if name.startswith(".") and name.endswith(".part"):  # atomic_write_bytes' temp files
                    Path(folder, name).unlink(missing_ok=True)
                    removed += 1
        recovered = redone = 0
        for row in self.journal.in_processing():
            complete = self._complete_outputs(row)
            if complete:
                outputs, sr_error = complete
                self.journal.done(row.id, outputs, sr_error)
                recovered += 1
            else:
                stem = self.cfg.out / output_stem(PurePath(row.relative))
                stem.with_name(stem.name + ".sr.dcm").unlink(missing_ok=True)  # an SR without its JSON
                self.journal.requeue(row.id)
                redone += 1
        if removed or recovered or redone:
            log.warning("recovered from an unclean stop: %d temp files removed, %d inputs had complete outputs, "
                        "%d will be redone", removed, recovered, redone)

    def _complete_outputs(self, row: Row) -> tuple[dict, dict | None] | None:
        """(outputs, the record's sr_error) when the row's outputs are complete, else None."""
        import json

        stem = self.cfg.out / output_stem(PurePath(row.relative))
        json_path = stem.with_name(stem.name + ".json")
        try:
            record = json.loads(json_path.read_text())
        except (OSError, ValueError):
            return None
        if record.get("status") != "ok" or record.get("input", {}).get("sha256") != row.sha256:
            return None
        outputs = {"json": str(json_path)}
        sr = (record.get("outputs") or {}).get("sr")
        if sr:
            if not Path(sr["path"]).is_file():
                return None
            outputs["sr"] = sr["path"]
        return outputs, record.get("sr_error")

    # --- SR sending -----------------------------------------------------------------------------
    def _send_loop(self) -> None:
        from .dicom_net import Peer, send_sr

        while not self.stopping.wait(0.5):
            for send_id, sr_path, destination, attempts in self.journal.due_sends():
                try:
                    problem = send_sr(Path(sr_path), Peer.parse(destination), self.cfg.calling_ae)
                except Exception as exc:  # network down, PACS away: retried with backoff
                    problem = f"{type(exc).__name__}: {exc}"
                self.journal.send_result(send_id, problem is None, problem, attempts + 1)
                self.metrics.inc("cxr_edge_sr_sends", labels={"result": "ok" if problem is None else "retry"},
                                 help="SR C-STORE attempts")
                if problem:
                    log.warning("SR send to %s failed (attempt %d), will retry: %s", destination, attempts + 1, problem)
                else:
                    log.info("SR sent to %s", destination)
