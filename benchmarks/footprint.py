"""Peak memory against the model file, with the speed each choice costs, on the CPU, in one run (issue 16).

    python benchmarks/footprint.py --models gpt2 gpt2-large --threads 2 --runs 3 --replicas 3

For each model shape (random weights, make_models.py) and variant (fp32, int8, int4) it makes two folders once
(kept in benchmarks/exports/<model>/memory-<head>-<variant>): the head in parts of at most 16 MiB (the export
default, graph.split_tied_head / split_head) and the head whole (as exports were before); and int4 quantized
with --accuracy-level 1 (MatMulNBits' fp32 path, which packs no int8 block scales and sums: variant int4-level1),
and int8 and int4 with the key/value cache in int8 (quantize --kv-cache int8: variants int8-kv8, int4-kv8).
Then each case runs in a process of its own (its files first dropped from the page cache: evict), the cases
taken in turns for --runs rounds so that they see the same machine:
- the two folders with onnxruntime's defaults;
- the parts folder without onnxgen's paging advice (pages.py: the file's pages still mapped after the load
  read on demand), with `mapped_weights=True` (onnxgen.load's option: the weights packed once for this machine into
  a cached file that the process maps, prepacked.py; the copy is made before the runs), and with
  `enable_cpu_mem_arena=False`.
- with --llama-cpp PYTHON (an interpreter with llama-cpp-python) and --llama-cpp-source DIR (llama.cpp's tree,
  for convert_hf_to_gguf.py and gguf-py): llama.cpp on the same checkpoint, f32 / Q8_0 / Q4_0 beside fp32 / int8 /
  int4 (GGUF files made once in benchmarks/exports/<model>/llama.cpp/; its context sized to the call, its batch
  to the prompt, the weights mapped as it does by default).
Each process reports the model file (model.onnx + data), RSS before loading, the peak while loading (VmHWM),
the peak while decoding (VmHWM reset after the load through /proc/self/clear_refs), the RSS after decoding and
how much of it is anonymous (private to the process: what neither another process can share nor the kernel
drop without swap; the rest is mostly the model file's page cache), load seconds, and decode tok/s at batch 1
(32-token prompt, 128 greedy tokens, the median of 3 calls after a warm-up).
With --replicas N, N processes load the same int8 (then int4) folder at once, as N workers or Ray replicas on one machine
would, each decodes one call and holds; the sum of their PSS (each shared page divided among its sharers) is
the machine's memory for the N of them, with and without mapped_weights.
Results: benchmarks/results/footprint.{json,md}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANTS = ["fp32", "int8", "int4", "int4-level1", "int8-kv8", "int4-kv8"]
BASE = VARIANTS[:3]  # the others are one option each, made and run with the head in parts and defaults only
HEADS = ["parts", "whole"]
OPTIONS = {  # name: what the child changes before loading
    "default": "as onnxgen loads a folder",
    "no-paging": "without pages.page_on_demand",
    "mapped-weights": "onnxgen.load(mapped_weights=True)",
    "no-arena": "enable_cpu_mem_arena=False",
}
PROMPT, NEW, CALLS = 32, 128, 3


def evict(folder: Path) -> None:
    """Drop a folder's files from the page cache, so that every case's first load reads them the same way. A
    file quantize has just written sits in the page cache as the write left it, in large folios that a page
    fault maps whole: decoding gpt2-large int8 then brought 37 MiB of its embedding into the process in four
    tokens (a row's page alone once the file had been read back), 40 MiB over the same folder read afresh."""
    for path in [folder] if folder.is_file() else folder.glob("model.onnx*"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prepare(name: str, checkpoint: Path, work: Path) -> dict[tuple[str, str], Path]:
    """The folders for one model shape, made if missing: fp32 exported, int8 and int4 quantized from it."""
    from onnxgen import graph
    from onnxgen.export import export
    from onnxgen.quantize import QuantizeOptions, quantize

    folders = {}
    for head in HEADS:
        saved = graph.HEAD_PART_BYTES
        graph.HEAD_PART_BYTES = saved if head == "parts" else 1 << 62  # one part: the head as exports made it before
        try:
            fp32 = work / f"memory-{head}-fp32"
            if not fp32.exists():
                export(str(checkpoint), fp32)
            folders[head, "fp32"] = fp32
            for variant in VARIANTS[1:] if head == "parts" else ("int8", "int4"):
                out = work / f"memory-{head}-{variant}"
                if not out.exists():
                    mode, level = variant.split("-")[0], 1 if variant == "int4-level1" else 4
                    kv_cache = "int8" if variant.endswith("-kv8") else "float"
                    # random weights: the accuracy budget means nothing here (the bundled model's report does)
                    quantize(fp32, out, QuantizeOptions(mode=mode, accuracy_level=level, kv_cache=kv_cache, max_ppl_increase=1e9))
                folders[head, variant] = out
        finally:
            graph.HEAD_PART_BYTES = saved
    return folders


def _status(*keys: str, source: str = "status", pid: str = "self") -> dict[str, float]:
    """Fields of /proc/PID/status (or smaps_rollup) in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            values[key] = int(value.split()[0]) / 1024
    return values


def arena_off() -> None:
    """Every SessionOptions made from now on turns onnxruntime's CPU memory arena off (enable_cpu_mem_arena=False)."""
    import onnxruntime as ort

    make = ort.SessionOptions

    def options() -> Any:  # the runtime makes its SessionOptions through this name
        o = make()
        o.enable_cpu_mem_arena = False
        return o

    ort.SessionOptions = options


def child(folder: Path, option: str, threads: int, hold: bool = False) -> dict[str, Any]:
    import numpy as np

    import onnxgen
    import onnxgen.runtime
    from onnxgen.bench import reset_peak_rss

    before = _status("VmRSS")["VmRSS"]
    if option == "no-arena":
        arena_off()
    if option == "no-paging":
        onnxgen.runtime.page_on_demand = lambda path, random: 0
    start = time.perf_counter()
    model = onnxgen.load(folder, threads=threads, mapped_weights=option == "mapped-weights")
    load_s = time.perf_counter() - start
    loaded = _status("VmRSS", "VmHWM")
    reset_peak_rss()  # the next peak is the decode's own
    prompt = np.random.default_rng(0).integers(0, model.dims.vocab_size, size=(1, PROMPT)).tolist()
    opts = model.options(max_new_tokens=NEW, eos_token_id=None, min_new_tokens=0)
    speeds = []
    for call in range(CALLS + 1):
        model.generate(prompt, opts)
        if call:
            speeds.append(model.last_stats.decode_tokens_per_s)
    after = _status("VmRSS", "VmHWM") | _status("Anonymous", "Pss", source="smaps_rollup")
    result = {"model_file_mb": model.folder.weight_bytes / 2**20, "rss_before_load_mb": before, "load_peak_mb": loaded["VmHWM"],
              "rss_loaded_mb": loaded["VmRSS"], "decode_peak_mb": after["VmHWM"], "rss_after_mb": after["VmRSS"],
              "anonymous_after_mb": after["Anonymous"], "pss_after_mb": after["Pss"],
              "load_s": load_s, "decode_tokens_per_s": statistics.median(speeds)}
    if hold:  # a replica: report, then keep the model loaded until the parent has measured every replica
        print(json.dumps(result), flush=True)
        sys.stdin.read()
    return result


GGUF = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # llama.cpp's counterpart of each variant


def prepare_gguf(name: str, checkpoint: Path, work: Path, python: str, source: Path) -> dict[str, Path]:
    """llama.cpp's files for one model shape, made if missing: f32 and Q8_0 by its converter (run here, where
    torch and transformers are), Q4_0 by its quantizer (through llama-cpp-python)."""
    import os
    import tempfile

    out = work / "llama.cpp"
    out.mkdir(parents=True, exist_ok=True)
    files = {variant: out / f"{name}-{kind}.gguf" for variant, kind in GGUF.items()}
    with tempfile.TemporaryDirectory() as staging:
        # The converter reads GPT-2's context length as `n_ctx`, which transformers no longer writes.
        for item in checkpoint.iterdir():
            if item.name != "config.json":
                (Path(staging) / item.name).symlink_to(item.resolve())
        config = json.loads((checkpoint / "config.json").read_text())
        (Path(staging) / "config.json").write_text(json.dumps({**config, "n_ctx": config["n_positions"]}))
        env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
        for variant in ("fp32", "int8"):
            if not files[variant].exists():
                subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), staging, "--outtype", GGUF[variant],
                                "--outfile", str(files[variant])], env=env, check=True, capture_output=True)
    if not files["int4"].exists():
        quantize = ("import ctypes, sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
                    "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0; "
                    "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))")
        subprocess.run([python, "-c", quantize, str(files["fp32"]), str(files["int4"])], check=True, capture_output=True)
    return files


