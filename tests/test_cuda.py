"""What a GPU user runs, on the CUDA provider against the CPU one: run with -m cuda on a machine with an
NVIDIA GPU and onnxgen[gpu]. Each test skips only when this onnxruntime has no CUDA provider."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxgen

from .conftest import EVAL_TEXT
from .test_generate import PROMPTS

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("no CUDA provider in this onnxruntime (install onnxgen[gpu] on a machine with a GPU)")


@pytest.fixture(scope="module")
def folders(exported_growing: Path, quantized_folder, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """fp16 and int4 in an fp16 graph (--float16) with the cache in place (GroupQueryAttention runs on CUDA in fp16
    only); fp32 and int4 with the growing cache, as a CUDA user exports them (--growing-cache)."""
    from onnxgen.quantize import QuantizeOptions, quantize

    int4 = tmp_path_factory.mktemp("cuda") / "int4-growing"
    # int4 with fp32 compute (accuracy level 1): the CPU's default int8 compute would differ from CUDA's by design.
    quantize(exported_growing, int4, QuantizeOptions(mode="int4", accuracy_level=1, max_ppl_increase=0.5), quiet=True)
    return {"fp32": exported_growing, "fp16": quantized_folder("fp16"), "int4": int4,
            "int4-fp16": quantized_folder("int4", float16=True, accuracy_level=1)}


def _tokens(model: onnxgen.Model, prompts: list[list[int]], **options: object) -> list[list[int]]:
    return [c.token_ids for c in model.generate(prompts, max_new_tokens=20, **options)]


def _greedy_matches(gpu: onnxgen.Model, cpu: onnxgen.Model, prompts: list[list[int]], tolerance: float = 0.03, **options: object) -> None:
    """Greedy tokens on CUDA are the CPU's, or part from them only where the CPU's own two best were a near-tie (fp16
    kernels round differently on each: guidance's 2.5 x conditional - 1.5 x unconditional scores and a LoRA adapter's
    terms parted so on an H200 at 0.007 and 0.008 nats); after that the texts go their own ways."""
    options = {"max_new_tokens": 20, "do_sample": False, **options}
    on_gpu, on_cpu = gpu.generate(prompts, **options), cpu.generate(prompts, logprobs=2, **options)
    for g, c in zip(on_gpu, on_cpu, strict=True):
        parted = [i for i, (a, b) in enumerate(zip(g.token_ids, c.token_ids)) if a != b]
        if not parted:
            assert g.token_ids == c.token_ids
            continue
        assert c.top_logprobs is not None
        best = c.top_logprobs[parted[0]]
        assert g.token_ids[parted[0]] in best and best[c.token_ids[parted[0]]] - best[g.token_ids[parted[0]]] < tolerance


def _beams_match(gpu: onnxgen.Model, cpu: onnxgen.Model, prompts: list[list[int]], tolerance: float = 0.03, **options: object) -> None:
    """Beam search's sequences on CUDA are the CPU's, or, where a near-tie sent the beams their own ways (a LoRA
    adapter's fp16 terms on an H200: the GPU's sequence scored 1.2 nats better under the CPU's model than the CPU's
    own), one whose score on CUDA is the CPU's score of its tokens (each beam's cache held its own row: a mixed-up
    row scores its tokens under another's context) and which the CPU's model scores no worse than its own sequence,
    by more than `tolerance` a token (the search on the device is as good)."""
    options = {"max_new_tokens": 20, "do_sample": False, "num_beams": 3, **options}
    for prompt, g, c in zip(prompts, gpu.generate(prompts, **options), cpu.generate(prompts, **options), strict=True):
        if g.token_ids == c.token_ids:
            continue
        assert g.score is not None and c.score is not None
        rescored = cpu.score([prompt + g.token_ids], adapter=options.get("adapter"))[0].logprobs[len(prompt):]  # type: ignore[arg-type]
        per_token = sum(lp for lp in rescored if lp is not None) / len(rescored)  # transformers' sequence score, length_penalty 1
        assert g.score == pytest.approx(per_token, abs=tolerance)
        assert per_token >= c.score - tolerance


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int4", "fp16 cuda graph", "int4-fp16 cuda graph"])
def test_cuda_generates_the_cpu_tokens(folders: dict[str, Path], variant: str) -> None:
    """Greedy, beam search, greedy and beam search held to a regex (guidance.py; beams reordered on the device),
    contrastive search (its candidates' hidden states read from the step's bound output) and diverse beam search on
    prompts of different lengths: the same tokens as the same folder on CPU."""
    folder = folders[variant.split()[0]]
    cpu, gpu = onnxgen.load(folder, threads=1), onnxgen.load(folder, provider="cuda", cuda_graph="graph" in variant)
    assert gpu.runtime.session.get_providers()[0] == "CUDAExecutionProvider"
    for options in ({"do_sample": False}, {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
                    {"do_sample": False, "regex": "[a-z ]{3,30}[.]"}, {"num_beams": 3, "regex": "[a-z ]{3,30}[.]"},
                    {"penalty_alpha": 0.6, "top_k": 4},
                    {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0, "num_return_sequences": 4}):
        assert _tokens(gpu, PROMPTS, **options) == _tokens(cpu, PROMPTS, **options)


def test_fp16_on_cuda_is_close_to_fp32(folders: dict[str, Path]) -> None:
    full, half = onnxgen.load(folders["fp32"], threads=1), onnxgen.load(folders["fp16"], provider="cuda")
    assert half.runtime.cache_dtype == np.float16
    window = np.asarray([full.tokenizer.encode(EVAL_TEXT.read_text())[:96]])
    a, b = full.runtime.all_logits(window), half.runtime.all_logits(window)
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()  # fp16 keeps ~3 significant digits
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95


def test_beam_reorder_stays_on_the_device(folders: dict[str, Path]) -> None:
    """In place: rows move within the same device buffers (CUDA graphs replay on those addresses)."""
    rt = onnxgen.load(folders["fp16"], provider="cuda").runtime
    cache = rt.new_cache(2, 8)
    cache.prefill([[5, 6, 7], [8, 9, 10]])
    before = cache.buffer.numpy().reshape(-1, *cache.shape)
    address = cache.buffer.data_ptr()
    cache.reorder(np.array([1, 1]))
    assert cache.buffer.device_name().lower() == "cuda" and cache.buffer.data_ptr() == address
    assert np.array_equal(cache.buffer.numpy().reshape(-1, *cache.shape)[:, :, :, :3], before[:, [1, 1], :, :3])


def test_every_decode_node_runs_on_cuda(folders: dict[str, Path], tmp_path: Path) -> None:
    """A CUDA graph needs every compute node on the GPU and no copies to the host: onnxruntime's profile of a
    call says where each node ran."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(folders["fp16"] / "model.onnx"), options, providers=["CUDAExecutionProvider"])
    model = onnxgen.load(folders["fp16"], provider="cuda")
    model.runtime.session = session
    model.generate([[5, 6, 7]], max_new_tokens=3, do_sample=False)
    events = json.loads(Path(session.end_profiling()).read_text())
    placed = {(e["args"]["op_name"], e["args"]["provider"]) for e in events if e.get("cat") == "Node" and "provider" in e.get("args", {})}
    assert ("GroupQueryAttention", "CUDAExecutionProvider") in placed
    assert {op for op, provider in placed if provider != "CUDAExecutionProvider"} == set()
    assert not {op for op, _ in placed if op.startswith("Memcpy")}


