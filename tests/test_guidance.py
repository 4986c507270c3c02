"""Constrained decoding (guidance.py): the text a JSON schema, a regular expression or a Lark grammar allows, token
for token what llguidance's own numpy helpers give as a caller's logits processor, on every path a call can take."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import llguidance  # the `guidance` extra (which `serve` brings)
import llguidance.numpy
import numpy as np
import pytest

import onnxgen

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}
PROMPTS = ["It is a truth", "Call me"]


def reference(model: onnxgen.Model, grammar: str, rows: int) -> Any:
    """llguidance's documented use, as a caller's processor: a matcher per row fed the row's last token, its mask
    filled and applied with llguidance.numpy (in a call that names no constraint of onnxgen's)."""
    eos = model.defaults.eos_ids
    tokenizer = llguidance.LLTokenizer(str(model.tokenizer.path), n_vocab=model.dims.vocab_size, eos_token=eos)
    matchers = [llguidance.LLMatcher(tokenizer, grammar, log_level=0) for _ in range(rows)]
    ended = [False] * rows
    mask = llguidance.numpy.allocate_token_bitmask(rows, model.dims.vocab_size)
    calls = [0]

    def processor(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores = scores.copy()
        for row, matcher in enumerate(matchers):
            last = int(input_ids[row, -1])
            if ended[row] or (calls[0] and (last in eos or not matcher.consume_token(last))):
                ended[row] = True
                continue
            llguidance.numpy.fill_next_token_bitmask(matcher, mask, row)
            llguidance.numpy.apply_token_bitmask_inplace(scores[row : row + 1], mask[row : row + 1])
        calls[0] += 1
        return scores

    return processor


@pytest.mark.parametrize("options", [{"do_sample": False}, {"do_sample": True, "seed": 3, "temperature": 1.5},
                                     {"do_sample": True, "seed": 7, "top_k": 20, "top_p": 0.9}])
def test_json_schema_gives_json_it_allows_as_llguidance_itself_does(model: onnxgen.Model, options: dict[str, Any]) -> None:
    got = model.generate(PROMPTS, max_new_tokens=30, json_schema=SCHEMA, **options)
    for c in got:
        value = json.loads(c.text)  # whole, and ended by the end token where it was complete
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 99 and c.finish_reason == "eos"
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    expected = model.generate(PROMPTS, max_new_tokens=30, logits_processors=[reference(model, grammar, 2)], **options)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    free = model.generate(PROMPTS, max_new_tokens=30, **options)
    assert [c.token_ids for c in free] != [c.token_ids for c in got]  # random weights write no JSON unless held to it


def fresh_reference(model: onnxgen.Model, grammar: str, prompt_length: int) -> Any:
    """llguidance's documented use again, keeping nothing between calls: each row's matcher made anew and fed the row's
    generated tokens, whatever row it was before (beam search reorders rows); a row whose tokens the grammar does not
    take (a beam kept to fill its candidates) is left as it is."""
    eos = model.defaults.eos_ids
    tokenizer = llguidance.LLTokenizer(str(model.tokenizer.path), n_vocab=model.dims.vocab_size, eos_token=eos)

    def processor(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores = scores.copy()
        mask = llguidance.numpy.allocate_token_bitmask(len(scores), model.dims.vocab_size)
        for row, ids in enumerate(input_ids[:, prompt_length:].tolist()):
            matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            if any(t in eos for t in ids) or not all(matcher.consume_token(t) for t in ids):
                continue
            llguidance.numpy.fill_next_token_bitmask(matcher, mask, row)
            llguidance.numpy.apply_token_bitmask_inplace(scores[row : row + 1], mask[row : row + 1])
        return scores

    return processor


@pytest.mark.parametrize("constraint", [{"json_schema": SCHEMA}, {"regex": r"(yes|no|maybe|[0-9]{2,4})!"}])
def test_beam_search_holds_every_beam_as_llguidance_itself_does(model: onnxgen.Model, constraint: dict[str, Any]) -> None:
    """Beam search with a constraint: each new beam goes on from the state of the beam it came from, so the beams, their
    scores and the sequences returned are those of beam search with llguidance's matchers made anew at every step."""
    options = {"max_new_tokens": 24, "num_beams": 4, "num_return_sequences": 3, "length_penalty": 0.7}
    got = model.generate(PROMPTS[0], **constraint, **options)
    name, value = next(iter(constraint.items()))
    grammar = guidance_grammar(name, value)
    expected = model.generate(PROMPTS[0], logits_processors=[fresh_reference(model, grammar, len(model.tokenizer.encode(PROMPTS[0])))],
                              **options)
    assert [(c.token_ids, c.finish_reason) for c in got] == [(c.token_ids, c.finish_reason) for c in expected]
    assert [c.score for c in got] == pytest.approx([c.score for c in expected], abs=1e-4)
    assert len({tuple(c.token_ids) for c in got}) == 3 and all(c.finish_reason == "eos" for c in got)
    for c in got:
        assert json.loads(c.text) if name == "json_schema" else re.fullmatch(value, c.text)


def guidance_grammar(name: str, value: Any) -> str:
    """llguidance's grammar of one constraint, made as its documentation makes it (compact JSON, as onnxgen's default)."""
    if name == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(value, defaults={"whitespace_flexible": False})
    return llguidance.LLMatcher.grammar_from_regex(value)


def test_regex_and_lark_grammar_hold_the_whole_text(model: onnxgen.Model) -> None:
    for c in model.generate(PROMPTS, max_new_tokens=20, regex=r"[0-9]{3}-[0-9]{4}", do_sample=True, seed=1, num_return_sequences=2):
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", c.text) and c.finish_reason == "eos"
    lark = 'start: answer "!"\nanswer: "yes" | "no" | "maybe"'
    texts = {c.text for c in model.generate(PROMPTS * 4, max_new_tokens=10, grammar=lark, do_sample=True, seed=2)}
    assert texts <= {"yes!", "no!", "maybe!"} and texts
    # a schema as JSON text is the same schema
    assert model.generate(PROMPTS, max_new_tokens=30, json_schema=json.dumps(SCHEMA))[0].text == model.generate(PROMPTS, max_new_tokens=30, json_schema=SCHEMA)[0].text


def test_every_path_of_a_call_holds_the_constraint(model: onnxgen.Model) -> None:
    """stream(), the step loop, prompt lookup's guessed tokens and a text cut short (max_new_tokens) all give the
    tokens generate() gives; a text cut short is a valid start."""
    options = {"max_new_tokens": 30, "json_schema": SCHEMA, "do_sample": True, "seed": 5}
    expected = model.generate(PROMPTS[0], **options)[0]
    assert "".join(model.stream(PROMPTS[0], **options)) == expected.text
    g = model.generator(PROMPTS[0], **options)
    while not g.done:
        g.step()
    assert g.completions()[0].token_ids == expected.token_ids
    greedy = {**options, "do_sample": False}
    assert model.generate(PROMPTS[0], prompt_lookup_num_tokens=3, **greedy)[0].text == model.generate(PROMPTS[0], **greedy)[0].text
    short = model.generate(PROMPTS[0], **{**options, "max_new_tokens": 4})[0]
    assert expected.text.startswith(short.text) and short.finish_reason == "length"


def test_without_llguidance_the_error_names_the_extra(model: onnxgen.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if not installed: its import fails
    with pytest.raises(onnxgen.OptionsError, match=r"need llguidance: pip install 'onnxgen\[guidance\]'"):
        model.generate("Hello", regex="a")


def test_cli_takes_a_schema_inline_or_in_a_file_a_regex_and_a_grammar_file(exported: Path, tmp_path: Path) -> None:
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "answer.lark").write_text('start: "yes" | "no"')
    for flags, check in [(["--json-schema", str(tmp_path / "schema.json")], lambda text: set(json.loads(text)) == {"ok", "n"}),
                         (["--json-schema", json.dumps(SCHEMA)], lambda text: set(json.loads(text)) == {"ok", "n"}),  # inline
                         (["--regex", "[a-c]{2}[0-9]"], lambda text: re.fullmatch("[a-c]{2}[0-9]", text)),
                         (["--grammar", str(tmp_path / "answer.lark")], lambda text: text in ("yes", "no"))]:
        r = subprocess.run([sys.executable, "-m", "onnxgen", "generate", "Hello", "--model", str(exported), "--max-new-tokens", "30", *flags],
                           capture_output=True, text=True)
        assert r.returncode == 0 and check(r.stdout.rstrip("\n")), (flags, r.stdout, r.stderr)


def test_one_model_serves_constrained_calls_from_many_threads(exported: Path) -> None:
    """A fresh model (its llguidance tokenizer not built yet): 4 threads x 5 seeded constrained calls at once give
    the serial results."""
    from concurrent.futures import ThreadPoolExecutor

    model = onnxgen.load(exported, threads=1)
    calls = [{"json_schema": SCHEMA, "seed": seed} if seed % 2 else {"regex": "[a-z]{2,9}[.]", "seed": seed} for seed in range(20)]

    def run(options: dict[str, Any]) -> list[int]:
        return model.generate(PROMPTS[0], max_new_tokens=30, do_sample=True, **options)[0].token_ids

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, calls))
    assert together == [run(options) for options in calls]


def test_llguidances_tokenizer_is_built_once_and_goes_with_its_model(exported: Path) -> None:
    import gc

    from onnxgen import guidance

    model = onnxgen.load(exported, threads=1)
    for _ in range(3):
        model.generate(PROMPTS[0], max_new_tokens=5, regex="[a-z]+")
    assert [len(built) for tokenizer, built in guidance._tokenizers.items() if tokenizer is model.tokenizer] == [1]
    held = len(guidance._tokenizers)
    del model
    gc.collect()
    assert len(guidance._tokenizers) == held - 1
