"""What an onnxgen model folder holds, described in one place (as onnxruntime-genai's genai_config.json
describes its folders): the file names, the graph's input and output names, and what the manifest and
config say of the model. Export and quantize write folders by these names; the runtime reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import manifest
from .errors import ModelFolderError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # the weights (mapped into memory by onnxruntime; the bundled model has none)
CONFIG = "config.json"  # transformers' model config, as the checkpoint had it
GENERATION_CONFIG = "generation_config.json"  # the default generation options
TOKENIZER = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.jinja"  # where the checkpoint has one: the Jinja template of its conversations (chat.py)
MANIFEST = manifest.MANIFEST  # onnxgen.json: sizes, hashes, dims, provenance; written last
SHARED_FILES = (CONFIG, GENERATION_CONFIG, TOKENIZER, CHAT_TEMPLATE)  # a quantized folder copies these from its parent

# The graph's inputs and outputs (optimum's names, plus transformers' logits_to_keep).
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS_TO_KEEP, LOGITS = "input_ids", "attention_mask", "position_ids", "logits_to_keep", "logits"
# Every position's hidden state after the last layer norm, what the head reads (transformers' hidden_states[-1]):
# contrastive search compares a candidate's with the text's (graph.add_hidden_output; folders exported before lack it).
LAST_HIDDEN_STATE = "last_hidden_state"
# A graph with the cache in place (graph.cache_in_place) has no attention mask: each row's length is given by
# GroupQueryAttention's inputs, named as onnxruntime names them.
SEQLENS_K, TOTAL_SEQUENCE_LENGTH = "seqlens_k", "total_sequence_length"
# LoRA (export --lora): the linear layers that take an adapter at run time, by their names in GPT-2 and in PEFT, and
# the graph inputs that carry one: per row, A (rows, in, rank) and B (rows, rank, out), the adapter's scale in B.
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
ADAPTER_FILE = "adapter.onnx_adapter"  # a LoRA adapter folder's weights, in onnxruntime's adapter format, by graph input name


def lora_names(layer: int, target: str) -> tuple[str, str]:
    """The graph inputs of one layer's target: its A and B."""
    return f"transformer.h.{layer}.{target}.lora_A", f"transformer.h.{layer}.{target}.lora_B"


# The cache's and the logits' element types, as onnxruntime names them; an int8 cache is quantize --kv-cache int8's (CPU).
ELEMENT_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16), "tensor(int8)": np.dtype(np.int8)}


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


DIM_NAMES = tuple(Dims.__dataclass_fields__)


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    manifest: dict[str, Any]
    dims: Dims
    bos_token_id: int | None  # an empty prompt starts from it
    # config.json's task_specific_params["text-generation"] (gpt2's: sampling, max_length 50), which transformers'
    # pipeline applies over the model's generation options (onnxgen.pipeline too)
    text_generation_params: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> ModelFolder:
        """The folder as its manifest describes it, after checking that its files are there with the sizes the
        manifest gives and that the manifest's dims are the config's (the graph's are checked at load)."""
        record = manifest.read(path)
        if record.get("kind") == "lora":
            raise ModelFolderError(f"{path} is a LoRA adapter, not a model: load its base model with it, "
                                   f"onnxgen.load(BASE, adapters={{...: {str(path)!r}}}) (--adapter on the command line)")
        for name, described in record.get("files", {}).items():
            size = (path / name).stat().st_size
            if size != described.get("bytes"):
                raise ModelFolderError(f"{path / name} is {size} bytes, the manifest says {described.get('bytes')}: "
                                       "the folder was changed after it was made; make it again")
        dims = record.get("dims")
        if not isinstance(dims, dict) or any(not isinstance(dims.get(k), int) or dims[k] < 1 for k in DIM_NAMES):
            raise ModelFolderError(f"{path / MANIFEST} has no valid dims (positive integers {', '.join(DIM_NAMES)}): {dims!r}")
        try:
            config = json.loads((path / CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelFolderError(f"{path / CONFIG} cannot be read: {e}") from None
        differ = [f"{k} {dims[k]} (config {config.get(k)})" for k in DIM_NAMES if config.get(k) != dims[k]]
        if differ:
            raise ModelFolderError(f"{path / MANIFEST} and {CONFIG} disagree: {', '.join(differ)}")
        params = (config.get("task_specific_params") or {}).get("text-generation")
        return cls(path, record, Dims(**{k: dims[k] for k in DIM_NAMES}), config.get("bos_token_id"),
                   params if isinstance(params, dict) else {})

    def verify(self) -> None:
        """Every file's sha256 against the manifest's (manifest.verify)."""
        manifest.verify(self.path, self.manifest)

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def data_file(self) -> Path:
        """The weights, where the export put them apart from the graph (a folder may keep them in model.onnx)."""
        return self.path / DATA_FILE

    @property
    def weight_bytes(self) -> int:
        """The graph and its weights, as the manifest records them."""
        return sum(self.manifest["files"][name]["bytes"] for name in (MODEL_FILE, DATA_FILE) if name in self.manifest["files"])

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER

    @property
    def chat_template(self) -> tuple[str, dict[str, Any]] | None:
        """The checkpoint's chat template and the special tokens it may name (`eos_token`, ...), or None."""
        path = self.path / CHAT_TEMPLATE
        if not path.is_file():
            return None
        return path.read_text(encoding="utf-8"), self.special_tokens

    @property
    def special_tokens(self) -> dict[str, Any]:
        """The tokenizer's special tokens by name (`eos_token`, ...): what chat templates name."""
        return dict((self.manifest.get("tokenizer") or {}).get("special_tokens") or {})

    @property
    def clean_up_tokenization_spaces(self) -> bool:
        """Whether text decodes as transformers' clean_up_tokenization_spaces makes it (the export records the
        checkpoint's setting; folders made before it was recorded decode without)."""
        return bool((self.manifest.get("tokenizer") or {}).get("clean_up_tokenization_spaces", False))
