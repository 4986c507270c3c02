"""Train onnxgen's small default model: a byte-level BPE tokenizer and a scaled-down GPT-2, on CPU.

    python models/train.py --corpus ../shared/data/corpus --out models/runs/prose-mini --minutes 60

The run is reproducible (fixed seed, batches drawn from a per-step seed, config and corpus hash
recorded) and resumable: a checkpoint is written every few minutes, and running the same command
again continues from it until the time or step budget is spent. The result is a transformers-format
folder (`hf/`) that `onnxgen export` takes like any other GPT-2 checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


@dataclass
class Recipe:
    vocab_size: int = 8192
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_ctx: int = 256
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 1234


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_tokenizer(train_txt: Path, vocab_size: int) -> Tokenizer:
    """GPT-2's scheme (byte-level BPE, no prefix space) with a vocabulary sized for a small model."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(train_txt)], trainer)
    return tok


def encode_file(tok: Tokenizer, path: Path) -> np.ndarray:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    ids = [i for enc in tok.encode_batch(lines) for i in enc.ids]
    return np.asarray(ids, dtype=np.uint16)


def lr_at(step: int, total: int, r: Recipe) -> float:
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    progress = min(1.0, (step - r.warmup_steps) / max(1, total - r.warmup_steps))
    return r.min_lr + 0.5 * (r.lr - r.min_lr) * (1 + math.cos(math.pi * progress))


def batch(data: np.ndarray, step: int, r: Recipe) -> torch.Tensor:
    rng = np.random.default_rng(r.seed * 1_000_003 + step)  # per-step seed: resuming draws the same batches
    starts = rng.integers(0, len(data) - r.n_ctx, size=r.batch_size)
    return torch.from_numpy(np.stack([data[s : s + r.n_ctx] for s in starts]).astype(np.int64))


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, val: np.ndarray, r: Recipe, max_windows: int = 64) -> float:
    """Mean next-token loss (nats) over evenly spaced validation windows."""
    model.eval()
    n = min(max_windows, len(val) // r.n_ctx)
    windows = np.stack([val[i * r.n_ctx : (i + 1) * r.n_ctx] for i in range(n)]).astype(np.int64)
    losses = [model(torch.from_numpy(w), labels=torch.from_numpy(w)).loss.item() for w in np.split(windows, n // 8)]
    model.train()
    return float(np.mean(losses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True, help="folder with train.txt and val.txt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=60.0, help="training-time budget (resumes count)")
    ap.add_argument("--max-steps", type=int, default=None, help="step budget; sets the cosine length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=200)
    args = ap.parse_args()

    r = Recipe()
    torch.manual_seed(r.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train_txt, val_txt = args.corpus / "train.txt", args.corpus / "val.txt"

    tok_path = args.out / "tokenizer.json"
    if not tok_path.exists():
        train_tokenizer(train_txt, r.vocab_size).save(str(tok_path))
    tok = Tokenizer.from_file(str(tok_path))
    eos_id = tok.token_to_id(EOS)
    train, val = encode_file(tok, train_txt), encode_file(tok, val_txt)
    bytes_per_token = len(val_txt.read_bytes()) / len(val)

    config = GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=r.n_ctx, n_embd=r.n_embd, n_layer=r.n_layer,
        n_head=r.n_head, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    optim = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay, betas=(0.9, 0.95))

    # Without a step budget, estimate the cosine length from the time budget after a short timing run.
    ckpt_path = args.out / "checkpoint.pt"
    state = {"step": 0, "elapsed": 0.0, "total_steps": args.max_steps, "log": []}
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])
        state = ckpt["state"]
        print(f"resumed at step {state['step']} ({state['elapsed'] / 60:.1f} min)", flush=True)

    model.train()
    last_ckpt = time.time()
    while state["elapsed"] < args.minutes * 60 and (state["total_steps"] is None or state["step"] < state["total_steps"]):
        t0 = time.time()
        step = state["step"]
        total = state["total_steps"] or 10**9
        for g in optim.param_groups:
            g["lr"] = lr_at(step, total, r)
        x = batch(train, step, r)
        loss = model(x, labels=x).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        state["elapsed"] += time.time() - t0
        state["step"] += 1
        if state["total_steps"] is None and state["step"] == 20:
            per_step = state["elapsed"] / 20
            state["total_steps"] = int(args.minutes * 60 / per_step)
            print(f"{per_step:.2f} s/step -> {state['total_steps']} steps in {args.minutes} min", flush=True)
        if state["step"] % args.eval_every == 0 or state["step"] == state["total_steps"]:
            val_loss = evaluate(model, val, r)
            entry = {
                "step": state["step"], "minutes": round(state["elapsed"] / 60, 2), "train_loss": round(loss.item(), 4),
                "val_loss": round(val_loss, 4), "val_ppl": round(math.exp(val_loss), 2),
                "val_bpb": round(val_loss / math.log(2) / bytes_per_token, 4),
                "tokens_per_s": round(state["step"] * r.batch_size * r.n_ctx / state["elapsed"]),
            }
            state["log"].append(entry)
            print(json.dumps(entry), flush=True)
        if time.time() - last_ckpt > 180:
            torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "state": state}, ckpt_path)
            last_ckpt = time.time()
    torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "state": state}, ckpt_path)

    # The transformers-format folder that `onnxgen export` reads.
    hf = args.out / "hf"
    model.save_pretrained(hf)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    fast.model_max_length = r.n_ctx
    fast.save_pretrained(hf)
    # Greedy decoding of a model this small loops; these sampling defaults gave its best text.
    GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=True,
        top_p=0.9, top_k=0, temperature=0.8, repetition_penalty=1.2, max_new_tokens=60,
    ).save_pretrained(hf)
    final = state["log"][-1] if state["log"] else {}
    result = {
        "recipe": asdict(r), "threads": args.threads, "steps": state["step"],
        "train_minutes": round(state["elapsed"] / 60, 1), "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": {"train_sha256": sha256(train_txt), "val_sha256": sha256(val_txt),
                   "train_tokens": int(len(train)), "val_tokens": int(len(val)), "bytes_per_token": round(bytes_per_token, 3)},
        "final": final, "log": state["log"],
    }
    (args.out / "training.json").write_text(json.dumps(result, indent=2))
    (hf / "training.json").write_text(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=2))
    print(json.dumps(final), flush=True)


if __name__ == "__main__":
    main()
