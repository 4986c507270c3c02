"""Chat templates (onnxgen/chat.py): the export keeps a checkpoint's template, and the runtime renders a
conversation to the same prompt text as transformers' apply_chat_template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import onnxgen
from onnxgen.errors import OptionsError
from onnxgen.export import export
from onnxgen.quantize import QuantizeOptions, quantize

# What templates use: the special tokens by name, loop controls, tojson, raise_exception, {% generation %} blocks.
TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = 'You are helpful.' %}{% endif %}"
    "{{ bos_token }}system: {{ system | tojson }}\n"
    "{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('roles are user and assistant') }}{% endif %}"
    "{% if message['content'] == 'skip me' %}{% continue %}{% endif %}"
    "{% if message['role'] == 'assistant' %}assistant: {% generation %}{{ message['content'] }}{% endgeneration %}{{ eos_token }}\n"
    "{% else %}user: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Answer in French — « oui »."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "skip me"}, {"role": "user", "content": "Again"}],
]


@pytest.fixture(scope="module")
def chat_checkpoint(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = shutil.copytree(checkpoint, tmp_path_factory.mktemp("chat") / "ckpt")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def chat_folder(chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat-export") / "tiny-chat"
    export(str(chat_checkpoint), out, quiet=True)
    return out


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_a_conversation_renders_as_transformers_renders_it(chat_folder: Path, chat_checkpoint: Path, add_generation_prompt: bool) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(chat_checkpoint)
    model = onnxgen.load(chat_folder, threads=1)
    assert (chat_folder / "chat_template.jinja").read_text() == TEMPLATE
    for messages in CONVERSATIONS:
        text = model.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert text.startswith("<|endoftext|>system: ") and text.endswith("assistant:") == add_generation_prompt


def test_what_a_template_refuses_is_an_options_error(chat_folder: Path, exported: Path) -> None:
    model = onnxgen.load(chat_folder, threads=1)
    with pytest.raises(OptionsError, match="chat template refuses these messages: roles are user and assistant"):
        model.apply_chat_template([{"role": "tool", "content": "x"}])
    for bad in ([], [{"role": "user"}], "Hello", [{"role": "user", "content": 3}]):
        with pytest.raises(OptionsError, match="messages must be a non-empty list"):
            model.apply_chat_template(bad)  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="has no chat template"):
        onnxgen.load(exported, threads=1).apply_chat_template(CONVERSATIONS[0])


def test_a_quantized_folder_keeps_the_template(chat_folder: Path, tmp_path: Path) -> None:
    quantize(chat_folder, tmp_path / "int8", QuantizeOptions(mode="int8", max_ppl_increase=10.0), quiet=True)
    model = onnxgen.load(tmp_path / "int8", threads=1)
    assert model.apply_chat_template(CONVERSATIONS[1]) == onnxgen.load(chat_folder, threads=1).apply_chat_template(CONVERSATIONS[1])
