"""build-engine: ONNX FP32 -> FP16 / INT8 (explicit Q/DQ, dynamic) -> TensorRT engines, each gated
against FP32 on held-out real images before it is registered in the model package.

Imports `cxr_edge` (decode, preprocessing, model package) and onnx / onnxruntime / tensorrt;
never torch.
"""
