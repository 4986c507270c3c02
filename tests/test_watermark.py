"""Watermarking (watermark.py) against transformers' own: the green lists are torch.randperm's, the filter is
WatermarkLogitsProcessor's, generation equals generate(watermarking_config=...), detection counts as
WatermarkDetector does; and the option, the commands and the server around them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from scipy import stats
from transformers import GenerationConfig, WatermarkDetector
from transformers.generation.logits_process import WatermarkLogitsProcessor

import onnxgen
from onnxgen import batch
from onnxgen.errors import OptionsError
from onnxgen.options import GenerationOptions, WatermarkingConfig
from onnxgen.serve import create_app
from onnxgen.watermark import Greenlists, detect, watermark

from .test_generate import PROMPTS, hf_generate

SCHEMES = [{}, {"seeding_scheme": "selfhash"}, {"seeding_scheme": "selfhash", "context_width": 3, "hashing_key": 12345},
           {"context_width": 3, "hashing_key": 2**62 + 5, "greenlist_ratio": 0.5, "bias": 1.5}]


@pytest.mark.parametrize(("seed", "n", "count"), [(0, 400, 100), (15485863 * 399, 50257, 12564), (2**40 + 17, 1000, 1000),
                                                  (2**64 - 2, 7, 7), (15485863, 1_000_003, 50257)])
def test_green_lists_are_torch_randperms_first_ids(seed: int, n: int, count: int) -> None:
    """torch's generator seeded so (seeds past 32 bits included), its randperm's first ids: the shuffle done without a loop."""
    lists = Greenlists(WatermarkingConfig(), n)
    generator = torch.Generator().manual_seed(seed)
    assert lists._shuffled_prefix(seed, n, count).tolist() == torch.randperm(n, generator=generator)[:count].tolist()


@pytest.mark.parametrize("vocab", [400, 50257])
def test_a_token_followed_through_the_shuffle_is_green_where_the_list_holds_it(vocab: int) -> None:
    """Greenlists.holds (one token, traced through the swaps: selfhash's and the detector's question) against the first
    ids of torch.randperm under transformers' lefthash seed, for tokens in the list and out of it."""
    rng = np.random.default_rng(2)
    for before in rng.integers(0, vocab, 8).tolist():
        lists = Greenlists(WatermarkingConfig(hashing_key=31), vocab)
        green = set(torch.randperm(vocab, generator=torch.Generator().manual_seed(31 * before))[:lists.size].tolist())
        tokens = [*rng.choice(sorted(green), 20).tolist(), *rng.integers(0, vocab, 40).tolist()]
        assert [lists.holds([before], t) for t in tokens] == [t in green for t in tokens]


@pytest.mark.parametrize("config", SCHEMES)
def test_the_filter_equals_transformers_processor(config: dict[str, Any]) -> None:
    """On random scores (some banned: -inf) and rows of different lengths, left-padded as transformers holds them: the
    short rows' windows reach into the padding; while every row is shorter than context_width nothing is marked."""
    vocab, pad = 1000, 3
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(4, vocab)).astype(np.float32) * 3
    scores[:, rng.integers(0, vocab, 200)] = -np.inf
    history = [rng.integers(0, vocab, length).tolist() for length in (6, 1, 2, 4)]
    width = max(map(len, history))
    padded = torch.tensor([[pad] * (width - len(row)) + row for row in history])
    processor = WatermarkLogitsProcessor(vocab, "cpu", **config)
    ours = watermark(WatermarkingConfig.of(config), pad)(scores, history, 0)
    assert np.array_equal(ours, processor(padded, torch.from_numpy(scores.copy())).numpy())
    assert (ours != scores).sum() > 0
    short = [row[:1] for row in history]
    if WatermarkingConfig.of(config).context_width > 1:
        assert watermark(WatermarkingConfig.of(config), pad)(scores, short, 0) is scores


@pytest.mark.parametrize("kw", [
    {"watermarking_config": {"hashing_key": 7, "bias": 4.0}},
    {"watermarking_config": {"hashing_key": 7, "bias": 4.0, "seeding_scheme": "selfhash", "context_width": 2}},
    {"watermarking_config": {"hashing_key": 9, "bias": 3.0}, "num_beams": 3, "num_return_sequences": 2},
])
def test_watermarked_generation_equals_transformers(model: onnxgen.Model, torch_model: torch.nn.Module, kw: dict[str, Any]) -> None:
    """Greedy search on a left-padded batch and beam search, token for token transformers' generate with the same
    watermarking_config, and different from the text without it."""
    eos = model.defaults.eos_ids[0]
    ours = [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=12, **kw)]
    plain = [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=12, **{k: v for k, v in kw.items() if k != "watermarking_config"})]
    assert ours != plain
    theirs = hf_generate(torch_model, PROMPTS, eos, max_new_tokens=12, do_sample=False,
                         **{**kw, "watermarking_config": GenerationConfig(watermarking_config=kw["watermarking_config"]).watermarking_config})
    assert ours == theirs


