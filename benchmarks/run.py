"""onnxgen against transformers' PyTorch generate, optimum's ORTModelForCausalLM and CTranslate2, in one run.

    python benchmarks/run.py --models gpt2 gpt2-large --threads 2

For each model (random weights of the real shapes, made by make_models.py; or --checkpoint DIR) it makes
the onnxgen fp32/int8/int4 folders, optimum's own export and CTranslate2's float32/int8 conversions once (kept
in benchmarks/exports/), then runs
every competitor in a subprocess of its own, with the same thread count, in --runs rounds: each round
runs every competitor once, one after the other, so that a machine whose memory bandwidth drifts over the
run (a shared host's does) slows all competitors alike instead of whichever ran last:
- time to first token = a generate() of one new token; decode tok/s = batch x (N - 1) / (T(N) - T(1)),
  the same method for every competitor, so no one is timed by its own clock;
- peak RSS of the subprocess (the highest round), model load time;
- medians with min and max over the rounds, each after a short warm-up.
The machine's memory bandwidth is measured before every round and its median turned into each model's
decode bound: read bandwidth / the weight bytes a token reads (streamed_bytes; decoding streams the weights
and writes next to nothing, so a copy's rate, which counts writes, is no bound; it is reported beside).
Results: benchmarks/results/latest.{json,md,png} (--name: another stem).
Run it on a quiet machine: any background job halves the figures (the ratios hold up better).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from onnxgen.options import STRATEGIES

HERE = Path(__file__).resolve().parent
VARIANTS = ["fp32", "int8", "int4", "fp16"]  # onnxgen's
CT2_TYPES = {"fp32": "float32", "int8": "int8"}  # CTranslate2's on the CPU (it has no int4 there), by onnxgen's name
CHOICES = ["pytorch", "optimum", *(f"ctranslate2-{v}" for v in CT2_TYPES), *(f"onnxgen-{v}" for v in VARIANTS)]
COMPETITORS = [c for c in CHOICES if c != "onnxgen-fp16"]  # the default run; fp16 on request (--competitors, --pair)
SAMPLING = "top-k-top-p"  # the sampling case: a preset of onnxgen.options.STRATEGIES, as greedy and beam are


def cases_for(new_tokens: int, context: int) -> list[dict[str, Any]]:
    grid = [(1, 32), (1, 512), (8, 32), (8, 512)]
    cases = [{"batch": b, "prompt": p, "new": new_tokens, "strategy": "greedy"} for b, p in grid]
    cases += [{"batch": 1, "prompt": 32, "new": new_tokens, "strategy": s} for s in (SAMPLING, "beam")]
    return [c for c in cases if c["prompt"] + c["new"] <= context]


# -- one competitor, in its own process ---------------------------------------------------------------

Generate = Callable[[list[list[int]], int, str], object]  # (prompts' ids, new tokens, strategy) -> what the library returns


def load(competitor: str, folder: str, threads: int) -> tuple[Generate, int]:
    """Load one competitor; returns its generate(ids, new_tokens, strategy) and its vocabulary size."""
    if competitor.startswith("onnxgen"):
        import onnxgen

        model = onnxgen.load(folder, threads=threads)

        def generate(ids: list[list[int]], new: int, strategy: str) -> object:
            return model.generate(ids, max_new_tokens=new, eos_token_id=None, **{"seed": 0, **STRATEGIES[strategy]})
        return generate, model.dims.vocab_size
    if competitor.startswith("ctranslate2"):
        return ctranslate2_generate(folder, threads)
    import torch

    if competitor == "pytorch":
        from transformers import GPT2LMHeadModel

        torch.set_num_threads(threads)
        hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    else:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        torch.set_num_threads(1)  # its OpenMP threads would fight onnxruntime's for the cores
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        hf = ORTModelForCausalLM.from_pretrained(folder, session_options=options, use_io_binding=False)

    def hf_generate(ids: list[list[int]], new: int, strategy: str) -> object:
        with torch.no_grad():
            t = torch.tensor(ids)
            return hf.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=new, min_new_tokens=new,
                               pad_token_id=hf.config.eos_token_id, **{k: v for k, v in STRATEGIES[strategy].items() if k != "seed"})
    return hf_generate, hf.config.vocab_size


def ctranslate2_generate(folder: str, threads: int) -> tuple[Generate, int]:
    """CTranslate2's Generator as its users run it: its own choice of kernels for this CPU, tokens given as the
    vocabulary's strings (its API takes no ids), the prompt's tokens left out of the result."""
    import ctranslate2

    generator = ctranslate2.Generator(folder, device="cpu", compute_type="default", intra_threads=threads, inter_threads=1)
    spelled = json.loads((Path(folder) / "vocabulary.json").read_text())

    def generate(ids: list[list[int]], new: int, strategy: str) -> object:
        options = STRATEGIES[strategy]
        sampling = {"sampling_topk": options.get("top_k") or 0, "sampling_topp": options.get("top_p", 1.0),
                    "sampling_temperature": options.get("temperature", 1.0)} if options["do_sample"] else {}
        ctranslate2.set_random_seed(0)
        # end_token=[]: no token ends a row, as eos_token_id=None and min_new_tokens do for the others
        return generator.generate_batch([[spelled[i] for i in row] for row in ids], max_length=new, min_length=new, end_token=[],
                                         beam_size=options["num_beams"], include_prompt_in_result=False, **sampling)
    return generate, len(spelled)


def time_case(generate: Generate, vocab: int, case: dict[str, Any]) -> dict[str, float]:
    """A warm-up, then a generate() of one new token (time to first token) and one of case["new"]."""
    ids = np.random.default_rng(0).integers(0, vocab, size=(case["batch"], case["prompt"])).tolist()
    generate(ids, 4, case["strategy"])
    t0 = time.perf_counter()
    generate(ids, 1, case["strategy"])
    t1 = time.perf_counter()
    generate(ids, case["new"], case["strategy"])
    return {"first_s": t1 - t0, "full_s": time.perf_counter() - t1}


def decode_tps(case: dict[str, Any], timing: dict[str, float]) -> float:
    return case["batch"] * (case["new"] - 1) / max(1e-9, timing["full_s"] - timing["first_s"])


def worker(competitor: str, folder: str, threads: int, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """One round: load, then each case once. Returns raw seconds; main() aggregates."""
    from onnxgen.bench import peak_rss_mb, reset_peak_rss

    start = time.perf_counter()
    generate, vocab = load(competitor, folder, threads)
    load_s = time.perf_counter() - start
    load_peak = peak_rss_mb()
    timings = []
    for case in cases:
        reset_peak_rss()  # each case's own peak (Linux; elsewhere the peak so far)
        timings.append({**time_case(generate, vocab, case), "peak_rss_mb": peak_rss_mb()})
    return {"load_s": load_s, "load_peak_rss_mb": load_peak, "timings": timings}


def serve(competitor: str, folder: str, threads: int) -> None:
    """Paired mode's side: load once, then time each case that arrives on stdin (a JSON line)."""
    generate, vocab = load(competitor, folder, threads)
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(time_case(generate, vocab, json.loads(line))), flush=True)


