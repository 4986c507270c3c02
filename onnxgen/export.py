"""`onnxgen export`: a GPT-2 checkpoint in, a validated onnxgen model folder out.

Steps: load the checkpoint with transformers (a PEFT adapter, such as LoRA, is merged into its base model's weights
with peft: the folder runs as a plain GPT-2; with `lora`, a LoRA adapter is written apart instead, for a base exported
with `lora` to take at run time: export_adapter; a nanoGPT ckpt.pt or an llm.c .bin becomes a GPT2LMHeadModel: nanogpt.py,
llmc.py); export it with optimum's `text-generation-with-past`
task; fuse LayerNorm/Gelu with onnxruntime's GPT-2 optimizer; apply onnxgen's graph edits (graph.py);
save (weights in `model.onnx.data`, which onnxruntime maps into memory, and which protobuf's 2 GB limit
requires past that size anyway);
then compare onnxruntime's logits with PyTorch's before the folder is renamed into place.

optimum's own post-processing is skipped: it re-serializes the whole model in memory to de-duplicate
the tied head, which fails past 2 GB (gpt2-large) with protobuf's C++ backend. graph.py does that
de-duplication on the graph instead.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import platform
import socket
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from . import __version__, atomic, llmc, manifest, nanogpt
from .errors import ExportError, PerformanceWarning
from .folder import (
    ADAPTER_FILE,
    CHAT_TEMPLATE,
    CONFIG,
    DATA_FILE,
    LORA_TARGETS,
    MODEL_FILE,
    TOKENIZER,
    Dims,
    ModelFolder,
    lora_names,
)
from .progress import steps

ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter's folder (LoRA, ...), which names its base model


@dataclass
class ExportOptions:
    optimize: bool = True  # fusions: onnxruntime's (SkipLayerNorm, FastGelu) and ours (MultiHeadAttention)
    # GroupQueryAttention on a buffer per layer written in place (graph.cache_in_place). False keeps
    # MultiHeadAttention's growing cache: what fp32 and int4 folders need on CUDA, where onnxruntime runs
    # GroupQueryAttention in fp16 only, and what optimum's ORTModelForCausalLM can run.
    cache_in_place: bool = True
    opset: int | None = None  # None: optimum's default for GPT-2
    # Bytes of weights above which they go to model.onnx.data. Always, by default: onnxruntime maps that file
    # instead of copying the weights out of the protobuf it parsed (gpt2 int8: peak memory 336 -> 255 MiB).
    external_data_threshold: int = 0
    atol: float = 1e-4  # max abs logit difference against PyTorch for the export to pass
    force: bool = False
    revision: str | None = None  # a hub id's branch, tag or commit (default: its main branch)
    base: str | None = None  # a PEFT adapter's base model, where not the one its adapter_config.json names
    tokenizer: str | None = None  # a nanoGPT or llm.c checkpoint's tokenizer (hub id or folder; default: the hub's gpt2)
    # LoRA at run time. A model: its graph takes an adapter per row (graph.add_lora). A LoRA adapter: written apart,
    # as an adapter folder for such a model, instead of merged into its base.
    lora: bool = False


def _hub_out_of_reach(timeout: float = 10.0) -> bool:
    """Whether the hub's host cannot be reached at all (no name, no route, refused, no answer in huggingface_hub's
    own 10 s), or HF_HUB_OFFLINE says not to try: then a hub id loads from the local cache at once, where
    huggingface_hub would first try 5 times over ~23 s (a minute and more behind a firewall that drops packets).
    Behind a proxy only the proxy knows: not asked."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return False
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError:
        return True
    return False


