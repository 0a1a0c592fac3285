"""Opt-in Prometheus metrics (prometheus_client), served on 127.0.0.1 only.

Each daemon has a registry of its own, not prometheus_client's global one: two daemons in one
process (the tests) keep their counts apart. The names are documented in README.md; label values
are fixed words (stages, error kinds, results), never anything read from an input.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The daemon's metrics. Counters are exposed with prometheus_client's `_total` suffix."""

    def __init__(self):
        # No `<name>_created` series: in the text format each would be one more gauge beside the
        # documented names. (A process-wide switch; cxr-edge has no other registry.)
        disable_created_metrics()
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("cxr_edge_queue_depth", "inputs seen but not yet processed", registry=r)
        self.waiting_transient = Gauge(
            "cxr_edge_waiting_transient",
            "inputs waiting for a transient condition (disk full, I/O, permission) to clear", registry=r)
        self.batch_size = Histogram("cxr_edge_batch_size", "inference batch sizes", buckets=BATCH_BUCKETS, registry=r)
        self.stage_seconds = Histogram("cxr_edge_stage_seconds", "time per input and stage", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.arrival_to_output_seconds = Histogram(
            "cxr_edge_arrival_to_output_seconds", "file mtime to outputs written", buckets=LATENCY_BUCKETS, registry=r)
        self.inputs = Counter("cxr_edge_inputs", "inputs processed", ["result"], registry=r)
        self.errors = Counter("cxr_edge_errors", "failed inputs by stage", ["stage"], registry=r)
        self.retries = Counter("cxr_edge_retries", "inputs to be retried, by error kind", ["kind"], registry=r)
        self.sr_sends = Counter("cxr_edge_sr_sends", "SR C-STORE attempts", ["result"], registry=r)
        self.sr_failures = Counter("cxr_edge_sr_failures", "inputs whose findings were written without their SR",
                                   registry=r)
        self.reloads = Counter("cxr_edge_reloads", "SIGHUP model reloads", ["result"], registry=r)
        self.journal_errors = Counter("cxr_edge_journal_errors", "journal reads or writes that failed (disk full, I/O)",
                                      registry=r)


class MetricsServer:
    """prometheus_client's HTTP server for one registry, on 127.0.0.1 (never a public interface).
    Stopped like the daemon's other servers: shutdown() then server_close(); no thread is left."""

    def __init__(self, metrics: Metrics, port: int):
        self.server, self.thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
        self.thread.name = "metrics"  # for faulthandler's dump (SIGUSR1)
        self.host, self.port = self.server.server_address[:2]  # the port bound when `port` is 0

    def shutdown(self) -> None:
        self.server.shutdown()
        self.thread.join()

    def server_close(self) -> None:
        self.server.server_close()


def serve(metrics: Metrics, port: int) -> MetricsServer:
    """GET /metrics on 127.0.0.1:port; raises OSError when the port cannot be bound."""
    return MetricsServer(metrics, port)
