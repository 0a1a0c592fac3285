"""The pipeline: dynamic batching, error isolation, a crashing decoder process."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import cxr_edge.workers as workers_module
from cxr_edge.backends import create_backend
from cxr_edge.manifest import ModelPackage
from cxr_edge.pipeline import Pipeline
from cxr_edge.sinks import SRSink
from cxr_edge.workers import WorkerPool
from cxr_edge.sources import discover

from .conftest import SAMPLES


@pytest.fixture(scope="module")
def package():
    return ModelPackage.load()


def make_inbox(tmp_path, copies: int):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    pngs = sorted((SAMPLES / "nih").glob("*.png"))
    for i in range(copies):
        shutil.copy(pngs[i % len(pngs)], inbox / f"img{i:03d}.png")
    return inbox


def run_pipeline(package, inbox, out, pool=None, **options):
    items, _ = discover([inbox])
    with create_backend(package, threads=1) as backend:
        return Pipeline(package, backend, out, workers=2, **options).run(items, pool=pool)


# A max delay no decode takes (10 min): batches run when full, or when the inputs run out.
NEVER_MS = 600_000


def test_batches_fill_up_to_max_batch(package, tmp_path):
    results = run_pipeline(package, make_inbox(tmp_path, 13), tmp_path / "out", max_batch=4, max_delay_ms=NEVER_MS)
    sizes = [r.record.timings_ms["batch_size"] for r in results]
    assert len(results) == 13 and all(r.status == "ok" for r in results)
    assert sorted(sizes) == [1] + [4] * 12  # three full batches, then the one input left


def test_identical_inputs_give_identical_findings_whatever_the_batch(package, tmp_path):
    inbox = make_inbox(tmp_path, 6)
    one = run_pipeline(package, inbox, tmp_path / "a", max_batch=1)
    many = run_pipeline(package, inbox, tmp_path / "b", max_batch=6, max_delay_ms=NEVER_MS)
    assert {r.record.timings_ms["batch_size"] for r in many} == {6}  # really one batch of six
    by_name = lambda results: {r.item.relative: [f.as_dict() for f in r.record.findings] for r in results}  # noqa: E731
    a, b = by_name(one), by_name(many)
    for name in a:
        for fa, fb in zip(a[name], b[name]):
            assert fa["probability"] == pytest.approx(fb["probability"], abs=1e-5)


_real_prepare = workers_module.prepare


def crashing_prepare(item, *args):
    if item.path.name == "crash.png":
        os._exit(1)  # what a segfaulting decoder looks like to the pool
    return _real_prepare(item, *args)


def test_crashing_decoder_is_isolated(package, tmp_path, monkeypatch):
    """A worker that dies (segfault, OOM kill) costs only the input that killed it."""
    inbox = make_inbox(tmp_path, 8)
    shutil.copy(SAMPLES / "nih" / "00001873_000.png", inbox / "crash.png")
    # The pool forks its workers, so they run the patched function.
    monkeypatch.setattr(workers_module, "prepare", crashing_prepare)
    results = run_pipeline(package, inbox, tmp_path / "out")
    status = {r.item.path.name: r.status for r in results}
    assert len(status) == 9
    assert status.pop("crash.png") == "error"
    assert set(status.values()) == {"ok"}
    crashed = json.loads((tmp_path / "out" / "inbox" / "crash.png.json").read_text())
    assert crashed["error"]["reason"] == "the decoder process crashed on this file"


def test_unwritable_output_is_an_error_record_not_a_crash(package, tmp_path):
    inbox = make_inbox(tmp_path, 2)
    out = tmp_path / "out"
    (out / "inbox").mkdir(parents=True)
    (out / "inbox" / "img000.png.json").mkdir()  # a folder where the JSON should go
    results = run_pipeline(package, inbox, out)
    status = {r.item.path.name: r for r in results}
    assert status["img001.png"].status == "ok"
    failed = status["img000.png"]
    assert failed.status == "error" and failed.error.stage == "write"


def test_worker_pool_prepares_every_item(package, tmp_path):
    inbox = make_inbox(tmp_path, 3)
    items, _ = discover([inbox])
    pool = WorkerPool(2, package.preprocess_params)
    try:
        prepared = [p for p in pool.prepared(items, window=4) if p is not None]
        assert sorted(p.item.path.name for p in prepared) == ["img000.png", "img001.png", "img002.png"]
        assert all(p.error is None and p.tensor.shape[0] == 1 for p in prepared)
    finally:
        pool.close()



def crashing_encode_sr(header, findings, identity, uids=None):
    os._exit(1)  # the worker building an SR dies (OOM kill)


def test_srs_are_built_in_the_pool_and_here_when_the_pool_dies(package, tmp_path, monkeypatch, caplog):
    """SRs are built in the worker pool, off the batcher's thread; if the pool dies under them,
    they are built on the main thread instead, and every DICOM still gets a valid SR."""
    import pydicom

    from cxr_edge.sr import read_sr_findings

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("a.dcm", "b.dcm"):
        shutil.copy(SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm", inbox / name)
    in_pool = run_pipeline(package, inbox, tmp_path / "pool")
    assert "redoing it on the main thread" not in caplog.text
    monkeypatch.setattr(SRSink, "start", lambda self, inference, pool: pool.submit(crashing_encode_sr, *self._args(inference)))
    pool = WorkerPool(2, package.preprocess_params)  # one pool for two runs, as the daemon does
    try:
        fallback = run_pipeline(package, inbox, tmp_path / "fallback", pool=pool)
        assert "redoing it on the main thread" in caplog.text
        monkeypatch.undo()
        again = run_pipeline(package, inbox, tmp_path / "again", pool=pool)  # the broken pool is replaced
    finally:
        pool.close()
    assert [r.status for r in again] == ["ok", "ok"]
    # the same bytes and model give the same SR, wherever and however often it is built: a redo
    # after a crash or a re-send is the same instance to the PACS
    assert len({r.record.sr["sop_instance_uid"] for r in in_pool + fallback + again}) == 1
    for results in (in_pool, fallback):
        assert [r.status for r in results] == ["ok", "ok"]
        for result in results:
            found = read_sr_findings(pydicom.dcmread(result.outputs["sr"]))
            assert len(found) == 15
            assert result.record.timings_ms["write"] > 0


def test_an_sr_that_cannot_be_written_leaves_the_findings(package, tmp_path):
    """The findings never depend on the SR: a folder where the SR should go (as a full or read-only
    disk would) gives a findings record with status ok and the SR's failure, stage sr."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm", inbox / "a.dcm")
    out = tmp_path / "out"
    (out / "inbox" / "a.dcm.sr.dcm").mkdir(parents=True)
    (result,) = run_pipeline(package, inbox, out)
    assert result.status == "ok" and "sr" not in result.outputs
    record = json.loads((out / "inbox" / "a.dcm.json").read_text())
    assert record["status"] == "ok" and len(record["findings"]) == 14
    assert record["sr_error"]["stage"] == "sr" and record["sr_error"]["reason"].startswith("cannot write the SR: ")


