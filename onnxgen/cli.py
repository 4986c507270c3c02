"""The `onnxgen` command: export, quantize, generate, chat, score, detect-watermark, bench, serve, run-batch, verify. Results on stdout, progress and errors on
stderr. Every error is one line, `onnxgen: error: ...`: exit 2 for a usage error, 1 for anything else, 130 on
Ctrl-C. No traceback reaches the user unless ONNXGEN_DEBUG=1 is set.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import warnings
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

try:
    import typer
except ImportError:  # the embedding install (`pip install onnxgen onnxruntime`) has the API, not the command line
    sys.exit("onnxgen: error: the command line needs typer and rich: pip install 'onnxgen[cpu]' (or 'onnxgen[gpu]', or 'onnxgen[cli]')")

from .errors import AdapterWarning, ContextLengthError, IgnoredOptionWarning, OnnxgenError, PerformanceWarning
from .options import STRATEGIES, GenerationOptions, under_key
from .tools import PARSERS

if TYPE_CHECKING:
    from .generator import Completion

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="GPT-2 text generation on onnxruntime: export, quantize, generate, chat, serve, bench.")


def _version(asked: bool) -> None:
    """--version: onnxgen's, and the onnxruntime it runs on with its providers (what a bug report needs)."""
    if asked:
        from . import __version__
        from .runtime import import_onnxruntime

        onnxruntime = run(import_onnxruntime)  # one line of error where none, or two, are installed
        print(f"onnxgen {__version__}, onnxruntime {onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="print the versions of onnxgen and onnxruntime, and exit")] = False) -> None:
    pass


ModelOption = Annotated[Path | None, typer.Option("--model", "-m", help="model folder (default: the bundled small model)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
MappedWeightsOption = Annotated[bool, typer.Option(
    "--mapped-weights", help="CPU: map the weights, packed once for this machine into a cached file ($ONNXGEN_CACHE), "
                             "instead of packing a private copy: every process that loads the folder shares one")]
ChatTemplateOption = Annotated[Path | None, typer.Option(
    "--chat-template", help="a Jinja chat template file, used instead of the checkpoint's (or where it had none)")]
AdapterOption = Annotated[list[str] | None, typer.Option(
    "--adapter", help="a LoRA adapter folder (onnxgen export ADAPTER --lora) for a model exported with --lora: NAME=FOLDER, or FOLDER "
    "named after it")]
ToolCallParserOption = Annotated[str | None, typer.Option(
    "--tool-call-parser", help="hermes: the model writes tool calls as <tool_call>{...}</tool_call> (Hermes-style fine-tunes); "
    "tool_choice \"auto\" then reads them (vLLM's)")]
WatermarkKeyOption = Annotated[int | None, typer.Option(
    envvar="ONNXGEN_WATERMARK_KEY", help="watermark the text under this private key (transformers' watermark, the folder's "
    "watermarking_config or transformers' defaults otherwise; detect-watermark finds it)", show_default=False)]
CudaGraphOption = Annotated[bool, typer.Option("--cuda-graph", help="CUDA: replay the decode step as one captured CUDA graph (a folder with the cache in place)")]


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"onnxgen: error: {' '.join(message.split())}", file=sys.stderr)
    raise typer.Exit(code)


def run(action: Any) -> Any:
    """Run a command body: onnxgen's own errors become one line on stderr (main() handles the rest)."""
    try:
        return action()
    except OnnxgenError as e:
        fail(str(e))


def _export_stack() -> None:
    """Refuse at once, naming the fix, where the export stack is not installed. Looked up, not imported: importing
    transformers (and torch with it) takes seconds, which a quantize run, or a command refused for its arguments,
    never needs."""
    from importlib.util import find_spec

    from .runtime import import_onnxruntime

    run(import_onnxruntime)
    try:
        installed = all(find_spec(name) for name in ("optimum.exporters.onnx", "transformers", "onnx"))
    except ImportError:  # find_spec imports a dotted name's parents: optimum itself missing
        installed = False
    if not installed:
        fail("export and quantize need the export stack: pip install 'onnxgen[export,cpu]' (or 'onnxgen[export,gpu]')")


def _size(folder_manifest: dict[str, Any]) -> str:
    return f"{sum(f['bytes'] for f in folder_manifest['files'].values()) / 1e6:.1f} MB"


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="hub id (gpt2, gpt2-large, ...) or local transformers folder; or a PEFT adapter's "
                                              "(LoRA, ...), merged into its base model; or a nanoGPT (ckpt.pt) or llm.c (.bin) checkpoint")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder to create")],
    revision: Annotated[str | None, typer.Option(help="hub id: the branch, tag or commit to export (default: main); "
                                                 "the manifest records the commit either way")] = None,
    base: Annotated[str | None, typer.Option(help="a PEFT adapter's base model (hub id or folder), where not the one its "
                                             "adapter_config.json names")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="a nanoGPT or llm.c checkpoint's tokenizer: hub id or folder (default: gpt2, "
                                                  "GPT-2's own, which both encode with)")] = None,
    force: Annotated[bool, typer.Option(help="replace OUTPUT if it exists")] = False,
    optimize: Annotated[bool, typer.Option(help="fuse LayerNorm/Gelu with onnxruntime's GPT-2 optimizer")] = True,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: optimum's)")] = None,
    growing_cache: Annotated[bool, typer.Option(help="MultiHeadAttention with a cache copied one position longer each step, "
                                                "instead of GroupQueryAttention writing in place: for fp32/int4 on CUDA, and optimum's runtime")] = False,
    external_data_threshold: Annotated[int, typer.Option(help="weights above this many bytes go to model.onnx.data (default: always; onnxruntime maps that file instead of copying it)")] = 0,
    lora: Annotated[bool, typer.Option("--lora", help="a model: take LoRA adapters at run time (--adapter), each row its own; a PEFT "
                                       "LoRA adapter: export it apart, as an adapter folder for such a model, instead of merged")] = False,
    as_json: JsonOption = False,
) -> None:
    """Export a GPT-2 checkpoint to a validated ONNX model folder (or, with --lora, a LoRA adapter to an adapter folder)."""
    _export_stack()
    from .export import ExportOptions, export as do_export

    options = ExportOptions(optimize=optimize, opset=opset, cache_in_place=not growing_cache, external_data_threshold=external_data_threshold,
                            force=force, revision=revision, base=base, tokenizer=tokenizer, lora=lora)
    result = run(lambda: do_export(model, output, options))
    if as_json:
        print(json.dumps(result, indent=2))
    elif result.get("kind") == "lora":
        print(f"exported the LoRA adapter {model} to {output} ({_size(result)}, rank {result['lora']['rank']}, "
              f"{len(result['lora']['targets'])} kinds of layer); load it beside its base: --adapter {output}")
    else:
        v = result["validation"]
        diff = max(v["max_abs_diff_prompt"], v["max_abs_diff_cached_step"])
        print(f"exported {model} to {output} ({_size(result)}); logits match PyTorch within {diff:.1e}")