def test_the_watermark_through_guesses_and_shared_steps(exported: Path, model: onnxgen.Model) -> None:
    """Each token judged after the tokens before it on every path a call can take: prompt lookup's guessed positions,
    and calls from threads sharing the batcher's steps, give the text the call gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    kw = {"max_new_tokens": 24, "watermarking_config": {"hashing_key": 5, "bias": 4.0}}
    quoted = "the cat sat on the mat, the cat sat on the mat, the cat"
    alone = model.generate(quoted, **kw)[0].token_ids
    assert model.generate(quoted, prompt_lookup_num_tokens=4, **kw)[0].token_ids == alone
    assert model.last_stats is not None and model.last_stats.guesses_taken > 0
    shared = onnxgen.load(exported, threads=1, max_batch=4)
    prompts = ["It is a truth", "Call me", quoted]
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda p: shared.generate(p, seed=2, do_sample=True, **kw)[0].text, prompts))
    assert texts == [model.generate(p, seed=2, do_sample=True, **kw)[0].text for p in prompts]


@pytest.mark.parametrize("config", [{"hashing_key": 99}, {"hashing_key": 99, "seeding_scheme": "selfhash", "context_width": 2}])
def test_detection_counts_as_transformers_detector_and_finds_the_watermark(model: onnxgen.Model, config: dict[str, Any]) -> None:
    """Sampled texts with and without the watermark: green counts and z-scores equal to transformers' WatermarkDetector
    on the same tokens, the p-value the normal tail's (transformers approximates it), and each text told apart."""
    prompts = ["It is a truth", "Call me", "The whale"]
    marked = model.generate(prompts, max_new_tokens=60, do_sample=True, seed=3, watermarking_config=config, eos_token_id=[])
    plain = model.generate(prompts, max_new_tokens=60, do_sample=True, seed=3, eos_token_id=[])
    detector = WatermarkDetector(model_config=type("Config", (), {"bos_token_id": None, "is_encoder_decoder": False,
                                                                   "vocab_size": model.dims.vocab_size})(),
                                 device="cpu", watermarking_config=asdict(WatermarkingConfig.of(config)))
    for completions, watermarked in ((marked, True), (plain, False)):
        found = model.detect_watermark([c.token_ids for c in completions], config)
        theirs = detector(torch.tensor([c.token_ids for c in completions]), return_dict=True)
        assert [d.num_tokens_scored for d in found] == theirs.num_tokens_scored.tolist()
        assert [d.num_green_tokens for d in found] == theirs.num_green_tokens.tolist()
        assert np.allclose([d.z_score for d in found], theirs.z_score)
        assert np.allclose([d.p_value for d in found], stats.norm.sf([d.z_score for d in found]))
        assert [d.prediction for d in found] == [watermarked] * len(prompts)


def test_repeated_ngrams_count_once_when_asked(model: onnxgen.Model) -> None:
    """ignore_repeated_ngrams: each (context, token) once, so a text repeating itself counts as its distinct pairs do."""
    config = WatermarkingConfig(hashing_key=5)
    a, b, c = 17, 42, 99
    lists = Greenlists(config, model.dims.vocab_size)
    repeated = detect([a, b, a, b, a, b, c], lists, ignore_repeated_ngrams=True)
    parts = [detect(pair, Greenlists(config, model.dims.vocab_size)) for pair in ([a, b], [b, a], [b, c])]
    assert repeated.num_tokens_scored == 3 == sum(p.num_tokens_scored for p in parts)
    assert repeated.num_green_tokens == sum(p.num_green_tokens for p in parts)
    assert detect([a, b, a, b, a, b, c], lists).num_tokens_scored == 6


