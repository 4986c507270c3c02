"""The bad-input corpus: every input here must give a specific onnxgen error (API) or one line on stderr
with the right exit code (CLI): never a traceback, a hang, or a silent accept."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxgen
from onnxgen.errors import ContextLengthError, ModelFolderError, OnnxgenError, OptionsError, ProviderError
from onnxgen.model import BUNDLED

NAN, INF = float("nan"), float("inf")

# (options for generate("Hello", ...), the error's message must contain this)
BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"seed": -1}, "seed"), ({"seed": NAN}, "seed"), ({"seed": "x"}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": 1.0}, "seed"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": "5"}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"), ({"max_new_tokens": None}, "max_new_tokens"),
    ({"min_new_tokens": 30, "max_new_tokens": 5}, "min_new_tokens"), ({"min_new_tokens": -1}, "min_new_tokens"),
    ({"num_beams": NAN}, "num_beams"), ({"num_beams": 0}, "num_beams"), ({"num_beams": 2.5}, "num_beams"),
    ({"do_sample": "no"}, "do_sample"), ({"do_sample": 1}, "do_sample"), ({"truncate_prompt": "no"}, "truncate_prompt"),
    ({"top_k": 2.5}, "top_k"), ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": NAN}, "top_p"),
    ({"stop": 5}, "stop"), ({"stop": [""]}, "stop"), ({"stop": ["a", 5]}, "stop"), ({"stop": {"a": 1}}, "stop"),
    ({"repetition_penalty": INF}, "repetition_penalty"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"), ({"repetition_penalty": 1e9}, "repetition_penalty"),
    ({"do_sample": True, "temperature": 1e300}, "temperature"), ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"do_sample": True, "temperature": NAN}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"do_sample": True, "temperature": 1e-50}, "temperature"), ({"repetition_penalty": 1e-50}, "repetition_penalty"),
    ({"encoder_repetition_penalty": 0.009}, "encoder_repetition_penalty"),
    ({"length_penalty": NAN, "num_beams": 2}, "length_penalty"), ({"length_penalty": INF}, "length_penalty"),
    ({"length_penalty": 512, "num_beams": 2}, "length_penalty"),  # found by the property test below: an OverflowError
    ({"early_stopping": "yes"}, "early_stopping"), ({"early_stopping": 1}, "early_stopping"),
    ({"pad_token_id": 10**9}, "pad_token_id"), ({"pad_token_id": -1}, "pad_token_id"), ({"pad_token_id": 2.5}, "pad_token_id"),
    ({"eos_token_id": 10**9}, "eos_token_id"), ({"eos_token_id": "x"}, "eos_token_id"), ({"eos_token_id": [1, "x"]}, "eos_token_id"),
    ({"logprobs": -1}, "logprobs"), ({"logprobs": 21}, "logprobs"), ({"logprobs": 2.5}, "logprobs"),
    ({"logit_bias": {10**9: 1.0}}, "logit_bias"), ({"logit_bias": {1: NAN}}, "logit_bias"), ({"logit_bias": {1: 1000}}, "logit_bias"),
    ({"logit_bias": "x"}, "logit_bias"), ({"logit_bias": {"one": 1}}, "logit_bias"),
    ({"logits_processors": ["x"]}, "logits_processors"), ({"stopping_criteria": [1]}, "stopping_criteria"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": NAN}, "frequency_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"), ({"min_p": NAN}, "min_p"),
    ({"typical_p": 0.0}, "typical_p"), ({"typical_p": 1.5}, "typical_p"), ({"bad_words_ids": [[]]}, "bad_words_ids"),
    ({"bad_words_ids": [1, 2]}, "bad_words_ids"), ({"bad_words_ids": [[10**9]]}, "bad_words_ids"), ({"suppress_tokens": "x"}, "suppress_tokens"),
    ({"suppress_tokens": [-1]}, "suppress_tokens"), ({"suppress_tokens": list(range(400))}, "nothing is left"),
    ({"frequency_penalty": "high"}, "frequency_penalty"),
    ({"num_return_sequences": 0}, "num_return_sequences"), ({"num_beams": 2, "num_return_sequences": 5}, "num_return_sequences"),
    ({"num_return_sequences": 2}, "greedy"),
    ({"max_new_tokens": 10**6}, "context window"), ({"foo": 1}, "unknown"),
    ({"epsilon_cutoff": 1.0}, "epsilon_cutoff"), ({"epsilon_cutoff": -0.1}, "epsilon_cutoff"), ({"eta_cutoff": NAN}, "eta_cutoff"),
    ({"eta_cutoff": "x"}, "eta_cutoff"), ({"begin_suppress_tokens": [10**9]}, "begin_suppress_tokens"),
    ({"begin_suppress_tokens": 3}, "begin_suppress_tokens"), ({"begin_suppress_tokens": list(range(400))}, "nothing is left"),
    ({"sequence_bias": {(1, 2): NAN}}, "sequence_bias"), ({"sequence_bias": {(): 1.0}}, "sequence_bias"),
    ({"sequence_bias": {1: 1.0}}, "sequence_bias"), ({"sequence_bias": [[[1, 10**9], 1.0]]}, "sequence_bias"),
    ({"sequence_bias": [[1, 2]]}, "sequence_bias"), ({"sequence_bias": "x"}, "sequence_bias"),
    ({"exponential_decay_length_penalty": (2, 0.0)}, "exponential_decay_length_penalty"),
    ({"exponential_decay_length_penalty": (-1, 1.5)}, "exponential_decay_length_penalty"),
    ({"exponential_decay_length_penalty": (2.5, 1.5)}, "exponential_decay_length_penalty"),
    ({"exponential_decay_length_penalty": (2, INF)}, "exponential_decay_length_penalty"),
    ({"exponential_decay_length_penalty": 2}, "exponential_decay_length_penalty"),
    ({"forced_eos_token_id": 10**9}, "forced_eos_token_id"), ({"forced_eos_token_id": "x"}, "forced_eos_token_id"),
    ({"forced_eos_token_id": 5, "suppress_tokens": [5]}, "forced_eos_token_id is in suppress_tokens"),
    ({"remove_invalid_values": 1}, "remove_invalid_values"), ({"renormalize_logits": "yes"}, "renormalize_logits"),
    ({"max_time": 0}, "max_time"), ({"max_time": INF}, "max_time"), ({"max_time": "1s"}, "max_time"),
    ({"max_length": 0}, "max_length"), ({"max_length": 2.5}, "max_length"), ({"min_length": -1}, "min_length"),
    ({"min_length": "3"}, "min_length"),  # checked, though max_new_tokens given beside them wins
    ({"prompt_lookup_num_tokens": 0}, "prompt_lookup_num_tokens"), ({"prompt_lookup_num_tokens": 2.5}, "prompt_lookup_num_tokens"),
    ({"prompt_lookup_num_tokens": "5"}, "prompt_lookup_num_tokens"), ({"max_matching_ngram_size": -1}, "max_matching_ngram_size"),
    ({"prompt_lookup_num_tokens": 3, "num_beams": 2}, "not beam search"),
    ({"prompt_lookup_num_tokens": 3, "do_sample": True, "num_return_sequences": 2}, "one sequence a call"),
    ({"guidance_scale": -1.0}, "guidance_scale"), ({"guidance_scale": "x"}, "guidance_scale"), ({"guidance_scale": 1e9}, "guidance_scale"),
    ({"guidance_scale": 2.0, "num_beams": 2}, "not beam search"), ({"negative_prompt": "x"}, "give guidance_scale"),
    ({"negative_prompt": "x", "guidance_scale": 1.0}, "give guidance_scale"), ({"guidance_scale": 2, "negative_prompt": 5}, "negative_prompt"),
    ({"guidance_scale": 2.0, "negative_prompt": [10**9]}, "token ids"),
    ({"guidance_scale": 2.0, "prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens and guidance_scale"),
    ({"guidance_scale": 2.0, "negative_prompt": [1] * 5000}, "context window"),
    ({"stop_strings": [""]}, "must not be empty"),
    ({"stop_strings": [3]}, "stop_strings"),
    ({"prefix_allowed_tokens_fn": [1, 2]}, "prefix_allowed_tokens_fn must be a function"),
    ({"prefix_allowed_tokens_fn": lambda b, ids: [10**9]}, "prefix_allowed_tokens_fn returned"),
    ({"prefix_allowed_tokens_fn": lambda b, ids: ["a"]}, "prefix_allowed_tokens_fn returned"),
    ({"encoder_repetition_penalty": 0}, "encoder_repetition_penalty"), ({"encoder_repetition_penalty": NAN}, "encoder_repetition_penalty"),
    ({"encoder_no_repeat_ngram_size": -1}, "encoder_no_repeat_ngram_size"), ({"encoder_no_repeat_ngram_size": 1.5}, "encoder_no_repeat_ngram_size"),
    ({"json_schema": 5}, "json_schema must be a JSON schema"), ({"json_schema": "{not json"}, "json_schema must be a JSON object"),
    ({"json_schema": {"type": "nosuch"}}, "json_schema is not usable"), ({"regex": "("}, "regex is not usable: .*invalid regex"),
    ({"regex": 5}, "regex must be a string"), ({"grammar": "start: nosuch"}, "grammar is not usable: .*unknown name"),
    ({"regex": "a", "grammar": 'start: "a"'}, "one constraint a call: got regex and grammar"),
    ({"regex": "a", "eos_token_id": None}, "regex needs an end token"),
    ({"regex": "a", "min_new_tokens": 3}, "leave row 0 no token"),  # the text is complete at "a": only the end is left
    ({"watermarking_config": 5}, "watermarking_config must be"), ({"watermarking_config": {"bias": INF}}, "bias"),
    ({"watermarking_config": {"greenlist_ratio": 0}}, "greenlist_ratio"), ({"watermarking_config": {"hashing_key": 1.5}}, "hashing_key"),
    ({"watermarking_config": {"hashing_key": True}}, "hashing_key"), ({"watermarking_config": {"context_width": 2.0}}, "context_width"),
    ({"watermarking_config": {"seeding_scheme": None}}, "seeding_scheme"), ({"watermarking_config": {"salt": 1}}, "no field"),
    ({"max_new_token": 3}, r"unknown generation option\(s\): 'max_new_token' \(did you mean 'max_new_tokens'\?\)$"),
    ({"": 1, "zzz": 2}, r"unknown generation option\(s\): '', 'zzz'$"),  # a name shown even where it is empty
]

# a caller's processor or criterion that breaks transformers' contract: (options, the error's message must contain this)
BAD_CALLABLES: list[tuple[dict[str, Any], str]] = [
    ({"logits_processors": [lambda ids, scores: None]}, r"logits_processors\[0\] returned NoneType: expected scores of shape"),
    ({"logits_processors": [lambda ids, scores: scores[0]]}, r"returned ndarray of shape \(\d+,\)"),
    ({"logits_processors": [lambda ids, scores: scores[:, :10]]}, r"returned ndarray of shape \(\d+, 10\)"),  # was taken: tokens from 10
    ({"logits_processors": [lambda ids, scores: np.full(scores.shape, "a")]}, "returned ndarray"),
    ({"logits_processors": [lambda ids, scores: scores, lambda ids, scores: scores * np.nan]}, r"logits_processors\[1\] returned NaN"),
    ({"logits_processors": [lambda ids, scores: np.full_like(scores, np.inf)]}, r"NaN or \+inf"),
    ({"logits_processors": [lambda ids, scores: np.full_like(scores, -np.inf)]}, "banned every token of row 0"),
    ({"stopping_criteria": [lambda ids, scores: None]}, r"stopping_criteria\[0\] returned NoneType: expected a bool, or one per row \(\d+\)"),
    ({"stopping_criteria": [lambda ids, scores: "yes"]}, "returned str"),  # was taken as True
    ({"stopping_criteria": [lambda ids, scores: np.zeros(5, bool)]}, r"returned ndarray of shape \(5,\)"),
    ({"stopping_criteria": [lambda ids, scores: ids[:, -1]]}, "returned ndarray"),  # token ids, not bools
]

# prompts that are neither text nor token ids, or ids the model does not have
BAD_PROMPTS: list[tuple[Any, type[Exception], str]] = [
    ([[1.5, 2.0]], OptionsError, "prompt"), ([True, False], OptionsError, "prompt"), ({"a": 1}, OptionsError, "prompt"),
    (5, OptionsError, "prompt"), (None, OptionsError, "prompt"), ([], OptionsError, "no prompt"), (set(), OptionsError, "prompt"),
    (b"\xff\xfe", OptionsError, "UTF-8"), ("a\udc80b", OptionsError, "not valid text"), ([-1], OptionsError, "token ids"),
    ([10**9], OptionsError, "token ids"), (["x", 5], OptionsError, "prompt"), (np.array([1.5, 2.0]), OptionsError, "prompt"),
    (np.zeros((1, 2, 3), np.int64), OptionsError, "prompt"), ([1] * 5000, ContextLengthError, "context window"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[repr(o)[:40] for o, _ in BAD_OPTIONS])
def test_bad_options_are_refused_by_name(model: onnxgen.Model, options: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        model.generate("Hello", max_new_tokens=options.pop("max_new_tokens", 5), **options)


CALLABLE_CASES = [(strategy, options, message) for options, message in BAD_CALLABLES for strategy in ("greedy", "sample", "beam")]


@pytest.mark.parametrize(("strategy", "options", "message"), CALLABLE_CASES, ids=[f"{s}-{m[:30]}" for s, _, m in CALLABLE_CASES])
def test_bad_processors_and_criteria_are_refused_by_name(model: onnxgen.Model, strategy: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        model.generate(["Hello", "Once upon a time"], max_new_tokens=3, **onnxgen.STRATEGIES[strategy], **options)


@pytest.mark.parametrize(("prompt", "error", "message"), BAD_PROMPTS, ids=[repr(p)[:30] for p, _, _ in BAD_PROMPTS])
def test_bad_prompts_are_refused(model: onnxgen.Model, prompt: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        model.generate(prompt, max_new_tokens=3)


def test_api_misuse_gets_onnxgen_errors(model: onnxgen.Model) -> None:
    """Calls shaped wrong: a row the generator does not have (-1 used to end the last row, 2 an IndexError), options
    as a dict (an AttributeError), a folder that is not a path (a TypeError)."""
    generator = model.generator(["Hello", "Hi"], max_new_tokens=3)
    for row in (2, -1, "0", 1.0, True):
        with pytest.raises(OptionsError, match="row must be one of this generator's rows, 0 to 1"):
            generator.finish(row)  # type: ignore[arg-type]
    assert generator.finish_reasons == [None, None]
    generator.finish(np.int64(1))
    assert generator.finish_reasons == [None, "cancelled"]
    beams = model.generator(["Hello", "Hi"], max_new_tokens=3, num_beams=2, num_return_sequences=2)
    for row in (4, -1, "0", 1.0, True):
        with pytest.raises(OptionsError, match="row must be one of this generator's rows, 0 to 3"):
            beams.finish(row)  # type: ignore[arg-type]
    assert not beams.cancelled.any()
    for running in (generator, model.generator("Hello", max_new_tokens=3, num_beams=2)):  # no finish reason yet: not "length"
        with pytest.raises(OptionsError, match=r"the generator is still running: step\(\) until done, or cancel\(\)"):
            running.completions()
        running.cancel()
        assert running.completions()
    with pytest.raises(OptionsError, match="options must be a GenerationOptions, got dict"):
        model.generate("Hello", {"max_new_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(ModelFolderError, match="a model folder is a path"):
        onnxgen.load(5)  # type: ignore[arg-type]
    # The tokenizer's own calls: the tokenizers library's TypeError and OverflowError were what came out
    for text in (5, None, b"Hello", ["Hello"]):
        with pytest.raises(OptionsError, match=f"text to encode must be a string, got {type(text).__name__}"):
            model.tokenizer.encode(text)  # type: ignore[arg-type]
    for ids in ("Hello", 5, [1.5], [-1], [[1, 2]], None):
        with pytest.raises(OptionsError, match="ids to decode must be a list of non-negative integer token ids, got "):
            model.tokenizer.decode(ids)  # type: ignore[arg-type]
    assert model.tokenizer.decode(np.array(model.tokenizer.encode("Hello there"))) == "Hello there"
    with pytest.raises(OptionsError, match="token must be a string"):
        model.tokenizer.token_to_id(5)  # type: ignore[arg-type]
    first = model.tokenizer.encode("Hello")[0]
    assert model.tokenizer.token_to_id(model.tokenizer.spell(first)) == first  # "H": no leading space to spell as Ġ


def test_an_output_that_is_or_nests_in_its_source_is_refused(exported: Path, checkpoint: Path, tmp_path: Path) -> None:
    """With --force, quantize or export onto the folder it reads replaced that folder (the fp32 parent, the
    checkpoint); an output inside it made a model folder within a model folder. Refused before any work."""
    from onnxgen.export import ExportOptions, export
    from onnxgen.quantize import QuantizeOptions, quantize

    before = {p: p.stat().st_mtime_ns for p in (*exported.iterdir(), *checkpoint.iterdir())}
    with pytest.raises(OnnxgenError, match="is the folder it is made from"):
        quantize(exported, exported, QuantizeOptions(force=True), quiet=True)
    with pytest.raises(OnnxgenError, match="would be inside, or hold, the folder it is made from"):
        quantize(exported, exported / "int8", QuantizeOptions(), quiet=True)
    held = shutil.copytree(exported, tmp_path / "holder" / "model")  # a copy: were the check to fail, force would replace its folder
    with pytest.raises(OnnxgenError, match="would be inside, or hold, the folder it is made from"):
        quantize(held, tmp_path / "holder", QuantizeOptions(force=True), quiet=True)
    assert (held / "onnxgen.json").is_file()
    with pytest.raises(OnnxgenError, match="is the folder it is made from"):
        export(str(checkpoint), checkpoint, ExportOptions(force=True), quiet=True)
    assert {p: p.stat().st_mtime_ns for p in (*exported.iterdir(), *checkpoint.iterdir())} == before


def test_what_is_accepted_is_what_it_looks_like(model: onnxgen.Model) -> None:
    """numpy ids and arrays, bytes and None for stop are taken as what they plainly mean."""
    ids = [12, 40, 7]
    expected = model.generate([ids], max_new_tokens=4)[0].token_ids
    for prompt in (np.array(ids), np.array([ids]), [np.int64(t) for t in ids], tuple(ids)):
        assert [c.token_ids for c in model.generate(prompt, max_new_tokens=np.int64(4))] == [expected]
    text = model.generate("Hello", max_new_tokens=4)[0].text
    assert model.generate(b"Hello", max_new_tokens=4, stop=None)[0].text == text
    # asking for beams asks for beam search, also over a sampling default (the bundled model's case)
    assert len(model.generate("Hello", onnxgen.GenerationOptions(do_sample=True), max_new_tokens=4, num_beams=2)) == 1


@pytest.mark.parametrize("threads", [10**6, -1, 0, 2.5, True, "2"])
def test_threads_out_of_range_are_refused_at_once(exported: Path, threads: Any) -> None:
    start = time.perf_counter()
    with pytest.raises(OptionsError, match="threads"):
        onnxgen.load(exported, threads=threads)
    assert time.perf_counter() - start < 5  # 10**6 threads used to hang in session creation for minutes


def test_unknown_provider(exported: Path) -> None:
    with pytest.raises(ProviderError, match="unknown provider"):
        onnxgen.load(exported, provider="tpu")  # type: ignore[arg-type]


def _edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _set_dim(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["dims"].__setitem__(name, value)


def _restamped(breaking: Callable[[Path], Any]) -> Callable[[Path], None]:
    """Break the folder, then describe its files in the manifest again (as a careless tool would), so that
    the size check passes and the check behind it has to find the problem."""
    from onnxgen import manifest

    def apply(folder: Path) -> None:
        breaking(folder)
        _edit_json(folder / "onnxgen.json", lambda m: m.__setitem__("files", manifest.describe_files(folder)))

    return apply


def _flip_a_weight_byte(folder: Path) -> None:
    """Same size, still loads: only the sha256 tells."""
    data = bytearray((folder / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "model.onnx.data").write_bytes(bytes(data))


# (what breaks the folder, the ModelFolderError's message must contain this)
BROKEN_FOLDERS: list[tuple[str, Callable[[Path], None], str]] = [
    ("dims.n_head", lambda f: _edit_json(f / "onnxgen.json", _set_dim("n_head", 8)), "disagree"),
    ("dims.n_layer", lambda f: _edit_json(f / "onnxgen.json", _set_dim("n_layer", 3)), "disagree"),
    ("dims.n_positions", lambda f: _edit_json(f / "onnxgen.json", _set_dim("n_positions", 4096)), "disagree"),
    ("dims.vocab_size", lambda f: _edit_json(f / "onnxgen.json", _set_dim("vocab_size", 50257)), "disagree"),
    ("dims and config n_head", _restamped(lambda f: (_edit_json(f / "onnxgen.json", _set_dim("n_head", 8)),
                                          _edit_json(f / "config.json", lambda c: c.__setitem__("n_head", 8)))), "heads"),
    ("dims and config n_layer", _restamped(lambda f: (_edit_json(f / "onnxgen.json", _set_dim("n_layer", 3)),
                                           _edit_json(f / "config.json", lambda c: c.__setitem__("n_layer", 3)))), "layers"),
    ("dims and config vocab", _restamped(lambda f: (_edit_json(f / "onnxgen.json", _set_dim("vocab_size", 500)),
                                         _edit_json(f / "config.json", lambda c: c.__setitem__("vocab_size", 500)))), "scores"),
    ("no dims", lambda f: _edit_json(f / "onnxgen.json", lambda m: m.pop("dims")), "dims"),
    ("dims not numbers", lambda f: _edit_json(f / "onnxgen.json", _set_dim("n_head", "4")), "dims"),
    ("tokenizer {}", _restamped(lambda f: (f / "tokenizer.json").write_text("{}")), "tokenizer"),
    ("tokenizer larger than the model", _restamped(lambda f: (_edit_json(f / "onnxgen.json", _set_dim("vocab_size", 300)),
                                                   _edit_json(f / "config.json", lambda c: c.__setitem__("vocab_size", 300)))), "tokens"),
    ("no config.json", lambda f: (f / "config.json").unlink(), "config.json"),
    ("no tokenizer.json", lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json"),
    ("truncated weights", lambda f: (f / "model.onnx.data").write_bytes((f / "model.onnx.data").read_bytes()[:1000]), "bytes"),
    ("manifest not JSON", lambda f: (f / "onnxgen.json").write_text("{"), "JSON"),
    ("manifest format", lambda f: _edit_json(f / "onnxgen.json", lambda m: m.__setitem__("format_version", 99)), "format version"),
]


@pytest.mark.parametrize(("breaking", "message"), [(b, m) for _, b, m in BROKEN_FOLDERS], ids=[n for n, _, _ in BROKEN_FOLDERS])
def test_broken_folders_are_refused_at_load(exported: Path, tmp_path: Path, breaking: Callable[[Path], None], message: str) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(exported, folder)
    breaking(folder)
    with pytest.raises(ModelFolderError, match=message):
        onnxgen.load(folder)


def test_a_file_given_for_its_folder_names_the_folder(exported: Path, tmp_path: Path) -> None:
    for name in ("model.onnx", "onnxgen.json"):
        with pytest.raises(ModelFolderError, match=f"is a file, not a model folder: give its folder, {re.escape(str(exported))}$"):
            onnxgen.load(exported / name)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ModelFolderError, match="notes.txt is a file, not a model folder$"):
        onnxgen.load(tmp_path / "notes.txt")


def test_corrupted_weights_are_found_by_verify(exported: Path, tmp_path: Path) -> None:
    folder = tmp_path / "corrupted"
    shutil.copytree(exported, folder)
    _flip_a_weight_byte(folder)
    with pytest.raises(ModelFolderError, match="sha256"):
        onnxgen.load(folder, verify=True)
    r = subprocess.run([sys.executable, "-m", "onnxgen", "verify", "--model", str(folder)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "sha256" in r.stderr
    r = subprocess.run([sys.executable, "-m", "onnxgen", "verify", "--model", str(exported)], capture_output=True, text=True)
    assert r.returncode == 0 and "matches" in r.stdout


def test_pipeline_max_length(model: onnxgen.Model) -> None:
    generator = onnxgen.TextGenerationPipeline(model)
    with pytest.raises(OptionsError, match="max_length"):
        generator("It is a truth universally acknowledged", max_length=3)
    out = generator("It is a truth", max_length=4, max_new_tokens=6, do_sample=False)  # max_new_tokens wins
    assert out[0]["generated_text"] == "It is a truth" + model.generate("It is a truth", max_new_tokens=6)[0].text
    with pytest.raises(OptionsError, match="string"):
        generator([1, 2, 3])  # type: ignore[arg-type]


# -- the command line --------------------------------------------------------------------------------

def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "onnxgen", *args], capture_output=True, env=env)


CLI_CASES: list[tuple[list[str], int, str]] = [
    (["generate", "x", "--max-new-tokens", "abc"], 2, "--max-new-tokens"),
    (["generate", "x", "--strategy", "nucleus"], 2, "nucleus"),
    (["generate", "x", "--bogus"], 2, "--bogus"),
    (["quantize", "-m", "x", "-o", "y", "--mode", "int2"], 2, "int2"),
    (["nosuch"], 2, "nosuch"),
    (["generate"], 2, "prompt"),
    (["bench", "--runs", "0"], 1, "runs"),
    (["bench", "--batch", "0"], 1, "got batch 0, 32 prompt tokens"),
    (["serve", "--port", "70000"], 2, "--port"),  # was taken: "serving ... on :70000"
    (["serve", "--port", "0"], 2, "--port"),
    (["serve", "--max-tokens", "0"], 2, "--max-tokens"),
    (["serve", "--tool-call-parser", "mistral"], 1, "--tool-call-parser: onnxgen reads hermes, not 'mistral'"),
    (["export", "/nope", "-o", "/tmp/onnxgen-never"], 1, "no such folder"),
    (["generate", "x", "--threads", "1000000"], 1, "threads"),
    (["generate", "x", "--threads", "-1"], 1, "threads"),
    (["generate", "x", "--seed", "-1"], 1, "seed"),
    (["generate", "x", "--top-p", "2"], 1, "top_p"),
    (["generate", "x", "--temperature", "nan", "--strategy", "sample"], 1, "temperature"),
    (["generate", "x", "--model", "/nope"], 1, "not found"),
    (["verify", "--model", "/nope"], 1, "not found"),
    (["generate", "x", "--assistant-model", "/nope"], 1, "not found"),
    (["generate", "x", "--assistant-model", str(BUNDLED), "--strategy", "beam"], 1, "not beam search"),
    (["serve", "--assistant-model", "/nope"], 1, "not found"),
    (["score"], 2, "Missing argument 'files"),
    (["score", "/nope.txt"], 1, "cannot read /nope.txt: No such file"),
    (["score", str(Path(__file__).parent / "__init__.py")], 1, "nothing to score"),  # empty
    (["score", str(Path(__file__)), "--stride", "0"], 1, "stride must be"),
    (["generate", "x", "--json-schema", "/nope.json"], 1, "cannot read /nope.json: No such file"),
    (["generate", "x", "--regex", "(", "--max-new-tokens", "3"], 1, "regex is not usable"),
    (["generate", "x", "--watermark-key", "abc"], 2, "--watermark-key"),
    (["generate", "x", "--watermark-key", str(2**63)], 1, "hashing_key must be an integer in [0, 2**63)"),
    (["detect-watermark"], 2, "Missing argument 'files"),
    (["detect-watermark", "/nope.txt", "--watermark-key", "1"], 1, "cannot read /nope.txt: No such file"),
    (["detect-watermark", str(Path(__file__).parent / "__init__.py")], 1, "no watermarking_config"),
    (["detect-watermark", str(Path(__file__).parent / "__init__.py"), "--watermark-key", "1"], 1, "needs at least 2 tokens"),
    (["detect-watermark", str(Path(__file__)), "--watermark-key", "1", "--z-threshold", "nan"], 1, "z_threshold"),
    (["serve", "--watermark-key", "-1"], 1, "hashing_key"),
]


@pytest.mark.parametrize(("args", "code", "message"), CLI_CASES, ids=[" ".join(a) for a, _, _ in CLI_CASES])
def test_cli_errors_are_one_line(args: list[str], code: int, message: str) -> None:
    r = _cli(*args)
    err = r.stderr.decode()
    assert r.returncode == code, err
    # lower(): typer before 0.16 names a missing argument in capitals ('PROMPT')
    assert err.startswith("onnxgen: error: ") and err.count("\n") == 1 and message.lower() in err.lower() and "Traceback" not in err


def test_cli_takes_a_prompt_that_is_not_utf8() -> None:
    import os

    r = subprocess.run([os.fsencode(sys.executable), b"-m", b"onnxgen", b"generate", b"caf\xe9"], capture_output=True)
    assert r.returncode == 1 and r.stderr.startswith(b"onnxgen: error: prompt is not valid text") and b"Traceback" not in r.stderr


def test_cli_beams_over_a_sampling_default() -> None:
    """The bundled model samples by default; --num-beams alone means beam search, as the user meant."""
    r = _cli("generate", "It was", "--num-beams", "3", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr.decode()


def test_cli_ctrl_c_says_interrupted() -> None:
    """Ctrl-C while text streams: one line on stderr, exit 130, no traceback. The signal goes once the first
    text has arrived, so it lands inside the command (a fixed delay could land while Python was still
    importing onnxgen, or during an export in code of torch's that turns it into another error). That export
    leaves nothing behind when interrupted is test_export.py's test_force_replaces_and_interrupt_leaves_nothing."""
    # A terminal's Ctrl-C: a suite started in the background (`cmd &` without job control) hands its children
    # SIGINT ignored, and Python keeps an ignored SIGINT ignored.
    proc = subprocess.Popen([sys.executable, "-m", "onnxgen", "generate", "It was", "--strategy", "greedy",
                             "--max-new-tokens", "240", "--min-new-tokens", "240"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None and proc.stdout.read(1)  # the stream has begun
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.decode().strip().splitlines()[-1] == "onnxgen: error: interrupted", err.decode()
    assert b"Traceback" not in err


# -- property: any option value gives a completion or an onnxgen error, quickly --------------------------------

ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=3), st.lists(st.integers(-5, 500), max_size=3))
OPTION_NAMES = ["max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams", "length_penalty",
                "early_stopping", "num_return_sequences", "repetition_penalty", "no_repeat_ngram_size", "eos_token_id",
                "pad_token_id", "stop", "seed", "truncate_prompt", "logprobs", "presence_penalty", "frequency_penalty",
                "min_p", "typical_p", "encoder_repetition_penalty", "epsilon_cutoff", "eta_cutoff"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(OPTION_NAMES), ANY_VALUE, max_size=4))
