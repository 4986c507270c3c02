"""The key/value cache in place (GroupQueryAttention, the export default) against the growing cache
(MultiHeadAttention, `--growing-cache`), and against the cache in place kept in int8 (`quantize --kv-cache
int8`, the int8 and int4 variants), on the CPU, in one run.

    python benchmarks/cache.py --models gpt2 gpt2-large --threads 2

For each model shape (random weights, make_models.py) and variant (fp32, int8, int4 at quantize's default block
size, int4-b128: `--block-size 128`, in place only) it makes the folders once (kept in
benchmarks/exports/<model>/<layout>-<variant>), then:
- decode tok/s at batch 1 after a 32- and a 512-token prompt (64 new tokens): the layouts loaded in one
  process and run in turns (--runs rounds, the order alternating), each call's figure the median time
  between its decode steps (the generator's step_ends), the result the median over rounds. This host's memory
  bandwidth drifts by up to a third within minutes, so folders timed one after the other (the first version
  of this script) could rank either way; taken in turns they cannot drift apart;
- the ceiling those figures are held to: a decode step reads the weights and, once, the cache, so at the
  read bandwidth it can make at most bandwidth / (weight bytes + cache bytes) steps a second (the weight bytes
  a step reads, run.streamed_bytes, not the file's; the cache's size at the middle of the 64 new tokens). The
  bandwidth drifts as the speeds do, so it is probed in the timing process before every round of calls, and
  each call is held to the ceiling of its own round (one probe a run, minutes away from the calls, put a
  layout at 0.65 of its ceiling in one run and 1.04 in the next). The fraction at 32 tokens is the weights'
  own (the cache is a few % of the bytes there); the fraction at 512 falls below it where the cache costs
  more than one read of it;
- peak RSS of a batch 8 x 512-token call (64 new tokens), in a process of its own per folder.
Results: benchmarks/results/cache.{json,md}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import bandwidth_gbs, host, streamed_bytes, write_results  # noqa: E402  (the suite's own measures)

LAYOUTS = {"growing": ["--growing-cache"], "in-place": [], "in-place-kv8": []}  # kv8: quantize --kv-cache int8
VARIANTS = {"fp32": [], "int8": ["--mode", "int8"], "int4": ["--mode", "int4"], "int4-b128": ["--mode", "int4", "--block-size", "128"]}
NEW = 64


def layouts(variant: str) -> list[str]:
    if variant == "fp32":
        return ["growing", "in-place"]  # an int8 cache comes with quantize
    return list(LAYOUTS)[1:] if variant == "int4-b128" else list(LAYOUTS)  # a block size's speed shows in place


def prepare(name: str, checkpoint: Path, work: Path, variants: list[str]) -> dict[tuple[str, str], Path]:
    if not (checkpoint / "config.json").exists():
        from make_models import make

        make(name, checkpoint.parent)
    cli = [sys.executable, "-m", "onnxgen"]
    folders = {}
    for variant in ["fp32", *[v for v in variants if v != "fp32"]]:  # the fp32 folders are the others' parents
        for layout in layouts(variant):
            folder = folders[layout, variant] = work / f"{layout}-{variant}"
            if (folder / "onnxgen.json").exists():
                continue
            if variant == "fp32":
                subprocess.run([*cli, "export", str(checkpoint), "-o", str(folder), "--force", *LAYOUTS[layout]], check=True)
            else:  # random weights make perplexity meaningless: the accuracy budget is opened
                parent, cache = ("in-place", ["--kv-cache", "int8"]) if layout == "in-place-kv8" else (layout, [])
                subprocess.run([*cli, "quantize", "--model", str(work / f"{parent}-fp32"), "-o", str(folder), *VARIANTS[variant],
                                *cache, "--force", "--max-ppl-increase", "100"], check=True)
    return folders


def step_seconds(model: Any, ids: list[list[int]], new_tokens: int) -> float:
    """One greedy call of `new_tokens` (no end token, no penalty: every call the same length); the median time
    between its decode steps (the generator's step_ends), which leaves the prompt pass out."""
    generator = model.generator(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, min_new_tokens=0,
                                repetition_penalty=1.0)
    while not generator.done:
        generator.step()
    return float(np.median(np.diff(generator.step_ends)))


def decode_speeds(folders: list[str], threads: int, runs: int, prompts: list[int]) -> dict[str, dict[str, Any]]:
    """In this process: per folder and prompt length, decode tok/s at batch 1 (see the module's docstring), each
    round's read bandwidth, probed just before the round's calls, and the fraction of the ceiling that bandwidth
    sets which each call reached (medians over the rounds)."""
    import time

    import onnxgen

    models = [onnxgen.load(folder, threads=threads) for folder in folders]
    rng = np.random.default_rng(0)
    steps: dict[tuple[int, int], list[float]] = {}
    bandwidths: dict[int, list[float]] = {prompt: [] for prompt in prompts}
    for prompt in prompts:
        ids = rng.integers(0, models[0].dims.vocab_size, size=(1, prompt)).tolist()
        for model in models:  # warm-up
            model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, min_new_tokens=0)
        for round_ in range(runs):
            time.sleep(0.05)  # onnxruntime's threads stop spinning: the probe has the cores to itself
            bandwidths[prompt].append(bandwidth_gbs(threads)["read"])
            for i in range(len(models)) if round_ % 2 == 0 else reversed(range(len(models))):
                steps.setdefault((i, prompt), []).append(step_seconds(models[i], ids, NEW))
    result: dict[str, dict[str, Any]] = {}
    for i, folder in enumerate(folders):
        weights = streamed_bytes("onnxgen", Path(folder))
        result[folder] = {"streamed_bytes": weights, "bandwidth_gbs": {}, "ceiling": {}, "of_ceiling": {}}
        for prompt in prompts:
            ceilings = [bandwidth * 1e9 / (weights + cache_bytes(Path(folder), prompt + NEW // 2)) for bandwidth in bandwidths[prompt]]
            key = str(prompt)
            result[folder][key] = 1 / float(np.median(steps[i, prompt]))
            result[folder]["bandwidth_gbs"][key] = bandwidths[prompt]
            result[folder]["ceiling"][key] = float(np.median(ceilings))
            result[folder]["of_ceiling"][key] = float(np.median([1 / (step * c) for step, c in zip(steps[i, prompt], ceilings)]))
    return result


def peak_rss(folder: str, threads: int, batch: int, prompt: int) -> dict[str, float]:
    """In this process: one batch x prompt call of NEW tokens; the process's high-water mark."""
    import onnxgen
    from onnxgen.bench import peak_rss_mb

    model = onnxgen.load(folder, threads=threads)
    ids = np.random.default_rng(0).integers(0, model.dims.vocab_size, size=(batch, prompt)).tolist()
    model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, min_new_tokens=0)
    return {"peak_rss_mb": peak_rss_mb()}


def in_subprocess(job_name: str, *arguments: Any) -> dict[str, Any]:
    job = json.dumps([job_name, *arguments])
    out = subprocess.run([sys.executable, __file__, "--job", job], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def cache_bytes(folder: Path, positions: int) -> int:
    record = json.loads((folder / "onnxgen.json").read_text())
    int8 = (record.get("quantization") or {}).get("options", {}).get("kv_cache") == "int8"
    dims, itemsize = record["dims"], 1 if int8 else 2 if record["dtype"] == "float16" else 4
    return 2 * dims["n_layer"] * dims["n_embd"] * positions * itemsize


def markdown(result: dict[str, Any]) -> str:
    lines = ["# The key/value cache in place against the growing cache, and in int8 (CPU)", "",
             (f"{result['environment']}; {result['threads']} threads, batch 1, {NEW} new tokens; decode tok/s = 1 / the median time "
             f"between decode steps, median of {result['runs']} calls taken in turns with the other layouts; the ceiling is the "
             "read bandwidth over the weight bytes a step reads (the table's \"weights MB\": not an int8 or int4 folder's file, "
             "which holds the token embedding twice, gathered a row a token and read whole as the head) + one read of the cache "
             "at the middle of the new tokens, the bandwidth probed before every round of calls and each call held to its "
             "round's ceiling (\"of ceiling\": the median of those fractions; \"ceiling\": the median ceiling). At 32 tokens the "
             "cache is a few % of a step's bytes, so \"of ceiling @32\" is how near the weights' reads come to the bandwidth; "
             "\"of ceiling @512\" below it is what the cache costs beyond one read of it. int4-b128 is int4 at "
             "`--block-size 128`."), ""]
    for model in result["models"]:
        lines += [f"## {model['name']}", "",
                  ("| variant | layout | weights MB | tok/s @32 | of ceiling @32 | tok/s @512 | of ceiling @512 | @512 / @32 "
                   "| read GB/s @512 (rounds' min-max) | ceiling @512 | peak RSS b8x512 (MiB) |"),
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in model["rows"]:
            read = row["bandwidth_gbs"]["512"]
            lines.append(f"| {row['variant']} | {row['layout']} | {row['streamed_bytes'] / 1e6:.0f} | {row['32']:.1f} | "
                         f"{row['of_ceiling']['32']:.2f} | {row['512']:.1f} | {row['of_ceiling']['512']:.2f} | {row['512'] / row['32']:.2f} | "
                         f"{min(read):.1f}-{max(read):.1f} | {row['ceiling']['512']:.1f} | {row['peak_rss_b8_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gpt2"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=HERE / "exports")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--job", help=argparse.SUPPRESS)  # internal: one measurement, in a process of its own
    args = ap.parse_args()
    if args.job:
        name, *arguments = json.loads(args.job)
        print(json.dumps({"speeds": decode_speeds, "memory": peak_rss}[name](*arguments)))
        return
    result: dict[str, Any] = {"environment": host(),
                              "threads": args.threads, "runs": args.runs, "models": []}
    for name in args.models:
        folders = prepare(name, HERE / "models" / name, args.work / name, args.variants)
        rows = []
        for variant in args.variants:
            print(f"[{name}] {variant} ...", file=sys.stderr, flush=True)
            compared = [str(folders[layout, variant]) for layout in layouts(variant)]
            speeds = in_subprocess("speeds", compared, args.threads, args.runs, [32, 512])
            for layout, folder in zip(layouts(variant), compared):
                memory = in_subprocess("memory", folder, args.threads, 8, 512)
                rows.append({"variant": variant, "layout": layout, **speeds[folder], "peak_rss_b8_mb": memory["peak_rss_mb"]})
        result["models"].append({"name": name, "rows": rows})
    write_results(args.out, "cache", result, markdown(result))


if __name__ == "__main__":
    main()