def test_the_folders_watermark_and_bad_values(model: onnxgen.Model, tmp_path: Path) -> None:
    """generation_config.json's watermarking_config (as transformers writes it) is taken, with no warning, and is what
    generate and detect_watermark use by default; a bad config is an OptionsError that names the field."""
    GenerationConfig(watermarking_config={"hashing_key": 11, "bias": 4.0, "seeding_scheme": "selfhash"}).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = GenerationOptions.from_folder(tmp_path)
    assert folder.watermarking_config == WatermarkingConfig(bias=4.0, hashing_key=11, seeding_scheme="selfhash")
    given = model.generate(PROMPTS, max_new_tokens=8, watermarking_config=asdict(folder.watermarking_config))
    assert [c.token_ids for c in model.generate(PROMPTS, folder, max_new_tokens=8)] == [c.token_ids for c in given]
    with pytest.raises(OptionsError, match="no watermarking_config"):
        model.detect_watermark("some text")
    for bad, field in [({"greenlist_ratio": 1.0}, "greenlist_ratio"), ({"bias": float("nan")}, "bias"), ({"hashing_key": -1}, "hashing_key"),
                       ({"hashing_key": 2**63}, "hashing_key"), ({"seeding_scheme": "righthash"}, "seeding_scheme"),
                       ({"context_width": 0}, "context_width"), ({"key": 1}, "no field"), ("yes", "must be a WatermarkingConfig")]:
        with pytest.raises(OptionsError, match=field):
            model.generate("x", watermarking_config=bad)
    with pytest.raises(OptionsError, match="needs at least 2 tokens"):
        model.detect_watermark([5], {"hashing_key": 1})


def _cli(*args: str, key: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = None if key is None else {**os.environ, "ONNXGEN_WATERMARK_KEY": key}
    return subprocess.run([sys.executable, "-m", "onnxgen", *args], capture_output=True, text=True, env=env, input=stdin)


def test_the_commands_write_and_find_the_watermark(tmp_path: Path) -> None:
    """With the bundled model (a trained one: its text reads back as the same tokens, which the tiny model's sampled text
    does not): generate --watermark-key (here ONNXGEN_WATERMARK_KEY) writes what generate(watermarking_config=...) writes;
    detect-watermark finds it under that key and not under another; a bad key is one line."""
    prompt = "It is a truth universally acknowledged"
    written = _cli("generate", prompt, "--max-new-tokens", "60", "--seed", "1", "--json", key="1234")
    assert written.returncode == 0, written.stderr
    text = json.loads(written.stdout)["completions"][0]["text"]
    assert text == onnxgen.load().generate(prompt, max_new_tokens=60, seed=1, watermarking_config={"hashing_key": 1234})[0].text
    (tmp_path / "text.txt").write_text(text)
    found = _cli("detect-watermark", str(tmp_path / "text.txt"), "--watermark-key", "1234", "--json")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)[0]["prediction"] is True
    other = _cli("detect-watermark", "-", "--watermark-key", "4321", stdin=text)
    assert other.returncode == 0 and other.stdout.startswith("-: not watermarked (z-score"), other.stdout
    bad = _cli("generate", "x", "--watermark-key", "-5")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "hashing_key must be an integer" in bad.stderr


def test_a_servers_watermark_is_its_own(exported: Path, model: onnxgen.Model, tmp_path: Path) -> None:
    """create_app(watermark_key=...) (serve --watermark-key): every completion written under it, and a request cannot
    set watermarking_config; a server without one lets a request bring its own; run-batch's --watermark-key too."""
    def post(app: Any, body: dict[str, Any]) -> httpx.Response:
        async def send() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as http:
                return await http.post("/v1/completions", json=body)
        return asyncio.run(send())

    body = {"prompt": "Call me", "max_tokens": 10, "temperature": 0}
    marked = create_app(onnxgen.load(exported, threads=1), "tiny", watermark_key=77)
    reply = post(marked, body)
    assert reply.status_code == 200
    expected = model.generate("Call me", max_new_tokens=10, watermarking_config={"hashing_key": 77})[0].text
    assert reply.json()["choices"][0]["text"] == expected != model.generate("Call me", max_new_tokens=10)[0].text
    refused = post(marked, {**body, "watermarking_config": None})
    assert refused.status_code == 400 and "watermarks its text" in refused.json()["error"]["message"]
    folders = onnxgen.load(exported, threads=1)  # as a folder whose generation_config.json has a watermarking_config loads
    folders.defaults = replace(folders.defaults, watermarking_config=WatermarkingConfig(hashing_key=5))
    assert post(create_app(folders, "tiny"), {**body, "watermarking_config": None}).status_code == 400
    plain = create_app(onnxgen.load(exported, threads=1), "tiny")
    own = post(plain, {**body, "watermarking_config": {"hashing_key": 77}})
    assert own.json()["choices"][0]["text"] == expected
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"custom_id": "a", "url": "/v1/completions", "body": body}) + "\n")
    batch.run(onnxgen.load(exported, threads=1), batch.read(requests), tmp_path / "out.jsonl", "tiny", quiet=True, watermark_key=77)
    assert json.loads((tmp_path / "out.jsonl").read_text())["response"]["body"]["choices"][0]["text"] == expected  # run-batch
