"""Digit recognition on the device: the exported ONNX model, the shared preprocessing, a server fallback."""
