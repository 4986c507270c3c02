"""Token healing (onnxgen/healing.py): the prompt's last token taken back, the first new token one of those whose text
begins with it, the text still continuing the prompt as given."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import onnxgen
from onnxgen.errors import OptionsError
from tests.test_generate import hf_generate

# Each ends inside what running text writes as one token: after a space, mid-word
HEALED = ["It is a truth universally acknowledged, that a ", "The whale swam in the se", "It is a"]


def extensions(checkpoint: Path, token: int) -> list[int]:
    """The tokens whose text, as tokenizer.json writes it, begins with `token`'s (special ones left out): read here
    from the file, apart from onnxgen's search."""
    saved = json.loads((checkpoint / "tokenizer.json").read_text())
    special = {t["id"] for t in saved["added_tokens"] if t["special"]}
    vocab = saved["model"]["vocab"]
    written = next(text for text, i in vocab.items() if i == token)
    return sorted(i for text, i in vocab.items() if text.startswith(written) and i not in special)


@pytest.mark.parametrize("beams", [1, 3])
def test_healing_continues_the_prompt_less_its_last_token_from_that_tokens_extensions_as_transformers(
        model: onnxgen.Model, torch_model: torch.nn.Module, checkpoint: Path, beams: int) -> None:
    """transformers' generate on the prompt without its last token, the first new token held to the tokens extending
    it (prefix_allowed_tokens_fn), gives the same tokens, greedy and with beams; the text is theirs after the
    characters that the taken-back token spelled, so prompt + text is the whole."""
    eos = model.defaults.eos_ids[0]
    for text in HEALED:
        ids = model.tokenizer.encode(text)
        allowed = extensions(checkpoint, ids[-1])
        assert len(allowed) > 1
        first_step = len(ids) - 1

        def fn(_: int, row: Any, allowed: list[int] = allowed, first_step: int = first_step) -> list[int]:
            return allowed if len(row) == first_step else list(range(model.runtime.vocab_size))

        kw = dict(max_new_tokens=6, num_beams=beams, num_return_sequences=beams)
        healed = model.generate(text, token_healing=True, **kw)
        theirs = hf_generate(torch_model, [ids[:-1]], eos, do_sample=False, prefix_allowed_tokens_fn=fn, **kw)
        assert [c.token_ids for c in healed] == theirs
        tail = model.tokenizer.decode(ids[-1:])
        for c in healed:
            assert c.token_ids[0] in allowed and c.healed == tail
            assert text + c.text == model.tokenizer.decode(ids[:-1] + c.token_ids)
        plain = model.generate(text, **kw)
        assert [c.token_ids for c in healed] != [c.token_ids for c in plain], text  # the healing chose otherwise


