"""onnxgen: GPT-2 text generation on onnxruntime.

    import onnxgen
    model = onnxgen.load("gpt2-onnx")            # or onnxgen.load() for the bundled small model
    for piece in model.stream("Hello", max_new_tokens=40, do_sample=True, top_p=0.9):
        print(piece, end="", flush=True)
"""

__version__ = "0.1.0"

from .errors import (
    AdapterWarning,
    ContextLengthError,
    IgnoredOptionWarning,
    ModelFolderError,
    OnnxgenError,
    OptionsError,
    PerformanceWarning,
    ProviderError,
)
from .beam import BeamSearch
from .generator import Completion, Event, Generator, Stats
from .model import Model, Score, TextGenerationPipeline, load, pipeline
from .options import STRATEGIES, GenerationOptions, WatermarkingConfig
from .watermark import WatermarkDetection

__all__ = [
    "STRATEGIES", "AdapterWarning", "BeamSearch", "Completion", "ContextLengthError", "Event", "GenerationOptions", "Generator", "IgnoredOptionWarning", "Model",
    "ModelFolderError", "OnnxgenError", "OptionsError", "PerformanceWarning", "ProviderError", "Score", "Stats", "TextGenerationPipeline", "WatermarkDetection", "WatermarkingConfig", "load", "pipeline",
]
