"""What an onnxgen model folder holds, described in one place (as onnxruntime-genai's genai_config.json
describes its folders): the file names, the graph's input and output names, and what the manifest and
config say of the model. Export and quantize write folders by these names; the runtime reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import manifest

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # the weights, when they pass protobuf's 2 GB (or the export's threshold)
CONFIG = "config.json"  # transformers' model config, as the checkpoint had it
GENERATION_CONFIG = "generation_config.json"  # the default generation options
TOKENIZER = "tokenizer.json"
MANIFEST = manifest.MANIFEST  # onnxgen.json: sizes, hashes, dims, provenance; written last
SHARED_FILES = (CONFIG, GENERATION_CONFIG, TOKENIZER)  # a quantized folder copies these from its parent

# The graph's inputs and outputs (optimum's names, plus transformers' logits_to_keep).
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS_TO_KEEP, LOGITS = "input_ids", "attention_mask", "position_ids", "logits_to_keep", "logits"


def past_names(n_layer: int) -> list[str]:
    """The cache inputs, layer by layer, key before value."""
    return [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    """The cache outputs, in the order of past_names."""
    return [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


@dataclass(frozen=True)
class Dims:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int  # the context window

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    manifest: dict[str, Any]
    dims: Dims
    bos_token_id: int | None  # an empty prompt starts from it

    @classmethod
    def read(cls, path: Path) -> ModelFolder:
        record = manifest.read(path)
        config = json.loads((path / CONFIG).read_text())
        return cls(path, record, Dims(**{k: record["dims"][k] for k in Dims.__dataclass_fields__}), config.get("bos_token_id"))

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER
