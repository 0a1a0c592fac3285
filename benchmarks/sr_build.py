"""SR sink micro-benchmark: milliseconds per SR, highdicom's constructor vs the template path.

usage: python benchmarks/sr_build.py [DICOM ...] [--repeats 20] [--json]
       (default inputs: samples/dicom/*.dcm; the bundled demo model's identity, labels and
       thresholds; probabilities drawn at random, so findings are both positive and negative)

For each path, per input: `build` is build_sr / build_sr_reference from a header read with
stop_before_pixels (as the pipeline reads it), `encode` is writing it to bytes (what
pipeline.encode_sr does next), `total` both. The template path's first SR (which builds the
template with highdicom) is reported apart, as `first_ms`. Medians over --repeats. Numbers, not
a test: other load on the machine shows in them.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from cxr_edge.findings import Finding  # noqa: E402
from cxr_edge.manifest import ModelPackage  # noqa: E402
from cxr_edge.outputs import dicom_bytes  # noqa: E402
from cxr_edge.sr import ModelIdentity, build_sr, build_sr_reference  # noqa: E402


def bundled_model() -> tuple[ModelIdentity, list[str], list[float]]:
    package = ModelPackage.load()
    named = package.describe(package.artifact("fp32").sha256)  # as the SR sink names the model
    identity = ModelIdentity(named["name"], named["version"], named["sha256"])
    return identity, list(package.labels), [float(t) for t in package.thresholds]


def measure(build, header, identity, labels, thresholds, repeats: int, seed: int) -> dict:
    rng = random.Random(seed)
    builds, encodes = [], []
    for _ in range(repeats):
        findings = [Finding(label, rng.random(), t) for label, t in zip(labels, thresholds)]
        started = time.perf_counter()
        sr = build(header, findings, identity)
        built = time.perf_counter()
        dicom_bytes(sr)
        builds.append((built - started) * 1e3)
        encodes.append((time.perf_counter() - built) * 1e3)
    totals = [b + e for b, e in zip(builds, encodes)]
    return {name: {"median_ms": round(statistics.median(v), 2), "min_ms": round(min(v), 2),
                   "max_ms": round(max(v), 2)}
            for name, v in (("build", builds), ("encode", encodes), ("total", totals))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", type=Path)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    inputs = args.inputs or sorted((REPO / "samples" / "dicom").glob("*.dcm"))
    identity, labels, thresholds = bundled_model()

    # The template path's first SR for this model and label list builds the template.
    header = pydicom.dcmread(inputs[0], stop_before_pixels=True)
    started = time.perf_counter()
    build_sr(header, [Finding(label, 0.5, t) for label, t in zip(labels, thresholds)], identity)
    first_ms = round((time.perf_counter() - started) * 1e3, 1)

    report = {"machine": {"python": platform.python_version(), "pydicom": pydicom.__version__,
                          "cpu": platform.processor() or platform.machine()},
              "model": {"name": identity.name, "labels": len(labels)},
              "repeats": args.repeats, "template_first_ms": first_ms, "inputs": {}}
    for i, path in enumerate(inputs):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        report["inputs"][path.name] = {
            "reference": measure(build_sr_reference, header, identity, labels, thresholds, args.repeats, i),
            "template": measure(build_sr, header, identity, labels, thresholds, args.repeats, i),
        }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{identity.name}, {len(labels)} findings; medians over {args.repeats} SRs "
          f"(min .. max); the template path's first SR, which builds the template: {first_ms} ms")
    print(f"{'input':45} {'path':10} {'build ms':>22} {'encode ms':>22} {'total ms':>22}")
    for name, paths in report["inputs"].items():
        for path_name, numbers in paths.items():
            cells = [f"{n['median_ms']:8.2f} ({n['min_ms']:.1f}..{n['max_ms']:.1f})"
                     for n in (numbers["build"], numbers["encode"], numbers["total"])]
            print(f"{name:45} {path_name:10} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
