"""Exporter: ONNX -> FP16 / INT8 (explicit Q/DQ) -> TensorRT engines, with an accuracy gate.

Not built yet: this is the next issue ("build-engine"). It will import `cxr_edge` (decode,
preprocessing, model package) and onnx / onnxruntime / tensorrt, never torch.
"""
