"""An llm.c checkpoint (the `model_NNNNNN.bin` its train_gpt2 writes, or gpt2_124M.bin) as the GPT-2 it is.

The file is a header of 256 int32 (magic 20240326; version 3: float32 weights, 5: bfloat16; then the context length,
the vocabulary, layers, heads, width and the vocabulary padded for its kernels) and every weight in one run, in a
fixed order, each matrix in Linear's layout (out x in). llm.c's GELU is the tanh approximation (GPT-2's own,
"gelu_new") and its softmax reads only the real vocabulary, so the padded rows are dropped: the model never gives a
padded id. The weights go to nanogpt.gpt2, under nanoGPT's names. No tokenizer inside: llm.c encodes with GPT-2's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError
from .nanogpt import gpt2

MAGIC = 20240326
VERSIONS = {3: np.float32, 5: np.uint16}  # 5: bfloat16, the top half of a float32's bits


def is_checkpoint(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size < 1024:
        return False
    with path.open("rb") as file:
        return int(np.frombuffer(file.read(4), np.int32)[0]) == MAGIC


def load(path: Path) -> tuple[Any, dict[str, Any]]:
    """The checkpoint as a GPT2LMHeadModel, and what it is."""
    import torch

    header = np.fromfile(path, np.int32, 256)
    version, context, vocab, layers, heads, width, padded = (int(v) for v in header[1:8])
    if version not in VERSIONS:
        raise ExportError(f"{path}: llm.c checkpoint version {version}; onnxgen reads 3 (float32) and 5 (bfloat16)")
    sizes = {"wte": padded * width, "wpe": context * width, "ln1w": layers * width, "ln1b": layers * width,
             "qkvw": layers * 3 * width * width, "qkvb": layers * 3 * width, "attprojw": layers * width * width, "attprojb": layers * width,
             "ln2w": layers * width, "ln2b": layers * width, "fcw": layers * 4 * width * width, "fcb": layers * 4 * width,
             "fcprojw": layers * width * 4 * width, "fcprojb": layers * width, "lnfw": width, "lnfb": width}
    raw = np.fromfile(path, VERSIONS[version], offset=256 * 4)
    if raw.size != sum(sizes.values()):
        raise ExportError(f"{path}: {raw.size} weights where its header says {sum(sizes.values())}: not a whole llm.c checkpoint")
    if version == 5:
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    tensors, at = {}, 0
    for name, size in sizes.items():
        tensors[name], at = torch.from_numpy(raw[at : at + size].copy()), at + size
    shapes = {"qkvw": (3 * width, width), "qkvb": (3 * width,), "attprojw": (width, width), "attprojb": (width,), "ln1w": (width,),
              "ln1b": (width,), "ln2w": (width,), "ln2b": (width,), "fcw": (4 * width, width), "fcb": (4 * width,),
              "fcprojw": (width, 4 * width), "fcprojb": (width,)}
    names = {"ln1w": "ln_1.weight", "ln1b": "ln_1.bias", "qkvw": "attn.c_attn.weight", "qkvb": "attn.c_attn.bias",
             "attprojw": "attn.c_proj.weight", "attprojb": "attn.c_proj.bias", "ln2w": "ln_2.weight", "ln2b": "ln_2.bias",
             "fcw": "mlp.c_fc.weight", "fcb": "mlp.c_fc.bias", "fcprojw": "mlp.c_proj.weight", "fcprojb": "mlp.c_proj.bias"}
    weights = {"transformer.wte.weight": tensors["wte"].view(padded, width)[:vocab],  # its softmax reads the real vocabulary only
               "transformer.wpe.weight": tensors["wpe"].view(context, width),
               "transformer.ln_f.weight": tensors["lnfw"], "transformer.ln_f.bias": tensors["lnfb"]}
    for name, shape in shapes.items():
        for layer, tensor in enumerate(tensors[name].view(layers, *shape)):
            weights[f"transformer.h.{layer}.{names[name]}"] = tensor
    args = {"n_layer": layers, "n_head": heads, "n_embd": width, "block_size": context, "vocab_size": vocab, "bias": True}
    return gpt2(path, args, weights, "gelu_new"), {"format": "llm.c", "dtype": "bfloat16" if version == 5 else "float32"}
