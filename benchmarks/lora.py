"""LoRA adapters at run time (export --lora) against the alternatives: the plain base, and the adapter merged into a
folder of its own (one folder per fine-tune), on the CPU, in one run.

    python benchmarks/lora.py --threads 2 [--shape gpt2] [--work benchmarks/exports/lora]

Made once in --work (kept for later runs): a random-weight checkpoint of --shape (benchmarks/make_models.py), its
plain export and its --lora export, both quantized to int8; PEFT LoRA adapters of it with random B matrices (rank 16
on every linear layer, and rank 8 on c_attn alone, peft's default for GPT-2), each exported with --lora and, the
first, merged and quantized to int8 too. Timed, in --rounds alternating rounds (median): greedy decoding of
--new-tokens tokens after a 32-token prompt, batch 1 (model.generate) and batch 8 through the server's batcher (8
requests at once: none with an adapter, all with one, or four adapters two requests each). Reported: tok/s, each
against the plain base's in the same round, and the folders' sizes. Results: benchmarks/results/lora.{json,md}.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from make_models import make  # noqa: E402
from run import EVAL_TEXT, environment, host, write_results  # noqa: E402

from tests.conftest import make_adapter  # noqa: E402  (the tests' adapter maker: peft's LoRA, random B matrices)

ADAPTERS = {"all-r16": {"r": 16, "lora_alpha": 32, "target_modules": ["c_attn", "c_proj", "c_fc"]},
            "attn-r8": {"r": 8, "lora_alpha": 16, "target_modules": ["c_attn"]}}
MIXED = 4  # adapters in the mixed batch (all-r16 with other random B matrices)


def prepare(shape: str, work: Path) -> dict[str, Path]:
    """The folders, made where missing."""
    from onnxgen.export import ExportOptions, export
    from onnxgen.quantize import QuantizeOptions, quantize

    int8 = QuantizeOptions(mode="int8", max_ppl_increase=10.0)  # random weights: the accuracy report is not the point here
    made: dict[str, Path] = {}
    checkpoint = work / shape if (work / shape).is_dir() else make(shape, work)
    for name, lora in (("plain", False), ("lora", True)):
        if not (work / f"{name}-int8").is_dir():
            export(str(checkpoint), work / f"{name}-fp32", ExportOptions(lora=lora))
            quantize(work / f"{name}-fp32", work / f"{name}-int8", int8)
        made[name] = work / f"{name}-int8"
    configs = {**ADAPTERS, **{f"mixed-{i}": ADAPTERS["all-r16"] for i in range(1, MIXED)}}
    for seed, (name, config) in enumerate(configs.items()):
        peft_folder = work / f"peft-{name}"
        if not (work / f"adapter-{name}").is_dir():
            export(str(peft_folder if peft_folder.is_dir() else make_adapter(checkpoint, peft_folder, seed, **config)), work / f"adapter-{name}",
                   ExportOptions(lora=True))
        made[f"adapter-{name}"] = work / f"adapter-{name}"
    if not (work / "merged-int8").is_dir():
        export(str(work / "peft-all-r16"), work / "merged-fp32")
        quantize(work / "merged-fp32", work / "merged-int8", int8)
    made["merged"] = work / "merged-int8"
    return made


def _batched(batcher: Any, model: Any, prompts: list[list[int]], adapters: list[str | None], new_tokens: int) -> None:
    """len(prompts) requests at once through the server's batcher; returns when all are done."""
    from onnxgen.batcher import Job

    inboxes = []
    for prompt, adapter in zip(prompts, adapters):
        inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        opts = model.options(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, adapter=adapter)
        batcher.submit(Job([prompt], opts, lambda kind, value, inbox=inbox: inbox.put((kind, value))))
        inboxes.append(inbox)
    for inbox in inboxes:
        kind, value = inbox.get(timeout=600)
        while kind == "event":
            kind, value = inbox.get(timeout=600)
        assert kind == "done", value


