"""cxr-edge against the usual way, in one run, on the same images and the same weights.

    python benchmarks/compare.py --images ../shared/data/nih [--model PKG] [--int8-model PKG]

The usual way (benchmarks/usual_way.py): timm + torch eager, one image at a time, PIL +
torchvision preprocessing, a JSON per image. cxr-edge: `cxr-edge bench --mode e2e`, the same
Pipeline as `cxr-edge infer`, with ONNX Runtime FP32 and INT8 (and TensorRT where a GPU and
engines are present). Without --int8-model, INT8 artifacts are built first with
`cxr-edge build-engine --int8` into --work. Needs the train extra (torch, timm).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from usual_way import run_usual_way, weights_parity  # noqa: E402

from cxr_edge.bench.machine import machine_report  # noqa: E402
from cxr_edge.bench.run import sample_tensors  # noqa: E402
from cxr_edge.bench.stats import summarize  # noqa: E402
from cxr_edge.manifest import ModelPackage  # noqa: E402
from cxr_edge.sources import discover  # noqa: E402


def cxr_edge_bench(images: Path, package: Path, precisions: list[str], passes: int, out: Path) -> dict:
    command = [sys.executable, "-m", "cxr_edge", "bench", str(images), "--model", str(package), "--mode", "e2e",
               "--passes", str(passes), "--json", str(out), *(a for p in precisions for a in ("--precision", p))]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="Folder of PNG images (e.g. ../shared/data/nih).")
    parser.add_argument("--model", type=Path, default=None, help="Model package (default: the bundled demo model).")
    parser.add_argument("--int8-model", type=Path, default=None, help="The same package with INT8 artifacts.")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cxr-edge-compare")
    parser.add_argument("--passes", type=int, default=2, help="cxr-edge end-to-end passes.")
    parser.add_argument("--json", type=Path, default=None, help="Write every number here.")
    args = parser.parse_args()

    package = ModelPackage.load(args.model)
    pngs = sorted(p for p in args.images.rglob("*.png"))
    if not pngs:
        parser.error(f"no PNG images under {args.images}")
    args.work.mkdir(parents=True, exist_ok=True)

    fast = args.int8_model
    if fast is None:
        fast = args.work / "package-int8"
        if not (fast / "manifest.json").exists():
            print(f"building INT8 artifacts into {fast} (cxr-edge build-engine --int8)", flush=True)
            subprocess.run([sys.executable, "-m", "cxr_edge", "build-engine", "--model", str(package.root), "--int8",
                            "--calib", str(args.images), "--out", str(fast)], check=True)
    fast_package = ModelPackage.load(fast)
    if fast_package.artifact("fp32").sha256 != package.artifact("fp32").sha256:
        parser.error(f"{fast} holds other weights than {package.root}: the comparison would not be fair")

    items, _ = discover([str(p) for p in pngs])
    drift = weights_parity(package, sample_tensors(items, package, 8))
    print(f"same weights: torch vs ONNX Runtime max |Δlogit| {drift:.2e} on 8 images", flush=True)

    print(f"the usual way on {len(pngs)} images ...", flush=True)
    usual = run_usual_way(package, pngs, args.work / "usual-way-out")
    print(f"cxr-edge on {len(pngs)} images ...", flush=True)
    precisions = ["fp32", "int8"]
    if fast_package.artifacts(format="tensorrt"):
        precisions.append("fp16")
    ours = cxr_edge_bench(args.images, fast, precisions, args.passes, args.work / "bench.json")

    rows = [{"way": f"usual: timm + torch {usual['torch_threads']} threads eager, batch 1, PIL",
             "throughput_img_s": usual["throughput_img_s"], "latency_ms": summarize(usual["latencies_ms"])}]
    for result in ours["end_to_end"]:
        rows.append({"way": f"cxr-edge {result['backend']} {result['precision']} ({result['artifact']}), "
                            f"batch {result['batch_size']}, {result['workers']} decode workers",
                     "throughput_img_s": result["throughput_img_s"], "latency_ms": result["latency_ms"],
                     "overlap_efficiency": result["overlap_efficiency"]})
    for row in rows:
        row["vs_usual"] = round(row["throughput_img_s"] / usual["throughput_img_s"], 2)

    print(f"\n{len(pngs)} images from {args.images}; model {package.name} {package.version}; "
          f"{ours['machine']['cpu']}, {ours['machine']['usable_cpus']} CPUs, GPU: {ours['machine']['gpu'] or 'none'}")
    print(f"{'':72} {'img/s':>7} {'vs usual':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for row in rows:
        lat = row["latency_ms"]
        print(f"{row['way']:72} {row['throughput_img_s']:7.1f} {row['vs_usual']:8.2f}x {lat['p50']:8.1f} {lat['p99']:8.1f}")
    print("latency: the usual way, per image; cxr-edge, decode start to outputs written (includes batching waits)")
    if args.json:
        report = {"images": len(pngs), "model": {"name": package.name, "version": package.version},
                  "weights_max_abs_dlogit": drift, "machine": machine_report(), "rows": rows,
                  "cxr_edge_bench": ours, "usual_way": {k: v for k, v in usual.items() if k != "probabilities"}}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
