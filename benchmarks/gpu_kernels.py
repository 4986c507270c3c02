"""Which CUDA kernels a decode step of an onnxgen folder runs, and how long each takes on the GPU (issue 14:
gpt2-large fp16 at batch 1 replays its step in 1.62 ms with CUDA graphs, GPU-bound; 600 tok/s needs the
whole step under 1.67 ms, so the question is which kernels to make fewer or faster).

    python benchmarks/gpu_kernels.py /tmp/onnxgen-gpu/onnx/fp16 --out benchmarks/results/gpu

PyTorch's profiler (CUPTI) records every kernel the process launches, onnxruntime's too, so it needs a
CUDA build of torch beside onnxruntime-gpu (the GPU session's environment has both). The steps run without
CUDA graphs (the same kernels; a replay only removes the launches between them), at batch 1 after a
32-token prompt (or --prompt-tokens), --steps of them after 8 to warm up. Results: <out>/kernels.{json,md}, each kernel's
launches and GPU time per step, the largest first, and their sum against the step's wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def profile(folder: Path, steps: int, batch: int, prompt_tokens: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity

    import onnxgen

    model = onnxgen.load(folder, provider="cuda")
    prompts = np.random.default_rng(0).integers(0, model.dims.vocab_size, size=(batch, prompt_tokens)).tolist()
    generator = model.generator(prompts, max_new_tokens=steps + 9, do_sample=False, eos_token_id=None, min_new_tokens=0)
    for _ in range(9):  # the prompt pass and 8 decode steps
        generator.step()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(steps):
            generator.step()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    kernels = []
    for event in trace.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us > 0:
            kernels.append({"name": event.key, "launches_per_step": event.count / steps, "us_per_step": device_us / steps})
    kernels.sort(key=lambda k: -k["us_per_step"])
    return {"folder": str(folder), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "onnxruntime": __import__("onnxruntime").__version__, "batch": batch, "prompt_tokens": prompt_tokens, "steps": steps, "step_wall_ms": wall_ms,
            "kernel_ms_per_step": sum(k["us_per_step"] for k in kernels) / 1e3, "kernels": kernels}


def markdown(result: dict[str, Any], top: int = 30) -> str:
    total = result["kernel_ms_per_step"] * 1e3 or 1.0
    title = f"# CUDA kernels of a decode step: {Path(result['folder']).name}, batch {result['batch']}, {result.get('prompt_tokens', 32)}-token prompt"
    lines = [title, "",
             f"{result['device']}, onnxruntime {result['onnxruntime']}, {result['steps']} steps without CUDA graphs; "
             f"kernels {result['kernel_ms_per_step']:.3f} ms a step on the GPU, the step {result['step_wall_ms']:.3f} ms of wall time. "
             "`python benchmarks/gpu_kernels.py FOLDER`.", "",
             "| kernel | launches a step | us a step | share |", "| --- | ---: | ---: | ---: |"]
    for k in result["kernels"][:top]:
        lines.append(f"| `{k['name'][:110]}` | {k['launches_per_step']:.1f} | {k['us_per_step']:.1f} | {k['us_per_step'] / total:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="an onnxgen folder that runs on CUDA (fp16)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu")
    args = ap.parse_args()
    result = profile(args.folder, args.steps, args.batch, args.prompt_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "kernels.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
