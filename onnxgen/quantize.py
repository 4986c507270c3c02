"""`onnxgen quantize`: int8, int4 and fp16 variants of an exported folder, checked for what they cost.

- int8: dynamic quantization (weights int8 once, activations quantized per call) of every weight
  MatMul and of the embedding Gather.
- int4: weight-only block quantization into onnxruntime's MatMulNBits (block size, accuracy level). With
  `float16` the rest of the graph is then made fp16 as fp16 mode makes it (activations, scales, the key/value
  cache): the int4 folder for CUDA, where GroupQueryAttention runs in fp16 only and a batch-1 step reads
  under a third of fp16's weight bytes (onnxruntime-genai's usual CUDA model). Its embedding stays fp16 (a Gather
  reads one row a token) and its head stays the tied fp16 one: onnxruntime's CUDA MatMulNBits takes a head of
  50,257 columns by dequantizing all of it every step (43 us, then a 52 us GEMV, on an H200) where fp16's
  tied head is one 41 us GEMV (benchmarks/results/gpu/h200-s26.md).
- `kv_cache="int8"` (int8 and int4 modes, folders with the cache in place; the CPU's): the key/value cache
  in int8 with one scale per channel, calibrated on text the parent model samples itself (the evaluation
  text stays unseen), so that the accuracy report below measures it honestly.
- fp16: a native half-precision graph for the CUDA provider: weights, activations and the key/value cache
  are fp16, and the one Cast is the logits' to fp32 at the graph's edge (for the host's numpy).
  onnxruntime's fused CUDA kernels (LayerNorm, SkipLayerNorm, MultiHeadAttention, Gelu) accumulate in
  fp32 inside, so nothing needs to stay fp32;
  a Cast around each of them would double the kernels a decode step launches, which is what bounds a
  GPU step at batch 1. On CPU the folder still loads and runs (onnxruntime computes most of its ops in
  fp32 behind Casts it inserts itself), slower than fp32.

Before quantizing, the head's Transpose(embedding) (graph.py; its parts joined first) is materialized as
its own weight, or the largest matrix of the model would stay float, and split into parts of at most 16 MiB
once quantized (graph.split_head: what onnxruntime holds twice while it packs it at load). fp16, and int4 with
`float16`, keep the tied head: they are for CUDA, where nothing packs it.
After quantizing, the quantized nodes are counted against the weight MatMuls there were: a mode that did
not take is an error, never a silent fp32 model.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import accuracy, atomic, manifest
from .cache import InPlaceCache
from .errors import QuantizeError
from .export import save_model
from .folder import DATA_FILE, LOGITS, MODEL_FILE, SHARED_FILES
from .model import Model
from .progress import steps
from .runtime import Provider

Mode = Literal["int8", "int4", "fp16"]
KvCache = Literal["float", "int8"]
QUANTIZED_OP = {"int8": "MatMulInteger", "int4": "MatMulNBits"}
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass
class QuantizeOptions:
    mode: Mode = "int8"
    per_channel: bool = False  # int8: one scale per output channel instead of per tensor
    block_size: int = 32  # int4: weights per scale
    accuracy_level: int = 4  # int4: MatMulNBits compute type (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8)
    float16: bool = False  # int4: fp16 around the int4 weights (activations, scales, cache): the int4 folder for CUDA
    max_ppl_increase: float = 0.10  # refuse when perplexity grows by more than this fraction
    provider: Provider = "cpu"  # where the accuracy check runs: cuda measures fp16 as it will be used, and fast
    kv_cache: KvCache = "float"  # int8: the key/value cache in int8 (a quarter of fp32's memory and reads)
    force: bool = False


# What the parent samples to set the int8 cache's scales, and the headroom over the largest value seen: text
# the parent has not sampled reaches further, and clipping costs more than the coarser steps (on a trained
# prose-mini, perplexity +0.67% without headroom, +0.51% with 1.25, +0.54% with 1.5; benchmarks/quantize_accuracy.py).
@dataclass(frozen=True)
class Calibration:
    rows: int = 4
    tokens: int = 256
    seed: int = 0
    margin: float = 1.25


CALIBRATION = Calibration()


def cache_scales(source: Path) -> dict[str, np.ndarray]:
    """Per layer's key and value (past names), one int8 scale per channel (n_head * head_dim): the largest
    magnitude each channel reaches over text the fp32 model samples itself from the beginning-of-text token
    (temperature 1, no filter), times CALIBRATION's margin, over 127. Sampled rather than read from a
    corpus: any GPT-2 gets text of its own domain, and the evaluation text the accuracy report uses is never
    seen."""
    model = Model(source, "cpu")
    n = min(CALIBRATION.tokens, model.context_length)
    samples = model.generate([""] * CALIBRATION.rows, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=CALIBRATION.seed,
                             max_new_tokens=n - 1, min_new_tokens=0, eos_token_id=None, repetition_penalty=1.0)
    prompts = [[model.folder.bos_token_id, *c.token_ids] for c in samples]
    cache = model.runtime.new_cache(len(prompts), max(len(p) for p in prompts))
    assert isinstance(cache, InPlaceCache)  # quantize() refused any other folder from its manifest
    cache.prefill(prompts)
    peaks = np.abs(cache.layers()).max(axis=(1, 3))  # over rows and positions: (layer's key or value, head, head size)
    return {name: np.maximum(peak.reshape(-1), 1e-6) * CALIBRATION.margin / 127 for name, peak in zip(model.runtime.past_names, peaks)}


def _bytes_per_weight(options: QuantizeOptions) -> float:
    """What a weight takes once quantized (int4: half a byte and its share of the block's fp32 scale)."""
    return 1.0 if options.mode == "int8" else 0.5 + 4 / options.block_size


def _weight_matmuls(model: Any) -> int:
    inits = {t.name for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)


def _quantized_count(model: Any, mode: Mode) -> int:
    if mode in QUANTIZED_OP:
        return sum(1 for n in model.graph.node if n.op_type == QUANTIZED_OP[mode])
    import onnx

    half = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in half)