def child_llama(gguf: Path, threads: int) -> dict[str, Any]:
    """The same measures for llama.cpp (run by the interpreter that has llama-cpp-python)."""
    import random

    from llama_cpp import Llama

    before = _status("VmRSS")["VmRSS"]
    start = time.perf_counter()
    llm = Llama(str(gguf), n_ctx=PROMPT + NEW, n_batch=PROMPT, n_ubatch=PROMPT, n_threads=threads, verbose=False)
    load_s = time.perf_counter() - start
    loaded = _status("VmRSS", "VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # bench.reset_peak_rss's, in an interpreter without onnxgen
    prompt = [random.Random(0).randrange(llm.n_vocab()) for _ in range(PROMPT)]
    speeds = []
    for call in range(CALLS + 1):
        llm.reset()
        stamps = []
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):  # greedy
            stamps.append(time.perf_counter())
            if len(stamps) == NEW:
                break
        if call:
            speeds.append((NEW - 1) / (stamps[-1] - stamps[0]))
    after = _status("VmRSS", "VmHWM") | _status("Anonymous", "Pss", source="smaps_rollup")
    return {"model_file_mb": gguf.stat().st_size / 2**20, "rss_before_load_mb": before, "load_peak_mb": loaded["VmHWM"],
            "rss_loaded_mb": loaded["VmRSS"], "decode_peak_mb": after["VmHWM"], "rss_after_mb": after["VmRSS"],
            "anonymous_after_mb": after["Anonymous"], "pss_after_mb": after["Pss"],
            "load_s": load_s, "decode_tokens_per_s": statistics.median(speeds)}