def _load(source: str, revision: str | None, base: str | None = None, tokenizer: str | None = None,
          apart: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """Load model and fast tokenizer from a hub id (at `revision`) or local folder, with one-line errors; and where
    they came from, as the manifest's source says it. A PEFT adapter comes merged into its base (or `base`), or with
    `apart` as peft's model of the two, unmerged; a nanoGPT checkpoint file with `tokenizer` (GPT-2's by default)."""
    # What the arguments say wrong is refused first: importing transformers (and torch) takes seconds.
    path = Path(source)
    if not path.exists() and source.startswith((".", "/", "~")):  # a path, not a hub id
        raise ExportError(f"{source}: no such folder")
    trainer = nanogpt if nanogpt.is_checkpoint(path) else llmc if llmc.is_checkpoint(path) else None
    adapter_folder = path.exists() and not (path / CONFIG).is_file() and (path / ADAPTER_CONFIG).is_file()
    if trainer is not None:
        if revision is not None or base is not None:
            raise ExportError(f"{source} is a checkpoint file: a revision is for a hub id, a base for a PEFT adapter")
    elif tokenizer is not None:
        raise ExportError(f"{source} has a tokenizer of its own: --tokenizer is for a nanoGPT or llm.c checkpoint file")
    elif path.exists() and revision is not None:
        raise ExportError(f"{source} is a folder: a revision names a commit of a hub id")
    elif path.exists() and not (path / CONFIG).is_file() and not adapter_folder:
        raise ExportError(f"{source} is not a transformers checkpoint folder (no {CONFIG})")
    cached_only = not path.exists() and _hub_out_of_reach()
    if cached_only and not _cached(source, revision):
        from huggingface_hub import constants

        hub = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the hub ({constants.ENDPOINT}) cannot be reached"
        raise ExportError(f"cannot load {source!r}: {hub} and {source!r} is not in the local cache ({constants.HF_HUB_CACHE})")

    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoConfig, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # progress is ours; transformers' notices would interleave with it
    hub_logging.set_verbosity_error()  # and huggingface_hub's: 12 lines of retries where the hub is unreachable
    if trainer is not None:
        return _trained(path, trainer, tokenizer or "gpt2")
    if adapter_folder:
        return _merged(path, source, None, base, apart)
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, local_files_only=cached_only)
    except (OSError, ValueError) as e:
        adapter = None if path.exists() else _hub_adapter(source, revision, cached_only)
        if adapter is not None:
            return _merged(adapter, source, adapter.name, base, apart)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot load {source!r} (unknown model id, no network, or not a checkpoint): {first}") from None
    if config.model_type != "gpt2":
        raise ExportError(f"{source} is a {config.model_type!r} model; onnxgen exports GPT-2 models only")
    if base is not None:
        raise ExportError(f"{source} is a checkpoint: a base model is for a PEFT adapter (a folder with {ADAPTER_CONFIG})")
    # The tokenizer and weights from the commit the config came from: a push to the branch between the three
    # loads would otherwise mix two commits' files.
    revision = config._commit_hash or revision
    tokenizer = _tokenizer(source, revision, cached_only)
    # Eager attention: transformers' SDPA path ignores `scale_attn_weights` and `scale_attn_by_inverse_layer_idx`
    # (transformers#44380, fixed after 4.57), so exported and checked against it, a checkpoint trained with either
    # (stanford-crfm's GPT-2s) would pass validation with the wrong attention scale.
    try:
        model = GPT2LMHeadModel.from_pretrained(source, revision=revision, dtype="float32", attn_implementation="eager",
                                                local_files_only=cached_only).eval()
    except Exception as e:  # no weights file, a damaged one, weights of other shapes than its config says, a config they refuse
        detail = " ".join(str(e).split())[:400] or type(e).__name__  # torch's size mismatches span lines
        raise ExportError(f"cannot load {source}: {detail}") from None
    return model, tokenizer, {"model": source, "commit": config._commit_hash}


