"""What the commands print: rich tables on stderr for people, progress while running."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections import Counter

import click

log = logging.getLogger("cxr_edge")


def print_calibration(report: dict, fit: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cxr-edge calibrate -> {report['package']} ({report['version']}, {report['images']} images)")
    for column in ("finding", "positives", "T", "threshold", "operating point", "sens", "spec", "ECE before", "ECE after",
                   "NLL before", "NLL after"):
        table.add_column(column, justify="left" if column == "finding" else "right")
    r = fit["report"]
    for c, label in enumerate(report["temperatures"]):
        fitted = report["temperature_fitted"][label]
        point = report["operating_points"][label]
        expected = [("-" if point[k] is None else f"{point[k]:.2f}") for k in ("expected_sensitivity", "expected_specificity")]
        table.add_row(label, str(report["positives"][label]), f"{report['temperatures'][label]:.3f}" + ("" if fitted else " (kept)"),
                      f"{report['thresholds'][label]:.3f}", point["policy"], *expected, f"{r['ece_before'][c]:.3f}", f"{r['ece_after'][c]:.3f}",
                      f"{r['nll_before'][c]:.3f}", f"{r['nll_after'][c]:.3f}")
    m = report["mean"]
    table.add_row("mean", "", "", "", "", "", "", f"{m['ece_before']:.3f}", f"{m['ece_after']:.3f}", f"{m['nll_before']:.3f}", f"{m['nll_after']:.3f}")
    Console(stderr=True).print(table)
    click.echo(f"wrote {report['package']} (version {report['version']}); (kept) = fewer than 5 positives "
               "or negatives, T left at 1; sens/spec = what the operating point gives on these images; "
               "'prevalence' = too few positives or negatives for the policy, so the class flags as many "
               "images as it has positives", err=True)


def print_build(report: dict) -> None:
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


@contextlib.contextmanager
def progress(total: int, label: str = "infer", bar: bool = True):
    """A progress bar on a terminal (log lines every tenth otherwise, or without `bar`); yields on_result(result)."""
    if not (bar and sys.stderr.isatty()):
        step, done = max(1, total // 10), [0]

        def on_result(result) -> None:
            done[0] += 1
            if done[0] % step == 0 or done[0] == total:
                log.info("processed %d/%d", done[0], total)

        yield on_result
        return

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as display:
        task = display.add_task(label, total=total)
        yield lambda _: display.advance(task)


def print_summary(summary: dict, results) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title="cxr-edge infer", show_header=False)
    for key in ("inputs", "succeeded", "succeeded_without_sr", "failed", "skipped", "seconds", "images_per_second"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    positives = Counter(label for r in results if r.status == "ok" for label in r.record.positive_findings)
    if positives:
        table.add_row("positive findings", ", ".join(f"{k} {v}" for k, v in positives.most_common()))
    table.add_row("summary file", summary["summary_file"])
    console.print(table)
    problems = [(r, r.error) for r in results if r.status != "ok"]
    problems += [(r, r.record.sr_error) for r in results if r.status == "ok" and r.record.sr_error]
    if problems:
        errors = Table(title="failed inputs, and findings written without their SR (stage sr)")
        for column in ("input", "stage", "reason"):
            errors.add_column(column, overflow="fold")
        for r, error in problems:
            errors.add_row(r.item.relative.as_posix(), error.stage, error.reason)
        console.print(errors)


def print_backfill(summary: dict, failures: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title="cxr-edge backfill", show_header=False)
    for key in ("inputs", "processed", "already_done", "succeeded", "succeeded_without_sr", "failed", "skipped",
                "seconds", "images_per_second"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    cluster = summary["cluster"]
    table.add_row("cluster", f"{cluster['nodes']} node(s), {cluster['cpus']:g} CPUs, {cluster['gpus']:g} GPUs, "
                             f"{cluster['actors']} model replica(s) ({cluster['backend']} {cluster['precision']})")
    table.add_row("findings table", summary["findings_table"])
    console.print(table)
    if failures:
        errors = Table(title=f"failed inputs ({len(failures)}; all in the findings table)")
        for column in ("input", "stage", "reason"):
            errors.add_column(column, overflow="fold")
        for row in failures[:50]:
            errors.add_row(row["relative_path"], row["error_stage"], row["error_reason"])
        console.print(errors)


def print_status(report: dict) -> None:
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