def test_streams_stops_logprobs_and_samples_follow_the_healed_text(model: onnxgen.Model, checkpoint: Path) -> None:
    """A stream's pieces add up to the healed text; a stop string cuts that text (and keeps the tokens wholly before
    it); the first token's log-probability is under the extensions alone; seeded samples repeat, each one's first
    token an extension."""
    text = HEALED[0]
    ids = model.tokenizer.encode(text)
    allowed = extensions(checkpoint, ids[-1])
    seen: list[Any] = []

    def record(_: Any, scores: Any) -> Any:  # the caller's processors see the scores before the healing's mask
        seen.append(scores.copy())
        return scores

    healed = model.generate(text, max_new_tokens=8, token_healing=True, logprobs=2, logits_processors=[record])[0]
    assert "".join(model.stream(text, max_new_tokens=8, token_healing=True)) == healed.text
    assert healed.logprobs is not None and len(healed.logprobs) == len(healed.token_ids)
    first = torch.tensor(seen[0][0])
    expected = first[healed.token_ids[0]] - torch.logsumexp(first[allowed], dim=0)
    assert healed.logprobs[0] == pytest.approx(float(expected), abs=1e-5)

    stop = healed.text[3:5]
    assert "\ufffd" not in stop and healed.text.index(stop) == 3
    cut = model.generate(text, max_new_tokens=8, token_healing=True, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == healed.text[:3]
    kept = len(cut.token_ids)
    assert cut.token_ids == healed.token_ids[:kept] and kept >= 1
    assert model.tokenizer.decode(cut.token_ids, after=len(cut.healed)) == cut.text
    assert len(model.tokenizer.decode(healed.token_ids[: kept + 1], after=len(cut.healed))) > len(cut.text)

    sampled = [model.generate(text, max_new_tokens=6, token_healing=True, do_sample=True, seed=3, num_return_sequences=3)
               for _ in range(2)]
    assert [c.token_ids for c in sampled[0]] == [c.token_ids for c in sampled[1]]
    assert all(c.token_ids[0] in allowed and c.healed == " " for c in sampled[0])


@pytest.mark.parametrize("prompt", ["The", "It is<|endoftext|>", [5]], ids=["one token", "special token last", "one token id"])
def test_a_prompt_with_nothing_to_heal_is_left_as_it_is(model: onnxgen.Model, prompt: Any) -> None:
    """One token (text or ids), a special token last: the call is the one without healing (nothing is re-covered)."""
    healed = model.generate(prompt, max_new_tokens=5, token_healing=True)
    assert [c.token_ids for c in healed] == [c.token_ids for c in model.generate(prompt, max_new_tokens=5)]
    assert [c.healed for c in healed] == [""]


def test_healing_with_a_constraint_is_refused(model: onnxgen.Model) -> None:
    with pytest.raises(OptionsError, match="token_healing and regex: not both"):
        model.generate("It is a ", token_healing=True, regex="[a-z]+")


@pytest.mark.parametrize("strategy", [{"do_sample": False}, {"do_sample": True, "top_p": 0.9}, {"num_beams": 2}])
def test_options_that_leave_no_first_token_are_refused(model: onnxgen.Model, strategy: dict[str, Any]) -> None:
    """An end token forced at the first (and last) step, which does not continue the healed prompt: a clear error,
    not a token chosen from none (greedy's argmax took token 0; top_p failed inside numpy)."""
    with pytest.raises(OptionsError, match="token_healing and the other options leave row 0 no first token"):
        model.generate("It is a ", token_healing=True, max_new_tokens=1, forced_eos_token_id=model.defaults.eos_ids[0], **strategy)


def test_a_batch_heals_each_prompt_alone_and_shares_the_servers_steps(model: onnxgen.Model, exported: Path) -> None:
    """Prompts of different lengths, one with nothing to heal: each row as the prompt gives alone; calls from threads
    sharing a batcher's steps give the same."""
    prompts = [*HEALED, "The"]
    together = model.generate(prompts, max_new_tokens=6, token_healing=True)
    alone = [model.generate(p, max_new_tokens=6, token_healing=True)[0] for p in prompts]
    assert [(c.token_ids, c.text, c.healed) for c in together] == [(c.token_ids, c.text, c.healed) for c in alone]
    batched = onnxgen.load(exported, threads=1, max_batch=4)
    assert [c.token_ids for c in batched.generate(prompts, max_new_tokens=6, token_healing=True)] == [c.token_ids for c in alone]


def test_the_cli_heals_with_token_healing(exported: Path, model: onnxgen.Model) -> None:
    text = HEALED[1]
    run = subprocess.run([sys.executable, "-m", "onnxgen", "generate", text, "-m", str(exported), "--token-healing",
                          "--max-new-tokens", "6", "--json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    written = json.loads(run.stdout)["completions"][0]
    expected = model.generate(text, max_new_tokens=6, token_healing=True)[0]
    assert (written["text"], written["token_ids"], written["healed"]) == (expected.text, expected.token_ids, "e")


def test_a_folders_generation_config_turns_it_on(tmp_path: Path) -> None:
    """generation_config.json's token_healing is taken (it was ignored, with a warning)."""
    from onnxgen.options import GenerationOptions

    (tmp_path / "generation_config.json").write_text(json.dumps({"token_healing": True}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GenerationOptions.from_folder(tmp_path).token_healing is True