def _trained(path: Path, trainer: Any, tokenizer_source: str) -> tuple[Any, Any, dict[str, Any]]:
    """A GPT-2 trainer's checkpoint file (nanoGPT's ckpt.pt: nanogpt.py; llm.c's .bin: llmc.py) with a tokenizer from
    a folder or the hub, its end token the model's."""
    model, training = trainer.load(path)
    from_hub = not Path(tokenizer_source).exists()
    try:
        tokenizer = _tokenizer(tokenizer_source, None, from_hub and _hub_out_of_reach())
    except ExportError as e:
        raise ExportError(f"{path} holds no tokenizer, and {tokenizer_source!r} cannot give one ({e}): give the one it was trained "
                          "with, --tokenizer FOLDER (GPT-2's tokenizer.json, or vocab.json and merges.txt) or a hub id") from None
    if len(tokenizer) > model.config.vocab_size:
        raise ExportError(f"the tokenizer {tokenizer_source!r} has {len(tokenizer)} tokens, more than the {model.config.vocab_size} of "
                          f"{path}: give the one it was trained with (--tokenizer)")
    for config in (model.config, model.generation_config):
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer, {"model": str(path), "commit": None, "tokenizer": tokenizer_source, **training}


def _tokenizer(source: str, revision: str | None, cached_only: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, use_fast=True, local_files_only=cached_only)
    except TypeError:  # no tokenizer files at all: transformers opens a vocab_file of None
        raise ExportError(f"{source} has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt, "
                          "beside config.json (tokenizer.save_pretrained(folder) writes them)") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{source} has no usable tokenizer: {str(e).splitlines()[0]}") from None
    if not tokenizer.is_fast:
        raise ExportError(f"{source} has no fast tokenizer (tokenizer.json or vocab.json + merges.txt)")
    return tokenizer


def _cached(source: str, revision: str | None) -> bool:
    """Whether the local hub cache holds a checkpoint's or an adapter's config for hub id `source` at `revision`
    (a branch, tag or commit): asked before transformers is imported, so an id that cannot load without the hub
    is refused in a second, not after seconds of imports."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(source, name, revision=revision), str) for name in (CONFIG, ADAPTER_CONFIG))
    except ValueError:  # not a repository id at all ("a/b/c"): huggingface_hub validates it
        return False


def _hub_adapter(source: str, revision: str | None, cached_only: bool) -> Path | None:
    """The local snapshot of a hub repository that holds a PEFT adapter (adapter_config.json, no config.json); None
    where it holds none, or cannot be had (the caller then says why the checkpoint could not be loaded)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        hf_hub_download(source, ADAPTER_CONFIG, revision=revision, local_files_only=cached_only)
        return Path(snapshot_download(source, revision=revision, local_files_only=cached_only))
    except (OSError, ValueError):  # huggingface_hub's errors for no such repository, file or network
        return None


