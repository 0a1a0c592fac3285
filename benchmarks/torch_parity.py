"""The torch backend against ONNX Runtime FP32 on real images: max |Δprobability| and |Δlogit|,
and the class maps, for one precision and device.

    python benchmarks/torch_parity.py ../shared/data/nih                       # CPU (or CUDA) FP32
    python benchmarks/torch_parity.py ../shared/data/nih --precision fp16 --device cuda

Prints one JSON object. Needs the gpu-torch (or train) extra.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--model", default=None, help="model package (default: the bundled one)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=256, help="at most this many images")
    args = parser.parse_args()

    from cxr_edge.backends import create_backend
    from cxr_edge.findings import calibrated_probabilities
    from cxr_edge.manifest import ModelPackage
    from cxr_edge.sources import discover
    from cxr_edge.workers import tensors_for

    package = ModelPackage.load(args.model)
    items, _ = discover(args.inputs)
    decoded = tensors_for(items[: args.limit], package.preprocess_params)  # workers forked before torch
    images = np.asarray(decoded.tensors)
    spec = package.heatmap_spec

    def run(backend: str, **options):
        logits, maps = [], []
        with create_backend(package, backend, args.precision if backend == "torch" else "fp32",
                            max_batch=args.batch_size, **options) as runner:
            runner.maps_output = spec.output if spec and runner.provides(spec.output) else None
            started = time.perf_counter()
            for start in range(0, len(images), args.batch_size):
                logits.append(runner.infer(images[start : start + args.batch_size]))
                maps.append(runner.last_maps)
            seconds = time.perf_counter() - started
            return np.concatenate(logits), (np.concatenate(maps) if runner.maps_output else None), seconds, runner.describe()

    ort_logits, ort_maps, ort_seconds, _ = run("onnxruntime")
    logits, maps, seconds, described = run("torch", device=args.device)
    t = package.temperatures
    report = {
        "images": len(images), "left_out": len(decoded.failures), "precision": args.precision, "torch": described,
        "max_abs_dprob": float(np.abs(calibrated_probabilities(logits, t) - calibrated_probabilities(ort_logits, t)).max()),
        "max_abs_dlogit": float(np.abs(logits - ort_logits).max()),
        "max_abs_dmap": float(np.abs(maps - ort_maps).max()) if maps is not None and ort_maps is not None else None,
        "seconds": {"onnxruntime": round(ort_seconds, 3), "torch": round(seconds, 3)},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
