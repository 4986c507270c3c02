"""Edits to optimum's GPT-2 graph that make it smaller and faster to run (export side: needs `onnx`).

- The language-model head is tied to the token embedding; optimum writes it a second time as a
  transposed copy. We keep one copy and compute the head through a Transpose node, which
  onnxruntime folds once at load: the file is 154 MB smaller for gpt2, 257 MB for gpt2-large.
- GPT-2's Conv1D layers partly export as Gemm, which dynamic int8 and MatMulNBits ignore; as
  MatMul + Add every weight matrix is quantizable (onnxruntime fuses them back at load).
- A `logits_to_keep` input (transformers' name and meaning: keep the last N positions, 0 = all)
  lets the prompt pass skip the head at every position but the last.
- Each layer's attention (about 40 nodes, one of which transposes the whole key cache at every step)
  becomes one MultiHeadAttention node; it pays most where the cache is large (long prompts, batches).
- Around that node, the fused ops add the projections' biases and c_proj reads its 3-D output
  directly: 16 fewer kernels a layer, which the small and quantized models feel most.
- The cache in place (the default): each MultiHeadAttention becomes a GroupQueryAttention that reads and
  writes a buffer the runtime allocates once per call, each row at its own length, instead of returning a
  new, longer copy of the whole cache at every step.
- LoRA at run time (export --lora): each of a layer's four linear layers adds x @ A @ B, A and B graph inputs with a
  row each, so that one loaded model serves many adapters, each row its own (none: rank 0, nothing added).
- An int8 cache (quantize --kv-cache int8): GroupQueryAttention stores keys and values in int8 with a
  calibrated scale per channel and reads them back through it.
- The head in parts of at most 16 MiB (a Concat of their logits): onnxruntime packs every weight for its
  kernels at load and frees the original after, so the load's peak is one weight's original above what the
  model holds running; the head is the largest weight (a third of gpt2's). An fp32 folder's parts read row
  ranges of the embedding's own bytes in model.onnx.data (FusedMatMul with transB), so nothing is stored
  twice and nothing is transposed at load.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .folder import (
    ATTENTION_MASK,
    LAST_HIDDEN_STATE,
    LOGITS,
    LOGITS_TO_KEEP,
    LORA_TARGETS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    lora_names,
)

HEAD_PART_BYTES = 16 << 20  # the most of the head onnxruntime holds twice while it packs it at load
TIED = "/lm_head/TiedTranspose"


def _head(model: onnx.ModelProto) -> onnx.NodeProto:
    heads = [n for n in model.graph.node if "logits" in n.output and n.op_type == "MatMul"]
    if len(heads) != 1:
        raise ValueError("expected one MatMul producing 'logits'")
    return heads[0]


def untie_lm_head(model: onnx.ModelProto) -> bool:
    """Replace the head's transposed copy of the embedding by Transpose(embedding). Returns whether it did."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    head = _head(model)
    weight = inits.get(head.input[1])
    gathers = [n for n in g.node if n.op_type == "Gather" and n.input[0] in inits]
    if weight is None or not gathers:
        return False
    w = numpy_helper.to_array(weight)
    for gather in gathers:
        emb = inits[gather.input[0]]
        if tuple(emb.dims) == tuple(w.shape[::-1]) and np.array_equal(numpy_helper.to_array(emb).T, w):
            g.initializer.remove(weight)
            g.node.insert(list(g.node).index(head), helper.make_node("Transpose", [emb.name], [weight.name], name=TIED, perm=[1, 0]))
            return True
    return False


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite each Gemm(A, B, C) with constant B and C as MatMul(A, B) + C. Returns how many."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    count = 0
    for i, node in reversed(list(enumerate(g.node))):
        if node.op_type != "Gemm" or len(node.input) != 3 or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            continue
        b = node.input[1]
        if attrs.get("transB", 0):
            b = f"{node.input[1]}_T"
            g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[node.input[1]]).T.copy(), b))
        product = f"{node.output[0]}_matmul"
        g.node.remove(node)
        g.node.insert(i, helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_add"))
        g.node.insert(i, helper.make_node("MatMul", [node.input[0], b], [product], name=f"{node.name}_matmul"))
        count += 1
    return count


def add_logits_to_keep(model: onnx.ModelProto) -> None:
    """Slice the hidden states to the last `logits_to_keep` positions before the head. The input defaults
    to 0 (every position, as optimum's graph computes them), so optimum's ORTModelForCausalLM, which feeds
    the inputs it knows, runs the folder too; onnxgen binds 1."""
    g = model.graph
    head = _head(model)
    g.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    g.initializer.extend([
        numpy_helper.from_array(np.array([0], np.int64), LOGITS_TO_KEEP),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "/lm_head/keep_end"),
        numpy_helper.from_array(np.array([1], np.int64), "/lm_head/keep_axis"),
    ])
    kept = "/lm_head/kept_hidden"
    at = list(g.node).index(head)
    g.node.insert(at, helper.make_node("Slice", [head.input[0], "/lm_head/keep_start", "/lm_head/keep_end", "/lm_head/keep_axis"], [kept], name="/lm_head/Keep"))
    g.node.insert(at, helper.make_node("Neg", [LOGITS_TO_KEEP], ["/lm_head/keep_start"], name="/lm_head/KeepStart"))
    head.input[0] = kept
    logits = next(o for o in g.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "logits_length"


def add_hidden_output(model: onnx.ModelProto) -> bool:
    """Make the final layer norm's output, every position's, an output of the graph too (named LAST_HIDDEN_STATE):
    contrastive search compares a candidate's with the text's. Its tensor is renamed, not copied: a run that does not
    bind it pays nothing, the head reading it anyway. False where the graph has it already."""
    g = model.graph
    if any(o.name == LAST_HIDDEN_STATE for o in g.output):
        return False
    keep = next(node for node in g.node if node.name == "/lm_head/Keep")  # add_logits_to_keep's: it reads the layer norm's output
    hidden = keep.input[0]
    for node in g.node:
        node.input[:] = [LAST_HIDDEN_STATE if name == hidden else name for name in node.input]
        node.output[:] = [LAST_HIDDEN_STATE if name == hidden else name for name in node.output]
    for info in g.value_info:
        if info.name == hidden:
            info.name = LAST_HIDDEN_STATE
    logits = next(o for o in g.output if o.name == LOGITS)
    g.output.append(helper.make_tensor_value_info(LAST_HIDDEN_STATE, logits.type.tensor_type.elem_type,
                                                  ["batch_size", "sequence_length", "hidden_size"]))
    return True


def _consumers(g: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in g.node if name in node.input]


def _attention_layers(g: onnx.GraphProto) -> list[tuple[onnx.NodeProto, ...]] | None:
    """Per layer, the nodes that bound its attention: (Split of c_attn's output, key Concat, value Concat,
    final Reshape to (batch, seq, embd)). None if any layer does not have optimum's GPT-2 shape."""
    producers = {out: node for node in g.node for out in node.output}
    layers = []
    for out in g.output:
        if not (out.name.startswith("present.") and out.name.endswith(".key")):
            continue
        key_concat = producers[out.name]
        value_concat = producers[out.name[: -len("key")] + "value"]
        try:  # present.key = Concat(past, Transpose(Reshape(Split(qkv)[1])))
            split = producers[producers[producers[key_concat.input[1]].input[0]].input[0]]
        except KeyError:
            return None
        # The value cache is read by MatMul(probs, V), whose output goes Transpose -> Reshape back to (batch, seq, embd).
        weighted = [n for n in _consumers(g, value_concat.output[0]) if n.op_type == "MatMul"]
        merge = _consumers(g, weighted[0].output[0]) if len(weighted) == 1 else []
        output = _consumers(g, merge[0].output[0]) if len(merge) == 1 and merge[0].op_type == "Transpose" else []
        if split.op_type != "Split" or len(split.output) != 3 or len(output) != 1 or output[0].op_type != "Reshape":
            return None
        layers.append((split, key_concat, value_concat, output[0]))
    return layers


def fuse_attention(model: onnx.ModelProto, num_heads: int, scales: list[float]) -> int:
    """Replace each layer's attention subgraph with one com.microsoft MultiHeadAttention node.

    optimum's graph spells attention out in about 40 nodes a layer, one of which transposes the whole
    key cache at every step; MultiHeadAttention takes the cache as it is (it still copies past and the
    new position into present: see export/README.md) and applies the causal and padding masks itself.
    Its inputs are the three slices of c_attn's output, the attention mask (as an int32 key padding
    mask) and the past; its outputs keep the names the graph used.
    `scales[layer]` multiplies that layer's query-key products (GPT-2's 1/sqrt(head size), divided by the
    layer's number too where a checkpoint's config says `scale_attn_by_inverse_layer_idx`): always given,
    since the graph's own scaling is among the nodes the fused one replaces.
    Nodes left without consumers are removed. All layers or none: returns how many were fused.
    """
    g = model.graph
    layers = _attention_layers(g)
    if not layers:
        return 0
    mask = "/attention/key_padding_mask"
    for split, key_concat, value_concat, output in layers:
        layer = key_concat.output[0].split(".")[1]
        attention = helper.make_node(
            "MultiHeadAttention",
            [*split.output, "", mask, "", key_concat.input[0], value_concat.input[0]],
            [output.output[0], key_concat.output[0], value_concat.output[0]],
            name=f"/attention/h.{layer}", domain="com.microsoft", num_heads=num_heads, unidirectional=1,
            scale=scales[int(layer)],
        )
        at = list(g.node).index(output)
        for node in (key_concat, value_concat, output):
            g.node.remove(node)
        g.node.insert(at, attention)
    first = min(i for i, n in enumerate(g.node) if n.op_type == "MultiHeadAttention")
    g.node.insert(first, helper.make_node("Cast", ["attention_mask"], [mask], name="/attention/MaskToInt32", to=TensorProto.INT32))
    _remove_dead_nodes(g)
    return len(layers)


def fold_attention_biases(model: onnx.ModelProto) -> int:
    """Around each MultiHeadAttention node, let the fused ops add the projections' biases.

    c_attn's bias moves into the attention node's `bias` input; c_proj (exported as Reshape to 2-D,
    MatMul, Add, Reshape back) becomes one MatMul on the attention's 3-D output whose bias the
    following SkipLayerNormalization adds. That drops 16 nodes a layer, each a kernel launch per step,
    which is what small models and quantized ones pay for. Returns how many layers it folded.
    """
    g = model.graph
    inits = {t.name for t in g.initializer}
    producers = {out: node for node in g.node for out in node.output}
    count = 0
    for attention in [n for n in g.node if n.op_type == "MultiHeadAttention"]:
        qkv = _qkv_bias(g, producers, attention, inits)
        projection = _projection(g, attention.output[0], inits)
        if qkv is None or projection is None:
            continue
        split, product, qkv_bias = qkv
        matmul, bias, norm = projection
        split.input[0] = product
        attention.input[3] = qkv_bias
        matmul.input[0] = attention.output[0]
        norm.input[0] = matmul.output[0]
        norm.input.extend([""] * (5 - len(norm.input)))
        norm.input[4] = bias
        count += 1
    _remove_dead_nodes(g)
    return count


def _qkv_bias(g: onnx.GraphProto, producers: dict[str, onnx.NodeProto], attention: onnx.NodeProto,
              inits: set[str]) -> tuple[onnx.NodeProto, str, str] | None:
    """(Split, c_attn's product, c_attn's bias) of product -> Add(bias) -> Split -> an attention node without a bias."""
    split = producers.get(attention.input[0])
    add = producers.get(split.input[0]) if split is not None and split.op_type == "Split" else None
    if add is None or add.op_type != "Add" or len(_consumers(g, add.output[0])) != 1 or attention.input[3]:
        return None
    bias = next((i for i in add.input if i in inits), None)
    if bias is None:
        return None
    return split, next(i for i in add.input if i != bias), bias


def _projection(g: onnx.GraphProto, attention_output: str, inits: set[str]) -> tuple[onnx.NodeProto, str, onnx.NodeProto] | None:
    """(MatMul, bias, SkipLayerNormalization) of Reshape -> MatMul -> Add(bias) -> Reshape -> SkipLayerNormalization(input 0)."""
    chain = [n for n in _consumers(g, attention_output) if n.op_type == "Reshape"]
    if len(chain) != 1:
        return None
    for op in ("MatMul", "Add", "Reshape", "SkipLayerNormalization"):
        following = _consumers(g, chain[-1].output[0])
        if len(following) != 1 or following[0].op_type != op:
            return None
        chain.append(following[0])
    _, matmul, add, reshape, norm = chain
    bias = next((i for i in add.input if i in inits), None)
    if matmul.input[1] not in inits or bias is None or norm.input[0] != reshape.output[0] or len(norm.input) > 4:
        return None
    return matmul, bias, norm


def cache_in_place(model: onnx.ModelProto) -> int:
    """Turn each MultiHeadAttention (after fold_attention_biases) into a GroupQueryAttention whose past and
    present the runtime binds to one buffer per layer: onnxruntime then writes each new position where it
    goes instead of copying the cache into a longer one (onnxruntime-genai runs its models this way).

    GroupQueryAttention takes c_attn's packed output (the bias added first: it has no bias input) and no
    mask: `seqlens_k` (per row, its length after this step, minus one) and `total_sequence_length` say
    which positions are real, so rows need no padding. The graph loses `attention_mask`, and
    logits_to_keep becomes the positions to keep (_keep_by_index). All layers or none: returns how many it
    converted.
    """
    g = model.graph
    producers = {out: node for node in g.node for out in node.output}
    layers = [n for n in g.node if n.op_type == "MultiHeadAttention"]
    splits = [producers.get(n.input[0]) for n in layers]
    if not layers or any(s is None or s.op_type != "Split" for s in splits):
        return 0
    for attention, split in zip(layers, splits):
        heads, scale = (next(helper.get_attribute_value(a) for a in attention.attribute if a.name == name) for name in ("num_heads", "scale"))
        packed, bias = split.input[0], attention.input[3]
        at = list(g.node).index(attention)
        g.node.remove(attention)
        if bias:
            g.node.insert(at, helper.make_node("Add", [packed, bias], [f"{attention.name}/qkv"], name=f"{attention.name}/QkvBias"))
            packed = f"{attention.name}/qkv"
        g.node.insert(at + bool(bias), helper.make_node(
            "GroupQueryAttention", [packed, "", "", attention.input[6], attention.input[7], SEQLENS_K, TOTAL_SEQUENCE_LENGTH],
            list(attention.output), name=attention.name, domain="com.microsoft", num_heads=heads, kv_num_heads=heads,
            scale=scale))
    g.input.remove(next(i for i in g.input if i.name == ATTENTION_MASK))
    g.input.extend([helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["batch_size"]),
                    helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, [])])
    _keep_by_index(g)
    for value in [*g.input, *g.output]:  # the buffer's length, not a past or total length
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.shape.dim[2].dim_param = "capacity"
    _remove_dead_nodes(g)  # the Splits, and the mask's Cast
    return len(layers)