def test_cuda_graph_calls_reuse_their_capture(folders: dict[str, Path]) -> None:
    """A finished call hands its buffers (and the graph captured on them) to the next call of its shape."""
    gpu = onnxgen.load(folders["fp16"], provider="cuda", cuda_graph=True)
    plain = onnxgen.load(folders["fp16"], provider="cuda")
    first = _tokens(gpu, PROMPTS)
    ids = {id(c) for c in gpu.runtime._idle}
    assert _tokens(gpu, PROMPTS) == first == _tokens(plain, PROMPTS)
    assert {id(c) for c in gpu.runtime._idle} == ids


def test_decode_on_cuda_reads_each_row_only_to_its_length(folders: dict[str, Path]) -> None:
    from .test_generate import decode_at_totals

    longest, capacity = decode_at_totals(onnxgen.load(folders["fp16"], provider="cuda").runtime)
    assert np.abs(longest - capacity).max() < 1e-2


def test_a_new_cuda_cache_holds_zeros(folders: dict[str, Path]) -> None:
    """Not whatever the memory held before (fp16 NaN bits: rows of NaN scores came of it, zero weights times NaN)."""
    rt = onnxgen.load(folders["fp16"], provider="cuda").runtime
    for _ in range(3):
        junk = rt.ort.OrtValue.ortvalue_from_numpy(np.full((4, 4, 64, 16), np.nan, np.float16), "cuda", 0)
        del junk  # its memory goes back to onnxruntime's arena, for the cache below to take
        cache = rt.new_cache(3, 64)
        assert not cache.buffer.numpy().any()