def run_case(case: dict[str, Any], threads: int, llama_python: str | None) -> dict[str, Any]:
    if case["head"] == "llama.cpp":
        cmd = [llama_python, __file__, "--child-llama", str(case["folder"])]
    else:
        cmd = [sys.executable, __file__, "--child", str(case["folder"]), "--option", case["option"]]
    out = subprocess.run([*cmd, "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Memory figures hardly move between runs: their maximum; speed and load time: the median."""
    keys = samples[0].keys()
    return {k: (statistics.median if k in ("decode_tokens_per_s", "load_s") else max)(s[k] for s in samples) for k in keys} | {
        "decode_tokens_per_s_all": [s["decode_tokens_per_s"] for s in samples]}


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Peak memory against the model file (issue 16)", "",
        f"{results['host']}; onnxruntime {results['onnxruntime']}; {results['threads']} threads, batch 1, {PROMPT}-token prompt, "
        f"{NEW} greedy tokens; each case in a process of its own, the cases in turns for {results['runs']} rounds "
        f"(memory: the largest of the rounds; speed, load: the median). `{results['command']}`", "",
        "Peak = the process's VmHWM over load and decode; decode peak = VmHWM reset after the load; x file = over "
        "model.onnx + model.onnx.data.", "",
        "| model | head (or runtime) | option | file MiB | before load | load peak | decode peak | peak x file | after | of it anonymous | load s | tok/s | tok/s vs onnxgen, head whole |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in results["cases"]:
        r = case["result"]
        base = next((c["result"] for c in results["cases"] if c["model"] == case["model"] and c["variant"] == case["variant"].split("-")[0]
                     and c["head"] == "whole" and c["option"] == "default"), None)
        ratio = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.3f}" if base else "-"
        peak = max(r["load_peak_mb"], r["decode_peak_mb"])
        lines.append(f"| {case['model']} {case['variant']} | {case['head']} | {case['option']} | {r['model_file_mb']:.0f} | "
                     f"{r['rss_before_load_mb']:.0f} | {r['load_peak_mb']:.0f} | {r['decode_peak_mb']:.0f} | "
                     f"{peak / r['model_file_mb']:.2f} | {r['rss_after_mb']:.0f} | {r['anonymous_after_mb']:.0f} | {r['load_s']:.2f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {ratio} |")
    if results.get("replicas"):
        lines += ["", f"{results['replicas'][0]['replicas']} processes loading one folder at once (each decodes one call, then all "
                  "hold): the machine's memory for them is the sum of their PSS.", "",
                  "| model | option | file MiB | sum of PSS MiB | per process | anonymous per process |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in results["replicas"]:
            lines.append(f"| {r['model']} {r['variant']} | {r['option']} | {r['model_file_mb']:.0f} | {r['pss_sum_mb']:.0f} | "
                         f"{r['pss_sum_mb'] / r['replicas']:.0f} | {r['anonymous_mean_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def replicas(folder: Path, count: int, option: str, threads: int) -> dict[str, Any]:
    """`count` processes load `folder` at once and decode one call each; measured once all of them hold."""
    cmd = [sys.executable, __file__, "--child", str(folder), "--option", option, "--threads", str(threads), "--hold"]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    try:
        results = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]  (each prints, then holds)
        memory = [_status("Pss", "Anonymous", source="smaps_rollup", pid=str(p.pid)) for p in procs]
    finally:
        for p in procs:
            p.communicate()  # closes its stdin: it exits
    return {"replicas": count, "option": option, "model_file_mb": results[0]["model_file_mb"],
            "pss_sum_mb": sum(m["Pss"] for m in memory), "anonymous_mean_mb": statistics.mean(m["Anonymous"] for m in memory)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gpt2"])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--checkpoints", type=Path, default=HERE / "models", help="make_models.py's output")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--llama-cpp", metavar="PYTHON", help="an interpreter with llama-cpp-python: adds llama.cpp's cases")
    ap.add_argument("--llama-cpp-source", type=Path, help="llama.cpp's source tree (convert_hf_to_gguf.py, gguf-py)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-llama", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--option", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--replicas", type=int, default=0, help="also load the int8 and int4 folders in this many processes at once")
    ap.add_argument("--out", default="footprint", help="results/OUT.json and .md (a partial run: name it apart)")
    args = ap.parse_args()
    if args.child:
        result = child(args.child, args.option, args.threads, args.hold)
        if not args.hold:
            print(json.dumps(result))
        return
    if args.child_llama:
        print(json.dumps(child_llama(args.child_llama, args.threads)))
        return
    if args.llama_cpp and not args.llama_cpp_source:
        ap.error("--llama-cpp needs --llama-cpp-source")

    import onnxruntime

    from onnxgen import prepacked
    from onnxgen.bench import machine
    from onnxgen.folder import ModelFolder

    cases = []
    for name in args.models:
        folders = prepare(name, args.checkpoints / name, HERE / "exports" / name)
        for variant in args.variants:
            cases += [{"model": name, "variant": variant, "head": head, "option": "default", "folder": folders[head, variant]}
                      for head in HEADS if (head, variant) in folders]
            cases += [{"model": name, "variant": variant, "head": "parts", "option": o, "folder": folders["parts", variant]}
                      for o in args.options if o != "default" and variant in BASE]  # the other variants are an option each
        if args.llama_cpp:
            ggufs = prepare_gguf(name, args.checkpoints / name, HERE / "exports" / name, args.llama_cpp, args.llama_cpp_source)
            cases += [{"model": name, "variant": variant, "head": "llama.cpp", "option": GGUF[variant], "folder": ggufs[variant]}
                      for variant in args.variants if variant in GGUF]
    if args.prepare_only:
        return
    for case in cases:
        if case["option"] == "mapped-weights":  # its copy packed for this machine, made once before the runs
            subprocess.run([sys.executable, "-c", "import onnxgen, sys; onnxgen.load(sys.argv[1], mapped_weights=True)", str(case["folder"])], check=True)
            evict(prepacked.location(ModelFolder.read(Path(case["folder"])), onnxruntime))
        evict(Path(case["folder"]))
    samples: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(cases))}
    for round_ in range(args.runs):
        order = list(range(len(cases)))
        for i in order if round_ % 2 == 0 else reversed(order):
            samples[i].append(run_case(cases[i], args.threads, args.llama_cpp))
            print(f"round {round_ + 1}/{args.runs} {cases[i]['model']} {cases[i]['variant']} {cases[i]['head']} {cases[i]['option']}: "
                  f"{samples[i][-1]}", file=sys.stderr)
    shared = [{"model": name, "variant": variant, **replicas(HERE / "exports" / name / f"memory-parts-{variant}", args.replicas, option, args.threads)}
              for name in args.models for variant in ("int8", "int4") for option in ("default", "mapped-weights")] if args.replicas else []
    command = " ".join(["python benchmarks/footprint.py", *(a if not a.startswith("/") else Path(a).name.upper() for a in sys.argv[1:])])
    results = {"command": command, "host": machine(), "onnxruntime": onnxruntime.__version__, "threads": args.threads,
               "runs": args.runs, "models": args.models,
               "cases": [{**{k: v for k, v in c.items() if k != "folder"}, "result": summarize(samples[i])} for i, c in enumerate(cases)],
               "replicas": shared}
    out = HERE / "results"
    (out / f"{args.out}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{args.out}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