def test_any_option_values_give_a_completion_or_an_onnxgen_error(model: onnxgen.Model, options: dict[str, Any]) -> None:
    options.setdefault("max_new_tokens", 4)
    options.setdefault("logprobs", 1)  # a completion's log-probabilities must be finite: NaN is a silently wrong answer
    # Keep each example's work small (bad values stay bad): the time limit is for checking options, and a valid
    # 188,359 beams is a valid call that takes 28 s even on the tiny model.
    for name, most in (("max_new_tokens", 8), ("num_beams", 64), ("num_return_sequences", 64)):
        if isinstance(options.get(name), int) and not isinstance(options[name], bool):
            options[name] = min(options[name], most)
    start = time.perf_counter()
    try:
        completions = model.generate("It is", **options)
    except OnnxgenError:
        pass
    else:
        assert completions and all(isinstance(c.text, str) and c.finish_reason in ("eos", "length", "stop") for c in completions)
        assert all(math.isfinite(lp) for c in completions for lp in c.logprobs or [])
    assert time.perf_counter() - start < 10


def test_extreme_temperatures_penalties_and_scores_sample_finite_log_probabilities(model: onnxgen.Model) -> None:
    """Below the smallest temperature and repetition penalties taken, float32 scores divided by them passed float32's
    largest: sampling drew NaN (a temperature of 1e-50 gave "!!!!!", the vocabulary's first token, with NaN
    log-probabilities). At them the greedy limit holds."""
    from onnxgen.options import MIN_REPETITION_PENALTY, MIN_TEMPERATURE

    penalties = {"repetition_penalty": MIN_REPETITION_PENALTY, "encoder_repetition_penalty": MIN_REPETITION_PENALTY}
    greedy = model.generate("It is a truth", max_new_tokens=6, **penalties)[0]
    for options in ({"temperature": MIN_TEMPERATURE}, {"temperature": MIN_TEMPERATURE, "top_k": 0, "top_p": 1.0}):
        sampled = model.generate("It is a truth", max_new_tokens=6, do_sample=True, seed=0, logprobs=1, **penalties, **options)[0]
        assert sampled.logprobs and all(math.isfinite(lp) for lp in sampled.logprobs), sampled.logprobs
        assert sampled.token_ids == greedy.token_ids
    # An end token's score that exponential_decay_length_penalty raised to float32's largest, then a temperature below 1
    # (the bundled model's default is 0.8): it overflowed to inf, and the weights to NaN. Now the end token comes once
    # the penalty starts (after 2 new tokens, past start=1).
    ended = model.generate("It is a truth", max_new_tokens=6, do_sample=True, seed=0, logprobs=1, temperature=0.5,
                           exponential_decay_length_penalty=(1, 1e300))[0]
    assert ended.finish_reason == "eos" and len(ended.token_ids) == 3 and all(math.isfinite(lp) for lp in ended.logprobs or [])
    # row by row: a row with such a score keeps those tokens alone (the limit), another row is only divided
    from onnxgen import logits

    rows = np.array([[1.0, np.finfo(np.float32).max, -5.0], [1.0, 2.0, -3.0]], dtype=np.float32)
    assert logits.temperature(0.5)(rows, [], 0).tolist() == [[-math.inf, 0.0, -math.inf], [2.0, 4.0, -6.0]]