def _merged(folder: Path, source: str, commit: str | None, base: str | None, apart: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """A PEFT adapter (LoRA and the other tuners that add to the weights) merged into its base model with peft, as
    `PeftModel.from_pretrained(base, adapter).merge_and_unload()` does; the adapter's own tokenizer where it has one (a
    fine-tune's added tokens: the base's embeddings grow to it first, as peft asks). With `apart`, peft's model of
    the two as it is, for export_adapter."""
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = base or adapter.get("base_model_name_or_path")
    if not base:
        raise ExportError(f"{source} is a PEFT adapter that names no base model: give it with --base")
    try:
        import peft
    except ImportError:
        raise ExportError(f"{source} is a PEFT adapter: merging it into {base} needs peft (pip install 'onnxgen[export]')") from None
    try:
        model, tokenizer, origin = _load(base, None if base != adapter.get("base_model_name_or_path") else adapter.get("revision"))
    except ExportError as e:
        raise ExportError(f"{source} is a PEFT adapter of {base!r}, which cannot be loaded ({e}); give its base with --base") from None
    if any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        tokenizer = _tokenizer(str(folder), None, True)
    if len(tokenizer) > model.config.vocab_size:
        if apart:
            raise ExportError(f"{source} adds {len(tokenizer) - model.config.vocab_size} tokens to {base}'s vocabulary: its "
                              "embeddings are not the base's, so it cannot run on the base's folder; export it merged (without --lora)")
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the rows come from the adapter
    origin = {**origin, "weights": weights_fingerprint(model)}  # what an adapter kept apart is checked against at load
    try:
        merged = peft.PeftModel.from_pretrained(model, str(folder))
    except Exception as e:  # weights of other shapes, a tuner this peft does not know
        detail = " ".join(str(e).split())[:400] or type(e).__name__
        raise ExportError(f"cannot apply the adapter {source} to {base}: {detail}") from None
    origin = {"model": source, "commit": commit, "base": origin, "adapter": adapter.get("peft_type")}
    if apart:
        return merged.eval(), tokenizer, origin
    if not hasattr(merged, "merge_and_unload"):  # prompt and prefix tuning: virtual tokens, not weights
        raise ExportError(f"{source} is a {adapter.get('peft_type')} adapter, which adds no weights to merge: onnxgen exports "
                          "merged weights (LoRA, IA3, LoHa, ...)")
    with warnings.catch_warnings():  # peft's notice that a merged adapter's own embeddings untie the head: the export handles both
        warnings.simplefilter("ignore")
        model = merged.merge_and_unload().eval()
    return model, tokenizer, origin


@dataclass
class Reference:
    """PyTorch's logits for two prompts of different lengths (every position), then for one cached step; kept so
    that the PyTorch model can be freed before the ONNX graph is loaded (gpt2-large would hold both at once)."""

    prompts: list[list[int]]
    prompt_logits: list[np.ndarray]  # per prompt, (length, vocab)
    next_tokens: np.ndarray  # (2,): each prompt's greedy next token
    step_logits: np.ndarray  # (2, vocab): the scores after it


def _reference(model: Any) -> Reference:
    """Run as a left-padded batch, the way transformers' generate runs it."""
    import torch

    cfg = model.config
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # second row left-padded
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        first = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(pos), use_cache=True)
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        second = model(input_ids=nxt, attention_mask=torch.from_numpy(mask2), position_ids=torch.from_numpy(pos[:, -1:] + 1),
                       past_key_values=first.past_key_values, use_cache=True)
    logits = first.logits.numpy()
    valid = mask.astype(bool)
    return Reference([ids[r][valid[r]].tolist() for r in range(2)], [logits[r][valid[r]] for r in range(2)],
                     nxt.numpy()[:, 0], second.logits.numpy()[:, -1])


def _validate(folder: Path, dims: Dims, ref: Reference, atol: float) -> dict[str, Any]:
    """onnxgen's runtime on the reference's prompts: every position's logits, then a cached step of both rows
    together (for a graph with the cache in place, rows of different lengths in one buffer)."""
    from .runtime import Runtime

    runtime = Runtime(ModelFolder(folder, {}, dims, None, {}), threads=1)
    prompt_diff = max(float(np.abs(runtime.all_logits(np.asarray([p]))[0] - want).max()) for p, want in zip(ref.prompts, ref.prompt_logits))
    cache = runtime.new_cache(len(ref.prompts), max(map(len, ref.prompts)) + 1)
    cache.prefill(ref.prompts)
    step_diff = float(np.abs(cache.decode(ref.next_tokens) - ref.step_logits).max())
    result = {"max_abs_diff_prompt": prompt_diff, "max_abs_diff_cached_step": step_diff, "atol": atol,
              "passed": max(prompt_diff, step_diff) <= atol}
    if not result["passed"]:
        raise ExportError(f"validation failed: ONNX logits differ from PyTorch by {max(prompt_diff, step_diff):.2e} (allowed {atol:.0e})")
    return result


