"""A nanoGPT checkpoint (the `ckpt.pt` its train.py writes) as transformers' GPT2LMHeadModel, for the export.

nanoGPT's GPT is GPT-2 written with nn.Linear where transformers' GPT2 has Conv1D (the four projection weights are
each other's transpose), its biases optional (`bias=False`: none, which is zero biases here), the exact GELU
(nn.GELU(); transformers' GPT-2 default is the tanh approximation, so the config says "gelu"), LayerNorm's epsilon
1e-5, the head tied to the token embedding, and a vocabulary padded up to 50304. torch.compile'd training saves the
weights under "_orig_mod."; the causal mask ("attn.bias") is a buffer, not a weight. The checkpoint holds no tokenizer:
nanoGPT encodes with tiktoken's "gpt2", which is GPT-2's own (the export takes it from --tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ExportError

ARGS = {"n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout"}  # nanoGPT's GPTConfig
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_checkpoint(path: Path) -> bool:
    return path.is_file() and path.suffix in (".pt", ".pth")


def load(path: Path) -> tuple[Any, dict[str, Any]]:
    """The checkpoint as a GPT2LMHeadModel (eager attention, float32), and what it says of its training."""
    import torch

    try:  # weights_only: a checkpoint is a pickle, and a pickle can run code; nanoGPT's holds tensors and plain data
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, damaged, or pickled objects beyond tensors and plain data
        raise ExportError(f"cannot read {path} as a nanoGPT checkpoint: {' '.join(str(e).split())[:300]}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict) or not isinstance(checkpoint.get("model_args"), dict):
        raise ExportError(f"{path} is not a nanoGPT checkpoint (a dict with 'model' and 'model_args', as its train.py saves)")
    args = checkpoint["model_args"]
    if set(args) - ARGS or not {"n_layer", "n_head", "n_embd", "block_size", "vocab_size"} <= set(args):
        raise ExportError(f"{path}: model_args {sorted(args)} are not nanoGPT's GPT-2 ({sorted(ARGS)}): a fork's model, which "
                          "onnxgen cannot read as GPT-2")
    weights = {key.removeprefix("_orig_mod."): value for key, value in checkpoint["model"].items()}  # torch.compile's wrapper
    best = checkpoint.get("best_val_loss")
    return gpt2(path, args, weights, "gelu"), {"format": "nanoGPT", "iter_num": checkpoint.get("iter_num"),
                                               "best_val_loss": None if best is None else float(best)}


def gpt2(path: Path, args: dict[str, Any], weights: dict[str, Any], activation: str) -> Any:
    """transformers' GPT2LMHeadModel of nanoGPT's `args` and `weights` (torch tensors by nanoGPT's names, Linear's
    layout), with the activation the trainer used (nanoGPT's exact "gelu", llm.c's "gelu_new")."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=args["vocab_size"], n_positions=args["block_size"], n_embd=args["n_embd"], n_layer=args["n_layer"],
                        n_head=args["n_head"], activation_function=activation, layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=True)
    config._attn_implementation = "eager"  # as export._load loads a checkpoint
    model = GPT2LMHeadModel(config).eval()
    weights = {key: value.float().t() if key.endswith(TRANSPOSED) else value.float()
               for key, value in weights.items() if not key.endswith(".attn.bias")}  # the causal mask (nanoGPT without flash)
    with torch.no_grad():
        if not args.get("bias", True):  # none in the checkpoint: GPT-2's, all zero
            for name, parameter in model.named_parameters():
                if name.endswith(".bias"):
                    parameter.zero_()
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # shapes other than model_args say
            raise ExportError(f"{path}: its weights do not fit its model_args: {' '.join(str(e).split())[:300]}") from None
    missing = [k for k in missing if not (k.endswith(".bias") and not args.get("bias", True)) and k != "lm_head.weight"]  # tied below
    if missing or unexpected:
        raise ExportError(f"{path}: not nanoGPT's GPT-2 weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model
