"""Training: fine-tune a timm ViT on ChestX-ray14, calibrate it, export an ONNX model package.

The only component that imports torch. It uses the runtime's decode + preprocessing contract
and manifest, so training and serving cannot drift apart.
"""
