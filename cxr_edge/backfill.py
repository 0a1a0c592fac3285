"""`cxr-edge backfill`: the stages of `infer` on Ray Data, for an archive too big for one machine.

    paths --map_batches(read_and_prepare: CPU tasks)--> tensors
          --map_batches(ModelStage: an actor pool, one runner each)--> logits (+ class maps)
          --map_batches(write_outputs: CPU tasks)--> per-input JSON, SR, heatmaps; one table row each
          --> the driver: OUT/findings.parquet

Each stage is the local pipeline's own code (prepare.prepare, the runners, pipeline.OutputWriter),
so the records are the ones `infer` writes. Resumable: an input whose complete outputs exist for
the same bytes and model is hashed, not decoded (resume.CompletedOutputs), and its row comes from
its record. Exactly once: every output is written atomically under a name that depends only on
the input, the JSON last; a worker that dies is replaced by Ray and its block done again, which
rewrites the same files; the table keeps one row per input.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath

import numpy as np

from .errors import UNEXPECTED, CxrEdgeError
from .limits import DEFAULT_MAX_PIXELS
from .pipeline import RunSettings

log = logging.getLogger(__name__)

LOCK_NAME = ".cxr-edge-backfill.lock"
# the largest image allowed (limits.DEFAULT_MAX_PIXELS) as float32, twice (the decoder's buffers)
DECODE_MEMORY = 2 * 4 * DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ClusterSettings:
    """Where and how wide the backfill runs (the model and outputs: RunSettings)."""

    address: str | None = None  # None: start a Ray instance on this machine; "auto", "HOST:PORT", "ray://HOST:PORT"
    cpus: int | None = None  # a started instance's CPUs (None: all)
    actors: int = 1  # model replicas (the actor pool's size)
    actor_cpus: float = 1.0  # CPUs each replica reserves (its inference threads)
    gpus_per_actor: float = 0.0  # > 0: each replica takes that share of a GPU
    block_rows: int = 32  # inputs per read-and-decode task (Ray's retry unit)


@dataclass(frozen=True)
class StageContext:
    """What every stage needs, sent once with the plan (picklable)."""

    out_dir: Path
    model_dir: str | None
    backend: str
    precision: str
    artifact: str
    params: object  # the package's PreprocessParams
    max_pixels: int
    min_side: int
    display_side: int
    write_sr: bool
    heatmaps: bool
    threads: int
    completed: object  # resume.CompletedOutputs
    max_batch: int = 8  # the model stage's batch (a torch runner captures CUDA graphs up to it)


# --- the stages (run in Ray workers) ------------------------------------------------------------
def _worker_setup() -> None:
    """As the local workers: DICOM libraries silenced (their messages quote header values),
    OpenCV single-threaded (one task per CPU)."""
    from . import preprocess  # noqa: F401
    from .prepare import quiet_dicom_warnings

    quiet_dicom_warnings()


def _objects(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


_decoder: list = []  # per Ray worker process: [(key, WorkerPool)], made on its first block


def _decode_pool(context: StageContext):
    """One decode process per Ray worker, as `infer`'s WorkerPool: an input that crashes its decoder
    (a segfault, the OOM killer) gets the same error record as in `infer`, instead of killing the
    Ray worker (whose task Ray would run again, for ever). Spawned: a Ray worker has threads."""
    from .workers import WorkerPool

    key = (context.out_dir, context.model_dir, context.artifact, context.min_side, context.display_side,
           context.write_sr, context.heatmaps)
    if _decoder and _decoder[0][0] != key:  # this Ray worker serves another run now
        _decoder.pop()[1].close()
    if not _decoder:
        _decoder.append((key, WorkerPool(1, context.params, context.max_pixels, context.min_side,
                                         display_side=context.display_side, earlier=context.completed,
                                         start_method="spawn")))
    return _decoder[0][1]


def read_and_prepare(batch: dict, context: StageContext) -> dict:
    """Hash, (if not done already) decode and preprocess each input of a block."""
    from .sources import InputItem

    params = context.params
    items = [InputItem(Path(path), PurePath(relative)) for path, relative in zip(batch["path"], batch["relative"])]
    done = {p.item.relative: p for p in _decode_pool(context).prepared(items, window=2)}
    prepared = [done[item.relative] for item in items]  # relative names are unique in a run
    shape = (params.channels, params.size, params.size)
    tensors = np.stack([p.tensor if p.tensor is not None else np.zeros(shape, np.float32) for p in prepared])
    ready = np.array([p.tensor is not None for p in prepared], dtype=bool)
    for p in prepared:
        p.tensor = None  # it travels in its own column
        p.started_at = None  # perf_counter is per machine: no end-to-end time across nodes
    return {"prepared": _objects(prepared), "tensor": tensors.astype(np.float32, copy=False), "ready": ready}


def _same_package(context: StageContext):
    """The model package as this node has it, which must be the driver's: the records name the
    driver's model, so a node with another version (an older install) stops the run, saying why."""
    from .manifest import ModelPackage

    package = ModelPackage.load(context.model_dir)
    if package.describe(package.artifact(context.artifact).sha256) != context.completed.model:
        raise CxrEdgeError(f"this node's model package ({package.name} {package.version} at {package.root}) is not "
                           "the driver's: install the same cxr-edge and model package on every node")
    return package