class Mode(str, Enum):
    int8 = "int8"
    int4 = "int4"
    fp16 = "fp16"


class KvCache(str, Enum):
    float = "float"
    int8 = "int8"


@app.command()
def quantize(
    model: Annotated[Path, typer.Option("--model", "-m", help="fp32 folder made by `onnxgen export`")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder to create")],
    mode: Annotated[Mode, typer.Option(help="int8 (dynamic), int4 (weight-only MatMulNBits) or fp16 (for CUDA)")] = Mode.int8,
    per_channel: Annotated[bool, typer.Option(help="int8: one scale per output channel")] = False,
    block_size: Annotated[int, typer.Option(help="int4: weights per scale")] = 32,
    accuracy_level: Annotated[int, typer.Option(help="int4: compute type, 4 = int8 (fastest on CPU), 1 = fp32")] = 4,
    float16: Annotated[bool, typer.Option("--float16", help="int4: fp16 around the int4 weights (activations, cache): the int4 folder for CUDA")] = False,
    max_ppl_increase: Annotated[float, typer.Option(help="refuse if perplexity on the evaluation text grows by more than this fraction")] = 0.10,
    provider: Annotated[str, typer.Option(help="where the accuracy check runs: cpu or cuda")] = "cpu",
    kv_cache: Annotated[KvCache, typer.Option(help="int8: keep the key/value cache in int8 (CPU; a quarter of the memory)")] = KvCache.float,
    force: Annotated[bool, typer.Option(help="replace OUTPUT if it exists")] = False,
    as_json: JsonOption = False,
) -> None:
    """Make an int8, int4 or fp16 variant and report what it costs in accuracy."""
    _export_stack()
    from .quantize import QuantizeOptions, quantize as do_quantize, summary

    options = QuantizeOptions(mode=mode.value, per_channel=per_channel, block_size=block_size,
                              accuracy_level=accuracy_level, float16=float16, max_ppl_increase=max_ppl_increase,
                              provider=provider, kv_cache=kv_cache.value, force=force)  # type: ignore[arg-type]
    result = run(lambda: do_quantize(model, output, options))
    print(json.dumps(result, indent=2) if as_json else summary(result))


Strategy = Enum("Strategy", {name.replace("-", "_"): name for name in STRATEGIES}, type=str)  # type: ignore[misc]


def strategy_options(strategy: Strategy | None, given: dict[str, Any]) -> dict[str, Any]:
    """What a --strategy means (onnxgen.options.STRATEGIES), with explicitly given options taking precedence."""
    explicit = {k: v for k, v in given.items() if v is not None and v != []}
    return {**(STRATEGIES[strategy.value] if strategy else {}), **explicit}


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="text to continue (- reads it from standard input)")],
    model: ModelOption = None,
    strategy: Annotated[Strategy | None, typer.Option(help="decoding preset (default: the model's generation_config)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option()] = None,
    min_new_tokens: Annotated[int | None, typer.Option()] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    top_k: Annotated[int | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    min_p: Annotated[float | None, typer.Option(help="sampling: drop tokens less likely than this x the most likely one")] = None,
    typical_p: Annotated[float | None, typer.Option(help="sampling: locally typical sampling's mass")] = None,
    epsilon_cutoff: Annotated[float | None, typer.Option(help="sampling: drop tokens less likely than this")] = None,
    eta_cutoff: Annotated[float | None, typer.Option(help="sampling: eta-sampling's epsilon (a cut that follows the row's entropy)")] = None,
    num_beams: Annotated[int | None, typer.Option()] = None,
    num_beam_groups: Annotated[int | None, typer.Option(help="diverse beam search: the beams in this many groups, each "
                                                        "kept from the tokens earlier groups take (with --diversity-penalty)")] = None,
    diversity_penalty: Annotated[float | None, typer.Option(help="diverse beam search: taken off a token's log-probability for "
                                                            "each beam of an earlier group that took it this step")] = None,
    length_penalty: Annotated[float | None, typer.Option()] = None,
    penalty_alpha: Annotated[float | None, typer.Option(help="contrastive search (with --top-k > 1, greedy): weighs each of the "
                                                        "top-k tokens' likeness to the text so far against its probability (0.6 usual)")] = None,
    num_return_sequences: Annotated[int | None, typer.Option()] = None,
    repetition_penalty: Annotated[float | None, typer.Option()] = None,
    no_repeat_ngram_size: Annotated[int | None, typer.Option()] = None,
    presence_penalty: Annotated[float | None, typer.Option(help="OpenAI's: lowers every token generated so far")] = None,
    frequency_penalty: Annotated[float | None, typer.Option(help="OpenAI's: lowers each token by how often it was generated")] = None,
    dry_multiplier: Annotated[float | None, typer.Option(help="DRY: lowers a token that would extend a repeat of earlier text, "
                                                         "more the longer the repeat (0.8 is usual; llama.cpp's)")] = None,
    dry_base: Annotated[float | None, typer.Option(help="DRY: the penalty's growth per token of repeat")] = None,
    dry_allowed_length: Annotated[int | None, typer.Option(help="DRY: repeats this long go free")] = None,
    xtc_probability: Annotated[float | None, typer.Option(help="sampling: XTC's chance a step of excluding the most likely tokens")] = None,
    xtc_threshold: Annotated[float | None, typer.Option(help="sampling: XTC excludes the tokens this likely, but the least of them")] = None,
    top_n_sigma: Annotated[float | None, typer.Option(help="sampling: keep the tokens scored within this many standard deviations "
                                                      "of the scores below the best (1.0 is usual)")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    max_time: Annotated[float | None, typer.Option(help="seconds: end the text after this long (finish reason time)")] = None,
    logprobs: Annotated[int | None, typer.Option(help="with --json: each token's log-probability and this many alternatives")] = None,
    prompt_lookup_num_tokens: Annotated[int | None, typer.Option(help="prompt lookup decoding: guess this many tokens a step from "
                                                                 "the text so far (same text, fewer steps where it repeats its input)")] = None,
    assistant_model: Annotated[Path | None, typer.Option(help="assisted generation: a smaller model folder with the same tokenizer "
                                                         "drafts tokens (same text, fewer steps where it agrees)")] = None,
    truncate_prompt: Annotated[bool | None, typer.Option("--truncate-prompt", help="drop the oldest prompt tokens if too long")] = None,
    token_healing: Annotated[bool | None, typer.Option("--token-healing", help="a prompt ending in a space or mid-word: its last "
                                                       "token is chosen again with the first new one (the text still follows it)")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="classifier-free guidance: above 1 the text keeps closer to the "
                                                         "prompt and away from --negative-prompt (a second pass a step)")] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="classifier-free guidance: the text to steer away from "
                                                        "(default: the prompt's last token)")] = None,
    json_schema: Annotated[str | None, typer.Option(help="a JSON schema, or a file holding one: the text is JSON it allows")] = None,
    regex: Annotated[str | None, typer.Option(help="a regular expression the whole text matches")] = None,
    grammar: Annotated[str | None, typer.Option(help="a file holding a Lark grammar (llguidance's) the text follows")] = None,
    adapter: AdapterOption = None,
    provider: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads (default: all cores)")] = None,
    mapped_weights: MappedWeightsOption = False,
    cuda_graph: CudaGraphOption = False,
    watermark_key: WatermarkKeyOption = None,
    stats: Annotated[bool, typer.Option("--stats", help="print tokens, time to first token and tok/s on stderr")] = False,
    as_json: JsonOption = False,
) -> None:
    """Continue PROMPT, streaming the text to stdout as it is produced."""
    from . import load

    given = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, min_p=min_p, typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff, num_beams=num_beams,
                 num_beam_groups=num_beam_groups, diversity_penalty=diversity_penalty, length_penalty=length_penalty, penalty_alpha=penalty_alpha, num_return_sequences=num_return_sequences,
                 repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size, presence_penalty=presence_penalty,
                 frequency_penalty=frequency_penalty, dry_multiplier=dry_multiplier, dry_base=dry_base, dry_allowed_length=dry_allowed_length,
                 xtc_probability=xtc_probability, xtc_threshold=xtc_threshold, top_n_sigma=top_n_sigma, stop=stop, seed=seed, max_time=max_time, logprobs=logprobs,
                 prompt_lookup_num_tokens=prompt_lookup_num_tokens, truncate_prompt=truncate_prompt, token_healing=token_healing, regex=regex,
                 guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                 json_schema=json_schema if json_schema is None or json_schema.lstrip().startswith("{") else _read(json_schema),
                 grammar=None if grammar is None else _read(grammar))

    if prompt == "-":
        prompt = _read(prompt)

    def body() -> None:
        # A model and its draft take turns: neither's threads may spin on after its run (load's `spinning`).
        spinning = assistant_model is None
        adapters = _one_adapter(adapter)
        m = load(model, provider=provider, threads=threads, mapped_weights=mapped_weights, cuda_graph=cuda_graph, spinning=spinning,  # type: ignore[arg-type]
                 adapters=adapters)
        draft = None if spinning else load(assistant_model, provider=provider, threads=threads, spinning=False)  # type: ignore[arg-type]
        opts = m.options(**strategy_options(strategy, given), **({"assistant_model": draft} if draft is not None else {}),
                         **_watermarked(m.defaults, watermark_key), adapter=next(iter(adapters), None))
        if as_json:
            completions = m.generate(prompt, opts)
            print(json.dumps({"prompt": prompt, "completions": [_json_completion(c) for c in completions],
                              "stats": asdict(m.last_stats) if m.last_stats else None}, indent=2))
        elif opts.num_beams == 1 and opts.num_return_sequences == 1:
            for piece in m.stream(prompt, opts):
                if piece:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()  # before --stats writes to stderr, or a terminal shows them on one line
        else:
            completions = m.generate(prompt, opts)
            for i, c in enumerate(completions):
                if len(completions) > 1:
                    print(f"--- {i + 1} of {len(completions)} ({c.finish_reason})")
                print(c.text)
        if stats and m.last_stats:
            s = m.last_stats
            print(f"{s.prompt_tokens} prompt tokens, {s.new_tokens} new tokens; time to first token "
                  f"{s.time_to_first_token_s * 1000:.1f} ms; decode {s.decode_tokens_per_s:.1f} tok/s; total {s.total_s:.2f} s"
                  + (f"; {s.guesses_taken} of {s.guessed_tokens} guesses taken" if s.guessed_tokens else ""),
                  file=sys.stderr)

    run(body)