def paired(a: str, b: str, folders: dict[str, Path], threads: int, case: dict[str, Any], reps: int) -> dict[str, Any]:
    """Two competitors loaded side by side, timed in turns (who goes first alternates): each rep gives a
    ratio of two runs seconds apart, which a drifting memory bandwidth moves far less than a median of
    runs minutes apart."""
    from onnxgen.bench import spread

    sides = {}
    for name in (a, b):
        job = json.dumps({"competitor": name, "folder": str(folders[name]), "threads": threads})
        sides[name] = subprocess.Popen([sys.executable, __file__, "--serve", job], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if sides[name].stdout.readline().strip() != "ready":
            sys.exit(f"{name} failed to load")
    tps: dict[str, list[float]] = {a: [], b: []}
    bandwidths = []
    for rep in range(reps):
        bandwidths.append(bandwidth_gbs(threads))  # it drifts over the run: sample it with the turns
        for name in (a, b) if rep % 2 == 0 else (b, a):
            time.sleep(0.5)  # the other side's idle threads stop spinning
            sides[name].stdin.write(json.dumps(case) + "\n")
            sides[name].stdin.flush()
            tps[name].append(decode_tps(case, json.loads(sides[name].stdout.readline())))
    for side in sides.values():
        side.stdin.close()
        side.wait()
    return {"a": a, "b": b, "case": case, "decode_tps": {name: spread(v) for name, v in tps.items()},
            "ratio": spread([y / x for x, y in zip(tps[a], tps[b])]),
            "bandwidth_gbs": {kind: spread([bw[kind] for bw in bandwidths]) for kind in ("read", "copy")}}


def aggregate(competitor: str, cases: list[dict[str, Any]], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians (min-max) over the rounds of one competitor."""
    from onnxgen.bench import spread

    results = []
    for i, case in enumerate(cases):
        first = [r["timings"][i]["first_s"] for r in rounds]
        tps = [decode_tps(case, r["timings"][i]) for r in rounds]
        results.append({**case, "key": f"b{case['batch']} p{case['prompt']} {case['strategy']}",
                        "ttft_ms": spread([x * 1000 for x in first]), "decode_tps": spread(tps),
                        "peak_rss_mb": max(r["timings"][i]["peak_rss_mb"] for r in rounds)})
    load_peak = max(r["load_peak_rss_mb"] for r in rounds)
    return {"competitor": competitor, "load_s": statistics.median(r["load_s"] for r in rounds), "load_peak_rss_mb": load_peak,
            "peak_rss_mb": max([load_peak, *(c["peak_rss_mb"] for c in results)]), "cases": results}


# -- preparation ----------------------------------------------------------------------------------------

def prepare(name: str, checkpoint: Path, work: Path, competitors: list[str], fresh: bool) -> dict[str, Path]:
    """The folders the competitors load, made once and reused (onnxgen's remade with `fresh`); a missing
    checkpoint of a known shape is made first (make_models.py)."""
    if not (checkpoint / "config.json").exists():
        from make_models import make

        make(name, checkpoint.parent)
    folders = {"pytorch": checkpoint, "optimum": work / "optimum", **{f"onnxgen-{v}": work / v for v in VARIANTS},
               **{f"ctranslate2-{v}": work / "ctranslate2" / v for v in CT2_TYPES}}
    if fresh:
        for variant in VARIANTS:
            shutil.rmtree(folders[f"onnxgen-{variant}"], ignore_errors=True)
    onnxgen_cli = [sys.executable, "-m", "onnxgen"]
    if any(c.startswith("onnxgen") for c in competitors) and not (folders["onnxgen-fp32"] / "onnxgen.json").exists():
        subprocess.run(onnxgen_cli + ["export", str(checkpoint), "-o", str(folders["onnxgen-fp32"]), "--force"], check=True)
    for mode in VARIANTS[1:]:
        if f"onnxgen-{mode}" in competitors and not (folders[f"onnxgen-{mode}"] / "onnxgen.json").exists():
            # Random weights make perplexity meaningless, so the accuracy budget is opened here.
            subprocess.run(onnxgen_cli + ["quantize", "--model", str(folders["onnxgen-fp32"]), "-o", str(folders[f"onnxgen-{mode}"]),
                                          "--mode", mode, "--force", "--max-ppl-increase", "100"], check=True)
    if "optimum" in competitors and not (folders["optimum"] / "model.onnx").exists():
        # optimum's own export as its users run it; its post-processing needs the pure-Python protobuf
        # past 2 GB (gpt2-large), else it fails to serialize.
        env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
        code = ("from optimum.exporters.onnx import main_export; import sys; "
                "main_export(sys.argv[1], sys.argv[2], task='text-generation-with-past', do_validation=False)")
        subprocess.run([sys.executable, "-c", code, str(checkpoint), str(folders["optimum"])], check=True, env=env)
    for variant, kind in CT2_TYPES.items():
        out = folders[f"ctranslate2-{variant}"]
        if f"ctranslate2-{variant}" in competitors and not (out / "model.bin").exists():
            # its converter, as its users run it (ct2-transformers-converter), into a folder renamed once whole
            code = ("from ctranslate2.converters import TransformersConverter; import sys; "
                    "TransformersConverter(sys.argv[1]).convert(sys.argv[2], quantization=sys.argv[3], force=True)")
            part = out.with_name(out.name + ".part")
            subprocess.run([sys.executable, "-c", code, str(checkpoint), str(part), kind], check=True)
            shutil.rmtree(out, ignore_errors=True)
            part.rename(out)
    return folders


def bandwidth_gbs(threads: int, mib: int = 512, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth in GB/s with `threads` threads, best of `repeats`: "read" streams a buffer, as a
    decode step streams the weights (numpy's max: one pass, SIMD, the GIL released); "copy" counts the
    bytes read and written by a copy, the measure of earlier runs."""
    sources = [np.ones(mib * 2**20 // 4 // threads, np.float32) for _ in range(threads)]
    targets = [np.empty_like(a) for a in sources]
    best = {"read": 0.0, "copy": 0.0}
    with ThreadPoolExecutor(threads) as pool:

        def seconds(work: Callable[[int], object]) -> float:
            start = time.perf_counter()
            list(pool.map(work, range(threads)))
            return time.perf_counter() - start

        for _ in range(repeats):
            best["read"] = max(best["read"], mib * 2**20 / seconds(lambda i: sources[i].max()) / 1e9)
            best["copy"] = max(best["copy"], 2 * mib * 2**20 / seconds(lambda i: np.copyto(targets[i], sources[i])) / 1e9)
    return best


def weight_bytes(competitor: str, folder: Path) -> int:
    """Bytes of the model file(s): what a folder holds, the measure of memory against weights."""
    prefix = {"pytorch": "model.safetensors", "ctranslate2": "model.bin"}.get(competitor.split("-")[0], "model.onnx")
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(prefix))


GATHERS = {"Gather", "GatherBlockQuantized"}  # ops that read a row of their first input per token, not all of it


def streamed_bytes(competitor: str, folder: Path) -> int:
    """Bytes of weights a decode step reads: the bound's numerator. Not the file's size: an int8 or int4 folder
    keeps the token embedding twice, quantized for the Gather that reads one row of it per token and again as
    the head that reads it whole (gpt2 int8: 163 MB of file, 124 MB read a step; counting the file flattered
    every fraction of the bound). An ONNX graph's: every initializer that a node other than a gather reads (an
    fp32 folder's tied head is row blocks pointing into the embedding's bytes: those count, the gathered
    embedding does not). PyTorch's: its file (its tied head reads the embedding whole; the position table,
    0.2-0.6% of it, is the only one gathered); CTranslate2's: its file, likewise."""
    if not competitor.startswith(("onnxgen", "optimum")):
        return weight_bytes(competitor, folder)
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    streamed = {name for node in graph.node for i, name in enumerate(node.input) if node.op_type not in GATHERS or i > 0}
    total = 0
    for tensor in (t for t in graph.initializer if t.name in streamed):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next(entry.value for entry in tensor.external_data if entry.key == "length"))
        else:
            total += len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    return total


IMPORTS = {"onnxgen": "import onnxgen", "optimum": "from optimum.onnxruntime import ORTModelForCausalLM",
           "pytorch": "import torch, transformers; transformers.GPT2LMHeadModel",
           "ctranslate2": "import ctranslate2"}  # what each kind of competitor imports


def import_seconds(statement: str, runs: int) -> float:
    """The median time of `statement` in `runs` fresh interpreters."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    return statistics.median(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
                             for _ in range(runs))


def write_results(out: Path, name: str, result: dict[str, Any], table: str) -> None:
    """A benchmark's results: out/NAME.json (the numbers) and out/NAME.md (the table, printed too)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(table)
    print(table)


EVAL_TEXT = Path(__file__).resolve().parents[1] / "onnxgen" / "data" / "eval.txt"  # prose the bundled model was not trained on


def held_out_prompts(tokenizer: Any, count: int, size: int = 32, apart: int = 48) -> list[list[int]]:
    """`count` windows of `size` tokens of the held-out prose, `apart` tokens from one start to the next."""
    tokens = tokenizer.encode(EVAL_TEXT.read_text())
    return [tokens[start : start + size] for start in range(0, len(tokens) - size, apart)][:count]


def strategy_speeds(folders: list[Path], strategies: dict[str, dict[str, Any]], rounds: int, new: int) -> dict[str, dict[str, float]]:
    """Per model (the bundled one, then `folders`), decode tok/s at batch 1 of each strategy (options by name) after a
    32-token prompt of the held-out prose, 2 threads, `new` tokens without an end token, the strategies in turns,
    medians of `rounds`."""
    import onnxgen

    speeds = {}
    for folder in [None, *folders]:
        model = onnxgen.load(folder, threads=2)
        prompt = held_out_prompts(model.tokenizer, 1)[0]
        runs: dict[str, list[float]] = {name: [] for name in strategies}
        for _ in range(rounds):
            for name, options in strategies.items():
                model.generate([prompt], max_new_tokens=new, eos_token_id=None, **options)
                assert model.last_stats is not None
                runs[name].append(model.last_stats.decode_tokens_per_s)
        speeds["bundled (prose-mini int8)" if folder is None else str(folder)] = {name: statistics.median(v) for name, v in runs.items()}
    return speeds


def speeds_table(timed: dict[str, dict[str, float]], strategies: dict[str, dict[str, Any]], rounds: int) -> str:
    """strategy_speeds' figures as a markdown table, a row per model."""
    table = (f"\nDecode tok/s, batch 1, 32-token prompt, 64 new tokens, 2 threads, medians of {rounds} rounds in turns:\n\n"
             "| model | " + " | ".join(strategies) + " |\n| --- |" + " ---: |" * len(strategies) + "\n")
    for model, rates in timed.items():
        table += f"| {model} | " + " | ".join(f"{rates[name]:.1f}" for name in strategies) + " |\n"
    return table


def host() -> str:
    """The one-line environment of the benchmarks' results: the machine (onnxgen.bench.machine) and Python."""
    from onnxgen.bench import machine

    return f"{machine()}, Python {platform.python_version()}"


def environment(threads: int) -> dict[str, Any]:
    from onnxgen.bench import machine
    from onnxgen.export import package_versions

    return {"machine": machine(), "threads": threads, "versions": package_versions()}


# -- report ---------------------------------------------------------------------------------------------

def pair_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"{env['machine']}, {env['threads']} threads. Batch 1, 32-token prompt, greedy, "
             f"{result['runs']} turns each, taken in alternation; medians (min-max).", "",
             "Bandwidth, measured before every turn, median (min-max): read (the bound) and copy (reads + writes). "
             "Each side's fraction of its bound: decode tok/s x weight bytes read a step / median read bandwidth.", "",
             "| model | read GB/s | copy GB/s | A | A decode tok/s | A of bound | B | B decode tok/s | B of bound | B / A, turn by turn |",
             "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for p in result["pairs"]:
        read, copy, r = p["bandwidth_gbs"]["read"], p["bandwidth_gbs"]["copy"], p["ratio"]
        sides = []
        for name in (p["a"], p["b"]):
            d = p["decode_tps"][name]
            bound = read["median"] * 1e9 / p["streamed_bytes"][name]
            sides.append(f"{name} | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | {d['median'] / bound:.2f}")
        lines.append(f"| {p['name']} | {read['median']:.1f} ({read['min']:.1f}-{read['max']:.1f}) | "
                     f"{copy['median']:.1f} ({copy['min']:.1f}-{copy['max']:.1f}) | {' | '.join(sides)} | "
                     f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}) |")
    return "\n".join(lines) + "\n"


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k != "onnxgen")
    lines = [f"{env['machine']}, {env['threads']} threads ({versions}). Medians of {result['runs']} interleaved rounds (min-max); "
             "memory bandwidth measured before each round; the bound is the read bandwidth over the weight bytes a step reads.", ""]
    for model in result["models"]:
        read, copy = model["bandwidth_gbs"]["read"], model["bandwidth_gbs"]["copy"]
        lines += [f"### {model['name']}", "", f"Bandwidth: read {read['median']:.1f} GB/s ({read['min']:.1f}-{read['max']:.1f}), "
                  f"copy {copy['median']:.1f} ({copy['min']:.1f}-{copy['max']:.1f}).", "",
                  (f"| competitor | weights MB | load s (peak RSS MiB) | case | decode tok/s | x {model['competitors'][0]['competitor']} | "
                   "first token ms | fraction of bound | peak RSS MiB (x weights) |"),
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        base = {c["key"]: c["decode_tps"]["median"] for c in model["competitors"][0]["cases"]}  # the first competitor's (PyTorch by default)
        for comp in model["competitors"]:
            for c in comp["cases"]:
                d, f = c["decode_tps"], c["ttft_ms"]
                bound = comp.get("bound_tps")
                frac = f"{d['median'] / bound:.2f}" if bound and c["key"] == "b1 p32 greedy" else ""
                lines.append(f"| {comp['competitor']} | {comp['weights_mb']:.0f} | {comp['load_s']:.2f} ({comp['load_peak_rss_mb']:.0f}) | {c['key']} | "
                             f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | {d['median'] / base[c['key']]:.2f} | "
                             f"{f['median']:.0f} ({f['min']:.0f}-{f['max']:.0f}) | {frac} | "
                             f"{c['peak_rss_mb']:.0f} ({c['peak_rss_mb'] * 2**20 / (comp['weights_mb'] * 1e6):.2f}x) |")
        lines.append("")
    imp = result["import_s"]
    lines.append("Import time: " + ", ".join(f"`{k}` {v:.2f} s" for k, v in imp.items()))
    if result.get("install_mb"):
        lines.append("Installed size: " + ", ".join(f"{k} {v:.0f} MB" for k, v in result["install_mb"].items() if isinstance(v, (int, float))))
    return "\n".join(lines) + "\n"


COLORS = {"pytorch": "#999999", "optimum": "#7a9cc6", "ctranslate2": "#6aa56a", "onnxgen": "#e07b39"}


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        names = [c["competitor"] for c in model["competitors"]]
        tps = [next(x for x in c["cases"] if x["key"] == "b1 p32 greedy")["decode_tps"]["median"] for c in model["competitors"]]
        bars = ax.bar(names, tps, color=[COLORS[name.split("-")[0]] for name in names])
        ax.bar_label(bars, fmt="%.0f")
        for comp in model["competitors"]:
            if comp["competitor"] == "onnxgen-fp32" and comp.get("bound_tps"):
                ax.axhline(comp["bound_tps"], color="#555555", linestyle="--", linewidth=1, label="fp32 read-bandwidth bound")
                ax.legend(loc="upper left", fontsize=8)
        ax.set_title(f"{model['name']}: decode tok/s, batch 1, greedy")
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_pairs(args: argparse.Namespace, targets: list[tuple[str, Path]], result: dict[str, Any]) -> None:
    """--pair: the two competitors side by side on each model; writes results/pair-A-B.{json,md}."""
    result["pairs"] = []
    for name, checkpoint in targets:
        folders = prepare(name, checkpoint, args.work / name, args.pair, args.fresh)
        case = {"batch": 1, "prompt": 32, "new": args.new_tokens, "strategy": "greedy"}
        print(f"[{name}] {args.pair[0]} and {args.pair[1]}, {args.runs} turns each ...", file=sys.stderr, flush=True)
        result["pairs"].append({"name": name, "streamed_bytes": {c: streamed_bytes(c, folders[c]) for c in args.pair},
                                **paired(*args.pair, folders, args.threads, case, args.runs)})
    stem = f"pair-{args.pair[0]}-{args.pair[1]}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(pair_markdown(result))
    print(pair_markdown(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["gpt2", "gpt2-large"], help="shapes from make_models.py")
    ap.add_argument("--checkpoint", action="append", default=[], help="also bench this transformers folder: PATH or NAME=PATH")
    ap.add_argument("--competitors", nargs="*", default=COMPETITORS, choices=CHOICES)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="latest", help="the results' file names: OUT/NAME.{json,md,png}")
    ap.add_argument("--work", type=Path, default=HERE / "exports")
    ap.add_argument("--fresh", action="store_true", help="remake onnxgen's folders (after a change to export or quantize)")
    ap.add_argument("--pair", nargs=2, choices=CHOICES, metavar="COMPETITOR",
                    help="instead of the full table: these two side by side, batch 1, 32-token prompt, greedy, --runs turns each")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON job description
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # internal: JSON job description (paired mode)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(worker(job["competitor"], job["folder"], job["threads"], job["cases"])))
        return
    if args.serve:
        job = json.loads(args.serve)
        serve(job["competitor"], job["folder"], job["threads"])
        return

    from onnxgen.bench import spread

    targets = [(name, args.work.parent / "models" / name) for name in args.models]
    for spec in args.checkpoint:
        name, _, path = spec.rpartition("=")
        targets.append((name or Path(path).name, Path(path)))
    result: dict[str, Any] = {"environment": environment(args.threads), "runs": args.runs}
    if any(c.startswith("ctranslate2") for c in args.pair or args.competitors):
        from importlib.metadata import version

        result["environment"]["versions"]["ctranslate2"] = version("ctranslate2")
    if args.pair:
        run_pairs(args, targets, result)
        return
    result["models"] = []
    for name, checkpoint in targets:
        folders = prepare(name, checkpoint, args.work / name, args.competitors, args.fresh)
        config = json.loads((checkpoint / "config.json").read_text())
        cases = cases_for(args.new_tokens, config["n_positions"])
        entry: dict[str, Any] = {"name": name, "config": {k: config[k] for k in ("n_layer", "n_embd", "n_head", "vocab_size")}, "competitors": []}
        rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in args.competitors}
        bandwidths = []
        for round_ in range(1, args.runs + 1):
            bandwidths.append(bandwidth_gbs(args.threads))  # it drifts on a shared host: sample it with the rounds
            for competitor in args.competitors:
                print(f"[{name}] round {round_}/{args.runs}: {competitor} ...", file=sys.stderr, flush=True)
                job = json.dumps({"competitor": competitor, "folder": str(folders[competitor]), "threads": args.threads, "cases": cases})
                done = subprocess.run([sys.executable, __file__, "--worker", job], capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{competitor} on {name} failed:\n{done.stderr[-3000:]}")
                rounds[competitor].append(json.loads(done.stdout.strip().splitlines()[-1]))
        entry["bandwidth_gbs"] = {kind: spread([b[kind] for b in bandwidths]) for kind in ("read", "copy")}
        for competitor in args.competitors:
            measured = aggregate(competitor, cases, rounds[competitor])
            measured["weights_mb"] = weight_bytes(competitor, folders[competitor]) / 1e6
            measured["bound_tps"] = entry["bandwidth_gbs"]["read"]["median"] * 1e9 / streamed_bytes(competitor, folders[competitor])
            entry["competitors"].append(measured)
        result["models"].append(entry)
    kinds = dict.fromkeys(c.split("-")[0] for c in args.competitors)  # the run's own competitors', in their order
    result["import_s"] = {IMPORTS[kind].split(";")[0]: import_seconds(IMPORTS[kind], args.runs) for kind in kinds}
    sizes = HERE / "results" / "install_sizes.json"  # written by install_sizes.sh
    if sizes.exists():
        result["install_mb"] = json.loads(sizes.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    chart(result, args.out / f"{args.name}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
