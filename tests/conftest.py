"""Session fixtures: a tiny GPT-2 (random weights, real architecture) with its own small tokenizer,
and its onnxgen export. Nothing is downloaded and nothing outside the repository is read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

EVAL_TEXT = Path(__file__).parents[1] / "onnxgen" / "data" / "eval.txt"
EOS = "<|endoftext|>"


def make_checkpoint(folder: Path, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 128,
                    vocab_size: int | None = None, initializer_range: float = 0.3, **config: Any) -> Path:
    """A GPT-2 checkpoint folder as transformers writes it, with a 400-token byte-level BPE
    (the model's vocabulary may be larger, as GPT-2's own 50257 for the real shapes); `config`: more
    GPT2Config fields."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([EVAL_TEXT.read_text()], trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    eos = tok.token_to_id(EOS)
    torch.manual_seed(0)
    # A wide initializer gives peaked next-token distributions, so that greedy and beam choices are not
    # near-ties that float rounding could flip (the default 0.02 makes every logit almost equal).
    config = GPT2Config(vocab_size=vocab_size or tok.get_vocab_size(), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=eos, eos_token_id=eos, initializer_range=initializer_range, **config)
    model = GPT2LMHeadModel(config)
    # GPT-2's initializer zeroes every bias and sets LayerNorm to identity; give them values too, or a
    # graph edit that drops or misplaces a bias would still match PyTorch.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif ".ln_" in name:
                p.normal_(1.0, 0.1)
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS).save_pretrained(folder)
    GenerationConfig(bos_token_id=eos, eos_token_id=eos).save_pretrained(folder)
    return folder


def make_adapter(base: Path, folder: Path, seed: int = 1, **lora: Any) -> Path:
    """A LoRA adapter of `base` as peft saves one (adapter_config.json naming the base, the adapter's weights); its B
    matrices random, as after training (peft starts them at zero: an adapter that changes nothing would prove nothing)."""
    import peft
    import torch
    from transformers import GPT2LMHeadModel

    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"], **lora}
    model = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(base), peft.LoraConfig(fan_in_fan_out=True, **lora))  # GPT-2's Conv1D
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def onnxgen_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where mapped_weights keeps its packed copies (prepacked.py): a folder of the test run, never the user's
    cache; subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as m:
        folder = tmp_path_factory.mktemp("onnxgen-cache")
        m.setenv("ONNXGEN_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from onnxgen.export import export

    out = tmp_path_factory.mktemp("exports") / "tiny"
    export(str(checkpoint), out, quiet=True)
    return out


@pytest.fixture(scope="session")
def exported_growing(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint with MultiHeadAttention's growing cache (`--growing-cache`)."""
    from onnxgen.export import ExportOptions, export

    out = tmp_path_factory.mktemp("exports") / "tiny-growing"
    export(str(checkpoint), out, ExportOptions(cache_in_place=False), quiet=True)
    return out


HEAD_PART_BYTES = 20_000  # the tiny model's head (400 x 64 fp32, 102,400 bytes) in 6 parts


@pytest.fixture(scope="session")
def exported_parts(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint with its head in parts (graph.split_tied_head), as gpt2's 154 MB head is exported."""
    from onnxgen import graph
    from onnxgen.export import export

    out = tmp_path_factory.mktemp("exports") / "tiny-parts"
    saved, graph.HEAD_PART_BYTES = graph.HEAD_PART_BYTES, HEAD_PART_BYTES
    try:
        export(str(checkpoint), out, quiet=True)
    finally:
        graph.HEAD_PART_BYTES = saved
    return out


@pytest.fixture(scope="session")
def lora_base(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported with --lora: its graph takes LoRA adapters at run time (tests/test_lora.py)."""
    from onnxgen.export import ExportOptions, export

    out = tmp_path_factory.mktemp("lora") / "base"
    export(str(checkpoint), out, ExportOptions(lora=True), quiet=True)
    return out


@pytest.fixture(scope="session")
def peft_adapters(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters as peft saves them: rank 4 on every linear layer, and rank 2 on c_attn alone (peft's default for GPT-2)."""
    folder = tmp_path_factory.mktemp("peft")
    return {"one": make_adapter(checkpoint, folder / "one", seed=1),
            "two": make_adapter(checkpoint, folder / "two", seed=2, r=2, lora_alpha=4, target_modules=["c_attn"])}


@pytest.fixture(scope="session")
def lora_adapters(peft_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Those adapters exported apart (--lora), for lora_base."""
    from onnxgen.export import ExportOptions, export

    folder = tmp_path_factory.mktemp("adapters")
    for name, adapter in peft_adapters.items():
        export(str(adapter), folder / name, ExportOptions(lora=True), quiet=True)
    return {name: folder / name for name in peft_adapters}


@pytest.fixture(scope="session")
def model(exported: Path):  # type: ignore[no-untyped-def]
    import onnxgen

    return onnxgen.load(exported, threads=1)


@pytest.fixture(scope="session")
def torch_model(checkpoint: Path):  # type: ignore[no-untyped-def]
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="session")
def quantized_folder(exported: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """quantized_folder(mode, **options): the tiny export quantized once per session for each set of options."""
    from onnxgen.quantize import QuantizeOptions, quantize

    made: dict[tuple[str, tuple[tuple[str, object], ...]], Path] = {}

    def make(mode: str, **options: object) -> Path:
        key = (mode, tuple(sorted(options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("quantized") / mode
            # Random weights give near-uniform distributions where any rounding flips the top token: the
            # budget here checks the machinery; the shipped model's report is the accuracy figure that means something.
            quantize(exported, out, QuantizeOptions(mode=mode, max_ppl_increase=0.5, **options), quiet=True)  # type: ignore[arg-type]
            made[key] = out
        return made[key]

    return make