def test_fp32_in_place_on_cuda_is_refused(exported: Path) -> None:
    with pytest.raises(onnxgen.ProviderError, match="fp16"):
        onnxgen.load(exported, provider="cuda")


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_seeded_sampling_on_cuda_repeats(folders: dict[str, Path], variant: str) -> None:
    gpu = onnxgen.load(folders[variant], provider="cuda")
    options = {"do_sample": True, "top_k": 20, "top_p": 0.9, "seed": 7, "num_return_sequences": 2}
    first = _tokens(gpu, PROMPTS, **options)
    assert first == _tokens(gpu, PROMPTS, **options) != _tokens(gpu, PROMPTS, **{**options, "seed": 8})


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_a_batch_on_cuda_equals_each_prompt_alone(folders: dict[str, Path], variant: str) -> None:
    gpu = onnxgen.load(folders[variant], provider="cuda")
    assert _tokens(gpu, PROMPTS) == [_tokens(gpu, [p])[0] for p in PROMPTS]


def test_cli_generates_on_cuda(folders: dict[str, Path]) -> None:
    def cli(provider: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "onnxgen", "generate", "It is a truth", "--model", str(folders["fp32"]),
                               "--strategy", "greedy", "--max-new-tokens", "15", "--provider", provider, "--stats"],
                              capture_output=True, text=True)

    gpu, cpu = cli("cuda"), cli("cpu")
    assert gpu.returncode == 0 and cpu.returncode == 0, gpu.stderr + cpu.stderr
    assert gpu.stdout == cpu.stdout and "tok/s" in gpu.stderr


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_one_cuda_model_serves_many_threads(folders: dict[str, Path], cuda_graph: bool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    gpu = onnxgen.load(folders["fp16"], provider="cuda", cuda_graph=cuda_graph)

    def call(i: int) -> list[list[int]]:
        return _tokens(gpu, PROMPTS[i % 3 :], do_sample=i % 2 == 0, seed=i, num_beams=1 if i % 2 == 0 else 2, logprobs=2)

    serial = [call(i) for i in range(24)]
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(call, range(24))) == serial


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_continuous_batching_on_cuda(folders: dict[str, Path], cuda_graph: bool) -> None:
    """The server's batcher on the device: requests joining rows already decoding, a long prompt written a
    part a step (GroupQueryAttention with a past and several new positions), rows ending below busy ones and
    moved down (with CUDA graphs, a graph for each count of rows), each answer what its prompt gives alone."""
    import threading

    from onnxgen.batcher import Batcher

    from .test_batcher import GREEDY, Inbox, alone, result, submit

    gpu = onnxgen.load(folders["fp16"], provider="cuda", cuda_graph=cuda_graph)
    batcher = Batcher(gpu, max_batch=4, prefill_chunk=4)
    gate = threading.Event()
    held = submit(batcher, gpu, ["Once upon"], on_event=lambda _: gate.wait(30), max_new_tokens=40, **GREEDY)
    jobs: list[tuple[str, int]] = [("It is a truth universally acknowledged that a single man", 30), ("Call me", 3), ("The city of", 20)]
    inboxes: list[Inbox] = [submit(batcher, gpu, [prompt], max_new_tokens=n, **GREEDY) for prompt, n in jobs]
    gate.set()
    for (prompt, n), inbox in zip(jobs, inboxes):
        assert [c.token_ids for c in result(inbox)] == alone(gpu, [prompt], max_new_tokens=n, **GREEDY)
    assert [c.token_ids for c in result(held)] == alone(gpu, ["Once upon"], max_new_tokens=40, **GREEDY)
    assert batcher.jobs == 4 and batcher.parts >= 3 and batcher.moved >= 1
    # beam search in the shared rows: its reorders move rows within the device buffer
    running = submit(batcher, gpu, ["It"], max_new_tokens=30, **GREEDY)
    beams = submit(batcher, gpu, ["The city of"], max_new_tokens=10, num_beams=3, num_return_sequences=2)
    expected = gpu.generate("The city of", max_new_tokens=10, num_beams=3, num_return_sequences=2)
    assert [c.token_ids for c in result(beams)] == [c.token_ids for c in expected]
    assert [c.token_ids for c in result(running)] == alone(gpu, ["It"], max_new_tokens=30, **GREEDY)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_prompt_lookup_on_cuda_gives_plain_decodings_text(folders: dict[str, Path], cuda_graph: bool) -> None:
    """Guessed positions written into the device cache in one pass (never captured), then steps (captured with
    CUDA graphs) that read each row only to its length, the refused guesses' positions included."""
    from .test_speculative import PROMPT, RepeatWithBreaks

    gpu = onnxgen.load(folders["fp16"], provider="cuda", cuda_graph=cuda_graph)
    options: dict = {"max_new_tokens": 40, "eos_token_id": None, "do_sample": False, "logits_processors": [RepeatWithBreaks()]}
    plain = gpu.generate(PROMPT, **options)[0].token_ids
    assert gpu.generate(PROMPT, prompt_lookup_num_tokens=4, **options)[0].token_ids == plain
    assert gpu.last_stats is not None and 0 < gpu.last_stats.guesses_taken < gpu.last_stats.guessed_tokens


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_assisted_generation_on_cuda_gives_plain_decodings_text(folders: dict[str, Path], cuda_graph: bool) -> None:
    """A draft on the device too (its own cache, its steps captured with CUDA graphs), rewound after each check."""
    from .test_speculative import PROMPT, OtherEvery5th

    gpu = onnxgen.load(folders["fp16"], provider="cuda", cuda_graph=cuda_graph)
    draft = onnxgen.load(folders["fp16"], provider="cuda", cuda_graph=cuda_graph)
    options: dict = {"max_new_tokens": 40, "eos_token_id": None, "do_sample": False, "logits_processors": [OtherEvery5th()]}
    plain = gpu.generate(PROMPT, **options)[0].token_ids
    assert gpu.generate(PROMPT, assistant_model=draft, num_assistant_tokens=3, assistant_confidence_threshold=0.0, **options)[0].token_ids == plain
    assert gpu.last_stats is not None and 0 < gpu.last_stats.guesses_taken < gpu.last_stats.guessed_tokens


