"""The bench report on a terminal (rich tables, trtexec's fields) and as JSON."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from . import STAGES


def _ms(value) -> str:
    return "—" if value is None else (f"{value:.2f}" if value < 100 else f"{value:.0f}")


def _stat(summary: dict | None, key: str) -> str:
    return "—" if not summary else _ms(summary[key])


def _name(result: dict) -> str:
    artifact = result["artifact"]
    return f"{result['backend']} {result['precision']}" + (f" ({artifact})" if artifact != result["precision"] else "")


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column.startswith(("backend", "stage")) else "right")
    return table


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)  # a log file has no width: keep the tables whole
    m = report["machine"]
    gpu = m["gpu"] or f"none ({m['gpu_unavailable_reason']})"
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v)
    console.print(f"[bold]Machine[/]: {m['cpu']}, {m['usable_cpus']}/{m['logical_cpus']} CPUs usable, "
                  f"{m['memory_gib']} GiB; GPU: {gpu}")
    console.print(f"[bold]Libraries[/]: {libs}")
    model = report["model"]
    flops = f"{model['gflops_per_image']} GFLOP/image" if model["gflops_per_image"] else model["counted_ops"]
    console.print(f"[bold]Model[/]: {model['name']} {model['version']} ({model['architecture']}, "
                  f"{flops}); GEMM reference: {report['gemm']['gflop_s']} GFLOP/s "
                  f"({report['gemm']['how']})")

    if report["model_stage"]:
        latency = _table("Model stage: latency per batch (ms)", "backend / precision", "batch", "img/s",
                         "min", "mean", "p50", "p90", "p95", "p99", "max")
        split = _table("Model stage: split (ms, p50) and efficiency", "backend / precision", "batch",
                       "h2d", "compute", "d2h", "GFLOP/s", "of GEMM")
        for r in report["model_stage"]:
            lat, st, eff = r["latency_ms"], r["stages_ms"], r["efficiency"]
            latency.add_row(_name(r), str(r["batch_size"]), f"{r['throughput_img_s']:.1f}",
                            *(_stat(lat, k) for k in ("min", "mean", "p50", "p90", "p95", "p99", "max")))
            split.add_row(_name(r), str(r["batch_size"]), _stat(st["h2d"], "p50"), _stat(st["compute"], "p50"),
                          _stat(st["d2h"], "p50"), _ms(eff["achieved_gflop_s"]),
                          "—" if eff["fraction_of_gemm"] is None else f"{eff['fraction_of_gemm']:.0%}")
        console.print(latency)
        console.print(split)

    for r in report["end_to_end"]:
        table = _table(f"End to end: {_name(r)}, batch {r['batch_size']}, {r['workers']} decode workers, "
                       f"{r['inputs']} inputs x {r['passes']} pass(es): {r['throughput_img_s']:.1f} img/s",
                       "stage (ms per input)", "mean", "p50", "p90", "p95", "p99", "max")
        for stage in (*STAGES, "end_to_end"):
            summary = r["latency_ms"] if stage == "end_to_end" else r["stages_ms"][stage]
            table.add_row(stage.replace("_", "-"), *(_stat(summary, k) for k in ("mean", "p50", "p90", "p95", "p99", "max")))
        console.print(table)
        rates = ", ".join(f"{k.replace('_', ' + ')} {v:.1f}" for k, v in r["isolated_rates_img_s"].items() if v)
        eff = r["pipeline_efficiency"]
        console.print(f"  isolated stage rates (img/s): {rates}; end to end is "
                      f"[bold]{eff:.0%}[/] of the slowest ({r['slowest_stage'].replace('_', ' + ')})"
                      if eff is not None else "  isolated stage rates: not measured")
        if r["overlap_efficiency"] is not None:
            console.print(f"  all stages share the CPU: at best {r['shared_cpu_bound_img_s']:.1f} img/s with perfect "
                          f"overlap; end to end is [bold]{r['overlap_efficiency']:.0%}[/] of that")
        cost = r.get("heatmap_cost", {})
        if cost.get("heatmaps") and cost.get("extra_time") is not None:
            verdict = "within" if cost["within_goal"] else "[yellow]over[/]"
            console.print(f"  heatmaps ({cost['maps_per_image']:.2f} per image): [bold]{cost['extra_time']:+.0%}[/] "
                          f"end-to-end time against the same passes without them ({verdict} the "
                          f"{cost['goal']:.0%} goal)")
        if r["failed"]:
            console.print(f"  [yellow]{r['failed']} input(s) failed and are not in the timings[/]")

    for skipped in report["skipped"]:
        console.print(f"[dim]skipped {skipped['backend']} {skipped['precision']}: {skipped['reason']}[/]")
    for result in (*report["model_stage"], *report["end_to_end"]):
        for warning in result["warnings"]:
            console.print(f"[yellow]warning[/] {_name(result)} batch {result['batch_size']}: {warning}")
