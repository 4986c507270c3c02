"""Contrastive search (onnxgen/contrastive.py; penalty_alpha): token for token what the algorithm gives when written
out plainly over transformers' PyTorch model, its hidden states from the graph's last_hidden_state output."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

import onnxgen
from onnxgen import manifest
from onnxgen.errors import OptionsError

PROMPTS = [[12, 40, 7, 99, 150, 3, 61], [5, 77], [200, 201, 202, 203]]  # different lengths: left padding


def contrastive_by_definition(torch_model: torch.nn.Module, prompt: list[int], top_k: int, alpha: float, new: int, eos: int,
                              processors: Any = None) -> list[int]:
    """Each step, for each of the top_k most likely tokens (after `processors`, transformers' own), a whole forward of
    the text and the token: (1 - alpha) x its probability - alpha x the greatest cosine between its last hidden state
    and those of the text; the best token is taken. No cache, no batch."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            out = torch_model(torch.tensor([ids]), output_hidden_states=True)
            scores = out.logits[:, -1]
            if processors is not None:
                scores = processors(torch.tensor([ids]), scores)
            likely, tokens = torch.topk(torch.softmax(scores[0], -1), top_k)
            context = torch.nn.functional.normalize(out.hidden_states[-1][0], dim=-1)
            best, best_score = -1, -np.inf
            for p, token in zip(likely.tolist(), tokens.tolist()):
                hidden = torch_model(torch.tensor([ids + [token]]), output_hidden_states=True).hidden_states[-1][0, -1]
                score = (1 - alpha) * p - alpha * float((context @ torch.nn.functional.normalize(hidden, dim=-1)).max())
                if score > best_score:
                    best, best_score = token, score
            ids.append(best)
            if best == eos:
                break
    return ids[len(prompt):]


@pytest.mark.parametrize(("top_k", "alpha"), [(4, 0.6), (2, 0.3), (6, 0.9)])
def test_contrastive_search_is_the_algorithm_written_out(model: onnxgen.Model, torch_model: torch.nn.Module, top_k: int, alpha: float) -> None:
    """A left-padded batch, each prompt as the plain algorithm continues it alone; not greedy search's text."""
    eos = model.defaults.eos_ids[0]
    ours = [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=12, penalty_alpha=alpha, top_k=top_k)]
    assert ours == [contrastive_by_definition(torch_model, p, top_k, alpha, 12, eos) for p in PROMPTS]
    assert ours != [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=12, do_sample=False)]


def test_processors_act_before_the_candidates_are_chosen(model: onnxgen.Model, torch_model: torch.nn.Module) -> None:
    """repetition_penalty and min_new_tokens as transformers' processors apply them, each step, to the text so far."""
    from transformers import LogitsProcessorList, MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

    eos, prompt = model.defaults.eos_ids[0], PROMPTS[0]
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5), MinNewTokensLengthLogitsProcessor(len(prompt), 6, eos)])
    ours = model.generate([prompt], max_new_tokens=12, penalty_alpha=0.6, top_k=4, repetition_penalty=1.5, min_new_tokens=6)[0]
    assert ours.token_ids == contrastive_by_definition(torch_model, prompt, 4, 0.6, 12, eos, processors)


