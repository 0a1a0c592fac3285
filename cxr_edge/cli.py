"""`cxr-edge` command line: options in, one call into the modules, output out. Heavy modules
are imported inside commands to keep start-up fast; usage errors are click exceptions (exit 2)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from . import cli_options as opt
from .bench import SHAPES
from .cli_options import EXIT_OK, EXIT_SOME_FAILED, UsageFailure

log = logging.getLogger("cxr_edge")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # plain lines for journald, CI logs and pipes
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxr-edge")
@click.option("-v", "--verbose", count=True, help="More logging.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def main(verbose: int, quiet: bool) -> None:
    """cxr-edge: chest X-ray findings (14 NIH ChestX-ray14 findings + No Finding) as JSON and DICOM SR."""
    _setup_logging(verbose, quiet)


def _reads_dicom() -> None:
    """Commands that read DICOM silence pydicom's and highdicom's warnings first (they quote
    header values); `status` and `--help` do not pay for importing pydicom."""
    from .prepare import quiet_dicom_warnings

    quiet_dicom_warnings()


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@opt.pipeline
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable run summary on stdout.")
def infer(inputs, out_dir, model_dir, backend, precision, batch_size, max_delay_ms, workers, threads, no_sr, min_side,
          heatmaps, as_json):
    """Find chest X-ray findings in INPUTS (files or folders, recursive).

    Writes OUT/<input path>.json for every input (an error record if it failed), a DICOM SR
    OUT/<input path>.sr.dcm for every DICOM input, a heatmap per flagged finding
    (OUT/<input path>.heatmap.<finding>.png, and .dcm for DICOM inputs), and OUT/summary.jsonl.
    Exit status: 0 every input succeeded with all its outputs, 1 some failed or got findings
    without their SR, 2 usage or configuration error.
    """
    from . import infer_run
    from .console import print_summary, progress
    from .pipeline import RunSettings
    from .errors import CxrEdgeError

    _reads_dicom()
    out = Path(out_dir)
    settings = RunSettings(model_dir, backend, precision, batch_size, max_delay_ms, workers, threads, not no_sr, min_side,
                           heatmaps)
    try:
        items, skipped, package, selection = infer_run.plan(list(inputs), out, settings)
        with progress(len(items)) as on_result:
            run = infer_run.run(items, skipped, package, selection, out, settings, on_result)
    except CxrEdgeError as exc:
        raise UsageFailure(exc) from None
    _report_and_exit(run, as_json, lambda summary: print_summary(summary, run.results))


@main.command()
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder (on a cluster: shared storage every node sees at the same path).")
@click.option("--list", "lists", multiple=True, type=click.Path(dir_okay=False),
              help="A CSV (header row) or Parquet file with a column of paths to read; repeatable.")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Where the lists' relative paths start, and what output names are relative to "
                   "[default: each list's folder].")
@click.option("--path-column", default="path", show_default=True, help="The lists' column of paths.")
@click.option("--address", default=None,
              help="Ray cluster: auto (RAY_ADDRESS, or the one `ray start` made here), HOST:PORT or ray://HOST:PORT "
                   "[default: start a Ray instance on this machine, stopped at the end].")
@click.option("--cpus", type=click.IntRange(1), default=None, help="CPUs of the instance started here [default: all].")
@click.option("--actors", type=click.IntRange(1), default=1, show_default=True,
              help="Model replicas (Ray actors); one per GPU, or a few CPUs each.")
@click.option("--actor-cpus", type=click.FloatRange(0.1), default=1.0, show_default=True,
              help="CPUs each model replica reserves (its inference threads).")
@click.option("--gpus-per-actor", type=click.FloatRange(0), default=0.0, show_default=True,
              help="GPU share of each model replica (1 with --backend tensorrt on GPU nodes).")
@click.option("--block-rows", type=click.IntRange(1), default=32, show_default=True,
              help="Inputs per decode task: the unit Ray schedules and retries.")
@opt.model
@opt.backend
@opt.precision
@opt.batch_size
@opt.no_sr
@opt.min_side
@opt.heatmaps
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable run summary on stdout.")
def backfill(inputs, out_dir, lists, root, path_column, address, cpus, actors, actor_cpus, gpus_per_actor,
             block_rows, model_dir, backend, precision, batch_size, no_sr, min_side, heatmaps, as_json):
    """Read an archive on a Ray cluster: the stages of `infer` on Ray Data, resumable.

    INPUTS (files and folders, as for `infer`) and the rows of --list files are decoded by Ray
    CPU tasks, inferred by a pool of model replicas (Ray actors) and written by CPU tasks: the
    same per-input JSON, SR and heatmaps as `infer`, plus OUT/findings.parquet, one row per
    input. An input whose complete outputs already exist for the same bytes and model is
    hashed, not decoded again, so a run stopped for any reason is finished by running it again.
    Needs the ray extra (pip install 'cxr-edge[ray]') on every node.
    Exit status: 0 every input succeeded with all its outputs, 1 some failed or got findings
    without their SR, 2 usage or configuration error.
    """
    from . import backfill as bf
    from .console import print_backfill, progress
    from .errors import CxrEdgeError
    from .pipeline import RunSettings

    if not inputs and not lists:
        raise UsageFailure("give INPUTS (files or folders), --list FILE, or both")
    _reads_dicom()
    out = Path(out_dir)
    settings = RunSettings(model_dir, backend, precision, batch_size, write_sr=not no_sr, min_side=min_side,
                           heatmaps=heatmaps)
    cluster = bf.ClusterSettings(address, cpus, actors, actor_cpus, gpus_per_actor, block_rows)
    verbose = logging.getLogger("cxr_edge").getEffectiveLevel() <= logging.DEBUG
    try:
        items, skipped, package, selection = bf.plan(list(inputs), list(lists), root, path_column, out, settings)
        # Ray Data draws its own progress bars on a terminal; elsewhere, a log line every tenth. Ray
        # prints its cluster's news (a worker that died) on stdout: stderr's, stdout is the summary's
        with progress(len(items), "backfill", bar=False) as on_result, contextlib.redirect_stdout(sys.stderr):
            run = bf.run(items, skipped, package, selection, out, settings, cluster,
                         on_rows=lambda n: [on_result(None) for _ in range(n)], verbose=verbose)
    except CxrEdgeError as exc:
        raise UsageFailure(exc) from None
    _report_and_exit(run, as_json, lambda summary: print_backfill(summary, run.failures()))


def _report_and_exit(run, as_json: bool, print_tables) -> None:
    """A run's summary (JSON on stdout, or tables), then the exit status infer and backfill share:
    1 when an input failed or got its findings without its SR."""
    from .atomic import strict_json

    summary = run.summary()
    if as_json:
        click.echo(strict_json(summary, indent=2))
    else:
        print_tables(summary)
    sys.exit(EXIT_SOME_FAILED if run.failed or run.without_sr else EXIT_OK)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--labels", "labels_csv", required=True, type=click.Path(dir_okay=False),
              help="The site's labels, NIH CSV format (Image Index, Finding Labels); rows matched by file name.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Deployed model package (default: the bundled demo model).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="New model package folder to write (must not exist).")
@click.option("--policy", default="specificity:0.90", show_default=True,
              help="Operating point per finding: specificity:T | sensitivity:T | f1 | youden | prevalence "
                   "(a class with too few positives or negatives for it gets the prevalence-matched point).")
@click.option("--version", "new_version", default=None, help="Version of the new package (default: <old>+site.<date>).")
@click.option("--precision", type=click.Choice(opt.ARTIFACT_PRECISIONS), default="fp32", show_default=True,
              help="Artifact whose logits are calibrated.")
@opt.batch_size
@opt.workers
@opt.threads
@click.option("--json", "as_json", is_flag=True, help="Print the calibration report as JSON on stdout.")
def calibrate(inputs, labels_csv, model_dir, out_dir, policy, new_version, precision, batch_size, workers, threads, as_json):
    """Re-fit temperatures and thresholds on a site's own labeled images (no torch, nothing leaves the box).

    Runs the deployed ONNX model on INPUTS, fits per-class temperatures (NLL) and thresholds by
    POLICY, and writes a new package to OUT with the same artifacts and a new manifest version.
    Exit status: 0 done, 1 done but some images failed to decode (left out, listed), 2 usage error.
    """
    from .console import print_calibration
    from .errors import CxrEdgeError
    from .recalibrate import recalibrate

    _reads_dicom()
    try:
        done = recalibrate(list(inputs), labels_csv, model_dir, out_dir, policy, new_version, precision, batch_size,
                           workers, threads)
    except (CxrEdgeError, ValueError) as exc:
        raise UsageFailure(exc) from None
    if as_json:
        click.echo(json.dumps(done.report, indent=2))
    else:
        print_calibration(done.report, done.fit)
    sys.exit(EXIT_SOME_FAILED if done.failures else EXIT_OK)


def _batch_profile(ctx, param, value: str) -> tuple[int, int, int]:
    try:
        profile = tuple(int(v) for v in value.split(","))
        if len(profile) != 3:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected MIN,OPT,MAX, e.g. 1,8,32") from None
    return profile


@main.command("build-engine")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Model package to add artifacts to (default: the bundled demo model).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write a copy of the package here and build into the copy (default: build in place).")
@click.option("--int8", is_flag=True, help="INT8: explicit Q/DQ ONNX (TensorRT + ONNX Runtime) and ORT dynamic INT8 (CPU).")
@click.option("--fp16", is_flag=True, help="Mixed FP16 ONNX (LayerNorm/Softmax kept FP32) for strongly typed TensorRT.")
@click.option("--calib", metavar="DIR|CSV[:IMAGES]", help="Real calibration images: a folder or a labeled NIH CSV.")
@click.option("--calib-count", default=500, show_default=True, type=click.IntRange(1), help="Images chosen (seeded).")
@click.option("--holdout", metavar="DIR|CSV[:IMAGES]",
              help="Held-out images for the gate [default: other images of --calib]; a CSV adds AUROC deltas.")
@click.option("--holdout-count", default=100, show_default=True, type=click.IntRange(1))
@click.option("--calib-method", type=click.Choice(["entropy", "minmax", "percentile"]), default="entropy", show_default=True)
@click.option("--quantize-ops", default=",".join(("MatMul", "Gemm", "Conv")), show_default=True,
              help="Op types that get Q/DQ; `all` quantizes everything (LayerNorm, Softmax...: for testing the gate).")
@click.option("--no-int8-dynamic", is_flag=True, help="With --int8, skip ONNX Runtime's dynamic INT8.")
@click.option("--tensorrt", "tensorrt_mode", type=click.Choice(["auto", "skip", "require"]), default="auto",
              show_default=True, help="auto: build engines when TensorRT and a GPU are present, else say why not.")
@click.option("--batch-profile", default="1,8,32", show_default=True, metavar="MIN,OPT,MAX", callback=_batch_profile,
              help="TensorRT batch profile.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None, help="TensorRT timing cache, reused across builds.")
@click.option("--opt-level", default=3, show_default=True, type=click.IntRange(0, 5), help="TensorRT builder optimization level.")
@click.option("--max-dprob", type=float, default=None, help="Gate: max |Δprob| [default per precision, see README].")
@click.option("--mean-dprob", type=float, default=None, help="Gate: mean |Δprob|.")
@click.option("--max-flip-rate", type=float, default=None, help="Gate: fraction of decisions flipped at the thresholds.")
@click.option("--max-auroc-drop", type=float, default=None, help="Gate: per-class AUROC drop (labeled holdout).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="JSON report [default: PKG/build-report.json]; always written.")
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=None)
@click.option("--threads", type=click.IntRange(1), default=None)
def build_engine(model_dir, out_dir, int8, fp16, calib, calib_count, holdout, holdout_count, calib_method, quantize_ops,
                 no_int8_dynamic, tensorrt_mode, batch_profile, timing_cache, opt_level, max_dprob, mean_dprob,
                 max_flip_rate, max_auroc_drop, report_path, seed, workers, threads):
    """Build FP16 / INT8 artifacts (and TensorRT engines on a GPU), gate them against FP32, register the good ones.

    Exit status: 0 every artifact passed the accuracy gate (and is in the manifest), 1 some were
    refused (not registered; see the report), 2 usage or configuration error.
    """
    import dataclasses

    from .console import print_build
    from .errors import CxrEdgeError

    try:
        from .engines.build import BuildOptions, build
        from .engines.gate import DEFAULT_TOLERANCES
    except ImportError as exc:
        raise UsageFailure(f"build-engine needs the `engines` extra (onnx, sympy, polygraphy): pip install 'cxr-edge[engines]' ({exc})")
    _reads_dicom()
    overrides = {k: v for k, v in (("max_abs_dprob", max_dprob), ("mean_abs_dprob", mean_dprob),
                                   ("flip_rate", max_flip_rate), ("max_auroc_drop", max_auroc_drop)) if v is not None}
    tolerances = {p: dataclasses.replace(t, **overrides) for p, t in DEFAULT_TOLERANCES.items()}
    ops = None if quantize_ops.strip().lower() == "all" else tuple(o.strip() for o in quantize_ops.split(",") if o.strip())
    options = BuildOptions(fp16=fp16, int8=int8, int8_dynamic=not no_int8_dynamic, calib=calib, calib_count=calib_count,
                           holdout=holdout, holdout_count=holdout_count, seed=seed, method=calib_method, quantize_ops=ops,
                           tensorrt=tensorrt_mode, min_batch=batch_profile[0], opt_batch=batch_profile[1],
                           max_batch=batch_profile[2], timing_cache=Path(timing_cache) if timing_cache else None,
                           optimization_level=opt_level, tolerances=tolerances, workers=workers, threads=threads)
    try:
        if out_dir:
            from .manifest import ModelPackage, write_package_copy

            model_dir = write_package_copy(ModelPackage.load(model_dir), out_dir).root
        report = build(model_dir, options, Path(report_path) if report_path else None)
    except (CxrEdgeError, ValueError) as exc:
        raise UsageFailure(exc) from None
    print_build(report)
    sys.exit(EXIT_OK if report["passed"] else EXIT_SOME_FAILED)


@main.command("add-class-maps")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Model package (default: the bundled demo model).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="New model package folder to write (must not exist).")
@click.option("--version", "new_version", default=None, help="Version of the new package (default: <old>+maps).")
def add_class_maps(model_dir, out_dir, new_version):
    """Give a package's model a `class_maps` output, for heatmaps (`python -m train export` does it already).

    Only a head that is linear on the mean of the patch tokens has exact class maps: any other
    is refused. The new package has the FP32 model only: build FP16/INT8 again from it.
    """
    from .errors import CxrEdgeError
    from .manifest import ModelPackage

    try:
        from .engines.class_maps import with_class_maps
    except ImportError as exc:
        raise UsageFailure(f"add-class-maps needs the `engines` extra (onnx): pip install 'cxr-edge[engines]' ({exc})")
    try:
        package = with_class_maps(ModelPackage.load(model_dir), out_dir, new_version)
    except CxrEdgeError as exc:
        raise UsageFailure(exc) from None
    spec = package.heatmap_spec
    click.echo(f"{package.root}: {package.name} {package.version}, class maps {spec.grid[0]}x{spec.grid[1]} "
               f"({package.section('heatmaps').get('exact_to')} from the logits)")


@main.command()
@click.argument("inbox", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Journal and processed inputs [default: OUT/.cxr-edge]. systemd: StateDirectory.")
@opt.pipeline
@click.option("--settle", default=2.0, show_default=True, type=click.FloatRange(0),
              help="Seconds a file written in place must stay unchanged before it is taken (renamed-in files: at once).")
@click.option("--max-attempts", default=5, show_default=True, type=click.IntRange(1), help="Tries for transient failures.")
@click.option("--disposition", type=click.Choice(["leave", "move", "delete"]), default="leave", show_default=True,
              help="What happens to an input once it is done or failed for good.")
@click.option("--processed-dir", type=click.Path(file_okay=False), default=None,
              help="With --disposition move [default: STATE_DIR/processed]: done/ and failed/ below it.")
@click.option("--listen", default=None, metavar="AE@HOST:PORT", help="Run a DICOM C-STORE SCP into the inbox.")
@click.option("--allow", "allowed", multiple=True, metavar="AE[@IP|@NET/BITS]",
              help="Who may send to the SCP (repeat): a calling AE title, from anywhere or only from an IP address "
                   "or network (PACS, PACS@10.1.2.3, MODALITY@10.1.0.0/16). Default: anyone.")
@click.option("--send-to", default=None, metavar="AE@HOST:PORT", help="C-STORE every SR and heatmap to this PACS (retried).")
@click.option("--calling-ae", default="CXREDGE", show_default=True, help="Our AE title when sending.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, help="Prometheus /metrics on 127.0.0.1.")
def watch(inbox, out_dir, state_dir, model_dir, backend, precision, batch_size, max_delay_ms, workers, threads, no_sr,
          min_side, heatmaps, settle, max_attempts, disposition, processed_dir, listen, allowed, send_to, calling_ae, metrics_port):
    """Watch INBOX (and optionally receive DICOM) and process every input exactly once, as a service.

    SIGTERM / SIGINT: finish the in-flight batch, exit 0. SIGHUP: reload the model package.
    Under systemd (Type=notify): READY, STATUS and WATCHDOG pings. See `cxr-edge status`.
    """
    from .daemon.dicom_net import AllowedCaller, Peer
    from .daemon.service import Daemon, DaemonConfig
    from .errors import CxrEdgeError
    from .pipeline import RunSettings

    out = Path(out_dir)
    try:
        listen_peer = Peer.parse(listen) if listen else None
        send_peer = Peer.parse(send_to) if send_to else None
    except ValueError as exc:
        raise UsageFailure(exc) from None
    try:
        allowed_callers = [AllowedCaller.parse(text) for text in allowed]
    except ValueError as exc:
        raise UsageFailure(f"--allow {exc}") from None
    cfg = DaemonConfig(inbox=Path(inbox), out=out, state_dir=Path(state_dir) if state_dir else out / ".cxr-edge",
                       run=RunSettings(model_dir, backend, precision, batch_size, max_delay_ms, workers, threads,
                                       not no_sr, min_side, heatmaps),
                       settle=settle, max_attempts=max_attempts, disposition=disposition,
                       processed_dir=Path(processed_dir) if processed_dir else None, listen=listen_peer, allowed_callers=allowed_callers, send_to=send_peer, calling_ae=calling_ae,
                       metrics_port=metrics_port)
    try:
        code = Daemon(cfg).run()
    except CxrEdgeError as exc:
        raise UsageFailure(exc) from None
    sys.exit(code)


@main.command()
@click.option("--state-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="The daemon's state directory (holds journal.sqlite3).")
@click.option("--out", "out_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Or the daemon's --out (state in OUT/.cxr-edge).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable.")
def status(state_dir, out_dir, as_json):
    """Counts by state, SR sends, last errors and throughput, read from the daemon's journal."""
    from .console import print_status
    from .daemon.journal import read_status
    from .errors import CxrEdgeError

    if not state_dir and not out_dir:
        raise UsageFailure("pass --state-dir or --out")
    try:
        report = read_status(Path(state_dir) if state_dir else Path(out_dir) / ".cxr-edge")
    except CxrEdgeError as exc:
        raise UsageFailure(exc) from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_status(report)


