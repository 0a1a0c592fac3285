"""Efficiency: the model's FLOPs (counted on its real tensor shapes) against a GEMM rate measured
on the same machine, so a reader sees how far the model stage is from the hardware's limit."""

from __future__ import annotations

import time

import numpy as np

MAC_OPS = ("MatMul", "Gemm", "Conv")


def model_gflops_per_image(model_bytes: bytes, sample: np.ndarray) -> dict:
    """Multiply-accumulate FLOPs (2 per MAC) of MatMul, Gemm and Conv for one image.

    Shapes come from running the graph once with every MAC op's tensors exposed as outputs: exact
    for any exporter, with no symbolic shape inference. Elementwise ops, softmax and norms are
    not counted (the convention of fvcore and the ViT papers). Needs the `onnx` package (the
    `bench` extra) to read the graph; without it the count is None and the report says why."""
    import onnxruntime as ort

    try:
        import onnx
    except ImportError:
        return {"gflops_per_image": None, "flops_per_image": None, "flops_by_op": {},
                "counted_ops": "not counted: the onnx package is not installed (pip install 'cxr-edge[bench]')"}

    model = onnx.load_from_string(model_bytes)
    initializers = {init.name: tuple(init.dims) for init in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in MAC_OPS]
    wanted = []
    for node in nodes:
        for name in (node.input[0], node.input[1], node.output[0]):
            if name not in initializers and name not in wanted:
                wanted.append(name)
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted if n not in existing)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {session.get_inputs()[0].name: sample[:1].astype(np.float32)})
    shapes = {name: value.shape for name, value in zip(names, values)}
    shapes.update(initializers)

    flops = {op: 0 for op in MAC_OPS}
    for node in nodes:
        out, a, b = shapes[node.output[0]], shapes[node.input[0]], shapes[node.input[1]]
        if node.op_type == "MatMul":
            macs = int(np.prod(out)) * a[-1]
        elif node.op_type == "Gemm":
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            macs = int(np.prod(out)) * (a[0] if trans_a else a[-1])
        else:  # Conv: every output element sums over (in_channels / group) x kernel
            macs = int(np.prod(out)) * int(np.prod(b[1:]))
        flops[node.op_type] += 2 * macs
    total = sum(flops.values())
    return {"gflops_per_image": round(total / 1e9, 4),
            "flops_per_image": int(total),
            "flops_by_op": {op: int(v) for op, v in flops.items() if v},
            "counted_ops": f"{len(nodes)} {'/'.join(MAC_OPS)} nodes of the FP32 graph, 2 FLOPs per multiply-accumulate"}


def gemm_rate(size: int = 1024, seconds: float = 1.0) -> dict:
    """Best float32 GEMM rate of numpy's BLAS on all cores, over about `seconds`."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm-up: thread pool start, page faults
    best, runs, deadline = float("inf"), 0, time.perf_counter() + seconds
    while runs < 3 or time.perf_counter() < deadline:
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
        runs += 1
    return {"gflop_s": round(2 * size**3 / best / 1e9, 2), "matrix": size, "runs": runs,
            "how": f"numpy float32 {size}x{size} matmul on its BLAS, all cores, best of {runs}"}
