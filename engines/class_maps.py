"""Class activation maps as a second output of the model's ONNX graph: `class_maps` [B, L, gh, gw].

The exported heads are linear on the mean of the patch tokens (timm `global_pool="avg"`,
`fc_norm=False`, train/model.py): logit_c = mean_i(W_c . token_i) + b_c. The map of class c at
patch i is W_c . token_i + b_c, so the image's logit is exactly the mean of its map (a CAM that
is a decomposition of the logit, not an approximation of it), and it costs one small MatMul on
tokens the graph computes anyway: the maps come out of the same inference pass.

The graph is edited, not re-exported, so a package whose training run is gone (the bundled one)
gets maps too: the head must be `Gemm(ReduceMean(tokens, axes=[1]), W, b)`; any other head (a
CLS-token head, an fc_norm) is refused, since its CAM would not be exact.
"""

from __future__ import annotations

import numpy as np

from cxr_edge.errors import ModelPackageError

CLASS_MAPS = "class_maps"


def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output}


def _int_attribute(node, name: str, default=None):
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def add_class_maps(model, grid: tuple[int, int], logits: str = "logits"):
    """`model` (onnx.ModelProto) with the `class_maps` output added; refuses a head whose CAM
    would not be exact. `grid`: patches per side (rows, columns) of the model's input."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    if any(o.name == CLASS_MAPS for o in graph.output):
        raise ModelPackageError(f"the model already has a {CLASS_MAPS!r} output")
    producers = _producers(graph)
    head = producers.get(logits)
    pool = producers.get(head.input[0]) if head is not None and head.input else None
    refusal = ("the model's head is not linear on the mean of the patch tokens (timm global_pool='avg', "
               "fc_norm=False): its class activation map would not be exact")
    if head is None or head.op_type != "Gemm" or len(head.input) != 3 or pool is None or pool.op_type != "ReduceMean":
        raise ModelPackageError(refusal)
    axes = _int_attribute(pool, "axes")
    if axes is None and len(pool.input) > 1:  # opset 18+: axes as an input
        initial = {i.name: i for i in graph.initializer}
        axes = numpy_helper.to_array(initial[pool.input[1]]).tolist() if pool.input[1] in initial else None
    if list(axes or []) != [1] or _int_attribute(pool, "keepdims", 1) != 0 or _int_attribute(head, "transA", 0) != 0:
        raise ModelPackageError(refusal)
    weights = {i.name: i for i in graph.initializer}
    if head.input[1] not in weights or head.input[2] not in weights:
        raise ModelPackageError(refusal)
    weight = numpy_helper.to_array(weights[head.input[1]]).astype(np.float32)
    if not _int_attribute(head, "transB", 0):
        weight = weight.T  # Gemm without transB holds W as [D, L]
    labels = weight.shape[0]
    rows, columns = grid
    tokens = pool.input[0]  # [B, N, D], N = rows * columns patch tokens (prefix tokens sliced off)
    names = {"w": f"{CLASS_MAPS}/weight_t", "shape": f"{CLASS_MAPS}/shape"}
    graph.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(weight.T), names["w"]),  # [D, L]
        numpy_helper.from_array(np.array([0, labels, rows, columns], np.int64), names["shape"]),
    ])
    graph.node.extend([
        helper.make_node("MatMul", [tokens, names["w"]], [f"{CLASS_MAPS}/matmul"], name=f"{CLASS_MAPS}/MatMul"),
        helper.make_node("Add", [f"{CLASS_MAPS}/matmul", head.input[2]], [f"{CLASS_MAPS}/add"], name=f"{CLASS_MAPS}/Add"),
        helper.make_node("Transpose", [f"{CLASS_MAPS}/add"], [f"{CLASS_MAPS}/transpose"], perm=[0, 2, 1],
                         name=f"{CLASS_MAPS}/Transpose"),
        helper.make_node("Reshape", [f"{CLASS_MAPS}/transpose", names["shape"]], [CLASS_MAPS],
                         name=f"{CLASS_MAPS}/Reshape"),
    ])
    graph.output.append(helper.make_tensor_value_info(CLASS_MAPS, onnx.TensorProto.FLOAT,
                                                      ["batch", labels, rows, columns]))
    onnx.checker.check_model(model)
    return model


def patch_grid(architecture: dict, size: int) -> tuple[int, int]:
    """Patches per side of a square `size` input for a timm ViT named in the manifest."""
    import re

    match = re.search(r"patch(\d+)", str(architecture.get("timm_name", "")))
    if not match or size % int(match.group(1)):
        raise ModelPackageError("cannot tell the model's patch grid from architecture.timm_name and its input size")
    side = size // int(match.group(1))
    return side, side


def check_maps_are_exact(model_bytes: bytes, images: np.ndarray, tolerance: float = 1e-3) -> float:
    """The largest |logit - mean(map)| over `images` in ONNX Runtime; refuses above `tolerance`."""
    from cxr_edge.backends.onnxruntime import cpu_session

    session = cpu_session(model_bytes, threads=None)
    logits, maps = session.run(["logits", CLASS_MAPS], {session.get_inputs()[0].name: images})
    gap = float(np.abs(logits - maps.mean(axis=(2, 3))).max())
    if not gap <= tolerance:
        raise ModelPackageError(f"the class maps do not average to the logits (max gap {gap:.2g})")
    return gap


def with_maps(model_bytes: bytes, architecture: dict, params) -> tuple[bytes, dict]:
    """(the model with `class_maps`, the manifest's `heatmaps` section), checked to average to
    the logits on inputs of the model's shape. ModelPackageError when its head allows no exact map."""
    import onnx

    grid = patch_grid(architecture, params.size)
    data = add_class_maps(onnx.load_from_string(model_bytes), grid).SerializeToString()
    rng = np.random.default_rng(0)
    gap = check_maps_are_exact(data, rng.normal(0, 1, (4, params.channels, params.size, params.size)).astype(np.float32))
    section = {"method": "cam", "output": CLASS_MAPS, "grid": list(grid), "exact_to": float(f"{max(gap, 1e-7):.1g}"),
               "note": "class map = the linear head applied to each patch token; the logit is its mean"}
    return data, section


def with_class_maps(package, out, version: str | None = None):
    """A new package at `out`: `package`'s FP32 model with the `class_maps` output and a
    `heatmaps` manifest section. Other artifacts (FP16/INT8 built from the old graph) are left
    out: build them again from this one."""
    from cxr_edge.manifest import sha256_bytes, write_package_copy

    if package.heatmap_spec is not None:
        raise ModelPackageError(f"{package.root}: the model already has class maps")
    key = "fp32"
    data, section = with_maps(package.read_verified(key), package.section("architecture"), package.preprocess_params)
    manifest = package.to_manifest()
    manifest["version"] = version or f"{manifest['version']}+maps"
    manifest["artifacts"] = {key: dict(manifest["artifacts"][key], sha256=sha256_bytes(data), class_maps=CLASS_MAPS)}
    manifest["heatmaps"] = section
    return write_package_copy(package, out, manifest, replace={key: data})
