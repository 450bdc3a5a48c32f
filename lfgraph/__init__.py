"""lfgraph: compress trained networks by layer fusion and export a dense, shallower ONNX model."""

__version__ = "0.1.0"
