"""`cxr-edge` command line. Heavy modules are imported inside commands to keep start-up fast."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import click

from . import __version__
from .limits import MIN_SIDE

log = logging.getLogger("cxr_edge")

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


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


# infer and watch refuse the same inputs
_min_side_option = click.option("--min-side", default=MIN_SIDE, show_default=True, type=click.IntRange(1),
                                help="Refuse images with fewer pixels than this on a side (thumbnails, icons).")


def _fail_usage(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _one_line(message) -> str:
    """An error message as one line (`infer`: exactly one `Error:` line, whatever a library said)."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip()) or type(message).__name__


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Model package folder (default: the bundled demo model).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="auto: a matching TensorRT engine on a GPU, else ONNX Runtime on CPU.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Which built artifact to run (fp16/int8 come from `cxr-edge build-engine`).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 256), help="Max batch size.")
@click.option("--max-delay-ms", default=20.0, show_default=True, type=click.FloatRange(0),
              help="Longest an input waits for its batch to fill.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Decode processes (default: CPU cores).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Inference threads (default: CPU cores).")
@click.option("--no-sr", is_flag=True, help="Do not write DICOM SR for DICOM inputs.")
@_min_side_option
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable run summary on stdout.")
def infer(inputs, out_dir, model_dir, backend, precision, batch_size, max_delay_ms, workers, threads, no_sr, min_side,
          as_json):
    """Find chest X-ray findings in INPUTS (files or folders, recursive).

    Writes OUT/<input path>.json for every input (an error record if it failed), a DICOM SR
    OUT/<input path>.sr.dcm for every DICOM input, and OUT/summary.jsonl for the run.
    Exit status: 0 every input succeeded with all its outputs, 1 some failed or got findings
    without their SR, 2 usage or configuration error.
    """
    from .backends import create_backend, select_backend
    from .errors import CxrEdgeError
    from .manifest import ModelPackage
    from .pipeline import Pipeline
    from .prepare import quiet_dicom_warnings
    from .workers import WorkerPool, default_workers
    from .sources import discover

    quiet_dicom_warnings()

    out = Path(out_dir)
    try:
        items, skipped = discover(list(inputs))
        if not items:
            _fail_usage("no input files found (looked for DICOM, PNG and JPEG files)")
        package = ModelPackage.load(model_dir)
        selection = select_backend(package, backend, precision)
        out.mkdir(parents=True, exist_ok=True)
    except CxrEdgeError as exc:
        _fail_usage(_one_line(exc))
    except OSError as exc:
        _fail_usage(_one_line(f"cannot create output folder {out}: {exc.strerror or type(exc).__name__}"))
    for path in skipped:
        log.debug("skipped (not an image by its name): %s", path)

    workers = workers or default_workers()
    # The decode processes are forked before the backend starts its threads.
    pool = WorkerPool(workers, package.preprocess_params, min_side=min_side)
    runner = None
    try:
        try:
            runner = create_backend(package, selection.backend, selection.precision, selection.artifact, threads=threads)
            runner.activate()
        except CxrEdgeError as exc:
            _fail_usage(_one_line(exc))
        except Exception as exc:  # a runtime refusing an artifact whose sha256 matched (corrupt when built)
            _fail_usage(_one_line(f"{package.root}: cannot load the {selection.artifact} artifact with "
                                  f"{selection.backend}: {type(exc).__name__}: {exc}"))
        log.info("backend %s, %s artifact %r: %s", selection.backend, selection.precision, selection.artifact, selection.reason)
        log.info("model %s %s, %d inputs, %d decode workers", package.name, package.version, len(items), workers)
        pipeline = Pipeline(package, runner, out, workers=workers, max_batch=batch_size,
                            max_delay_ms=max_delay_ms, write_sr=not no_sr)
        started = time.perf_counter()
        results = _run_with_progress(pipeline, items, pool)
        elapsed = time.perf_counter() - started
    finally:
        if runner is not None:
            runner.deactivate()
        pool.close()

    from .atomic import atomic_write, strict_json
    from .records import summary_line

    results.sort(key=lambda r: r.item.relative.as_posix())  # completion order varies run to run
    lines = [summary_line(r.record, r.outputs) for r in results]
    summary_path = out / "summary.jsonl"
    atomic_write(summary_path, "".join(strict_json(line) + "\n" for line in lines).encode())
    failed = [r for r in results if r.status != "ok"]
    without_sr = [r for r in results if r.status == "ok" and r.record.get("sr_error")]
    summary = {
        "inputs": len(results),
        "succeeded": len(results) - len(failed),
        "succeeded_without_sr": len(without_sr),  # findings written, the SR could not be (a subset of succeeded)
        "failed": len(failed),
        "skipped": len(skipped),
        "seconds": round(elapsed, 3),
        "images_per_second": round(len(results) / elapsed, 2) if elapsed > 0 else None,
        "summary_file": str(summary_path),
        "model": pipeline.model_info,
        "backend": pipeline.backend_info,
        "results": lines,
    }
    if as_json:
        click.echo(strict_json(summary, indent=2))
    else:
        _print_summary(summary, results)
    sys.exit(EXIT_SOME_FAILED if failed or without_sr else EXIT_OK)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--labels", "labels_csv", required=True, type=click.Path(dir_okay=False),
              help="The site's labels, NIH CSV format (Image Index, Finding Labels); rows matched by file name.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Deployed model package (default: the bundled demo model).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="New model package folder to write (must not exist).")