def _int8(src: Path, dst: Path, options: QuantizeOptions, large: bool) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, per_channel=options.per_channel, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gather"], use_external_data_format=large,
                     # onnxruntime's fused ops (SkipLayerNorm, FastGelu) carry no type information.
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})


def _int4(model: Any, options: QuantizeOptions) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    ops = ("MatMul",) if options.float16 else ("MatMul", "Gather")  # fp16's embedding is read a row a token: left as it is
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=options.block_size, is_symmetric=True,
                                     accuracy_level=options.accuracy_level, op_types_to_quantize=ops)
    quantizer.process()
    return quantizer.model.model


def _fp16(model: Any) -> Any:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Everything to fp16, inputs and outputs included: with nothing kept fp32 the converter inserts no
    # Cast (onnxruntime 1.31's inserted some twice and wrote an invalid model).
    model = convert_float_to_float16(model, keep_io_types=False, op_block_list=[], disable_shape_infer=True)
    # Then one Cast of our own at the edge: float32 logits. The GPU converts a step's scores in microseconds;
    # numpy took 0.3 ms for 8 rows of GPT-2's 50,257 (and beam search's 32 rows decide on the host).
    from onnx import TensorProto, helper

    g = model.graph
    for node in g.node:
        node.output[:] = [f"{LOGITS}_fp16" if name == LOGITS else name for name in node.output]
    g.node.append(helper.make_node("Cast", [f"{LOGITS}_fp16"], [LOGITS], name="/lm_head/LogitsToFloat", to=TensorProto.FLOAT))
    next(o for o in g.output if o.name == LOGITS).type.tensor_type.elem_type = TensorProto.FLOAT
    return model


