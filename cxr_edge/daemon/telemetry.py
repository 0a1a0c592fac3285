"""Opt-in Prometheus metrics on 127.0.0.1 (text exposition format 0.0.4), no extra dependency."""

from __future__ import annotations

import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self.gauges: dict[tuple[str, tuple], float] = {}
        self.histograms: dict[tuple[str, tuple], list] = {}
        self.help: dict[str, tuple[str, str]] = {}

    def _key(self, name: str, labels: dict | None) -> tuple[str, tuple]:
        return name, tuple(sorted((labels or {}).items()))

    def inc(self, name: str, value: float = 1.0, labels: dict | None = None, help: str = "") -> None:
        with self._lock:
            self.help.setdefault(name, ("counter", help))
            self.counters[self._key(name, labels)] += value

    def set(self, name: str, value: float, help: str = "") -> None:
        with self._lock:
            self.help.setdefault(name, ("gauge", help))
            self.gauges[self._key(name, None)] = value

    def observe(self, name: str, value: float, labels: dict | None = None, buckets=LATENCY_BUCKETS, help: str = "") -> None:
        with self._lock:
            self.help.setdefault(name, ("histogram", help))
            key = self._key(name, labels)
            if key not in self.histograms:
                self.histograms[key] = [list(buckets), [0] * len(buckets), 0, 0.0]
            bounds, counts, _, _ = entry = self.histograms[key]
            for i, bound in enumerate(bounds):
                if value <= bound:
                    counts[i] += 1
            entry[2] += 1
            entry[3] += value

    def render(self) -> str:
        def fmt(labels: tuple, extra: tuple = ()) -> str:
            items = labels + extra
            return "{" + ",".join(f'{k}="{v}"' for k, v in items) + "}" if items else ""

        lines = []
        with self._lock:
            for name, (kind, text) in sorted(self.help.items()):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                for (n, labels), value in sorted(self.counters.items()) if kind == "counter" else []:
                    if n == name:
                        lines.append(f"{name}_total{fmt(labels)} {value}")
                for (n, labels), value in sorted(self.gauges.items()) if kind == "gauge" else []:
                    if n == name:
                        lines.append(f"{name}{fmt(labels)} {value}")
                for (n, labels), (bounds, counts, count, total) in sorted(self.histograms.items()) if kind == "histogram" else []:
                    if n == name:
                        for bound, c in zip(bounds, counts):
                            lines.append(f"{name}_bucket{fmt(labels, (('le', bound),))} {c}")
                        lines.append(f"{name}_bucket{fmt(labels, (('le', '+Inf'),))} {count}")
                        lines += [f"{name}_count{fmt(labels)} {count}", f"{name}_sum{fmt(labels)} {total}"]
        return "\n".join(lines) + "\n"


def serve(metrics: Metrics, port: int) -> ThreadingHTTPServer:
    """GET /metrics on 127.0.0.1:port only (never on a public interface)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/metrics":
                self.send_error(404)
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes are not news
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
