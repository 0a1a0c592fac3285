"""Latency summaries the way trtexec and perf_analyzer print them."""

from __future__ import annotations

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def summarize(samples_ms) -> dict | None:
    """min / mean / p50 / p90 / p95 / p99 / max / std / cv of a list of milliseconds (None if empty)."""
    values = np.asarray([v for v in samples_ms if v is not None], dtype=np.float64)
    if values.size == 0:
        return None
    mean = float(values.mean())
    summary = {"count": int(values.size), "min": float(values.min()), "mean": mean}
    summary.update({f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES})
    summary["max"] = float(values.max())
    summary["std"] = float(values.std())
    # coefficient of variation: trtexec's "unstable" signal
    summary["cv"] = float(values.std() / mean) if mean > 0 else 0.0
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}


def instability_warning(name: str, summary: dict | None, threshold: float) -> str | None:
    if summary and summary["count"] >= 2 and summary["cv"] > threshold:
        return (f"{name} is unstable: coefficient of variation {summary['cv']:.1%} > {threshold:.0%} "
                "(other load on the machine? CPU frequency scaling? run longer with --duration)")
    return None