def test_lora_adapters_on_cuda(lora_base: Path, lora_adapters: dict[str, Path], tmp_path: Path) -> None:
    """An fp16 LoRA base on the device with two adapters: each adapter's greedy and beam tokens the CPU's (or parted
    from them at a near-tie), rows of different adapters in the batcher each what it gives alone; CUDA graphs with
    adapters refused."""
    from onnxgen.batcher import Batcher
    from onnxgen.errors import OptionsError
    from onnxgen.quantize import QuantizeOptions, quantize

    from .test_batcher import GREEDY, alone, result, submit, together

    quantize(lora_base, tmp_path / "fp16", QuantizeOptions(mode="fp16", max_ppl_increase=0.5), quiet=True)
    cpu = onnxgen.load(tmp_path / "fp16", threads=1, adapters=lora_adapters)
    gpu = onnxgen.load(tmp_path / "fp16", provider="cuda", adapters=lora_adapters)
    for adapter in ("one", "two", None):
        _greedy_matches(gpu, cpu, PROMPTS, adapter=adapter)
        _beams_match(gpu, cpu, PROMPTS, adapter=adapter)
    batcher = Batcher(gpu, max_batch=4)
    asks = [("one", "It is a truth"), (None, "Call me"), ("two", "The city of")]
    inboxes = together(batcher, gpu, lambda: [submit(batcher, gpu, [p], adapter=a, max_new_tokens=12, **GREEDY) for a, p in asks])
    for (adapter, prompt), inbox in zip(asks, inboxes):
        assert [c.token_ids for c in result(inbox)] == alone(gpu, [prompt], adapter=adapter, max_new_tokens=12, **GREEDY)
    with pytest.raises(OptionsError, match="cuda_graph with LoRA adapters is not supported"):
        onnxgen.load(tmp_path / "fp16", provider="cuda", cuda_graph=True, adapters=lora_adapters)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_guidance_beam_sampling_and_shared_calls_on_cuda(folders: dict[str, Path], cuda_graph: bool) -> None:
    """What came after the first GPU runs, on the device: classifier-free guidance (twin rows in the call's device
    cache) gives the CPU's greedy tokens (up to a near-tie); seeded beam sampling repeats, from one thread and from several;
    load(max_batch) calls made at once from threads each give what the model alone gives, async ones too."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from .test_batcher import GREEDY

    cpu = onnxgen.load(folders["fp16"], threads=1)
    gpu = onnxgen.load(folders["fp16"], provider="cuda", cuda_graph=cuda_graph)
    _greedy_matches(gpu, cpu, PROMPTS, guidance_scale=1.5, negative_prompt="Call me")
    beam_sampling = {"num_beams": 3, "do_sample": True, "top_k": 20, "seed": 7}
    once = _tokens(gpu, PROMPTS, **beam_sampling)
    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(lambda _: _tokens(gpu, PROMPTS, **beam_sampling), range(3))) == [once] * 3

    batched = onnxgen.load(folders["fp16"], provider="cuda", cuda_graph=cuda_graph, max_batch=4)
    calls = [(p, {"max_new_tokens": 8 + 3 * i, **GREEDY}) for i, p in enumerate(["It is a truth", "Call me", "The city of", "Once"])]
    with ThreadPoolExecutor(len(calls)) as pool:
        got = list(pool.map(lambda call: batched.generate(call[0], **call[1])[0].token_ids, calls))
    assert got == [gpu.generate(p, **options)[0].token_ids for p, options in calls]

    async def together() -> list[list[int]]:
        answers = await asyncio.gather(*(batched.agenerate(p, **options) for p, options in calls))
        return [a[0].token_ids for a in answers]

    assert asyncio.run(together()) == got