def _watermarked(defaults: GenerationOptions, key: int | None) -> dict[str, Any]:
    """generate's and chat's --watermark-key as a call's option (none without a key)."""
    return {} if key is None else {"watermarking_config": under_key(defaults.watermarking_config, key)}


def _json_completion(completion: Completion) -> dict[str, Any]:
    """A Completion as --json writes it: its log-probabilities as JSON holds them (generator.for_json)."""
    from .generator import for_json

    written = asdict(completion)
    if completion.logprobs is not None:
        written["logprobs"], written["top_logprobs"] = for_json(completion.logprobs, completion.top_logprobs or [])
    return written


def _one_adapter(specs: list[str] | None) -> dict[str, Path]:
    """generate's, chat's and score's --adapter: at most one, which the call runs with."""
    from .adapters import named

    if specs and len(specs) > 1:
        fail("--adapter: one adapter for this command (serve and run-batch take several)")
    return named(specs or [])


def _read(name: str, what: str = "") -> str:
    """A text file's contents, or standard input's for -; `what` names it in the error."""
    try:
        return sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read {what}{name}: {e.strerror if isinstance(e, OSError) else 'not UTF-8 text'}")


@app.command()
def chat(
    model: ModelOption = None,
    system: Annotated[str | None, typer.Option(help="the system message that opens the conversation")] = None,
    strategy: Annotated[Strategy | None, typer.Option(help="decoding preset (default: the model's generation_config)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="at most this many tokens a reply")] = 256,
    temperature: Annotated[float | None, typer.Option()] = None,
    top_k: Annotated[int | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    repetition_penalty: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    provider: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads (default: all cores)")] = None,
    prompt_cache_mib: Annotated[int, typer.Option(min=0, help="CPU: MiB of the last turn's key/value cache kept, so that a turn "
                                                  "computes only its new tokens (0: none)")] = 0,
    chat_template: ChatTemplateOption = None,
    adapter: AdapterOption = None,
    watermark_key: WatermarkKeyOption = None,
) -> None:
    """Talk with a chat model (a checkpoint with a chat template), a line a turn.

    Each line on standard input is a turn of yours; the reply streams to stdout, and the conversation so far goes
    through the template with each turn. Ends at the end of input."""
    from . import load

    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, seed=seed)
    interactive = sys.stdin.isatty()

    def body() -> None:
        adapters = _one_adapter(adapter)
        m = load(model, provider=provider, threads=threads, prompt_cache_mib=prompt_cache_mib,  # type: ignore[arg-type]
                 chat_template=_template_file(chat_template), adapters=adapters)
        opts = m.options(**strategy_options(strategy, given), **_watermarked(m.defaults, watermark_key), adapter=next(iter(adapters), None))
        messages = [{"role": "system", "content": system}] if system else []
        if not m.has_chat_template:
            fail(f"onnxgen chat needs a model whose checkpoint has a chat template; {m.folder.path.name!r} has none: use onnxgen "
                 "generate, or give one with --chat-template FILE")
        try:  # before any turn: a template that does not parse, or refuses a system message
            m.apply_chat_template([*messages, {"role": "user", "content": "Hi"}])
        except OnnxgenError as e:
            fail(f"onnxgen chat: {e}")
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            try:
                pieces = m.stream(m.apply_chat_template(messages), opts)  # checked now, before any piece
            except ContextLengthError:
                fail(f"the conversation no longer fits the context window of {m.context_length} tokens with a reply of "
                     f"{opts.max_new_tokens}: start a new one, or lower --max-new-tokens")
            reply = ""
            for piece in pieces:
                reply += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": reply})

    run(body)


@app.command()
def score(
    files: Annotated[list[str], typer.Argument(help="text files to score (- reads standard input)", show_default=False)],
    model: ModelOption = None,
    stride: Annotated[int | None, typer.Option(help="a text past the context window is scored in windows this many tokens "
                                               "apart (default: half the window)")] = None,
    provider: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads (default: all cores)")] = None,
    adapter: AdapterOption = None,
    as_json: JsonOption = False,
) -> None:
    """Each text's perplexity under the model: its tokens' log-probabilities, each given the tokens before it."""
    from . import load
    from .progress import counter

    def body() -> None:
        adapters = _one_adapter(adapter)
        m = load(model, provider=provider, threads=threads, adapters=adapters)  # type: ignore[arg-type]
        results = []
        for name in files:
            text = _read(name)
            with counter(f"Scoring {name}") as progress:
                s = m.score(text, stride=max(1, m.context_length // 2) if stride is None else stride, progress=progress,
                            adapter=next(iter(adapters), None))[0]
            scored = len(s.token_ids) > 1  # a text of one token has none scored (the first is given nothing): no perplexity
            results.append({"file": name, "tokens": len(s.token_ids), "total_logprob": s.total, "perplexity": s.perplexity if scored else None})
            if not as_json:
                said = f"perplexity {s.perplexity:.3f}" if scored else "no perplexity (one token: the first is not scored)"
                print(f"{name}: {len(s.token_ids)} tokens, {said} (log-probability {s.total:.1f})")
        if as_json:
            print(json.dumps(results, indent=2))

    run(body)


@app.command("detect-watermark")
def detect_watermark(
    files: Annotated[list[str], typer.Argument(help="text files, each a generated text without its prompt (- reads standard input)",
                                               show_default=False)],
    model: ModelOption = None,
    watermark_key: Annotated[int | None, typer.Option(envvar="ONNXGEN_WATERMARK_KEY", show_default=False, help="the private key "
                                                      "the text was written under (generate and serve's --watermark-key)")] = None,
    z_threshold: Annotated[float, typer.Option(help="a z-score above this says watermarked")] = 3.0,
    ignore_repeated_ngrams: Annotated[bool, typer.Option("--ignore-repeated-ngrams", help="a token after the same context counts once")] = False,
    as_json: JsonOption = False,
) -> None:
    """Whether each text was written under the watermark (generate --watermark-key): its share of green tokens and
    how unlikely that is without the key."""
    from . import load

    def body() -> None:
        m = load(model, threads=1)
        config = under_key(m.defaults.watermarking_config, watermark_key) if watermark_key is not None else None
        results = []
        for name in files:
            found = m.detect_watermark(_read(name), config, z_threshold, ignore_repeated_ngrams)[0]
            results.append({"file": name, **asdict(found)})
            if not as_json:
                print(f"{name}: {'watermarked' if found.prediction else 'not watermarked'} (z-score {found.z_score:.2f}, p-value "
                      f"{found.p_value:.2g}; {found.num_green_tokens} of {found.num_tokens_scored} tokens green)")
        if as_json:
            print(json.dumps(results, indent=2))

    run(body)


@app.command()
def bench(
    model: ModelOption = None,
    batch: Annotated[list[int] | None, typer.Option(help="batch size (repeatable)")] = None,
    prompt_tokens: Annotated[list[int] | None, typer.Option(help="prompt length (repeatable)")] = None,
    new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 128,
    strategy: Annotated[list[str] | None, typer.Option(help=f"{', '.join(STRATEGIES)} (repeatable)")] = None,
    runs: Annotated[int, typer.Option(help="timed runs per case (after one warm-up)")] = 3,
    provider: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads (default: all cores)")] = None,
    mapped_weights: MappedWeightsOption = False,
    cuda_graph: CudaGraphOption = False,
    adapter: Annotated[Path | None, typer.Option(help="a LoRA adapter folder every call runs with (a model exported with --lora)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Time a model folder: decode tok/s, time to first token, load time, peak memory."""
    from rich.console import Console

    from . import bench as b
    from .model import BUNDLED

    cases = [b.Case(n, p, new_tokens, s) for n in batch or [1] for p in prompt_tokens or [32] for s in strategy or ["greedy"]]
    result = run(lambda: b.run(model or BUNDLED, cases, runs, threads, provider, mapped_weights=mapped_weights, cuda_graph=cuda_graph,  # type: ignore[arg-type]
                               adapter=adapter))
    if as_json:
        print(json.dumps(result, indent=2))
    else:  # piped or redirected, rich would fit the table to 80 columns and cut its figures short ("260.…")
        Console(width=None if sys.stdout.isatty() else 200).print(b.table(result))


@app.command()
def serve(
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    provider: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads (default: all cores)")] = None,
    mapped_weights: MappedWeightsOption = False,
    cuda_graph: CudaGraphOption = False,
    max_batch: Annotated[int, typer.Option(min=1, help="rows decoded together; a request joins them at the next step")] = 8,
    prefill_chunk: Annotated[int | None, typer.Option(min=1, help="a longer prompt is written this many tokens a step, so that "
                                                      "running requests wait for a part of it (default: 128 on the CPU, 512 on CUDA)")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="the largest max_tokens a request may ask for")] = 1024,
    api_key: Annotated[str | None, typer.Option(envvar="ONNXGEN_API_KEY", help="require Authorization: Bearer KEY")] = None,
    name: Annotated[str | None, typer.Option(help="model name in the API (default: the folder's name)")] = None,
    assistant_model: Annotated[Path | None, typer.Option(help="a draft model folder (same tokenizer) that requests ask for with "
                                                         "the extra field \"assistant_model\": true (assisted generation)")] = None,
    prompt_cache_mib: Annotated[int, typer.Option(min=0, help="MiB of ended requests' key/value caches kept for requests that start "
                                                  "with their tokens (a chat's next turn); 0: none (CPU)")] = 0,
    allowed_origin: Annotated[list[str] | None, typer.Option(help="a web page's origin (https://app.example:8443, or *) whose scripts "
                                                             "may call the server from a browser (CORS); repeatable")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="serve HTTPS with this certificate (PEM; with --ssl-keyfile)")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="the certificate's private key (PEM)")] = None,
    chat_template: ChatTemplateOption = None,
    adapter: Annotated[list[str] | None, typer.Option(help="a LoRA adapter folder served as a model of its own, which a request's "
                                                      "\"model\" names (a model exported with --lora): NAME=FOLDER, or FOLDER named "
                                                      "after it; repeatable")] = None,
    adapter_loading: Annotated[bool, typer.Option("--adapter-loading", help="take LoRA adapters while running: POST "
                                                  "/v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's; behind --api-key)")] = False,
    stored_responses: Annotated[int, typer.Option(min=0, help="finished /v1/responses answers kept in memory for "
                                                  "previous_response_id and GET /v1/responses/ID (0: none)")] = 1000,
    tool_call_parser: ToolCallParserOption = None,
    watermark_key: WatermarkKeyOption = None,
) -> None:
    """Serve OpenAI's completions, chat completions and responses APIs over HTTP.

    POST /v1/completions, /v1/chat/completions and /v1/responses (a model with a chat template); GET /v1/models; POST /tokenize,
    /detokenize; GET /health, /metrics."""
    try:
        import uvicorn

        from .serve import Limits, create_app
    except ImportError:
        fail("serve needs the serve extra: pip install 'onnxgen[serve,cpu]' (or [serve,gpu])")
    from . import load
    from .model import BUNDLED

    if (ssl_certfile is None) != (ssl_keyfile is None):
        fail("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    _check_parser(tool_call_parser)
    tls = _tls(ssl_certfile, ssl_keyfile) if ssl_certfile and ssl_keyfile else {}
    listening = _listen(host, port)
    if api_key is None and not ipaddress.ip_address(listening.getsockname()[0]).is_loopback:
        print(f"onnxgen: warning: {host} takes requests from other machines, and without --api-key anyone who reaches "
              "the port can use the model" + (" and have it read folders of this machine (--adapter-loading)" if adapter_loading else ""),
              file=sys.stderr)
    folder = model or BUNDLED
    spinning = assistant_model is None  # a model and its draft take turns (load's `spinning`)
    template, adapters = _template_file(chat_template), _adapters(adapter, name or folder.name)
    loaded = run(lambda: load(folder, provider=provider, threads=threads, mapped_weights=mapped_weights, cuda_graph=cuda_graph,  # type: ignore[arg-type]
                              spinning=spinning, prompt_cache_mib=prompt_cache_mib, chat_template=template, adapters=adapters))
    draft = None if spinning else run(lambda: load(assistant_model, provider=provider, threads=threads, spinning=False))  # type: ignore[arg-type]
    app_ = run(lambda: create_app(loaded, name or folder.name, api_key, Limits(max_tokens=max_tokens, max_batch=max_batch, prefill_chunk=prefill_chunk),
                                  draft, allowed_origins=allowed_origin, adapter_loading=adapter_loading,
                                  stored_responses=stored_responses, tool_call_parser=tool_call_parser,
                                  watermark_key=watermark_key))
    where = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    print(f"serving {folder} as {name or folder.name!r} on http{'s' if tls else ''}://{where}:{port}/v1", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app_, log_level="warning", **tls)).run(sockets=[listening])


def _tls(certfile: Path, keyfile: Path) -> dict[str, str]:
    """uvicorn's HTTPS options, the pair checked before the model loads: a missing file or a key that is not the
    certificate's is a one-line error, not uvicorn's traceback after a load."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except ssl.SSLError as e:  # an OSError too: first
        fail(f"cannot serve HTTPS with {certfile} and {keyfile}: {e.reason or e}")
    except OSError as e:
        fail(f"cannot serve HTTPS with {certfile} and {keyfile}: {e.strerror or e}")
    return {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)}


@app.command("run-batch")
def run_batch(
    input_file: Annotated[str, typer.Option("--input", "-i", help="OpenAI Batch API requests, a JSON line each (- : standard input)")],
    output: Annotated[str, typer.Option("--output", "-o", help="where the responses go, a JSON line each, in the input's order "
                                        "(- : standard output)")],
    model: ModelOption = None,
    provider: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads (default: all cores)")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="rows decoded together")] = 8,
    max_tokens: Annotated[int, typer.Option(min=1, help="the largest max_tokens a request may ask for")] = 1024,
    name: Annotated[str | None, typer.Option(help="model name the requests may give (default: the folder's name)")] = None,
    chat_template: ChatTemplateOption = None,
    adapter: Annotated[list[str] | None, typer.Option(help="a LoRA adapter folder that a request's \"model\" names (a model exported "
                                                      "with --lora): NAME=FOLDER, or FOLDER named after it; repeatable")] = None,
    tool_call_parser: ToolCallParserOption = None,
    watermark_key: WatermarkKeyOption = None,
    force: Annotated[bool, typer.Option(help="replace OUTPUT if it exists")] = False,
    as_json: JsonOption = False,
) -> None:
    """Answer a file of OpenAI Batch API requests (/v1/completions, /v1/chat/completions, /v1/responses), as vLLM's run-batch.

    Each line: {"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}. The requests run
    together through the server's continuous batcher, in this process; each response is a line of OUTPUT."""
    try:
        from .batch import read, run as run_requests
        from .serve import Limits
    except ImportError:
        fail("run-batch needs the serve extra: pip install 'onnxgen[serve,cpu]' (or [serve,gpu])")
    from . import atomic, load
    from .model import BUNDLED

    _check_parser(tool_call_parser)
    requests = run(lambda: read(input_file))  # what is wrong with the file or the output is said before a model loads
    if output != "-":
        run(lambda: atomic.check_destination(Path(output), force))
    folder, template = model or BUNDLED, _template_file(chat_template)
    adapters = _adapters(adapter, name or folder.name)
    loaded = run(lambda: load(folder, provider=provider, threads=threads, chat_template=template, adapters=adapters))
    counts = run(lambda: run_requests(loaded, requests, output, name or folder.name, Limits(max_tokens=max_tokens, max_batch=max_batch),
                                      force, tool_call_parser=tool_call_parser, watermark_key=watermark_key))
    summary = (f"answered {counts['requests']} requests ({counts['failed']} refused or failed) in {counts['seconds']:.1f} s: "
               f"{counts['prompt_tokens']} prompt and {counts['completion_tokens']} completion tokens")
    print(json.dumps(counts) if as_json else summary, file=sys.stderr if output == "-" else sys.stdout)  # stdout may hold the responses


def _adapters(specs: list[str] | None, served: str) -> dict[str, Path]:
    """serve's and run-batch's --adapter, by name, none named as the model is served (a request's "model" says which)."""
    from .adapters import named

    adapters = run(lambda: named(specs or []))
    if served in adapters:
        fail(f"--adapter: {served!r} is the model's own name here; name the adapter otherwise (NAME=FOLDER)")
    return adapters


def _check_parser(parser: str | None) -> None:
    """--tool-call-parser, checked before a model loads."""
    if parser is not None and parser not in PARSERS:
        fail(f"--tool-call-parser: onnxgen reads {', '.join(PARSERS)}, not {parser!r}")


def _template_file(path: Path | None) -> str | None:
    """--chat-template's text, or one line of error, before a model loads."""
    return None if path is None else _read(str(path), "the chat template ")


def _listen(host: str, port: int) -> socket.socket:
    """serve's socket, bound before the model loads: a port in use or an address this machine does not have is
    a one-line error at once, not uvicorn's log line after a load (a minute for gpt2-large)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        listening = socket.socket(family, kind, proto)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's: a restart need not wait out TIME_WAIT
        listening.bind(address)
    except OSError as e:
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    return listening


@app.command()
def verify(model: ModelOption = None) -> None:
    """Check a model folder against its manifest: files, sizes, sha256, dims, graph and tokenizer (a LoRA adapter
    folder: its files and sha256, and that onnxruntime reads it)."""
    from . import load, manifest
    from .adapters import check_folder
    from .model import BUNDLED

    folder = model or BUNDLED
    if folder.is_dir() and (folder / manifest.MANIFEST).is_file() and run(lambda: manifest.read(folder)).get("kind") == "lora":
        run(lambda: check_folder(folder))
    else:
        run(lambda: load(folder, verify=True))
    print(f"{folder}: every file matches the manifest")


_python_format = warnings.formatwarning


def _warning_line(message: Warning | str, category: type[Warning], *rest: Any) -> str:
    """onnxgen's warnings as the command line prints them: one line, like its errors (Python's format adds the file
    and source line); other libraries' as Python prints them."""
    if issubclass(category, (IgnoredOptionWarning, PerformanceWarning, AdapterWarning)):
        return f"onnxgen: warning: {' '.join(str(message).split())}\n"
    return _python_format(message, category, *rest)


def main() -> None:
    """The console entry point: the one place where an error becomes a line and an exit code."""
    debug = os.environ.get("ONNXGEN_DEBUG") == "1"
    warnings.formatwarning = _warning_line  # type: ignore[assignment]
    try:
        code = app(standalone_mode=False)  # typer turns Ctrl-C inside a command into exit code 130
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    except Exception as e:
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # click's errors (typer vendors click): usage, 2
            if e.format_message():  # empty after `onnxgen` alone, which has shown the help
                print(f"onnxgen: error: {' '.join(e.format_message().split())} (onnxgen --help lists the commands, "
                      "onnxgen COMMAND --help their options)", file=sys.stderr)
            code = e.exit_code
        elif debug:
            raise
        else:  # a bug: say so in one line
            print(f"onnxgen: error: internal error ({type(e).__name__}: {' '.join(str(e).split())}); "
                  "ONNXGEN_DEBUG=1 shows the traceback", file=sys.stderr)
            code = 1
    if code == 130:
        print("onnxgen: error: interrupted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