@click.option("--policy", default="youden", show_default=True,
              help="Threshold policy: youden | sensitivity:0.90 | specificity:0.90.")
@click.option("--version", "new_version", default=None, help="Version of the new package (default: <old>+site.<date>).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Artifact whose logits are calibrated.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("--workers", type=click.IntRange(1), default=None, help="Decode processes (default: CPU cores).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Inference threads (default: CPU cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the calibration report as JSON on stdout.")
def calibrate(inputs, labels_csv, model_dir, out_dir, policy, new_version, precision, batch_size, workers, threads, as_json):
    """Re-fit temperatures and thresholds on a site's own labeled images (no torch, nothing leaves the box).

    Runs the deployed ONNX model on INPUTS, fits per-class temperatures (NLL) and thresholds by
    POLICY, and writes a new package to OUT with the same artifacts and a new manifest version.
    Exit status: 0 done, 1 done but some images failed to decode (left out, listed), 2 usage error.
    """
    import datetime

    from .backends import create_backend, select_backend
    from .calibration import fit_calibration, parse_policy
    from .errors import CxrEdgeError
    from .labeled import logits_for, match_labels
    from .manifest import ModelPackage, write_package_copy
    from .prepare import quiet_dicom_warnings

    quiet_dicom_warnings()
    try:
        parse_policy(policy)
        package = ModelPackage.load(model_dir)
        labeled = match_labels(list(inputs), labels_csv)
        if Path(out_dir).exists():
            _fail_usage(f"{out_dir}: already exists; choose a new folder for the new package")
        selection = select_backend(package, "onnxruntime", precision)
        runner = create_backend(package, "onnxruntime", precision, selection.artifact, threads=threads)
        log.info("calibrating %s %s (%s) on %d labeled images", package.name, package.version, precision, len(labeled.items))
        logits, ok, failures = logits_for(labeled.items, package, runner, batch_size, workers)
    except (CxrEdgeError, ValueError) as exc:
        _fail_usage(str(exc))
    for item, reason in failures:
        log.error("%s: left out of calibration: %s", item.path, reason)
    labels = labeled.labels[ok]
    if len(labels) < 2:
        _fail_usage("fewer than 2 images decoded; nothing to calibrate on")
    fit = fit_calibration(labels, logits, policy)
    today = datetime.date.today().strftime("%Y%m%d")
    version = new_version or f"{package.version.split('+')[0]}+site.{today}"
    fitted_on = f"site data: {len(labels)} labeled images ({Path(labels_csv).name}), {precision} logits"
    manifest = package.recalibrated(fit, fitted_on, version)
    try:
        new = write_package_copy(package, out_dir, manifest)
    except (CxrEdgeError, OSError) as exc:
        _fail_usage(f"cannot write {out_dir}: {exc}")
    report = {"package": str(new.root), "version": new.version, "images": len(labels), "failed": len(failures),
              "unlabeled_images_ignored": labeled.unlabeled, "policy": fit["threshold_policy"],
              "temperatures": dict(zip(new.labels, fit["temperatures"])),
              "thresholds": dict(zip(new.labels, fit["thresholds"])),
              "temperature_fitted": fit["temperature_fitted"], "positives": fit["positives"],
              "mean": fit["report"]["mean"]}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_calibration(report, fit)
    sys.exit(EXIT_SOME_FAILED if failures else EXIT_OK)


def _print_calibration(report: dict, fit: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cxr-edge calibrate -> {report['package']} ({report['version']}, {report['images']} images)")
    for column in ("finding", "positives", "T", "threshold", "ECE before", "ECE after", "NLL before", "NLL after"):
        table.add_column(column, justify="left" if column == "finding" else "right")
    r = fit["report"]
    for c, label in enumerate(report["temperatures"]):
        fitted = report["temperature_fitted"][label]
        table.add_row(label, str(report["positives"][label]), f"{report['temperatures'][label]:.3f}" + ("" if fitted else " (kept)"),
                      f"{report['thresholds'][label]:.3f}", f"{r['ece_before'][c]:.3f}", f"{r['ece_after'][c]:.3f}",
                      f"{r['nll_before'][c]:.3f}", f"{r['nll_after'][c]:.3f}")
    m = report["mean"]
    table.add_row("mean", "", "", "", f"{m['ece_before']:.3f}", f"{m['ece_after']:.3f}", f"{m['nll_before']:.3f}", f"{m['nll_after']:.3f}")
    Console(stderr=True).print(table)
    click.echo(f"wrote {report['package']} (version {report['version']}); (kept) = fewer than 5 positives "
               "or negatives, T left at 1", err=True)


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
@click.option("--batch-profile", default="1,8,32", show_default=True, metavar="MIN,OPT,MAX", help="TensorRT batch profile.")
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

    from .errors import CxrEdgeError
    from .prepare import quiet_dicom_warnings

    try:
        from engines.build import BuildOptions, build
        from engines.gate import DEFAULT_TOLERANCES
    except ImportError as exc:
        _fail_usage(f"build-engine needs the `engines` extra (onnx, sympy): pip install 'cxr-edge[engines]' ({exc})")
    quiet_dicom_warnings()
    try:
        profile = [int(v) for v in batch_profile.split(",")]
        if len(profile) != 3:
            raise ValueError
    except ValueError:
        _fail_usage(f"--batch-profile {batch_profile!r}: expected MIN,OPT,MAX, e.g. 1,8,32")
    overrides = {k: v for k, v in (("max_abs_dprob", max_dprob), ("mean_abs_dprob", mean_dprob),
                                   ("flip_rate", max_flip_rate), ("max_auroc_drop", max_auroc_drop)) if v is not None}
    tolerances = {p: dataclasses.replace(t, **overrides) for p, t in DEFAULT_TOLERANCES.items()}
    ops = None if quantize_ops.strip().lower() == "all" else tuple(o.strip() for o in quantize_ops.split(",") if o.strip())
    options = BuildOptions(fp16=fp16, int8=int8, int8_dynamic=not no_int8_dynamic, calib=calib, calib_count=calib_count,
                           holdout=holdout, holdout_count=holdout_count, seed=seed, method=calib_method, quantize_ops=ops,
                           tensorrt=tensorrt_mode, min_batch=profile[0], opt_batch=profile[1], max_batch=profile[2],
                           timing_cache=Path(timing_cache) if timing_cache else None, optimization_level=opt_level,
                           tolerances=tolerances, workers=workers, threads=threads)
    try:
        if out_dir:
            from .manifest import ModelPackage, write_package_copy

            source = ModelPackage.load(model_dir)
            model_dir = write_package_copy(source, out_dir).root
        report = build(model_dir, options, Path(report_path) if report_path else None)
    except (CxrEdgeError, ValueError) as exc:
        _fail_usage(str(exc))
    _print_build(report)
    sys.exit(EXIT_OK if report["passed"] else EXIT_SOME_FAILED)


def _print_build(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cxr-edge build-engine: {report['model']['name']} {report['model']['version']} "
                        f"({report['holdout']['images']} held-out images)")
    for column in ("artifact", "precision", "max |Δp|", "mean |Δp|", "flips", "AUROC drop", "CPU speed vs fp32", "result"):
        table.add_column(column)
    for key, a in report["artifacts"].items():
        if "gate" not in a:  # the build itself failed
            table.add_row(key, a["precision"], "", "", "", "", "", "[red]FAILED[/]")
            continue
        g = a["gate"]
        drop = "n/a" if g.get("max_auroc_drop") is None else f"{g['max_auroc_drop']:.4f}"
        speed = f"{a['cpu_speedup_vs_fp32']:.2f}x" if "cpu_speedup_vs_fp32" in a else f"{a.get('gpu_ms_per_image_incl_copies')} ms/img GPU"
        result = "[green]registered[/]" if a["registered"] else "[red]REFUSED[/]"
        table.add_row(key, a["precision"], f"{g['max_abs_dprob']:.4f}", f"{g['mean_abs_dprob']:.5f}",
                      f"{g['flipped_decisions']} ({100 * g['flip_rate']:.2f}%)", drop, speed, result)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
    console.print(table)
    for key, a in report["artifacts"].items():
        if a["reasons"]:
            console.print(f"[red]{key} refused[/]: {'; '.join(a['reasons'])}", highlight=False)
    trt = report.get("tensorrt") or {}
    if trt.get("status") == "skipped":
        console.print(f"TensorRT step skipped: {trt['reason']}")
    console.print(f"report: {report['report_path']}")


@main.command()
@click.argument("inbox", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Journal and processed inputs [default: OUT/.cxr-edge]. systemd: StateDirectory.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None, help="Model package.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 256), help="Max batch size.")
@click.option("--max-delay-ms", default=20.0, show_default=True, type=click.FloatRange(0),
              help="Longest an input waits for its batch to fill.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Decode processes (default: CPU cores).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Inference threads.")
@click.option("--settle", default=2.0, show_default=True, type=click.FloatRange(0),
              help="Seconds a file written in place must stay unchanged before it is taken (renamed-in files: at once).")
@click.option("--max-attempts", default=5, show_default=True, type=click.IntRange(1), help="Tries for transient failures.")
@click.option("--disposition", type=click.Choice(["leave", "move", "delete"]), default="leave", show_default=True,
              help="What happens to an input once it is done or failed for good.")
@click.option("--processed-dir", type=click.Path(file_okay=False), default=None,
              help="With --disposition move [default: STATE_DIR/processed]: done/ and failed/ below it.")
@click.option("--no-sr", is_flag=True, help="Do not write DICOM SR.")
@_min_side_option
@click.option("--listen", default=None, metavar="AE@HOST:PORT", help="Run a DICOM C-STORE SCP into the inbox.")
@click.option("--allow", "allowed", multiple=True, metavar="AE[@IP|@NET/BITS]",
              help="Who may send to the SCP (repeat): a calling AE title, from anywhere or only from an IP address "
                   "or network (PACS, PACS@10.1.2.3, MODALITY@10.1.0.0/16). Default: anyone.")
@click.option("--send-to", default=None, metavar="AE@HOST:PORT", help="C-STORE every SR to this PACS (retried).")
@click.option("--calling-ae", default="CXREDGE", show_default=True, help="Our AE title when sending.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, help="Prometheus /metrics on 127.0.0.1.")
def watch(inbox, out_dir, state_dir, model_dir, backend, precision, batch_size, max_delay_ms, workers, threads, settle,
          max_attempts, disposition, processed_dir, no_sr, min_side, listen, allowed, send_to, calling_ae, metrics_port):
    """Watch INBOX (and optionally receive DICOM) and process every input exactly once, as a service.

    SIGTERM / SIGINT: finish the in-flight batch, exit 0. SIGHUP: reload the model package.
    Under systemd (Type=notify): READY, STATUS and WATCHDOG pings. See `cxr-edge status`.
    """
    from .daemon.dicom_net import AllowedCaller, Peer
    from .daemon.service import Daemon, DaemonConfig
    from .errors import CxrEdgeError

    out = Path(out_dir)
    try:
        listen_peer = Peer.parse(listen) if listen else None
        send_peer = Peer.parse(send_to) if send_to else None
    except ValueError as exc:
        _fail_usage(str(exc))
    try:
        allowed_callers = [AllowedCaller.parse(text) for text in allowed]
    except ValueError as exc:
        _fail_usage(f"--allow {exc}")
    cfg = DaemonConfig(inbox=Path(inbox), out=out, state_dir=Path(state_dir) if state_dir else out / ".cxr-edge",
                       model=model_dir, backend=backend, precision=precision, max_batch=batch_size,
                       max_delay_ms=max_delay_ms, workers=workers, threads=threads, settle=settle,
                       max_attempts=max_attempts, disposition=disposition,
                       processed_dir=Path(processed_dir) if processed_dir else None, write_sr=not no_sr,
                       min_side=min_side,
                       listen=listen_peer, allowed_callers=allowed_callers, send_to=send_peer, calling_ae=calling_ae,
                       metrics_port=metrics_port)
    try:
        sys.exit(Daemon(cfg).run())
    except CxrEdgeError as exc:
        _fail_usage(str(exc))


@main.command()
@click.option("--state-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="The daemon's state directory (holds journal.sqlite3).")
@click.option("--out", "out_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Or the daemon's --out (state in OUT/.cxr-edge).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable.")
def status(state_dir, out_dir, as_json):
    """Counts by state, SR sends, last errors and throughput, read from the daemon's journal."""
    import sqlite3

    from .daemon.journal import Journal
    from .errors import CxrEdgeError

    if not state_dir and not out_dir:
        _fail_usage("pass --state-dir or --out")
    path = Path(state_dir) if state_dir else Path(out_dir) / ".cxr-edge"
    if not (path / "journal.sqlite3").is_file():
        _fail_usage(f"no journal in {path}")
    try:  # read-only: it must not create files the service's user cannot write
        journal = Journal(path / "journal.sqlite3", readonly=True)
        report = journal.status()
        journal.close()
    except CxrEdgeError as exc:
        _fail_usage(str(exc))
    except sqlite3.Error as exc:  # a journal of an older version: the daemon migrates it when it starts
        _fail_usage(f"cannot read the journal in {path} ({exc}); start `cxr-edge watch` once to upgrade it")
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cxr-edge status ({report['journal']})", show_header=False)
    for state, count in report["inputs"].items():
        table.add_row(f"inputs {state}", str(count))
    table.add_row("  of which done without SR", str(report["done_without_sr"]))
    for kind, count in report["pending_retrying"].items():
        table.add_row(f"  pending, retrying after a {kind} error", str(count))
    for state, count in report["sends"].items():
        table.add_row(f"SR sends {state}", str(count))
    table.add_row("done, last minute", str(report["throughput_per_minute"]["last_minute"]))
    table.add_row("done per minute, last hour", str(report["throughput_per_minute"]["last_hour"]))
    console = Console()
    console.print(table)
    for error in report["last_errors"]:
        console.print(f"{error['at']}  {error['input']}: {error['error']}"
                      + (f" [{error['kind']}]" if error.get("kind") else ""), highlight=False)


def _run_with_progress(pipeline, items, pool):
    if not sys.stderr.isatty():
        step = max(1, len(items) // 10)
        done = []

        def on_result(result):
            done.append(result)
            if len(done) % step == 0 or len(done) == len(items):
                log.info("processed %d/%d", len(done), len(items))

        return pipeline.run(items, on_result=on_result, pool=pool)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]infer"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("infer", total=len(items))
        return pipeline.run(items, on_result=lambda _: progress.advance(task), pool=pool)


def _print_summary(summary: dict, results) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title="cxr-edge infer", show_header=False)
    for key in ("inputs", "succeeded", "succeeded_without_sr", "failed", "skipped", "seconds", "images_per_second"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    positives = Counter(label for r in results if r.status == "ok" for label in r.record["positive_findings"])
    if positives:
        table.add_row("positive findings", ", ".join(f"{k} {v}" for k, v in positives.most_common()))
    table.add_row("summary file", summary["summary_file"])
    console.print(table)
    problems = [(r, r.error) for r in results if r.status != "ok"]
    problems += [(r, r.record["sr_error"]) for r in results if r.status == "ok" and r.record.get("sr_error")]
    if problems:
        errors = Table(title="failed inputs, and findings written without their SR (stage sr)")
        for column in ("input", "stage", "reason"):
            errors.add_column(column, overflow="fold")
        for r, error in problems:
            errors.add_row(r.item.relative.as_posix(), error["stage"], error["reason"])
        console.print(errors)


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
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Model package (default: the bundled demo model).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["onnxruntime", "tensorrt"]),
              help="Repeat for several [default: both; one that cannot run here is listed as skipped].")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="Repeat for several [default: all the package has].")
@click.option("--batch-sizes", default="1,8", show_default=True, callback=_int_list, help="Model stage batch sizes.")
@click.option("--mode", type=click.Choice(["all", "model", "e2e"]), default="all", show_default=True,
              help="model: the model stage alone; e2e: the whole pipeline over INPUTS; all: both.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(0), help="Untimed model-stage iterations.")
@click.option("--iterations", default=30, show_default=True, type=click.IntRange(2), help="Timed model-stage iterations.")
@click.option("--duration", type=click.FloatRange(0.1), default=None, help="Seconds per model-stage run (instead of --iterations).")
@click.option("--e2e-batch-size", default=8, show_default=True, type=click.IntRange(1, 256), help="Pipeline max batch.")
@click.option("--passes", default=1, show_default=True, type=click.IntRange(1), help="End-to-end passes over INPUTS.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Decode processes (default: CPU cores).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Inference threads (default: CPU cores).")
@click.option("--no-sr", is_flag=True, help="End to end without writing DICOM SR.")
@click.option("--cv-threshold", default=0.10, show_default=True, type=click.FloatRange(0),
              help="Warn when the coefficient of variation is above this.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write the report as JSON to this file ('-': stdout, no tables).")
def bench(inputs, model_dir, backends, precisions, batch_sizes, mode, warmup, iterations, duration, e2e_batch_size,
          passes, workers, threads, no_sr, cv_threshold, json_path):
    """Latency percentiles, throughput and a per-stage split, like trtexec, on real INPUTS.

    The model stage alone (per backend x precision x batch size), then the whole pipeline end to
    end over INPUTS through the same code as `infer`, with each stage's isolated rate and the
    model's achieved GFLOP/s against a GEMM rate measured in the same run.
    """
    from rich.console import Console

    from .bench.report import print_report
    from .bench.run import Settings, run_bench
    from .errors import CxrEdgeError
    from .manifest import ModelPackage
    from .prepare import quiet_dicom_warnings
    from .sources import discover

    quiet_dicom_warnings()
    try:
        items, _ = discover(list(inputs))
        if not items:
            _fail_usage("no input files found (looked for DICOM, PNG and JPEG files)")
        package = ModelPackage.load(model_dir)
    except CxrEdgeError as exc:
        _fail_usage(str(exc))
    available = package.precisions()
    settings = Settings(backends=backends or ("onnxruntime", "tensorrt"),
                        precisions=precisions or tuple(p for p in ("fp32", "fp16", "int8") if p in available),
                        batch_sizes=batch_sizes, warmup=warmup, iterations=iterations, duration=duration, mode=mode,
                        e2e_batch_size=e2e_batch_size, workers=workers, threads=threads, passes=passes,
                        write_sr=not no_sr, cv_threshold=cv_threshold)
    status = Console(stderr=True)
    try:
        with status.status("benchmarking") as spinner:
            report = run_bench(package, items, settings, progress=lambda m: (spinner.update(m), log.info("%s", m)))
    except (CxrEdgeError, ValueError) as exc:
        _fail_usage(str(exc))
    if json_path == "-":
        click.echo(json.dumps(report, indent=2))
        return
    if json_path:
        from .atomic import atomic_write_json

        atomic_write_json(Path(json_path), report)
    print_report(report)