@contextmanager
def _quiet_quantizers() -> Iterator[None]:
    """onnxruntime's quantizers log every node at INFO (and configure the root logger to show it when
    imported) and advise pre-processing on the root logger; the progress bar already says what runs."""
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its import calls logging.basicConfig)

    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def quantize(source: str | Path, out: str | Path, options: QuantizeOptions | None = None, quiet: bool = False) -> dict[str, Any]:
    """Quantize the fp32 folder `source` into `out`; returns the new manifest. Raises QuantizeError."""
    import onnx

    from . import graph  # needs onnx, like everything here

    source, out, options = Path(source), Path(out), options or QuantizeOptions()
    parent = manifest.read(source)
    if parent.get("quantization"):
        raise QuantizeError(f"{source} is already quantized ({parent['quantization']['mode']}): quantize its fp32 parent")
    if options.mode not in ("int8", "int4", "fp16"):
        raise QuantizeError(f"unknown mode {options.mode!r}: use int8, int4 or fp16")
    if options.kv_cache not in ("float", "int8"):
        raise QuantizeError(f"unknown kv_cache {options.kv_cache!r}: use float or int8")
    if options.mode == "int4" and options.block_size not in INT4_BLOCK_SIZES:
        raise QuantizeError(f"block_size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))} (what onnxruntime quantizes and "
                            f"MatMulNBits runs), got {options.block_size}")
    if options.mode == "int4" and options.accuracy_level not in range(5):
        raise QuantizeError(f"accuracy_level must be 0 to 4 (unset, fp32, fp16, bf16, int8), got {options.accuracy_level}")
    if not math.isfinite(options.max_ppl_increase):  # NaN compares False: it would refuse nothing
        raise QuantizeError(f"max_ppl_increase must be a finite fraction, got {options.max_ppl_increase}")
    if options.provider not in ("cpu", "cuda"):
        raise QuantizeError(f"unknown provider {options.provider!r} for the accuracy check: use cpu or cuda")
    if options.float16 and options.mode != "int4":
        raise QuantizeError(f"float16 (--float16) is int4's: fp16 around int4 weights; {options.mode} mode "
                            + ("is fp16 throughout" if options.mode == "fp16" else "is the CPU's"))
    half = options.mode == "fp16" or options.float16
    int8_cache = options.kv_cache == "int8"
    if int8_cache and half:
        raise QuantizeError("an int8 key/value cache is for the CPU (int8 or int4 modes); fp16 folders keep an fp16 cache on CUDA")
    if int8_cache and not manifest.cache_in_place(parent):
        raise QuantizeError(f"an int8 key/value cache needs the cache in place; {source} was exported with --growing-cache")
    if (source / DATA_FILE).is_file() and (source / DATA_FILE).stat().st_nlink > 1:  # onnx would refuse it mid-way
        raise QuantizeError(f"{source / DATA_FILE} has several hard links, and onnx refuses to read weights from such a file "
                            "(a guard against hard-link attacks): quantize a copy of the folder (cp -r)")
    atomic.check_destination(out, options.force, source)
    size = sum(f["bytes"] for f in parent["files"].values())
    atomic.check_disk(out, size * 3)
    large = size > (1 << 30)
    with steps(4 + int8_cache, quiet=quiet) as progress, atomic.building(out, options.force) as work:
        if int8_cache:
            with progress.step("Calibrating the int8 key/value cache"):
                scales = cache_scales(source)  # before the weights load: the parent's session is gone by then
        with progress.step(f"Quantizing to {options.mode}"), _quiet_quantizers(), \
                tempfile.TemporaryDirectory(dir=work.parent, prefix=atomic.scratch_prefix(out, "prep")) as tmp:
            model = onnx.load(str(source / MODEL_FILE), load_external_data=False)
            graph.join_tied_head(model)  # before the weights load: the head's parts would each load a copy
            onnx.load_external_data_for_model(model, str(source))
            head_parts = 1
            if not half:  # fp16 folders keep the tied head, Transpose of the fp16 embedding (see the module's docstring)
                graph.materialize_tied_head(model)
                head_parts = graph.split_head(model, _bytes_per_weight(options))
            expected = _weight_matmuls(model)
            if options.mode == "int8":
                prepared = Path(tmp) / MODEL_FILE
                save_model(model, Path(tmp), threshold=0 if large else 1 << 62)
                del model
                _int8(prepared, work / MODEL_FILE, options, large)
                quantized = onnx.load(str(work / MODEL_FILE))
                (work / MODEL_FILE).unlink(missing_ok=True)
                (work / DATA_FILE).unlink(missing_ok=True)
            else:
                quantized = _int4(model, options) if options.mode == "int4" else model
                del model  # or the fp32 weights stay in memory through the accuracy check
                if half:  # fp16 mode, and int4's float16: everything left float becomes fp16
                    quantized = _fp16(quantized)
            done = _quantized_count(quantized, options.mode)
            if done < expected:
                raise QuantizeError(f"{options.mode} did not take: {done} of {expected} weight matrices quantized")
            if int8_cache:
                graph.quantize_cache(quantized, scales)
            save_model(quantized, work, threshold=0)  # weights in model.onnx.data, as export writes them
            del quantized
        for name in SHARED_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, work / name)
        with progress.step("Measuring accuracy against fp32"):
            record = {
                **{k: v for k, v in parent.items() if k not in ("files", "format_version")},
                "dtype": "float16" if half else "float32",
                "graph": {**parent.get("graph", {}), "head_parts": head_parts},
                "quantization": {"mode": options.mode, "parent": str(source), "parent_sha256": parent["files"][MODEL_FILE]["sha256"],
                                 "quantized_matrices": done, "weight_matrices": expected,
                                 "options": {k: v for k, v in asdict(options).items() if k != "force"},
                                 **({"kv_cache_calibration": asdict(CALIBRATION)} if int8_cache else {})},
            }
            result = manifest.write(work, record)  # the runtime needs it to load the candidate; the folder is still hidden
            report = accuracy.compare(source, work, provider=options.provider)
        with progress.step("Checking the accuracy budget"):
            increase = report["perplexity_quantized"] / report["perplexity_fp32"] - 1
            report["perplexity_increase"] = increase
            report["max_perplexity_increase"] = options.max_ppl_increase
            if increase > options.max_ppl_increase:
                raise QuantizeError(
                    f"{options.mode} raises perplexity by {increase:.1%} ({report['perplexity_fp32']:.2f} -> "
                    f"{report['perplexity_quantized']:.2f}), over the allowed {options.max_ppl_increase:.0%}; "
                    "raise --max-ppl-increase to accept it"
                )
        with progress.step("Writing manifest"):
            result["quantization"]["accuracy"] = report  # the files are as described: no second hashing
            manifest.save(work, result)
    return result


def summary(result: dict[str, Any]) -> str:
    q = result["quantization"]
    a = q["accuracy"]
    size = sum(f["bytes"] for f in result["files"].values()) / 1e6
    return "\n".join([
        f"{q['mode']}{' (fp16 around it)' if q['options'].get('float16') else ''}: {size:.1f} MB, "
        f"{q['quantized_matrices']}/{q['weight_matrices']} weight matrices quantized",
        f"perplexity {a['perplexity_fp32']:.3f} (fp32) -> {a['perplexity_quantized']:.3f} ({a['perplexity_increase']:+.2%})",
        f"top-1 next-token agreement {a['top1_agreement']:.2%}; logit diff max {a['max_abs_logit_diff']:.3g}, mean {a['mean_abs_logit_diff']:.3g}",
        f"greedy: {a['greedy_tokens_agreeing']} of {a['greedy_tokens']} tokens agree before the first divergence",
    ])