def _training(source: Path) -> dict[str, Any]:
    """The recipe's results (validation perplexity, corpus hashes), for models trained by models/train.py."""
    path = source / "training.json"
    return {"training": json.loads(path.read_text())} if path.is_file() else {}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "onnxgen": __version__}
    for name in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def io_names(path: Path) -> tuple[list[str], list[str]]:
    """The graph's inputs (those with a default too) and outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def save_model(model: Any, folder: Path, threshold: int) -> None:
    """Write model.onnx, with weights in model.onnx.data when they pass `threshold` bytes."""
    import onnx

    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    path = folder / MODEL_FILE
    if weight_bytes > threshold:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def export(source: str | Path, out: str | Path, options: ExportOptions | None = None, quiet: bool = False) -> dict[str, Any]:
    """Export `source` (hub id or folder) to `out`; returns the manifest. Raises ExportError."""
    source, out, options = str(source), Path(out), options or ExportOptions()
    atomic.check_destination(out, options.force, source)
    with steps(6, quiet=quiet) as progress:
        with progress.step(f"Loading {source}"):
            model, tokenizer, origin = _load(source, options.revision, options.base, options.tokenizer, apart=options.lora)
        if "adapter" in origin and options.lora:
            return export_adapter(model, origin, out, options, progress)
        if options.lora and not options.optimize:
            raise ExportError("--lora edits the optimized graph (each linear layer's MatMul on 3-D activations): drop --no-optimize")
        origin["weights"] = weights_fingerprint(model)
        cfg = model.config
        n_params = sum(p.numel() for p in model.parameters())
        atomic.check_disk(out, n_params * 4 * 3)  # optimum's raw export, the final folder, slack
        with atomic.building(out, options.force) as work, tempfile.TemporaryDirectory(dir=work.parent, prefix=atomic.scratch_prefix(out, "raw")) as raw:
            with progress.step("Exporting with optimum (text-generation-with-past)"):
                from optimum.exporters.onnx import onnx_export_from_model
                from optimum.utils import logging as optimum_logging

                # its notices too: one says it moves generation options from config.json to the generation config,
                # where older checkpoints keep them (the folder's generation_config.json has them either way)
                optimum_logging.set_verbosity_error()
                reference = _reference(model)
                # optimum copies the checkpoint's preprocessors from the name it was loaded by: for a hub id, four
                # loads from the hub at main, not at the commit this export pinned, and a minute of retries without a
                # network. onnxgen writes the tokenizer itself (below): optimum is given its own output folder.
                name, cfg._name_or_path = cfg._name_or_path, raw
                with warnings.catch_warnings():  # the tracer's warnings concern code paths GPT-2 does not take
                    warnings.simplefilter("ignore")
                    try:
                        onnx_export_from_model(model, raw, task="text-generation-with-past", opset=options.opset,
                                               no_post_process=True, do_validation=False)
                    finally:
                        cfg._name_or_path = name
                cfg.save_pretrained(work)
                # As the checkpoint has it: transformers refuses to save a config its validation would warn about
                # (top_k or temperature set without do_sample, as many hub checkpoints have), and onnxgen reads it so.
                model.generation_config.to_json_file(work / "generation_config.json")
                del model
                gc.collect()  # the ONNX stages below need the memory the PyTorch weights held
            with progress.step("Optimizing the graph" if options.optimize else "Loading the graph"):
                onnx_model = _optimize(Path(raw) / MODEL_FILE, cfg, options.optimize)
            with progress.step("Saving"):
                from . import graph

                tied = graph.untie_lm_head(onnx_model)
                gemms = graph.gemm_to_matmul(onnx_model)
                attention = graph.fuse_attention(onnx_model, cfg.n_head, attention_scales(cfg)) if options.optimize else 0
                biases = graph.fold_attention_biases(onnx_model) if attention else 0
                lora = graph.add_lora(onnx_model, cfg.n_layer) if options.lora else 0
                graph.add_logits_to_keep(onnx_model)
                graph.add_hidden_output(onnx_model)
                in_place = graph.cache_in_place(onnx_model) if attention and options.cache_in_place else 0
                opset = next(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx"))
                save_model(onnx_model, work, options.external_data_threshold)
                del onnx_model
                head_parts = graph.split_tied_head(work / MODEL_FILE)
                tokenizer.backend_tokenizer.save(str(work / TOKENIZER))
                template = tokenizer.chat_template
                if isinstance(template, dict):  # named templates: the one transformers uses without a name
                    template = template.get("default")
                if isinstance(template, str):
                    (work / CHAT_TEMPLATE).write_text(template, encoding="utf-8")
            with progress.step("Validating against PyTorch"):
                dims = Dims(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.n_positions)
                validation = _validate(work, dims, reference, options.atol)
            with progress.step("Writing manifest"):
                inputs, outputs = io_names(work / MODEL_FILE)
                result = manifest.write(work, {
                    # commit: the hub's commit the files came from (None for a folder), whatever revision named it; an
                    # adapter's: its base's too, and its kind (peft's peft_type)
                    "source": {**origin, "parameters": n_params},
                    "versions": package_versions(),
                    "opset": opset,
                    "dtype": "float32",
                    "quantization": None,
                    "graph": {"optimized": options.optimize, "tied_head_deduplicated": tied, "gemm_rewritten": gemms,
                              "attention_fused": attention, "attention_biases_folded": biases, "lora_layers": lora,
                              "cache_in_place": bool(in_place), "head_parts": head_parts,
                              "external_data": (work / DATA_FILE).exists()},
                    "dims": asdict(dims),
                    # transformers' decode drops the space before punctuation and contractions when the checkpoint's
                    # tokenizer_config.json says so; the runtime decodes as it does (tokenizer.py)
                    "tokenizer": {"clean_up_tokenization_spaces": bool(tokenizer.clean_up_tokenization_spaces),
                                  "special_tokens": tokenizer.special_tokens_map},  # what a chat template names
                    "inputs": inputs,
                    "outputs": outputs,
                    "validation": validation,
                    **_training(Path(source)),
                    "export_options": {k: v for k, v in asdict(options).items() if k != "force"},
                })
    return result


def weights_fingerprint(model: Any) -> str:
    """A short hash of a GPT-2's weights (a few rows of its embeddings, first layer and last norm): the base a LoRA
    adapter was trained on, as its folder records it, against the model it is loaded beside (adapters.py)."""
    import hashlib

    import torch

    m = model.transformer
    parts = [m.wte.weight[:64], m.wpe.weight[:16], m.h[0].attn.c_attn.weight[:16], m.h[-1].mlp.c_proj.weight[:16], m.ln_f.weight]
    with torch.no_grad():
        return hashlib.sha256(b"".join(p.detach().float().contiguous().numpy().tobytes() for p in parts)).hexdigest()[:16]


def export_adapter(model: Any, origin: dict[str, Any], out: Path, options: ExportOptions, progress: Any) -> dict[str, Any]:
    """A LoRA adapter (peft's model of it on its base, unmerged) as an adapter folder for a base exported with --lora:
    each target's A as (in, rank) and B as (rank, out) with the adapter's scale in it, in onnxruntime's adapter format
    by the graph inputs' names (ADAPTER_FILE), and its manifest. Each target's pair is checked against peft's own
    layer: x @ A @ B is what the layer adds to its base's output, on random x."""
    import re

    import torch
    from onnxruntime import AdapterFormat, OrtValue
    from peft.tuners.lora import LoraLayer

    config = model.peft_config[model.active_adapter]
    if origin["adapter"] != "LORA":
        raise ExportError(f"{origin['model']} is a {origin['adapter']} adapter: --lora keeps LoRA adapters apart; export it merged (without --lora)")
    if config.modules_to_save:
        raise ExportError(f"{origin['model']} trains whole modules too ({', '.join(config.modules_to_save)}), which a base's folder "
                          "does not have: export it merged (without --lora)")
    weights: dict[str, np.ndarray] = {}
    worst = 0.0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        found = re.fullmatch(r".*transformer\.h\.(\d+)\.(" + "|".join(map(re.escape, LORA_TARGETS)) + ")", name)
        key = model.active_adapter
        if found is None:
            raise ExportError(f"{origin['model']} adapts {name.removeprefix('base_model.model.')}: a base folder takes LoRA on each "
                              f"layer's {', '.join(LORA_TARGETS)} only; export it merged (without --lora)")
        if layer.use_dora.get(key) or getattr(layer, "lora_bias", {}).get(key):
            raise ExportError(f"{origin['model']} is a DoRA adapter or has LoRA biases: export it merged (without --lora)")
        a = layer.lora_A[key].weight.detach().double().T  # (in, rank)
        b = layer.lora_B[key].weight.detach().double().T * layer.scaling[key]  # (rank, out)
        with torch.no_grad():
            x = torch.randn(3, a.shape[0], dtype=torch.float32)
            added = (layer(x) - layer.get_base_layer()(x)).double()
        worst = max(worst, float((added - x.double() @ a @ b).abs().max() / max(1e-6, float(added.abs().max()))))
        names = lora_names(int(found[1]), found[2])
        weights[names[0]], weights[names[1]] = a.float().numpy(), b.float().numpy()
    if not weights:
        raise ExportError(f"{origin['model']} adapts no linear layer of GPT-2")
    if worst > 1e-4:
        raise ExportError(f"validation failed: the adapter's weights as exported differ from peft's layers by {worst:.1e} (relative)")
    cfg = model.get_base_model().config
    with progress.step("Writing the adapter"), atomic.building(out, options.force) as work:
        adapter = AdapterFormat()
        adapter.set_parameters({name: OrtValue.ortvalue_from_numpy(value) for name, value in weights.items()})
        adapter.export_adapter(str(work / ADAPTER_FILE))
        ranks = sorted({value.shape[1] for name, value in weights.items() if name.endswith("lora_A")})
        result = manifest.write(work, {
            "kind": "lora",
            "source": origin,
            "versions": package_versions(),
            "lora": {"rank": max(ranks), "ranks": ranks, "alpha": config.lora_alpha, "targets": sorted({n.split(".", 3)[3].rsplit(".", 1)[0] for n in weights}),
                     "layers": cfg.n_layer, "n_embd": cfg.n_embd, "max_relative_diff": worst},
        })
    return result


def attention_scales(cfg: Any) -> list[float]:
    """Each layer's factor on its query-key products, as GPT-2's eager attention applies it."""
    base = (cfg.n_embd // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0
    return [base / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else base for layer in range(cfg.n_layer)]


def _optimize(path: Path, cfg: Any, optimize: bool) -> Any:
    import onnx

    # Fuse with the weight matrices still on disk (the fusions read only biases and constants), which
    # keeps gpt2-large's peak near 8 GB instead of 17: the optimizer copies whatever it holds.
    model = onnx.load(str(path), load_external_data=False)
    # And every constant in the graph: optimum writes a model over 2 GB with large constants in the data file too
    # (eager attention's causal mask, context x context), and onnxruntime's shape inference, reading one there
    # relative to the working directory, fails (a ValidationError); onnxruntime then skips, silently, the fusions
    # that check shapes (SkipLayerNormalization): gpt2-large's step ran 1.24x slower on CUDA for it.
    constants = [a.t for node in model.graph.node for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    small = [t for t in model.graph.initializer if np.prod(t.dims) < (1 << 20)]
    for tensor in constants + small:
        if onnx.external_data_helper.uses_external_data(tensor):
            if np.prod(tensor.dims) == 0:  # onnx before 1.21 reads an empty tensor's length 0 as "to the end of the file"
                tensor.raw_data = b""
            else:
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    if optimize:
        from onnxruntime.transformers.optimizer import optimize_model

        # opt_level=0: Python fusions only. onnxruntime's own graph passes run at every session load
        # anyway, and running them here would serialize the whole model (over 2 GB for gpt2-large).
        # Its shape inference warns of each Slice whose index it cannot tell the sign of (eager attention's causal
        # mask, cut at symbolic lengths: harmless to the fusions), a dozen lines on the user's terminal.
        shape_inference = logging.getLogger("symbolic_shape_infer")
        level = shape_inference.level
        shape_inference.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # where it prints that its shape inference failed: said below
                optimized = optimize_model(model, model_type="gpt2", num_heads=cfg.n_head, hidden_size=cfg.n_embd, opt_level=0)
        finally:
            shape_inference.setLevel(level)
        if not optimized.enable_shape_infer:  # it failed, and onnxruntime skipped the fusions that check shapes
            warnings.warn("onnxruntime's shape inference failed on this graph, so the fusions that need it (SkipLayerNormalization) "
                          "were left out: the folder is right but runs slower; please report the checkpoint", PerformanceWarning, stacklevel=2)
        model = optimized.model
        # The fused ops live in onnxruntime's domain; declare it, or onnx's shape inference (which the
        # quantizers run) rejects the graph.
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.load_external_data_for_model(model, str(path.parent))
    return model
