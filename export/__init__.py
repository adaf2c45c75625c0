"""Deployment of PDD: ONNX export (portable and plugin forms), TensorRT engines whose custom layers are
the Triton kernels compiled ahead of time, one runtime interface over PyTorch, ONNX Runtime and
TensorRT, CPU parity checks, and serving."""