class ModelStage:
    """One model replica (a Ray actor): the runner `infer` would use, loaded once."""

    def __init__(self, context: StageContext):
        from .backends import create_backend
        from .pipeline import heatmaps_wanted

        _worker_setup()
        package = _same_package(context)
        self.labels = len(package.labels)
        self.runner = create_backend(package, context.backend, context.precision, context.artifact,
                                     threads=context.threads, max_batch=context.max_batch)
        self.runner.activate()
        self.maps = None
        if context.heatmaps:
            heatmaps_wanted(True, package, self.runner)  # the artifact must have them too, or say why
            self.maps = package.heatmap_spec
            self.runner.maps_output = self.maps.output
        self.backend = json.dumps(self.runner.describe())

    def __call__(self, batch: dict) -> dict:
        ready = batch["ready"]
        n = len(ready)
        logits = np.full((n, self.labels), np.nan, np.float32)
        maps = np.zeros((n, self.labels, *self.maps.grid), np.float32) if self.maps else None
        timings, failure = {}, None
        if ready.any():
            started = time.perf_counter()
            try:
                logits[ready] = self.runner.infer(np.ascontiguousarray(batch["tensor"][ready]))
                if maps is not None:
                    maps[ready] = self.runner.last_maps
            except Exception as exc:  # as in `infer`: each input of the batch gets an error record
                failure = f"{type(exc).__name__}: {exc}"
            timings = {"inference_batch": (time.perf_counter() - started) * 1e3, "batch_size": int(ready.sum())}
            if self.runner.last_timings and failure is None:
                timings.update(self.runner.last_timings.split())
        out = {"prepared": batch["prepared"], "logits": logits, "ready": ready,
               "timings": np.array([json.dumps(timings)] * n), "backend": np.array([self.backend] * n),
               "failure": np.array([failure or ""] * n)}
        if maps is not None:
            out["maps"] = maps
        return out


_writers: dict = {}  # per worker process: (out, backend) -> OutputWriter (the SR template is built once)


def _writer(context: StageContext, backend: str):
    from .pipeline import OutputWriter

    key = (str(context.out_dir), context.model_dir, context.artifact, context.write_sr, context.heatmaps, backend)
    if key not in _writers:
        package = _same_package(context)
        # file names may carry patient data, and Ray keeps worker logs on every node: the driver names failures
        _writers[key] = OutputWriter(package, context.completed.model, json.loads(backend), context.out_dir,
                                     write_sr=context.write_sr, heatmaps=context.heatmaps, log_names=False)
    return _writers[key]


def write_outputs(batch: dict, context: StageContext, labels: list[str]):
    """Each input's outputs, as `infer` writes them; one findings-table row each."""
    import pyarrow as pa

    from .findings_table import schema, table_row
    from .pipeline import NON_FINITE
    from .sinks import Inference

    _worker_setup()
    rows = []
    maps = batch.get("maps")
    for i, prepared in enumerate(batch["prepared"]):
        if prepared.earlier is not None:
            rows.append(table_row(prepared.earlier, str(context.completed.record_path(prepared.item)), labels, True))
            continue
        writer = _writer(context, str(batch["backend"][i]))
        if prepared.error:
            result = writer.error(prepared, **prepared.error)
        elif batch["failure"][i]:
            result = writer.error(prepared, "inference", str(batch["failure"][i]), UNEXPECTED)
        else:
            started = time.perf_counter()
            findings = writer.findings_rows(batch["logits"][i : i + 1])[0]
            if findings is None:
                result = writer.error(prepared, *NON_FINITE)
            else:
                timings = {**prepared.timings_ms, **json.loads(str(batch["timings"][i])),
                           "postprocess": (time.perf_counter() - started) * 1e3}
                inference = Inference(prepared, findings, timings, writer.stem(prepared),
                                      maps[i] if maps is not None and writer.heatmaps else None)
                result = writer.write(inference, {})
        rows.append(table_row(result.record, result.outputs.get("json"), labels, False))
    return pa.Table.from_pylist(rows, schema=schema(labels))