@pytest.mark.parametrize("length_penalty", [-10.0, 0.0, 2.0])
@pytest.mark.parametrize("do_sample", [False, True])
def test_a_steep_decay_ends_every_beam_once_with_a_finite_score(model: onnxgen.Model, length_penalty: float, do_sample: bool) -> None:
    """An exponential_decay_length_penalty steep enough to raise the end token's score to float32's largest: its
    candidates kept that score under transformers' -1e9 for an ended beam, so ended beams ran on (an end token, then
    another) and their sums overflowed to an infinite score. Now each beam ends at the penalty's first step, once,
    with a finite score (past float32's range under the length penalty: its largest), and nothing overflows."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        results = model.generate(["It is", "The river"], max_new_tokens=8, num_beams=4, num_return_sequences=4, seed=0,
                                 do_sample=do_sample, length_penalty=length_penalty, exponential_decay_length_penalty=(0, 1e30))
    eos = model.defaults.eos_ids
    for c in results:
        assert c.finish_reason == "eos" and len(c.token_ids) == 2 and c.token_ids[-1] in eos, c
        assert c.score is not None and math.isfinite(c.score) and c.score > 0, c
    for prompt in (0, 1):  # four different beams, best first
        beams = [c for c in results if c.prompt_index == prompt]
        assert len({tuple(c.token_ids) for c in beams}) == 4
        assert [c.score for c in beams] == sorted((c.score for c in beams), reverse=True)

def test_a_call_whose_cache_cannot_fit_in_memory_is_refused(model: onnxgen.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before anything is allocated: the cache's pages would otherwise fill as the call runs, until the
    kernel killed the process."""
    from onnxgen import runtime

    monkeypatch.setattr(runtime, "available_memory", lambda: 1 << 20)  # the tiny model's cache: 1 KiB a row and position
    with pytest.raises(OptionsError, match=r"key/value cache and scores need \d+ MiB \(64 rows x \d+ positions\), more than the 1 MiB"):
        model.generate(["It is"] * 64, max_new_tokens=100)
    with pytest.raises(OptionsError, match="key/value cache and scores need"):
        model.generate("It is", max_new_tokens=100, num_beams=64)
    assert model.generate("It is", max_new_tokens=2)  # a call that fits runs


