"""Artifacts over the held-out images, and the gate, through Polygraphy's Comparator.

Every artifact runs the same preprocessed tensors (decoded once, in cxr_edge.workers, before any
runner starts) in the same batches. `Comparator.run` does the batching, warm-up and timing;
`Comparator.compare_accuracy` compares FP32 with a candidate with the gate's compare function
(engines.gate.GateCompareFunc) over the whole set at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from polygraphy.comparator import AccuracyResult, Comparator, IterationResult, RunResults

from cxr_edge.backends.onnxruntime import cpu_session
from cxr_edge.backends.polygraphy_env import polygraphy_calls

GATE_BATCH = 8  # the batch the CPU timings (cpu_ms_per_image) are measured at


class TensorBatches:
    """A Polygraphy data loader: feed dicts of `batch` images for the runner's one input.

    The last batch is padded to `min_batch` by repeating its last image (a TensorRT profile's
    minimum); `HoldoutRun` drops the extra rows."""

    def __init__(self, tensors: np.ndarray, batch: int = GATE_BATCH, min_batch: int = 1):
        self.tensors, self.batch, self.min_batch = tensors, batch, min_batch
        self.input_metadata = None  # Comparator.run sets it from the runner

    def __iter__(self):
        [name] = list(self.input_metadata.keys())
        for start in range(0, len(self.tensors), self.batch):
            part = self.tensors[start : start + self.batch]
            if len(part) < self.min_batch:
                part = np.concatenate([part, np.repeat(part[-1:], self.min_batch - len(part), axis=0)])
            yield {name: np.ascontiguousarray(part, dtype=np.float32)}


@dataclass(frozen=True)
class HoldoutRun:
    """One artifact over the held-out set: its logits as one Polygraphy iteration, and its speed."""

    name: str
    results: object  # polygraphy RunResults: {name: [IterationResult({output: logits [n, L]})]}
    ms_per_image: float  # Polygraphy's inference time per image, after one warm-up batch

    @property
    def logits(self) -> np.ndarray:
        [iteration] = self.results[self.name]
        [logits] = iteration.values()
        return logits


def onnxruntime_runner(name: str, load_bytes, threads: int | None = None):
    """Polygraphy's ONNX Runtime runner on the session `cxr-edge infer` uses."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(lambda: cpu_session(load_bytes(), threads), name=name)


def tensorrt_runner(name: str, load_bytes):
    """Polygraphy's TensorRT runner on an engine built on this machine (so no stamp to check)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(load_bytes), name=name)


def run_holdout(runner, tensors: np.ndarray, batch: int = GATE_BATCH, min_batch: int = 1) -> HoldoutRun:
    """Run `runner` (inactive; Comparator activates it) over every image."""
    with polygraphy_calls():
        results = Comparator.run([runner], data_loader=TensorBatches(tensors, batch, min_batch), warm_up=1)
        iterations = results[runner.name]
        # the gate judges the logits; class maps (a second output) follow them: their mean is the logit
        names = list(iterations[0].keys())
        output = "logits" if "logits" in names else names[0]
        logits = np.concatenate([it[output] for it in iterations])[: len(tensors)]
        seconds = sum(it.runtime for it in iterations)
        merged = RunResults()
        merged.append((runner.name, [IterationResult({output: logits}, seconds, runner.name)]))
    return HoldoutRun(runner.name, merged, seconds * 1e3 / len(tensors))


def gate(reference: HoldoutRun, candidate: HoldoutRun, compare_func):
    """The compare function's verdict (engines.gate.GateResult) on `candidate` against `reference`."""
    both = RunResults()
    both.extend([*reference.results, *candidate.results])
    with polygraphy_calls():
        accuracy = Comparator.compare_accuracy(both, compare_func=compare_func)
    # Polygraphy >= 0.53 returns one AccuracyResult per compare function; older ones, the result
    result = accuracy if isinstance(accuracy, AccuracyResult) else accuracy[0]
    [iterations] = result.values()  # one runner pair: (reference, candidate)
    [verdict] = iterations[0].values()  # one iteration, one output
    return verdict