# --- the driver ---------------------------------------------------------------------------------
@dataclass
class BackfillRun:
    table: object  # pyarrow.Table of the rows seen (one per input)
    skipped: int  # files in folders that are not images by name, and blank or repeated list entries
    seconds: float
    table_path: Path
    cluster: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    def _count(self, **equal) -> int:
        import pyarrow.compute as pc

        mask = None
        for column, value in equal.items():
            this = pc.equal(self.table.column(column), value)
            mask = this if mask is None else pc.and_(mask, this)
        return int(pc.sum(pc.fill_null(mask, False)).as_py() or 0) if mask is not None else self.table.num_rows

    @property
    def failed(self) -> int:
        return self._count(status="error")

    @property
    def without_sr(self) -> int:
        import pyarrow.compute as pc

        return int(pc.sum(pc.fill_null(pc.and_(pc.equal(self.table.column("status"), "ok"),
                                              pc.is_valid(self.table.column("sr_error"))), False)).as_py() or 0)

    def summary(self) -> dict:
        n = self.table.num_rows
        earlier = self._count(from_earlier_run=True)
        processed = n - earlier
        return {
            "inputs": n,
            "processed": processed,
            "already_done": earlier,
            "succeeded": n - self.failed,
            "succeeded_without_sr": self.without_sr,
            "failed": self.failed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(processed / self.seconds, 2) if self.seconds > 0 else None,
            "findings_table": str(self.table_path),
            "model": self.model,
            "cluster": self.cluster,
        }

    def failures(self) -> list[dict]:
        columns = ["relative_path", "error_stage", "error_reason"]
        return [r for r in self.table.select(columns + ["status"]).to_pylist() if r["status"] == "error"]


def plan(inputs: list[str], lists: list[str], root: str | None, column: str, out: Path, settings: RunSettings):
    """(items, skipped, package, selection) for the command line's inputs and path lists."""
    from .infer_run import model_and_output
    from .outputs import output_stem
    from .path_lists import items_from_lists
    from .sources import discover

    items, skipped = discover(list(inputs)) if inputs else ([], [])
    listed, left_out = items_from_lists(lists, root, column, {output_stem(i.relative) for i in items}) if lists else ([], 0)
    items += listed
    if not items:
        raise CxrEdgeError("no inputs (looked for DICOM, PNG and JPEG files, and the rows of the path lists)")
    package, selection = model_and_output(out, settings)
    return items, len(skipped) + left_out, package, selection