def test_the_hidden_states_output_is_transformers_last_one(exported: Path, torch_model: torch.nn.Module) -> None:
    """The exported graph's last_hidden_state (graph.add_hidden_output) is transformers' hidden_states[-1], after the
    last layer norm, at every position of a prompt pass."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = PROMPTS[0]
    feed = {i.name: np.zeros((1, i.shape[1], len(ids), i.shape[3]), np.float32) for i in session.get_inputs() if i.name.startswith("past_")}
    feed |= {"input_ids": np.array([ids]), "position_ids": np.arange(len(ids))[None], "seqlens_k": np.array([len(ids) - 1], np.int32),
             "total_sequence_length": np.array(len(ids), np.int32), "logits_to_keep": np.array([-1])}
    hidden = session.run(["last_hidden_state"], feed)[0]
    with torch.no_grad():
        expected = torch_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1].numpy()
    np.testing.assert_allclose(hidden, expected, atol=1e-4)


def test_it_streams_stops_and_ends_rows_as_greedy_search_does(model: onnxgen.Model, exported: Path) -> None:
    """A stream's pieces add up to the text; each token has its log-probability; a stop string cuts the text; a finished
    row keeps its text while the others go on; a model that batches calls runs it apart, with the same text."""
    kw: dict[str, Any] = {"max_new_tokens": 10, "penalty_alpha": 0.6, "top_k": 4}
    texts = ["It is a truth", "Call me Ishmael"]
    whole = model.generate(texts, logprobs=1, **kw)
    assert "".join(model.stream(texts[0], **kw)) == whole[0].text
    assert all(c.logprobs is not None and len(c.logprobs) == len(c.token_ids) for c in whole)
    stop = whole[0].text[2:4]
    cut = model.generate(texts[0], stop=[stop], **kw)[0]
    assert cut.finish_reason == "stop" and cut.text == whole[0].text[: whole[0].text.index(stop)]
    g = model.generator(texts, **kw)
    g.step()
    g.step()
    g.finish(0)
    while not g.done:
        g.step()
    done = g.completions()
    assert done[0].finish_reason == "cancelled" and done[0].token_ids == whole[0].token_ids[:2]
    assert done[1].token_ids == whole[1].token_ids
    batched = onnxgen.load(exported, threads=1, max_batch=4)
    assert [c.token_ids for c in batched.generate(texts, **kw)] == [c.token_ids for c in whole]


def test_a_folder_without_hidden_states_and_bad_options_are_refused(model: onnxgen.Model, exported: Path, exported_growing: Path,
                                                                     tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(exported, old)
    graph = onnx.load(str(old / "model.onnx"), load_external_data=False)
    graph.graph.output.remove(next(o for o in graph.graph.output if o.name == "last_hidden_state"))
    onnx.save_model(graph, str(old / "model.onnx"))
    record = manifest.read(old)  # a folder as onnxgen wrote it before: its manifest describes what it holds
    manifest.write(old, {k: v for k, v in record.items() if k not in ("format_version", "files")})
    for folder, why in ((old, "exported before onnxgen wrote them"), (exported_growing, "exported with --growing-cache")):
        with pytest.raises(OptionsError, match=f"penalty_alpha \\(contrastive search\\) needs .*{why}; export it again"):
            onnxgen.load(folder).generate("It is", penalty_alpha=0.6, top_k=4)
    assert onnxgen.load(old).generate("It is", max_new_tokens=3)  # the rest runs as before
    for bad, message in (({"penalty_alpha": 1.5, "top_k": 4}, "penalty_alpha must be in"),
                         ({"penalty_alpha": 0.6, "top_k": 1}, "give top_k > 1"),
                         ({"penalty_alpha": 0.6, "top_k": 4, "regex": "[a-z]+"}, "penalty_alpha .* and regex: not both"),
                         ({"penalty_alpha": 0.6, "top_k": 4, "prompt_lookup_num_tokens": 3}, "and prompt_lookup_num_tokens: not both")):
        with pytest.raises(OptionsError, match=message):
            model.generate("It is", **bad)
    # with do_sample asked for, transformers samples and leaves penalty_alpha unused: so does onnxgen
    sampled = {"do_sample": True, "seed": 1, "top_k": 4, "max_new_tokens": 6}
    assert model.generate("It is", penalty_alpha=0.6, **sampled)[0].token_ids == model.generate("It is", **sampled)[0].token_ids


def test_the_server_and_the_command_line(model: onnxgen.Model, exported: Path) -> None:
    """penalty_alpha and top_k as extra fields of a request (over OpenAI's default temperature, as beams are), and
    generate's --penalty-alpha: what model.generate gives."""
    import httpx

    from onnxgen.serve import create_app

    expected = model.generate("It is a truth", max_new_tokens=8, penalty_alpha=0.6, top_k=4)[0].text

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(model, "tiny")), base_url="http://x") as http:
            return await http.post("/v1/completions", json={"prompt": "It is a truth", "max_tokens": 8, "penalty_alpha": 0.6, "top_k": 4})

    assert asyncio.run(ask()).json()["choices"][0]["text"] == expected
    out = subprocess.run([sys.executable, "-m", "onnxgen", "generate", "It is a truth", "--model", str(exported), "--max-new-tokens", "8",
                          "--penalty-alpha", "0.6", "--top-k", "4"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout == expected + "\n", out.stderr
    preset = subprocess.run([sys.executable, "-m", "onnxgen", "generate", "It is a truth", "--model", str(exported), "--max-new-tokens", "8",
                             "--strategy", "contrastive"], capture_output=True, text=True, check=False)
    assert preset.stdout == out.stdout, preset.stderr  # the preset: top_k 4, penalty_alpha 0.6


def test_on_the_bundled_model_it_repeats_less_than_greedy_search() -> None:
    """The point of it, on a trained model: greedy search's text repeats its phrases; contrastive search's less."""
    bundled = onnxgen.load(threads=1)
    prompt = "It is a truth universally acknowledged, that a single man"

    def repeated(ids: list[int], n: int = 3) -> int:
        return sum(count - 1 for count in Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)).values())

    greedy = bundled.generate(prompt, max_new_tokens=80, do_sample=False)[0].token_ids
    contrastive = bundled.generate(prompt, max_new_tokens=80, penalty_alpha=0.6, top_k=4)[0].token_ids
    assert repeated(contrastive) < repeated(greedy), (repeated(contrastive), repeated(greedy))
