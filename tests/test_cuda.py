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
def folders(exported: Path, quantized_folder) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    # int4 with fp32 compute (accuracy level 1): the CPU's default int8 compute would differ from CUDA's by design.
    return {"fp32": exported, "fp16": quantized_folder("fp16"), "int4": quantized_folder("int4", accuracy_level=1)}


def _tokens(model: onnxgen.Model, prompts: list[list[int]], **options: object) -> list[list[int]]:
    return [c.token_ids for c in model.generate(prompts, max_new_tokens=20, **options)]


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int4"])
def test_cuda_generates_the_cpu_tokens(folders: dict[str, Path], variant: str) -> None:
    """Greedy and beam search on a left-padded batch: the same tokens as the same folder on CPU."""
    cpu, gpu = onnxgen.load(folders[variant], threads=1), onnxgen.load(folders[variant], provider="cuda")
    assert gpu.runtime.session.get_providers()[0] == "CUDAExecutionProvider"
    for options in ({"do_sample": False}, {"do_sample": False, "num_beams": 3, "num_return_sequences": 2}):
        assert _tokens(gpu, PROMPTS, **options) == _tokens(cpu, PROMPTS, **options)


def test_fp16_on_cuda_is_close_to_fp32(folders: dict[str, Path]) -> None:
    full, half = onnxgen.load(folders["fp32"], threads=1), onnxgen.load(folders["fp16"], provider="cuda")
    assert half.runtime.cache_dtype == np.float16
    window = np.asarray([full.tokenizer.encode(EVAL_TEXT.read_text())[:96]])
    a, b = full.runtime.all_logits(window), half.runtime.all_logits(window)
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()  # fp16 keeps ~3 significant digits
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95


def test_beam_reorder_stays_on_the_device(folders: dict[str, Path]) -> None:
    rt = onnxgen.load(folders["fp16"], provider="cuda").runtime
    _, cache = rt.forward(np.array([[5, 6, 7], [8, 9, 10]]), np.ones((2, 3), np.int64), np.array([[0, 1, 2]] * 2), rt.empty_cache(2))
    moved = rt.reorder(cache, np.array([1, 1]), [])
    assert {v.device_name().lower() for v in moved} == {"cuda"}
    assert all(np.array_equal(m.numpy(), c.numpy()[[1, 1]]) for m, c in zip(moved, cache))


def test_seeded_sampling_on_cuda_repeats(folders: dict[str, Path]) -> None:
    gpu = onnxgen.load(folders["fp32"], provider="cuda")
    options = {"do_sample": True, "top_k": 20, "top_p": 0.9, "seed": 7, "num_return_sequences": 2}
    first = _tokens(gpu, PROMPTS, **options)
    assert first == _tokens(gpu, PROMPTS, **options) != _tokens(gpu, PROMPTS, **{**options, "seed": 8})


def test_a_padded_batch_on_cuda_equals_each_prompt_alone(folders: dict[str, Path]) -> None:
    gpu = onnxgen.load(folders["fp32"], provider="cuda")
    assert _tokens(gpu, PROMPTS) == [_tokens(gpu, [p])[0] for p in PROMPTS]


def test_cli_generates_on_cuda(folders: dict[str, Path]) -> None:
    def cli(provider: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "onnxgen", "generate", "It is a truth", "--model", str(folders["fp32"]),
                               "--strategy", "greedy", "--max-new-tokens", "15", "--provider", provider, "--stats"],
                              capture_output=True, text=True)

    gpu, cpu = cli("cuda"), cli("cpu")
    assert gpu.returncode == 0 and cpu.returncode == 0, gpu.stderr + cpu.stderr
    assert gpu.stdout == cpu.stdout and "tok/s" in gpu.stderr


def test_one_cuda_model_serves_many_threads(folders: dict[str, Path]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    gpu = onnxgen.load(folders["fp16"], provider="cuda")

    def call(i: int) -> list[list[int]]:
        return _tokens(gpu, PROMPTS[i % 3 :], do_sample=i % 2 == 0, seed=i, num_beams=1 if i % 2 == 0 else 2, logprobs=2)

    serial = [call(i) for i in range(24)]
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(call, range(24))) == serial
