"""The served core: what every model archive, the edge client and the KServe image carry, and nothing else.

Model definitions (single network, grouped ensemble), the torch-free input path (`inputs/`: decode and
preprocess), the "not a digit" detector, Integrated Gradients, precision variants and the ONNX runner.
It imports nothing outside itself (tests/test_layout.py): the archive packs this folder whole.
"""