class _NaNForFirstBatch:
    """The real ONNX Runtime runner, with one logit of the first batch turned NaN (a broken artifact)."""

    def __init__(self, runner):
        self.runner, self.batches = runner, 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def infer(self, batch):
        logits = self.runner.infer(batch)
        self.batches += 1
        if self.batches == 1:
            logits[:, 3] = float("nan")
        return logits


def test_non_finite_probabilities_are_an_error_not_json_nan(package, tmp_path):
    inbox = make_inbox(tmp_path, 2)
    items, _ = discover([inbox])
    with create_backend(package, threads=1) as backend:
        results = Pipeline(package, _NaNForFirstBatch(backend), tmp_path / "out", workers=2, max_batch=1).run(items)
    assert sorted(r.status for r in results) == ["error", "ok"]
    (failed,) = [r for r in results if r.status == "error"]
    assert failed.error.stage == "inference"
    assert failed.error.reason == "the model produced non-finite probabilities (NaN or infinity) for this image"
    for path in (tmp_path / "out").rglob("*.json"):
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path}: {c}"))


def test_sr_uids_follow_the_input_bytes_and_the_model():
    from pydicom.uid import UID

    from cxr_edge.sinks import sr_uids
    from cxr_edge.sr import ModelIdentity

    model = ModelIdentity("m", "1", "f" * 64)
    first = sr_uids("a" * 64, model)
    assert first == sr_uids("a" * 64, model)
    assert first["sop_instance_uid"] != first["series_instance_uid"]
    assert first["sop_instance_uid"] != sr_uids("b" * 64, model)["sop_instance_uid"]
    assert first["sop_instance_uid"] != sr_uids("a" * 64, ModelIdentity("m", "2", "f" * 64))["sop_instance_uid"]
    assert all(UID(uid).is_valid for uid in first.values())
    assert sr_uids(None, model) == {}  # unknown bytes: fresh random UIDs