def add_lora(model: onnx.ModelProto, n_layer: int) -> int:
    """Give every layer's c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj a LoRA term: their output gains x @ A @ B,
    where A (rows, in, rank) and B (rows, rank, out) are graph inputs, so each row of a batch has its own adapter
    (vLLM's multi-LoRA batches, as a batched MatMul) and a row without one has rank 0, which adds nothing. The
    adapter's scale (alpha / r) is in B. The term goes on the MatMul's output before anything reads it (the bias
    Add, or the fused op that adds it), so the quantizers still see the weight's MatMul alone and leave the
    LoRA MatMuls, whose B is not a weight, in float. Returns how many linear layers took one."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    matmuls = {node.input[1]: node for node in g.node if node.op_type == "MatMul" and len(node.input) == 2}
    added = 0
    for layer in range(n_layer):
        for target in LORA_TARGETS:
            weight = inits.get(f"transformer.h.{layer}.{target}.weight")
            node = matmuls.get(weight.name) if weight is not None else None
            if node is None:
                raise ValueError(f"no MatMul reads transformer.h.{layer}.{target}.weight: not an onnxgen GPT-2 graph")
            n_in, n_out = weight.dims
            a, b = lora_names(layer, target)
            out, low, delta, total = node.output[0], f"{a}/x", f"{b}/x", f"{node.output[0]}/lora"
            for consumer in _consumers(g, out):
                consumer.input[:] = [total if name == out else name for name in consumer.input]
            at = list(g.node).index(node) + 1
            g.node.insert(at, helper.make_node("Add", [out, delta], [total], name=f"{b}/Add"))
            g.node.insert(at, helper.make_node("MatMul", [low, b], [delta], name=f"{b}/MatMul"))
            g.node.insert(at, helper.make_node("MatMul", [node.input[0], a], [low], name=f"{a}/MatMul"))
            # Rows: the batch's, or 1 where every row has the same adapter (MatMul broadcasts it); a rank for each layer
            # and target, as an adapter may have other ranks for some or none at all.
            rank = f"lora_rank.{layer}.{target}"
            g.input.extend([helper.make_tensor_value_info(a, TensorProto.FLOAT, ["lora_rows", n_in, rank]),
                            helper.make_tensor_value_info(b, TensorProto.FLOAT, ["lora_rows", rank, n_out])])
            added += 1
    return added


def quantize_cache(model: onnx.ModelProto, scales: dict[str, np.ndarray]) -> None:
    """Keep the in-place cache in int8: each GroupQueryAttention quantizes the keys and values it writes with
    a fixed scale per channel (`scales`: past name -> (n_head * head_dim,) float32, calibrated by
    quantize.py) and reads them back through it. A quarter of fp32's bytes for the cache, so a quarter of the
    memory a long call holds and of what attention reads a step."""
    g = model.graph
    for node in [n for n in g.node if n.op_type == "GroupQueryAttention"]:
        names = [f"{node.name}/k_scale", f"{node.name}/v_scale"]
        g.initializer.extend(numpy_helper.from_array(scales[past].astype(np.float32), name) for past, name in zip(node.input[3:5], names))
        node.input.extend([""] * (12 - len(node.input)) + names)  # k_scale and v_scale are inputs 12 and 13
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"), helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
    for value in [*g.input, *g.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.INT8


def _keep_by_index(g: onnx.GraphProto) -> None:
    """logits_to_keep as transformers' tensor form, the positions to keep ([-1]: the last; 0..n-1: all), read
    by a Gather. add_logits_to_keep's count needs a Neg whose result the Slice reads on the host: on CUDA that
    is a copy to the host inside the step, which rules out capturing it as a CUDA graph."""
    keep = next(n for n in g.node if n.name == "/lm_head/Keep")
    start = next(n for n in g.node if n.name == "/lm_head/KeepStart")
    g.node.remove(start)  # before it: the Gather goes where the Slice was, before the head that reads it
    at = list(g.node).index(keep)
    g.node.remove(keep)
    g.node.insert(at, helper.make_node("Gather", [keep.input[0], LOGITS_TO_KEEP], [keep.output[0]], name="/lm_head/Keep", axis=1))
    for default in [t for t in g.initializer if t.name == LOGITS_TO_KEEP]:  # no default: the caller says (a quantizer may have dropped it)
        g.initializer.remove(default)
    index = next(i for i in g.input if i.name == LOGITS_TO_KEEP)
    index.type.tensor_type.shape.dim[0].dim_param = "kept_positions"


def _remove_dead_nodes(g: onnx.GraphProto) -> None:
    """Drop the nodes whose outputs nothing reads (until none is left), then the unread initializers."""
    while True:
        read = {name for node in g.node for name in node.input} | {o.name for o in g.output}
        live = [node for node in g.node if any(o in read for o in node.output)]
        if len(live) == len(g.node):
            break
        del g.node[:]
        g.node.extend(live)
    for t in [t for t in g.initializer if t.name not in read]:
        g.initializer.remove(t)


def _part_count(nbytes: float) -> int:
    """How many parts of at most HEAD_PART_BYTES a head of `nbytes` takes."""
    return max(1, -(-int(nbytes) // HEAD_PART_BYTES))


def _bounds(total: int, parts: int) -> list[int]:
    return [round(total * k / parts) for k in range(parts + 1)]


def _concat_parts(g: onnx.GraphProto, head: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
    """Put `nodes` (the parts, each writing {logits}.k) and their Concat where `head` was."""
    at = list(g.node).index(head)
    g.node.remove(head)
    concat = helper.make_node("Concat", [n.output[0] for n in nodes], [head.output[0]], name="/lm_head/Concat", axis=-1)
    for offset, node in enumerate([*nodes, concat]):
        g.node.insert(at + offset, node)


def _stored_at(tensor: onnx.TensorProto) -> tuple[str, int]:
    """The data file and offset of a tensor kept in external data."""
    where = {e.key: e.value for e in tensor.external_data}
    return where.get("location", ""), int(where.get("offset", 0))


def split_tied_head(path: Path) -> int:
    """Rewrite the saved model.onnx at `path`: the head MatMul(x, Transpose(embedding)) becomes one
    FusedMatMul(x, rows, transB=1) per range of the embedding's rows, each `rows` an initializer that points
    at that range of the embedding's bytes in the data file. Returns the number of parts (1: left as it was,
    because the embedding is small or not in a data file, where nothing can point into it)."""
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    tie = next((n for n in g.node if n.name == TIED), None)
    emb = next((t for t in g.initializer if tie is not None and t.name == tie.input[0]), None)
    if emb is None or not onnx.external_data_helper.uses_external_data(emb):
        return 1
    rows, cols = emb.dims
    itemsize = helper.tensor_dtype_to_np_dtype(emb.data_type).itemsize
    parts = _part_count(rows * cols * itemsize)
    if parts == 1:
        return 1
    location, offset = _stored_at(emb)
    head = next(n for n in g.node if n.op_type == "MatMul" and n.input[1] == tie.output[0])
    nodes = []
    for k, (start, end) in enumerate(pairwise(_bounds(rows, parts))):
        part = TensorProto(name=f"/lm_head/rows.{k}", data_type=emb.data_type, dims=[end - start, cols], data_location=TensorProto.EXTERNAL)
        for key, value in (("location", location), ("offset", offset + start * cols * itemsize), ("length", (end - start) * cols * itemsize)):
            part.external_data.add(key=key, value=str(value))
        g.initializer.append(part)
        nodes.append(helper.make_node("FusedMatMul", [head.input[0], part.name], [f"{LOGITS}.{k}"], name=f"/lm_head/Part.{k}",
                                      domain="com.microsoft", transB=1))
    _concat_parts(g, head, nodes)
    g.node.remove(tie)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):  # an export without the fusions has none
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save_model(model, str(path))  # the proto alone: every weight stays where it is in the data file
    return parts


def join_tied_head(model: onnx.ModelProto) -> bool:
    """Undo split_tied_head on a model loaded without its external data (which says where each part points):
    one MatMul(x, Transpose(embedding)) again, which the quantizers understand. Returns whether there was
    anything to join."""
    g = model.graph
    parts = [n for n in g.node if n.name.startswith("/lm_head/Part.")]
    if not parts:
        return False
    concat = next(n for n in g.node if n.name == "/lm_head/Concat")
    first = next(t for t in g.initializer if t.name == parts[0].input[1])
    emb = next(t for t in g.initializer if not t.name.startswith("/lm_head/rows.") and _stored_at(t) == _stored_at(first))
    weight = "/lm_head/weight"
    head = helper.make_node("MatMul", [parts[0].input[0], weight], [LOGITS], name="/lm_head/MatMul")
    at = list(g.node).index(parts[0])
    for node in [*parts, concat]:
        g.node.remove(node)
    g.node.insert(at, head)
    g.node.insert(at, helper.make_node("Transpose", [emb.name], [weight], name=TIED, perm=[1, 0]))
    for t in [t for t in g.initializer if t.name.startswith("/lm_head/rows.")]:
        g.initializer.remove(t)
    return True


def materialize_tied_head(model: onnx.ModelProto) -> None:
    """Turn the head's Transpose(embedding) back into a weight of its own, so that it can be quantized."""
    g = model.graph
    tie = next((n for n in g.node if n.name == TIED), None)
    if tie is None:
        return
    emb = next(t for t in g.initializer if t.name == tie.input[0])
    g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(emb).T.copy(), tie.output[0]))
    g.node.remove(tie)


