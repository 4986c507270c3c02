"""onnxgen: GPT-2 text generation on onnxruntime."""

__version__ = "0.1.0"