def _int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("expected comma-separated integers, e.g. 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("batch sizes must be >= 1")
    return sizes


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@opt.model
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default=None,
              help="Instead of --model, a production-size model with random weights (built once with torch + "
                   "timm, then cached): its timings, not its findings, are the point.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["onnxruntime", "tensorrt", "torch"]),
              help="Repeat for several [default: all three; one that cannot run here is listed as skipped; torch "
                   "is a CUDA row unless named, when it also runs FP32 on CPU].")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(opt.PRECISIONS),
              help="Repeat for several [default: all the package has; torch: fp32, fp16, bf16].")
@click.option("--batch-sizes", default="1,8", show_default=True, callback=_int_list, help="Model stage batch sizes.")
@click.option("--mode", type=click.Choice(["all", "model", "e2e"]), default="all", show_default=True,
              help="model: the model stage alone; e2e: the whole pipeline over INPUTS; all: both.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(0), help="Untimed model-stage iterations.")
@click.option("--iterations", default=30, show_default=True, type=click.IntRange(2), help="Timed model-stage iterations.")
@click.option("--duration", type=click.FloatRange(0.1), default=None, help="Seconds per model-stage run (instead of --iterations).")
@click.option("--e2e-batch-size", default=8, show_default=True, type=click.IntRange(1, 256), help="Pipeline max batch.")
@click.option("--passes", default=1, show_default=True, type=click.IntRange(1), help="End-to-end passes over INPUTS.")
@opt.workers
@opt.threads
@click.option("--no-sr", is_flag=True, help="End to end without writing DICOM SR.")
@click.option("--heatmaps/--no-heatmaps", default=None,
              help="End to end with heatmaps, each pass also run without them to measure their cost "
                   "[default: when the model has class maps].")
@click.option("--cv-threshold", default=0.10, show_default=True, type=click.FloatRange(0),
              help="Warn when the coefficient of variation is above this.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write the report as JSON to this file ('-': stdout, no tables).")
def bench(inputs, model_dir, shape, backends, precisions, batch_sizes, mode, warmup, iterations, duration, e2e_batch_size,
          passes, workers, threads, no_sr, heatmaps, cv_threshold, json_path):
    """Latency percentiles, throughput and a per-stage split, like trtexec, on real INPUTS.

    The model stage alone (per backend x precision x batch size), then the whole pipeline end to
    end over INPUTS through the same code as `infer`, with each stage's isolated rate and the
    model's achieved GFLOP/s against a GEMM rate measured in the same run.
    """
    from rich.console import Console

    from .atomic import atomic_write_json
    from .bench.report import print_report
    from .bench.run import Settings, run_bench
    from .errors import CxrEdgeError
    from .manifest import ModelPackage
    from .sources import discover

    _reads_dicom()
    try:
        items, _ = discover(list(inputs))
        if not items:
            raise UsageFailure("no input files found (looked for DICOM, PNG and JPEG files)")
        if shape and model_dir:
            raise UsageFailure("--shape and --model name two models: give one")
        if shape:
            from .bench.shapes import shape_package

            log.info("model: the %s shape (random weights; built on first use, then cached)", shape)
            package = shape_package(shape)
        else:
            package = ModelPackage.load(model_dir)
        settings = Settings(backends=backends or ("onnxruntime", "tensorrt", "torch"), precisions=precisions or None,
                            torch_on_cpu="torch" in backends,
                            batch_sizes=batch_sizes, warmup=warmup, iterations=iterations, duration=duration, mode=mode,
                            e2e_batch_size=e2e_batch_size, workers=workers, threads=threads, passes=passes,
                            write_sr=not no_sr, heatmaps=heatmaps, cv_threshold=cv_threshold)
        with Console(stderr=True).status("benchmarking") as spinner:
            report = run_bench(package, items, settings, progress=lambda m: (spinner.update(m), log.info("%s", m)))
    except (CxrEdgeError, ValueError) as exc:
        raise UsageFailure(exc) from None
    if json_path == "-":
        click.echo(json.dumps(report, indent=2))
        return
    if json_path:
        atomic_write_json(Path(json_path), report)
    print_report(report)
