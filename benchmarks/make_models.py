"""Make random-weight GPT-2 checkpoints of the real shapes, with the real GPT-2 tokenizer.

    python benchmarks/make_models.py gpt2 gpt2-large --out benchmarks/models

Speed does not depend on weight values, so these stand in for the hub checkpoints, which this
workplace cannot download. The tokenizer comes from ../shared/data/gpt2-tokenizer (vocab.json, merges.txt).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

SHAPES = {  # name: (n_layer, n_embd, n_head)
    "distilgpt2": (6, 768, 12),
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}
TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpt2-tokenizer"


def make(name: str, out: Path, tokenizer_dir: Path = TOKENIZER) -> Path:
    n_layer, n_embd, n_head = SHAPES[name]
    folder = out / name
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=50257, n_positions=1024)
    GPT2LMHeadModel(config).save_pretrained(folder)
    GPT2TokenizerFast(vocab_file=str(tokenizer_dir / "vocab.json"), merges_file=str(tokenizer_dir / "merges.txt")).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+", choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/models"))
    args = ap.parse_args()
    for name in args.names:
        print(make(name, args.out))
