"""/metrics (cxr_edge.daemon.telemetry on prometheus_client): scraped over real HTTP and parsed
with prometheus_client's own parser. The documented names, a registry per daemon, loopback only,
no thread left after shutdown, and the values moving as a real `cxr-edge watch` works."""

from __future__ import annotations

import re
import socket
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cxr_edge.daemon.telemetry import Metrics, serve

from .conftest import REPO, SAMPLES
from .daemon_helpers import DaemonProcess, drop, kill_leftovers, wait_for

INF = float("inf")


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} of one GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def families(port: int) -> dict[str, str]:
    """{family name: type} of one GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return {f.name: f.type for f in text_string_to_metric_families(response.read().decode())}


@pytest.fixture
def served():
    """serve(metrics) on a free loopback port; every server is stopped and its thread checked gone."""
    servers = []

    def start(metrics: Metrics):
        server = serve(metrics, 0)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
        assert not server.thread.is_alive()


def test_every_documented_metric_is_exposed_with_its_type(served):
    """README.md's list of metrics is the contract dashboards are built on."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("- **Metrics** (`--metrics-port`", 1)[1].split("\n- **", 1)[0]
    documented = set(re.findall(r"`(cxr_edge_[a-z_]+)", section))
    assert len(documented) >= 12, documented
    server = served(Metrics())
    exposed = families(server.port)
    # prometheus_client names a counter's family without the `_total` of its samples
    names = {f"{name}_total" if kind == "counter" else name for name, kind in exposed.items()}
    assert documented == names
    assert exposed["cxr_edge_stage_seconds"] == exposed["cxr_edge_batch_size"] == "histogram"
    assert exposed["cxr_edge_queue_depth"] == exposed["cxr_edge_waiting_transient"] == "gauge"


def test_values_labels_and_buckets(served):
    metrics = Metrics()
    server = served(metrics)
    metrics.inputs.labels(result="ok").inc()
    metrics.inputs.labels(result="ok").inc()
    metrics.errors.labels(stage="decode").inc()
    metrics.retries.labels(kind="transient").inc()
    metrics.stage_seconds.labels(stage="decode").observe(0.02)
    metrics.batch_size.observe(3)
    metrics.queue_depth.set(7)
    s = scrape(server.port)
    assert s["cxr_edge_inputs_total"] == {(("result", "ok"),): 2.0}
    assert s["cxr_edge_errors_total"] == {(("stage", "decode"),): 1.0}
    assert s["cxr_edge_retries_total"] == {(("kind", "transient"),): 1.0}
    assert s["cxr_edge_queue_depth"] == {(): 7.0}
    decode = {dict(labels)["le"]: value for labels, value in s["cxr_edge_stage_seconds_bucket"].items()}
    assert decode == {"0.005": 0, "0.01": 0, "0.025": 1, "0.05": 1, "0.1": 1, "0.25": 1, "0.5": 1, "1.0": 1,
                      "2.5": 1, "5.0": 1, "10.0": 1, "+Inf": 1}
    batch = {float(dict(labels)["le"]): value for labels, value in s["cxr_edge_batch_size_bucket"].items()}
    assert batch == {1: 0, 2: 0, 4: 1, 8: 1, 16: 1, 32: 1, 64: 1, INF: 1}
    assert s["cxr_edge_batch_size_sum"] == {(): 3.0}


def test_two_daemons_in_one_process_keep_their_counts_apart(served):
    """A registry per Metrics: a second one would collide in prometheus_client's global registry."""
    first, second = Metrics(), Metrics()
    a, b = served(first), served(second)
    first.journal_errors.inc()
    first.reloads.labels(result="failed").inc()
    assert scrape(a.port)["cxr_edge_journal_errors_total"] == {(): 1.0}
    assert scrape(b.port)["cxr_edge_journal_errors_total"] == {(): 0.0}
    assert "cxr_edge_reloads_total" not in scrape(b.port)  # no label seen yet: no sample


def test_served_on_loopback_only_and_gone_after_shutdown():
    before = set(threading.enumerate())
    server = serve(Metrics(), 0)
    try:
        assert server.host == "127.0.0.1"
        assert scrape(server.port)
        outside = [ip for ip in _own_addresses() if not ip.startswith("127.")]
        for ip in outside:  # not reachable through another interface of this machine
            with pytest.raises(OSError):
                socket.create_connection((ip, server.port), timeout=5).close()
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(urllib.error.URLError):
        scrape(server.port)
    for thread in set(threading.enumerate()) - before:  # a request thread finishing its reply
        thread.join(timeout=10)
    assert set(threading.enumerate()) - before == set()


def _own_addresses() -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)})
    except OSError:
        return []


@pytest.fixture
def no_daemon_outlives_its_test():
    yield
    kill_leftovers()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_daemons_metrics_move_as_it_processes_inputs(tmp_path, no_daemon_outlives_its_test):
    port = _free_port()
    daemon = DaemonProcess(tmp_path, "--metrics-port", port).start()
    start = scrape(port)
    assert "cxr_edge_inputs_total" not in start and "cxr_edge_errors_total" not in start
    assert start["cxr_edge_batch_size_count"] == {(): 0.0}

    drop(SAMPLES / "nih" / "00000100_000.png", daemon.inbox)
    (tmp_path / "notes.dcm").write_text("not an image\n" * 10)
    drop(tmp_path / "notes.dcm", daemon.inbox)
    wait_for(lambda: daemon.states() == {"done": 1, "failed": 1}, what="one done, one failed")
    s = scrape(port)
    assert s["cxr_edge_inputs_total"] == {(("result", "ok"),): 1.0}
    assert sum(s["cxr_edge_errors_total"].values()) == 1.0
    assert s["cxr_edge_batch_size_count"] == {(): 1.0}
    assert s["cxr_edge_arrival_to_output_seconds_count"] == {(): 1.0}
    stages = {dict(labels)["stage"] for labels in s["cxr_edge_stage_seconds_count"]}
    assert {"decode", "preprocess", "inference_batch", "write"} <= stages
    assert s["cxr_edge_sr_failures_total"] == {(): 0.0}

    drop(SAMPLES / "nih" / "00001873_000.png", daemon.inbox)
    wait_for(lambda: scrape(port).get("cxr_edge_inputs_total") == {(("result", "ok"),): 2.0}, timeout=120,
             what="the second input counted")
    assert daemon.stop() == 0, daemon.text()[-3000:]