@pytest.mark.parametrize("change", ["append", "replace"])
def test_a_file_that_changes_between_hashing_and_decoding_is_read_again(package, tmp_path, monkeypatch, change):
    """The decoders open the file again by path. If a writer appends to it, or another file is
    renamed over it, after it was hashed, the pixels are not the hashed bytes: the input fails
    as transient (read again later), never a result filed under the old bytes' hash."""
    import cxr_edge.decode as decode_module
    from cxr_edge.prepare import prepare
    from cxr_edge.sources import InputItem

    source = SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm"
    data = source.read_bytes()
    path = tmp_path / "study.dcm"
    path.write_bytes(data[: 2 * len(data) // 3])  # what the hash sees: the first two thirds
    real_decode = decode_module.decode_file

    def writer_finishes_first(file, *args, **kwargs):
        if change == "append":
            with open(file, "ab") as f:
                f.write(data[2 * len(data) // 3 :])
        else:
            (tmp_path / "new.dcm").write_bytes(data)
            os.replace(tmp_path / "new.dcm", file)
        return real_decode(file, *args, **kwargs)

    monkeypatch.setattr(decode_module, "decode_file", writer_finishes_first)
    item = InputItem(path, path.relative_to(tmp_path))
    prepared = prepare(item, package.preprocess_params, 50_000_000, confine=tmp_path)
    assert prepared.error == {"stage": "read", "reason": "the file changed while it was being read", "kind": "transient"}
    monkeypatch.undo()
    again = prepare(item, package.preprocess_params, 50_000_000, confine=tmp_path)  # the writer is done
    assert again.error is None and again.size_bytes == len(data)


FORK_AFTER_OPENCV = """
import numpy as np
from cxr_edge.heatmaps import heat_on_display, overlay
from cxr_edge.manifest import ModelPackage
from cxr_edge.sources import discover
from cxr_edge.workers import WorkerPool, tensors_for
import cv2
for _ in range(10):  # what the main process does when it redraws a crashed worker's heatmaps
    cv2.resize(np.random.rand(2000, 2000).astype(np.float32), (700, 700), interpolation=cv2.INTER_AREA)
    overlay(np.zeros((384, 384), np.uint8), heat_on_display(np.random.rand(8, 8), (1024, 1024), (384, 384), "pad"), ["x"])
items, _ = discover([{samples!r}])
params = ModelPackage.load().preprocess_params
for _ in range(5):  # the pool forks again after OpenCV ran here, as a restart after a crash does
    with WorkerPool(2, params) as pool:
        assert len(tensors_for(items, params, pool=pool).tensors) == len(items)
print("forked fine")
"""


def test_workers_forked_after_opencv_ran_in_the_main_process_do_not_hang():
    """A child forked while OpenCV's thread pool exists hangs in its first OpenCV call (seen in
    CI, in the workers' start-up): the runtime keeps OpenCV single-threaded in every process."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", FORK_AFTER_OPENCV.format(samples=str(SAMPLES / "nih"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stuck workers too
        proc.communicate()
        pytest.fail("the worker pool hung after OpenCV ran in the main process")
    assert proc.returncode == 0 and "forked fine" in out, err[-2000:]
