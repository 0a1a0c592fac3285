"""ONNX FP32 -> mixed FP16 for strongly typed TensorRT builds.

TensorRT 11 has no FP16 builder flag: precision lives in the ONNX. LayerNorm and Softmax are
kept in FP32 (LayerNorm overflows in FP16 after attention, NVIDIA/TensorRT#3692) with Casts
around them, and the model's input and output stay FP32 so callers do not change.
"""

from __future__ import annotations

from pathlib import Path

KEEP_FP32_OPS = ("LayerNormalization", "Softmax")


def fp16(fp32_model: Path, out: Path, keep_fp32_ops: tuple[str, ...] = KEEP_FP32_OPS) -> dict:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(fp32_model))
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    onnx.save(converted, str(out))
    return {"kind": "fp16", "kept_fp32_ops": list(keep_fp32_ops), "keep_io_types": True}
