"""The small model that ships inside the package (issue: offline default model)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import onnxgen
from onnxgen.model import BUNDLED


@pytest.fixture(scope="module")
def bundled() -> onnxgen.Model:
    return onnxgen.load(threads=1)  # no path: the bundled model


def test_manifest_carries_training_and_accuracy(bundled: onnxgen.Model) -> None:
    m = bundled.manifest
    assert m["training"]["final"]["val_ppl"] > 1 and m["training"]["corpus"]["train_sha256"]
    assert m["validation"]["passed"]
    if m["quantization"]:
        a = m["quantization"]["accuracy"]
        assert a["perplexity_increase"] <= m["quantization"]["options"]["max_ppl_increase"]


def test_repr_names_the_folder_weights_shape_and_device(bundled: onnxgen.Model) -> None:
    config = json.loads((BUNDLED / "config.json").read_text())
    assert repr(bundled) == (f"<onnxgen.Model 'prose-mini': {bundled.manifest['quantization']['mode']} weights, {config['n_layer']} layers x "
                             f"{config['n_embd']} ({config['n_head']} heads), vocabulary {config['vocab_size']}, context "
                             f"{config['n_positions']}, on cpu>")


@pytest.mark.parametrize("options", [
    {"do_sample": False, "repetition_penalty": 1.0},
    {"do_sample": False, "num_beams": 4, "no_repeat_ngram_size": 3},
    {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 0.8, "seed": 1},
    {"do_sample": True, "top_k": 40, "top_p": 1.0, "seed": 1},
    {"do_sample": True, "top_k": 0, "top_p": 0.9, "seed": 1},
    {"seed": 1},  # the shipped generation_config.json defaults
])
def test_generates_with_every_strategy(bundled: onnxgen.Model, options: dict) -> None:
    (c,) = bundled.generate("It is a truth universally acknowledged", max_new_tokens=20, **options)
    assert len(c.token_ids) >= 1 and c.text.strip()


def test_defaults_come_from_generation_config(bundled: onnxgen.Model) -> None:
    saved = json.loads((BUNDLED / "generation_config.json").read_text())
    assert bundled.defaults.do_sample is saved["do_sample"] is True
    assert bundled.defaults.top_p == saved["top_p"] and bundled.defaults.repetition_penalty == saved["repetition_penalty"]


@pytest.mark.parametrize("text", ["It is a truth universally acknowledged, that a single man...",
                                  "Naïve café — “quoted” 😀\n\nnew paragraph\t tab"])
def test_tokenizer_round_trips(bundled: onnxgen.Model, text: str) -> None:
    assert bundled.tokenizer.decode(bundled.tokenizer.encode(text)) == text


def test_cli_main_job_needs_no_model_argument() -> None:
    r = subprocess.run([sys.executable, "-m", "onnxgen", "generate", "It is a truth universally acknowledged",
                        "--max-new-tokens", "15", "--seed", "0"], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0


def test_cli_reads_the_prompt_from_standard_input_for_a_dash(bundled: onnxgen.Model) -> None:
    """`onnxgen generate -` continues standard input's text, its last newline included (a document piped in)."""
    text = "It is a truth universally acknowledged,\n"
    r = subprocess.run([sys.executable, "-m", "onnxgen", "generate", "-", "--max-new-tokens", "12", "--strategy", "greedy", "--json"],
                       input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["prompt"] == text
    assert [c["text"] for c in result["completions"]] == [c.text for c in bundled.generate(text, max_new_tokens=12, do_sample=False)]


def test_cli_version_names_onnxgen_and_the_onnxruntime_it_runs_on() -> None:
    import onnxruntime

    r = subprocess.run([sys.executable, "-m", "onnxgen", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"onnxgen {onnxgen.__version__}, onnxruntime {onnxruntime.__version__} (")
    assert "CPUExecutionProvider" in r.stdout


def test_token_healing_on_the_bundled_tokenizer(bundled: onnxgen.Model) -> None:
    """A trailing space is chosen again with the next word: the first token is a spaced one, the text starts after
    the space. Special tokens never extend a prompt's end ("<" is extended by "<|", not by "<|endoftext|>")."""
    from onnxgen.healing import heal

    tokenizer = bundled.tokenizer
    c = bundled.generate("The capital of France is ", max_new_tokens=6, token_healing=True, do_sample=False)[0]
    assert c.healed == " " and tokenizer.decode(c.token_ids[:1]).startswith(" ") and not c.text.startswith(" ")
    assert "The capital of France is " + c.text == "The capital of France is" + tokenizer.decode(c.token_ids)
    healed = heal(tokenizer, tokenizer.encode("x<"))
    assert healed is not None and healed.tail == "<"
    spelled = [tokenizer.id_to_token(int(i)) for i in healed.extensions]
    assert "<" in spelled and all(s.startswith("<") for s in spelled) and tokenizer.token_to_id("<|endoftext|>") not in healed.extensions