def _connect(cluster: ClusterSettings, verbose: bool) -> bool:
    """Connect to the cluster, or start an instance here; True when we started it (and stop it)."""
    try:
        import ray
    except ImportError as exc:
        raise CxrEdgeError("backfill needs Ray: pip install 'cxr-edge[ray]'") from exc
    level = logging.INFO if verbose else logging.WARNING
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    if ray.is_initialized():  # a caller's own session (a notebook, a test)
        return False
    kwargs = {"logging_level": level, "log_to_driver": verbose}
    try:
        if cluster.address:
            ray.init(address=cluster.address, **kwargs)
            return True
        ray.init(num_cpus=cluster.cpus, include_dashboard=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CxrEdgeError(f"cannot reach the Ray cluster at {cluster.address or 'a new local instance'}: "
                           f"{type(exc).__name__}: {exc}") from exc
    return True


def _check_room(facts: dict, cluster: ClusterSettings, fixed: bool) -> None:
    """The model replicas must leave a CPU for decoding and writing, or the run would wait for
    ever. An instance started here is what it is (refused); a cluster may autoscale (warned)."""
    problems = []
    if facts["cpus"] < cluster.actors * cluster.actor_cpus + 1:
        problems.append(f"{cluster.actors} model replica(s) x {cluster.actor_cpus:g} CPUs leave no CPU of the "
                        f"cluster's {facts['cpus']:g} for decoding (lower --actors or --actor-cpus)")
    if facts["gpus"] < cluster.actors * cluster.gpus_per_actor:
        problems.append(f"{cluster.actors} model replica(s) x {cluster.gpus_per_actor:g} GPUs need more than the "
                        f"cluster's {facts['gpus']:g} GPUs")
    if problems and fixed:
        raise CxrEdgeError("; ".join(problems))
    for problem in problems:
        log.warning("%s: the run waits until the cluster grows", problem)


def _cluster_facts() -> dict:
    import ray

    resources = ray.cluster_resources()
    return {"nodes": len([n for n in ray.nodes() if n.get("Alive")]), "cpus": resources.get("CPU", 0),
            "gpus": resources.get("GPU", 0), "ray": ray.__version__}


def run(items, skipped: int, package, selection, out: Path, settings: RunSettings, cluster: ClusterSettings,
        on_rows=None, verbose: bool = False) -> BackfillRun:
    """Process every item not done already; `on_rows(n)` as rows arrive at the driver."""
    import ray
    import ray.data

    from .atomic import sweep_temp_files
    from .daemon.state_lock import lock_folder
    from .findings_table import TABLE_NAME, write_table
    from .heatmaps import DISPLAY_SIDE
    from .limits import MIN_SIDE
    from .pipeline import heatmaps_wanted
    from .resume import CompletedOutputs

    out = out.absolute()  # workers on other nodes see the same shared path, not our working folder
    heatmaps = heatmaps_wanted(settings.heatmaps, package)
    artifact = package.artifact(selection.artifact)
    model = package.describe(artifact.sha256)
    threads = max(1, math.floor(cluster.actor_cpus))
    context = StageContext(out, settings.model_dir, selection.backend, selection.precision, selection.artifact,
                           package.preprocess_params, DEFAULT_MAX_PIXELS,
                           MIN_SIDE if settings.min_side is None else settings.min_side,
                           DISPLAY_SIDE if heatmaps else 0, settings.write_sr, heatmaps, threads,
                           CompletedOutputs(out, model, settings.write_sr, heatmaps), settings.batch_size)
    lock = lock_folder(out, LOCK_NAME, "another cxr-edge backfill", "one backfill per output folder")
    try:
        removed = sweep_temp_files(out)  # a worker killed mid-write (SIGKILL, a lost node) left these
        if removed:
            log.warning("removed %d temp files an interrupted run left", removed)
        started_ray = _connect(cluster, verbose)
        try:
            facts = _cluster_facts()
            _check_room(facts, cluster, started_ray and not cluster.address)
            log.info("Ray: %d node(s), %g CPUs, %g GPUs; %d model replica(s); %d inputs", facts["nodes"], facts["cpus"],
                     facts["gpus"], cluster.actors, len(items))
            data_context = ray.data.DataContext.get_current()
            data_context.enable_fallback_to_arrow_object_ext_type = True  # Prepared travels as a Python object
            data_context.enable_auto_log_stats = verbose
            rows = [{"path": str(item.path), "relative": item.relative.as_posix()} for item in items]
            blocks = max(1, math.ceil(len(rows) / cluster.block_rows))
            ds = ray.data.from_items(rows, override_num_blocks=blocks)
            # Each decode task reserves the memory of the largest image allowed, so Ray never starts more
            # than a node holds; with that resource of its own, decoding is not fused into the model
            # replicas either: it stays a pool of CPU tasks, as the design has it
            ds = ds.map_batches(read_and_prepare, fn_kwargs={"context": context}, batch_size=None, num_cpus=1,
                                memory=DECODE_MEMORY)
            ds = ds.map_batches(ModelStage, fn_constructor_kwargs={"context": context}, batch_size=settings.batch_size,
                                compute=ray.data.ActorPoolStrategy(size=cluster.actors), num_cpus=cluster.actor_cpus,
                                num_gpus=cluster.gpus_per_actor or None)
            ds = ds.map_batches(write_outputs, fn_kwargs={"context": context, "labels": list(package.labels)},
                                batch_size=None, batch_format="numpy", num_cpus=1)
            started = time.perf_counter()
            batches = []
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                batches.append(batch)
                if on_rows:
                    on_rows(batch.num_rows)
            seconds = time.perf_counter() - started
        finally:
            if started_ray:
                ray.shutdown()
        table_path = out / TABLE_NAME
        write_table(table_path, batches, list(package.labels))
        import pyarrow.parquet as pq

        table = pq.read_table(table_path)
    finally:
        os.close(lock)
    facts.update(actors=cluster.actors, actor_cpus=cluster.actor_cpus, gpus_per_actor=cluster.gpus_per_actor,
                 backend=selection.backend, precision=selection.precision)
    return BackfillRun(table, skipped, seconds, table_path, facts, model)