def split_head(model: onnx.ModelProto, bytes_per_weight: float) -> int:
    """Split the head MatMul(x, W) of a loaded model (W a weight, as quantize makes it before quantizing) into
    MatMuls over ranges of W's columns, so that each part is at most HEAD_PART_BYTES once quantized to
    `bytes_per_weight`. Returns the number of parts."""
    g = model.graph
    head = _head(model)
    weight = next(t for t in g.initializer if t.name == head.input[1])
    w = numpy_helper.to_array(weight)
    parts = _part_count(w.size * bytes_per_weight)
    if parts == 1:
        return 1
    g.initializer.remove(weight)
    nodes = []
    for k, (start, end) in enumerate(pairwise(_bounds(w.shape[1], parts))):
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[:, start:end]), f"/lm_head/columns.{k}"))
        nodes.append(helper.make_node("MatMul", [head.input[0], f"/lm_head/columns.{k}"], [f"{LOGITS}.{k}"], name=f"/lm_head/Part.{k}"))
    _concat_parts(g, head, nodes)
    return parts


def select_rows_model(elem_type: int) -> onnx.ModelProto:
    """Gather(cache, rows) on the batch axis: the graph beam search reorders a CUDA cache with, on the device
    (runtime.py ships one per cache type in onnxgen/graphs; tests check they are what this makes)."""
    dims = ["batch", "heads", "positions", "head_size"]
    node = helper.make_node("Gather", ["cache", "rows"], ["selected"], name="SelectRows", axis=0)
    g = helper.make_graph([node], "select_rows",
                          [helper.make_tensor_value_info("cache", elem_type, dims), helper.make_tensor_value_info("rows", TensorProto.INT64, ["rows"])],
                          [helper.make_tensor_value_info("selected", elem_type, ["rows", *dims[1:]])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="onnxgen")


def copy_model(elem_type: int) -> onnx.ModelProto:
    """Identity(source) -> target: with `target` bound to an existing buffer, a copy into it on the device
    (beam search's reorder of an in-place CUDA cache; shipped in onnxgen/graphs like select_rows)."""
    dims = ["batch", "heads", "positions", "head_size"]
    node = helper.make_node("Identity", ["source"], ["target"], name="Copy")
    g = helper.make_graph([node], "copy", [helper.make_tensor_value_info("source", elem_type, dims)],
                          [helper.make_tensor_value_info("target", elem_type, dims)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="onnxgen")


def zeros_model(elem_type: int) -> onnx.ModelProto:
    """ConstantOfShape(shape) -> target: with `target` bound to an existing buffer, zeros written into it on the
    device (a new CUDA cache: shipped in onnxgen/graphs like select_rows)."""
    zero = helper.make_tensor("zero", elem_type, [1], [0])
    node = helper.make_node("ConstantOfShape", ["shape"], ["target"], name="Zeros", value=zero)
    g = helper.make_graph([node], "zeros", [helper.make_tensor_value_info("shape", TensorProto.INT64, [4])],
                          [helper.make_tensor_value_info("target", elem_type, ["batch", "heads", "positions", "head_size"])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="onnxgen")


def top_k_model() -> onnx.ModelProto:
    """TopK(scores, k) on the last axis, largest first (equal scores: the lower index first): beam search's
    selections. onnxruntime's heap over 8 x 201,028 scores takes about 1 ms, numpy's argpartition and sort 19."""
    node = helper.make_node("TopK", ["scores", "k"], ["values", "indices"], name="TopK", axis=-1, largest=1, sorted=1)
    g = helper.make_graph([node], "top_k",
                          [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["rows", "n"]),
                           helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
                          [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["rows", "k"]),
                           helper.make_tensor_value_info("indices", TensorProto.INT64, ["rows", "k"])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="onnxgen")
