"""The worker processes: decode in parallel, survive a worker that crashes, and do the other CPU
work that must not hold up the batcher (encoding SRs). The one decode-to-tensors path of
`infer`, `watch`, `bench`, `calibrate`, `build-engine` and training.

Fork before any inference threads exist: create the pool, then activate the runner.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UNEXPECTED
from .limits import usable_cpus
from .prepare import Prepared, init_worker, prepare
from .sources import InputItem

log = logging.getLogger(__name__)


def default_workers() -> int:
    return usable_cpus()


class WorkerPool:
    """Worker processes for preparing inputs (and encoding outputs); survives a worker that crashes.

    When a worker dies (a decoder segfault, the OOM killer) every in-flight input fails with it.
    Those inputs are retried one at a time, so the input that kills a worker again is named and
    its neighbours still get processed.
    """

    def __init__(self, workers: int, params, max_pixels: int | None = None, min_side: int | None = None,
                 confine: Path | None = None, display_side: int = 0, earlier=None, start_method: str | None = None):
        from .limits import DEFAULT_MAX_PIXELS, MIN_SIDE

        self.workers, self.params, self.max_pixels = workers, params, max_pixels or DEFAULT_MAX_PIXELS
        self.min_side = MIN_SIDE if min_side is None else min_side
        self.confine = confine  # the service's inbox: no symbolic links, nothing outside it
        self.display_side = display_side  # > 0: keep a small copy of each image for heatmaps
        self.earlier = earlier  # prepare(earlier=): a resumed backfill's check for complete outputs
        # fork before any backend threads exist is safe and fast; fall back where unavailable
        # (a process that has threads already, a Ray worker, asks for spawn)
        method = start_method or ("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        self._context = multiprocessing.get_context(method)
        self._executor = self._new_executor()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _new_executor(self) -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(self.workers, mp_context=self._context, initializer=init_worker)
        # The executor forks on its first task, not when it is made: fork now, so the workers
        # are copies of this process as it is (before a runner starts its threads).
        executor.submit(int).result()
        return executor

    def submit_prepare(self, item: InputItem) -> Future:
        return self.submit(prepare, item, self.params, self.max_pixels, self.min_side, self.confine, self.display_side,
                           self.earlier)

    def submit(self, fn, *args) -> Future:
        """Run fn(*args) in a worker (picklable function and arguments)."""
        try:
            return self._executor.submit(fn, *args)
        except BrokenProcessPool:  # a worker died after the last result was collected
            log.warning("the worker pool is broken; starting a new one")
            self.restart()
            return self._executor.submit(fn, *args)

    def restart(self) -> None:
        # A broken pool's survivors may be blocked writing a result nobody reads: kill them, or
        # the executor's manager thread waits on them forever (and so does interpreter exit).
        for process in list((self._executor._processes or {}).values()):
            process.kill()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def prepared(self, items: list[InputItem], window: int, tick: float | None = None):
        """Yield Prepared for every item as it completes, keeping `window` in flight.

        With `tick`, also yields None when nothing completed for `tick` seconds, so the caller
        can flush a partly filled batch (the batcher's max queue delay).
        """
        queue = list(reversed(items))
        suspects: list[InputItem] = []  # in flight when a worker died: retried one at a time
        running: dict[Future, InputItem] = {}
        while queue or suspects or running:
            limit = 1 if suspects or any(f.suspect for f in running) else window
            while len(running) < limit and (suspects or queue):
                from_suspects = bool(suspects)
                item = suspects.pop() if from_suspects else queue.pop()
                future = self.submit_prepare(item)
                future.suspect = from_suspects
                running[future] = item
            done, _ = wait(running, timeout=tick, return_when=FIRST_COMPLETED)
            if not done:
                yield None
                continue
            broken = False
            for future in done:
                item = running.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    broken = True
                    if future.suspect:
                        yield Prepared(item, error={"stage": "decode", "kind": UNEXPECTED,  # or the OOM killer
                                                    "reason": "the decoder process crashed on this file"})
                    else:
                        suspects.append(item)
            if broken:
                log.warning("a decode worker died; retrying %d in-flight input(s) one at a time", len(running) + len(suspects))
                for future, item in running.items():
                    suspects.append(item)
                running.clear()
                self.restart()


@dataclass
class TensorSet:
    """Model inputs of the items that decoded, in input order, and why the others did not."""

    tensors: np.ndarray  # [n_ok, C, H, W] float32
    ok: np.ndarray  # index into the items of each row of `tensors`
    failures: list[tuple[InputItem, str]]  # (item, "stage: reason"), in input order


def tensors_for(items: list[InputItem], params, workers: int | None = None, min_side: int = 0,
                pool: WorkerPool | None = None) -> TensorSet:
    """Decode + preprocess `items` in crash-isolated workers (a labeled set, calibration or
    training images: `min_side` 0 takes thumbnails too, the set is the user's own choice)."""
    workers = workers or default_workers()
    own = pool is None
    pool = pool or WorkerPool(workers, params, min_side=min_side)
    by_path = {}  # items come back pickled: matched by their path and relative name
    for i, item in enumerate(items):
        by_path.setdefault((str(item.path), item.relative.as_posix()), []).append(i)
    tensors: dict[int, np.ndarray] = {}
    failed: dict[int, str] = {}
    try:
        for prepared in pool.prepared(items, window=4 * workers):
            index = by_path[(str(prepared.item.path), prepared.item.relative.as_posix())].pop(0)
            if prepared.error:
                failed[index] = f"{prepared.error['stage']}: {prepared.error['reason']}"
            else:
                tensors[index] = prepared.tensor
    finally:
        if own:
            pool.close()
    order = sorted(tensors)
    shape = (0, params.channels, params.size, params.size)
    stacked = np.stack([tensors[i] for i in order]).astype(np.float32, copy=False) if order else np.zeros(shape, np.float32)
    return TensorSet(stacked, np.asarray(order, dtype=np.int64), [(items[i], failed[i]) for i in sorted(failed)])
