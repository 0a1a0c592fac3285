"""A timm model's parameters read back out of the package's torch-exported FP32 ONNX graph.

The torch runner loads these rather than a second weights file: every package has the ONNX
(the bundled one has nothing else), it is already sha256-verified, and a strict load into the
manifest's timm architecture proves the two describe the same network. Needs `onnx` (numpy only,
no torch).
"""

from __future__ import annotations

import numpy as np

# what engines.class_maps adds to a graph (heatmaps): not a timm parameter
ADDED_BY_CXR_EDGE = "class_maps/"


def timm_state_dict_from_onnx(model_bytes: bytes) -> dict[str, np.ndarray]:
    """{timm parameter name: array} from a graph exported by `torch.onnx.export`.

    The exporter keeps parameter names, except Linear weights on 3-D inputs: those become a
    transposed constant (named onnx::MatMul_*) feeding a MatMul whose output is added to the
    (still named) bias."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model_bytes).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state = {name: value for name, value in arrays.items() if not name.startswith(("onnx::", ADDED_BY_CXR_EDGE))}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or not node.input[1].startswith("onnx::"):
            continue
        for add in consumers.get(node.output[0], []):
            bias = next((i for i in add.input if i.endswith(".bias") and i in arrays), None) if add.op_type == "Add" else None
            if bias:
                state[bias[: -len(".bias")] + ".weight"] = np.ascontiguousarray(arrays[node.input[1]].T)
    return state
