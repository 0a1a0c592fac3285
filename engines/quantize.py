"""ONNX -> INT8: explicit symmetric Q/DQ (TensorRT and ONNX Runtime) and ORT dynamic INT8 (CPU only).

The Q/DQ settings are the ones TensorRT accepts (TENSORRT.md section 4, after ModelOpt's
configure_ort): signed INT8, symmetric activations and weights, per-channel weights, no bias
quantization, Q/DQ on the inputs of MatMul/Gemm/Conv only. By default the attention matmuls
(both inputs are activations), narrow layers (the 15-class head) and everything that is not a
MatMul/Gemm/Conv (LayerNorm, Softmax, GELU, residual adds) stay in floating point.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_QUANTIZE_OPS = ("MatMul", "Gemm", "Conv")
CALIBRATION_METHODS = ("entropy", "minmax", "percentile")
MIN_CHANNELS = 16  # ModelOpt skips MatMul/Gemm with K or N below this (the classifier head)


class ArrayReader:
    """onnxruntime's CalibrationDataReader over a preprocessed array, in small batches."""

    # One image per call: ORT's histogram calibrators stack per-call outputs and fail on a
    # short last batch.
    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 1):
        self.input_name, self.images, self.batch_size, self.position = input_name, images, batch_size, 0

    def get_next(self):
        if self.position >= len(self.images):
            return None
        batch = self.images[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:
        self.position = 0


@contextlib.contextmanager
def _quiet_onnxruntime_tools():
    """ORT's quantizer logs per tensor through the root logger and prints its calibration
    progress: thousands of lines. Keep them out of cxr-edge's logs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def pre_process(fp32_model: Path, out: Path) -> Path:
    """ORT basic graph optimisation + ONNX shape inference, which quantize_static expects.

    What `quant_pre_process` does minus its symbolic shape inference: that lives in
    onnxruntime.tools, whose __init__ imports torch whenever torch is installed, and the
    engines never import torch. A ViT exported with opset 17 infers its shapes without it.
    """
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(fp32_model), options, providers=["CPUExecutionProvider"])
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out)))
    # the marker quant_pre_process leaves, so quantize_static knows this was done
    onnx.helper.set_model_props(model, {"onnx.quant.pre_process": "onnxruntime.quant"})
    onnx.save(model, str(out))
    return out


def _initializer_shapes(model) -> dict[str, tuple[int, ...]]:
    return {init.name: tuple(init.dims) for init in model.graph.initializer}


def default_exclusions(model) -> list[str]:
    """Node names that stay in float: activation x activation matmuls and narrow layers."""
    shapes = _initializer_shapes(model)
    excluded = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        weight = shapes.get(node.input[1])
        if weight is None:  # attention QK^T and AV: no constant operand
            excluded.append(node.name)
        elif min(weight) < MIN_CHANNELS:  # e.g. the 15-class head
            excluded.append(node.name)
    return excluded


def qdq_int8(fp32_model: Path, out: Path, calibration: np.ndarray, method: str = "entropy",
             quantize_ops: tuple[str, ...] | None = DEFAULT_QUANTIZE_OPS, exclude_defaults: bool = True,
             percentile: float = 99.999) -> dict:
    """Write an explicit Q/DQ INT8 model to `out`; returns what was quantized and how.

    quantize_ops None quantizes every op ONNX Runtime can (LayerNorm and Softmax included):
    only for showing that the accuracy gate refuses such a model.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(CALIBRATION_METHODS)}")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = pre_process(fp32_model, Path(tmp) / "prepared.onnx")
        model = onnx.load(str(prepared))
        excluded = default_exclusions(model) if exclude_defaults and quantize_ops is not None else []
        input_name = model.graph.input[0].name
        extra = {
            "ActivationSymmetric": True,  # TensorRT: zero points must be 0
            "WeightSymmetric": True,
            "QuantizeBias": quantize_ops is None,  # an int32 bias DQ does not parse in TensorRT
            "AddQDQPairToWeight": True,
            "OpTypesToExcludeOutputQuantization": list(quantize_ops or []),
            "QDQOpTypePerChannelSupportToAxis": {"Conv": 0},
            "CalibMaxIntermediateOutputs": 64,  # bounds memory while collecting activations
            "CalibPercentile": percentile,
        }
        with _quiet_onnxruntime_tools():
            quantize_static(
                str(prepared), str(out), ArrayReader(input_name, calibration),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                per_channel=True, op_types_to_quantize=list(quantize_ops) if quantize_ops else None,
                nodes_to_exclude=excluded,
                calibrate_method={"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
                                  "percentile": CalibrationMethod.Percentile}[method],
                extra_options=extra,
            )
    quantized = onnx.load(str(out), load_external_data=False)
    ops = {}
    for node in quantized.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"kind": "qdq", "calibration_method": method, "calibration_images": int(len(calibration)),
            "quantized_op_types": list(quantize_ops) if quantize_ops else "all",
            "excluded_nodes": len(excluded), "quantize_linear_nodes": ops.get("QuantizeLinear", 0),
            "dequantize_linear_nodes": ops.get("DequantizeLinear", 0)}


def dynamic_int8(fp32_model: Path, out: Path) -> dict:
    """ORT dynamic INT8 (weights INT8, activations quantized per batch): CPU only, not TensorRT."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        prepared = pre_process(fp32_model, Path(tmp) / "prepared.onnx")
        with _quiet_onnxruntime_tools():
            quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8, per_channel=False,
                             op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
    return {"kind": "dynamic", "quantized_op_types": ["MatMul"], "note": "ONNX Runtime CPU only (IntegerOps)"}