def measure(folders: dict[str, Path], threads: int, new_tokens: int, rounds: int) -> dict[str, Any]:
    import onnxgen
    from onnxgen.batcher import Batcher

    plain = onnxgen.load(folders["plain"], threads=threads)
    merged = onnxgen.load(folders["merged"], threads=threads)
    adapters = {name.removeprefix("adapter-"): path for name, path in folders.items() if name.startswith("adapter-")}
    lora = onnxgen.load(folders["lora"], threads=threads, adapters=adapters)
    text = plain.tokenizer.encode(EVAL_TEXT.read_text())
    prompts = [text[i * 40 : i * 40 + 32] for i in range(8)]
    mixed = ["all-r16", *[f"mixed-{i}" for i in range(1, MIXED)]] * 2

    def one(model: Any, adapter: str | None = None) -> Any:
        return lambda: model.generate([prompts[0]], max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, adapter=adapter)

    batchers = {name: Batcher(model, max_batch=8) for name, model in (("plain", plain), ("lora", lora), ("merged", merged))}

    def eight(name: str, rows: list[str | None]) -> Any:
        model = {"plain": plain, "lora": lora, "merged": merged}[name]
        return lambda: _batched(batchers[name], model, prompts, rows, new_tokens)

    cases = {
        "batch 1: plain base": (one(plain), new_tokens),
        "batch 1: LoRA base, no adapter": (one(lora), new_tokens),
        "batch 1: LoRA base + attn-r8": (one(lora, "attn-r8"), new_tokens),
        "batch 1: LoRA base + all-r16": (one(lora, "all-r16"), new_tokens),
        "batch 1: all-r16 merged": (one(merged), new_tokens),
        "batch 8: plain base": (eight("plain", [None] * 8), 8 * new_tokens),
        "batch 8: LoRA base, no adapter": (eight("lora", [None] * 8), 8 * new_tokens),
        "batch 8: LoRA base, all-r16 every row": (eight("lora", ["all-r16"] * 8), 8 * new_tokens),
        f"batch 8: LoRA base, {MIXED} all-r16 adapters, 2 rows each": (eight("lora", mixed), 8 * new_tokens),  # type: ignore[arg-type]
        "batch 8: all-r16 merged": (eight("merged", [None] * 8), 8 * new_tokens),
    }
    for run, _ in cases.values():  # warm-up
        run()
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        for name in cases if r % 2 == 0 else reversed(list(cases)):
            start = time.perf_counter()
            cases[name][0]()
            seconds[name].append(time.perf_counter() - start)
    speed = {name: cases[name][1] / statistics.median(s) for name, s in seconds.items()}
    sizes = {name: sum(f.stat().st_size for f in path.iterdir()) for name, path in folders.items()}
    return {"tok_s": speed, "seconds": seconds, "bytes": sizes, "new_tokens": new_tokens, "rounds": rounds}


def markdown(result: dict[str, Any], shape: str, threads: int) -> str:
    speed, sizes = result["tok_s"], result["bytes"]
    lines = [f"# LoRA adapters at run time against the plain base and a merged folder (CPU, {shape} shape, int8)", "",
             (f"{host()}; {threads} threads; greedy, {result['new_tokens']} new tokens after a 32-token prompt; batch 8: 8 requests "
              f"at once through the server's batcher; median of {result['rounds']} alternating rounds. `python benchmarks/lora.py`."), "",
             "| case | tok/s | against the plain base |", "| --- | ---: | ---: |"]
    for name, value in speed.items():
        base = speed["batch 1: plain base" if name.startswith("batch 1") else "batch 8: plain base"]
        lines.append(f"| {name} | {value:.0f} | {value / base:.2f}x |")
    lines += ["", "| folder | MB |", "| --- | ---: |"]
    lines += [f"| {name} | {size / 1e6:.1f} |" for name, size in sizes.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=HERE / "exports" / "lora")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders = prepare(args.shape, args.work)
    result = measure(folders, args.threads, args.new_tokens, args.rounds)
    write_results(args.out, "lora", {"environment": environment(args.threads), "shape": args.shape, **result},
                  markdown(result, args.shape, args.threads))


if __name__ == "__main__":
    main()