def test_a_call_whose_scores_cannot_fit_in_memory_is_refused(model: onnxgen.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step's scores count too: rows x vocabulary float32s, the logits and the filters' copies. 100,000 return
    sequences of the bundled model fitted the cache check and then raised MemoryError mid-step (or met the kernel's kill)."""
    from onnxgen import runtime

    rows, capacity = 2000, len(model.tokenizer.encode("It is")) + 1
    cache = model.runtime.cache_bytes(rows, capacity)
    one_copy = rows * model.runtime.vocab_size * 4
    monkeypatch.setattr(runtime, "available_memory", lambda: cache + one_copy)  # room for the cache and one array of scores
    with pytest.raises(OptionsError, match=f"key/value cache and scores need .* \\({rows} rows x {capacity} positions\\)"):
        model.generate("It is", max_new_tokens=1, do_sample=True, num_return_sequences=rows)
    monkeypatch.setattr(runtime, "available_memory", lambda: cache + runtime.SCORE_COPIES * one_copy)
    assert len(model.generate("It is", max_new_tokens=1, do_sample=True, num_return_sequences=rows)) == rows


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_call_of_absurdly_many_rows_is_refused_before_they_are_made(model: onnxgen.Model, monkeypatch: pytest.MonkeyPatch,
                                                                       device: str) -> None:
    """10**12 beams or return sequences: refused at once, where the rows used to be built one by one until the host's
    memory ran out (a hang, then the kernel's kill; a server's extra field num_beams could do it). On CUDA, whose
    cache is the GPU's, by the host memory the rows' tokens need (the session stays the CPU's: nothing runs)."""
    monkeypatch.setattr(model.runtime, "device", device)
    what = "key/value cache and scores" if device == "cpu" else "token rows and scores"
    for options in ({"num_beams": 10**12}, {"do_sample": True, "num_return_sequences": 10**12}):
        with pytest.raises(OptionsError, match=f"this call's {what} need .* \\(1000000000000 rows x \\d+ positions\\)"):
            model.generate("It is", max_new_tokens=4, **options)
