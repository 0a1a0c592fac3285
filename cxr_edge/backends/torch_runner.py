"""PyTorch on a CUDA GPU (or, without one, on CPU): the GPU path that runs where TensorRT is absent.

The network is the manifest's timm architecture with the weights of the package's FP32 ONNX
(torch_model.py), so every package runs here, and on CPU it gives ONNX Runtime's FP32 results
(tests/test_torch_runner.py holds it to 1e-5 in probability).

On CUDA, per batch:
- the batch is copied into pinned host memory, then to the GPU with a non-blocking copy;
- a CUDA graph captured for that batch size is replayed (a batch is padded up to the next
  captured size: powers of two up to the pipeline's max batch), in FP16, BF16 or FP32; graphs
  rather than torch.compile, so a daemon starts in seconds with no JIT compiler and no Triton;
- the logits (and class maps) come back with a non-blocking copy into pinned memory;
- CUDA events between the steps time h2d / compute / d2h on the GPU itself, with no extra
  synchronisation.
Decoding runs in the worker processes all the while (workers.py), so it overlaps the GPU work:
the only wait on this thread is for the last event, and torch releases the GIL for it.

Without CUDA the runner says why, once, and runs FP32 on CPU (a FP16/BF16 request too: the
record's runner names what ran).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import CxrEdgeError, ModelPackageError
from ..limits import usable_cpus
from .base import Outputs, Runner, Timings

log = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEVICES = ("auto", "cuda", "cpu")
INSTALL_HINT = "pip install 'cxr-edge[gpu-torch]'"


def missing_modules() -> list[str]:
    import importlib.util

    return [m for m in ("torch", "timm", "onnx") if importlib.util.find_spec(m) is None]


def cuda_problem(device_node_first: bool = True) -> str | None:
    """Why torch cannot run on a CUDA GPU here, or None when it can. With `device_node_first`
    (backend auto) it looks for an NVIDIA device before importing torch, so a machine without one
    never pays for the import."""
    import glob

    if device_node_first and not glob.glob("/dev/nvidia[0-9]*"):
        return "no NVIDIA GPU device (/dev/nvidia*) on this machine"
    missing = missing_modules()
    if missing:
        return f"{', '.join(missing)} not installed ({INSTALL_HINT})"
    try:
        import torch
    except Exception as exc:  # a broken install, a CUDA library that does not load
        return f"torch cannot be imported: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no usable CUDA GPU (built for CUDA {torch.version.cuda})"
    return None


def batch_sizes_to_capture(max_batch: int) -> list[int]:
    """1, 2, 4, ... below `max_batch`, and `max_batch` itself: at most one doubling of padding."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch]


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, load_bytes, precision: str, artifact_key: str, artifact_sha256: str,
                 threads: int | None = None, where: str = "the model package", architecture: dict | None = None,
                 class_maps: tuple[str, tuple[int, int]] | None = None, max_batch: int = 8, device: str = "auto",
                 cuda_graphs: bool = True, warmup: int = 3):
        """`load_bytes`: a loader returning the FP32 ONNX's sha256-verified bytes (the weights);
        `architecture`: the manifest's; `class_maps`: (output name, grid) when the package has
        class maps; `max_batch`: the largest batch the caller sends at once (graphs are captured up to it)."""
        if precision not in DTYPES:
            raise CxrEdgeError(f"the torch backend runs {', '.join(DTYPES)}, not {precision} "
                               "(INT8 runs on onnxruntime or tensorrt)")
        if device not in DEVICES:
            raise CxrEdgeError(f"unknown torch device {device!r}; available: {', '.join(DEVICES)}")
        super().__init__(precision, artifact_key, artifact_sha256)
        self.requested_precision = precision
        self.load_bytes, self.where, self.threads = load_bytes, where, threads
        self.architecture, self.class_maps = dict(architecture or {}), class_maps
        self.maps_grid = tuple(class_maps[1]) if class_maps else None
        self.max_batch, self.device_choice = max(1, int(max_batch)), device
        self.cuda_graphs, self.warmup = cuda_graphs, warmup
        self.device: str | None = None
        self.fallback: str | None = None  # why this runs on CPU (or in FP32) when something else was asked
        self._module = self._maps_problem = None
        self._graphs: dict = {}

    # --- lifecycle ------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        if missing_modules():
            raise CxrEdgeError(f"the torch backend needs torch, timm and onnx: {', '.join(missing_modules())} "
                               f"not installed ({INSTALL_HINT})")
        import torch

        self.precision, self.fallback = self.requested_precision, None  # a second activation starts afresh
        self.device = self._choose_device()
        if self.device == "cpu" and self.precision != "fp32":
            self.fallback = f"{self.fallback}; so FP32 instead of {self.precision.upper()}" if self.fallback else \
                f"{self.precision.upper()} runs on CUDA only: FP32 on CPU"
            self.precision = "fp32"
        if self.fallback:
            log.warning("torch backend: %s", self.fallback)
        if self.device == "cpu":
            torch.set_num_threads(self.threads or usable_cpus())  # the cores this process may use
        from .torch_model import logits_and_maps, maps_problem, timm_model

        model = timm_model(self.architecture, self.load_bytes(), self.where)
        self._maps_problem = maps_problem(model) if self.maps_grid else "the package has no class maps"
        grid = self.maps_grid if self._maps_problem is None else None
        self._module = logits_and_maps(model, grid, getattr(torch, DTYPES[self.precision])).to(self.device)
        if self.device == "cuda":
            try:
                self._start_cuda(torch)
            except Exception as exc:  # out of memory, a capture the GPU refuses
                first = exc
                while first.__context__ is not None:  # a failed capture's own exit error hides the cause
                    first = first.__context__
                try:
                    self.deactivate_impl()
                except Exception:  # a sticky CUDA error raises again on synchronize: the first one is the news
                    pass
                raise ModelPackageError(f"{self.where}: the torch backend cannot start on CUDA: "
                                        f"{type(first).__name__}: {first}") from exc

    def _choose_device(self) -> str:
        if self.device_choice == "cpu":
            return "cpu"
        problem = cuda_problem(device_node_first=False)
        if problem is None:
            return "cuda"
        if self.device_choice == "cuda":
            raise CxrEdgeError(f"the torch backend cannot use CUDA: {problem}")
        self.fallback = f"CUDA is not available ({problem}): running on CPU"
        return "cpu"

    def _start_cuda(self, torch) -> None:
        if self.precision == "fp32":
            # FP32 means FP32: no TF32 in convolutions (cuDNN's default) or matmuls, so this runner
            # is the reference the FP16/BF16 and TensorRT paths are compared with
            _no_tf32(torch)
        self._stream = torch.cuda.Stream()
        # blocking: the wait for the last event sleeps instead of spinning a core the decode workers need
        self._events = [torch.cuda.Event(enable_timing=True, blocking=True) for _ in range(4)]
        labels = int(self.architecture["num_classes"])
        self._pinned_input = torch.empty((self.max_batch, *self._sample_shape()), dtype=torch.float32, pin_memory=True)
        self._pinned_logits = torch.empty((self.max_batch, labels), dtype=torch.float32, pin_memory=True)
        self._pinned_maps = torch.empty((self.max_batch, labels, *self.maps_grid), dtype=torch.float32,
                                        pin_memory=True) if self._maps_problem is None else None
        self._pool = torch.cuda.graph_pool_handle()
        # captured before the first input, not during; the largest first, so the smaller ones
        # fit in the memory it leaves in the shared pool
        for size in reversed(batch_sizes_to_capture(self.max_batch)):
            self._graph_for(size)

    def _sample_shape(self) -> tuple[int, int, int]:
        size = int(self.architecture["img_size"])
        return int(self.architecture["in_chans"]), size, size

    def _graph_for(self, size: int):
        """(static input, run) for this batch size, made on first use; run() computes on the
        static input and returns (logits, maps) on the GPU."""
        import torch

        if size in self._graphs:
            return self._graphs[size]
        static_input = torch.zeros((size, *self._sample_shape()), device="cuda")
        self._stream.wait_stream(torch.cuda.current_stream())  # the zeros are written on the default stream
        with torch.inference_mode(), torch.cuda.stream(self._stream):
            for _ in range(max(1, self.warmup)):  # lazy initialisation (cuBLAS, SDPA) before capture
                outputs = self._module(static_input)
            if self.cuda_graphs:
                graph = torch.cuda.CUDAGraph()
                # One memory pool for all sizes: replays are serialised on one stream and each one's
                # outputs are copied out before the next, so they may share intermediate buffers.
                with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                    outputs = self._module(static_input)

                def run(graph=graph, outputs=outputs):
                    graph.replay()
                    return outputs
            else:
                def run():
                    return self._module(static_input)
        self._stream.synchronize()
        self._graphs[size] = (static_input, run)
        return self._graphs[size]

    def deactivate_impl(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()  # nothing of ours still running when its memory goes
        self._graphs, self._module, self._pool, self._stream, self._events = {}, None, None, None, []
        self._pinned_input = self._pinned_logits = self._pinned_maps = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

    # --- inference ------------------------------------------------------------------------------
    def output_shape(self, output: str) -> tuple | None:
        if output == "logits":
            return (None, int(self.architecture["num_classes"]))
        if self.class_maps is not None and output == self.class_maps[0] and self._maps_problem is None:
            return (None, int(self.architecture["num_classes"]), *self.maps_grid)
        return None

    def infer_impl(self, batch: np.ndarray) -> Outputs:
        if self.device == "cpu":
            return self._infer_cpu(batch)
        logits, maps, timings = [], [], []
        for start in range(0, len(batch), self.max_batch):
            part_logits, part_maps, timing = self._infer_cuda(batch[start : start + self.max_batch])
            logits.append(part_logits)
            maps.append(part_maps)
            timings.append(timing)
        return Outputs(np.concatenate(logits), _total(timings), None if maps[0] is None else np.concatenate(maps))

    def _infer_cpu(self, batch: np.ndarray) -> Outputs:
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            logits, maps = self._module(torch.from_numpy(batch))
        wanted = maps.numpy() if self.maps_output and self._maps_problem is None else None
        return Outputs(logits.numpy(), Timings(compute_ms=(time.perf_counter() - started) * 1e3), wanted)

    def _infer_cuda(self, part: np.ndarray):
        import torch

        rows = len(part)
        size = next(s for s in batch_sizes_to_capture(self.max_batch) if s >= rows)
        static_input, run = self._graph_for(size)
        self._pinned_input[:rows].copy_(torch.from_numpy(part))  # pageable -> pinned, on this thread
        begin, copied_in, computed, copied_out = self._events
        with torch.inference_mode(), torch.cuda.stream(self._stream):
            begin.record()
            static_input[:rows].copy_(self._pinned_input[:rows], non_blocking=True)
            copied_in.record()
            static_logits, static_maps = run()  # rows past `rows`: an earlier batch's images, never read
            computed.record()
            self._pinned_logits[:rows].copy_(static_logits[:rows], non_blocking=True)
            fetch_maps = bool(self.maps_output) and self._maps_problem is None
            if fetch_maps:
                self._pinned_maps[:rows].copy_(static_maps[:rows], non_blocking=True)
            copied_out.record()
        copied_out.synchronize()
        timing = Timings(compute_ms=copied_in.elapsed_time(computed), h2d_ms=begin.elapsed_time(copied_in),
                         d2h_ms=computed.elapsed_time(copied_out))
        # copies: the pinned buffers are overwritten by the next batch
        return (self._pinned_logits[:rows].numpy().copy(),
                self._pinned_maps[:rows].numpy().copy() if fetch_maps else None, timing)

    def describe(self) -> dict:
        import torch

        details = {**super().describe(), "device": self.device, "torch": torch.__version__}
        if self.device == "cuda":
            details.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cuda_graphs=self.cuda_graphs)
        else:
            details["threads"] = torch.get_num_threads()
        if self.fallback:
            details["fallback"] = self.fallback
        return details


def _no_tf32(torch) -> None:
    """FP32 matmuls and convolutions in IEEE FP32, with the API this torch has (2.9 deprecates
    allow_tf32, and mixing the two raises)."""
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None and hasattr(conv, "fp32_precision"):
        matmul.fp32_precision = "ieee"
        conv.fp32_precision = "ieee"
    else:
        matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _total(timings: list[Timings]) -> Timings:
    return Timings(sum(t.compute_ms for t in timings), sum(t.h2d_ms or 0.0 for t in timings),
                   sum(t.d2h_ms or 0.0 for t in timings))
