"""Diverse beam search (num_beam_groups, diversity_penalty; beam.py): token for token and score for score what
transformers' group beam search gave (generate up to 4.55; a hub method since, which needs the hub), written out
plainly over transformers' PyTorch model. benchmarks/diverse_beams.py checks onnxgen against transformers 4.55's
own generate as well, where a folder holds that version."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

import onnxgen
from onnxgen.errors import OptionsError
from onnxgen.options import GenerationOptions

PROMPTS = [[12, 40, 7, 99, 150, 3, 61], [5, 77], [200, 201, 202, 203]]  # different lengths: left padding
Finished = list[tuple[float, list[int]]]  # (length-penalised score, new tokens), in the order they were kept


def _keep(finished: Finished, total: float, tokens: list[int], width: int, length_penalty: float) -> None:
    """A hypothesis offered to a group's `width` finished slots (transformers' BeamHypotheses.add)."""
    score = total / len(tokens) ** length_penalty
    if len(finished) < width or score > min(s for s, _ in finished):
        finished.append((score, tokens))
        if len(finished) > width:
            del finished[min(range(len(finished)), key=lambda i: finished[i][0])]


def _over(finished: Finished, best: float, steps: int, width: int, length_penalty: float, early_stopping: Any, new: int) -> bool:
    """Whether no running beam of a group can still beat its worst finished one (transformers' BeamHypotheses.is_done)."""
    if len(finished) < width:
        return False
    if early_stopping is True:
        return True
    horizon = new if early_stopping == "never" and length_penalty > 0 else steps
    return min(s for s, _ in finished) >= best / horizon**length_penalty


def diverse_beams_by_definition(torch_model: torch.nn.Module, prompt: list[int], beams: int, groups: int, penalty: float, new: int,
                                eos: int, length_penalty: float = 1.0, early_stopping: Any = False,
                                before: Any = None, after: Any = None) -> Finished:
    """transformers' group beam search for one prompt, written out: each step the groups in turn; a group's beams'
    log-probabilities (after `before`, transformers' processors ahead of its HammingDiversityLogitsProcessor) lowered
    by `penalty` for each beam of an earlier group that took the token this step (a group already over counts as
    taking padding, the end token here), then `after`; its best 2 x width continuations, of which an end token among
    the first width finishes and the first width others run on. No cache, no batch. All groups' finished beams,
    best first."""
    width = beams // groups
    running = [[(0.0 if j == 0 else -1e9, []) for j in range(width)] for _ in range(groups)]
    finished: list[Finished] = [[] for _ in range(groups)]
    over = [False] * groups
    with torch.no_grad():
        for step in range(new):
            taken: torch.Tensor | None = None
            for g in range(groups):
                ids = torch.tensor([prompt + tokens for _, tokens in running[g]])
                scores = torch.log_softmax(torch_model(ids).logits[:, -1], -1)
                if taken is None:
                    taken = torch.zeros(scores.shape[-1])
                if over[g]:
                    taken[eos] += width
                    continue
                scores = before(ids, scores) if before else scores
                scores = scores - penalty * taken
                scores = after(ids, scores) if after else scores
                total = scores + torch.tensor([s for s, _ in running[g]])[:, None]
                top_scores, top = torch.topk(total.reshape(-1), 2 * width)
                going = []
                for rank, (score, index) in enumerate(zip(top_scores.tolist(), top.tolist())):
                    beam, token = divmod(index, total.shape[-1])
                    tokens = running[g][beam][1] + [token]
                    if token == eos:
                        if rank < width:
                            _keep(finished[g], score, tokens, width, length_penalty)
                    else:
                        going.append((score, tokens))
                    if len(going) == width:
                        break
                running[g] = going
                for _, tokens in going:
                    taken[tokens[-1]] += 1
                over[g] = _over(finished[g], float(top_scores[0]), step + 1, width, length_penalty, early_stopping, new)
            if all(over):
                break
    for g in range(groups):  # the search ran out of tokens: its running beams finish as they are
        if not over[g]:
            for total, tokens in running[g]:
                _keep(finished[g], total, tokens, width, length_penalty)
    ranked = sorted((hyp for group in finished for hyp in group), key=lambda hyp: hyp[0])  # transformers' sort, then pops
    return ranked[::-1]


def _check(model: onnxgen.Model, torch_model: torch.nn.Module, returned: int, **options: Any) -> list[list[onnxgen.Completion]]:
    """onnxgen's results on PROMPTS, each prompt's `returned` best, against the algorithm's for each prompt alone."""
    eos = model.defaults.eos_ids[0]
    before, after = options.pop("reference_before", None), options.pop("reference_after", None)
    got = model.generate(PROMPTS, num_return_sequences=returned, **options)
    rows = [got[i * returned : (i + 1) * returned] for i in range(len(PROMPTS))]
    for prompt, ours in zip(PROMPTS, rows):
        want = diverse_beams_by_definition(torch_model, prompt, options["num_beams"], options["num_beam_groups"], options["diversity_penalty"],
                                           options["max_new_tokens"], eos, options.get("length_penalty", 1.0),
                                           options.get("early_stopping", False), before, after)[:returned]
        assert [c.token_ids for c in ours] == [tokens for _, tokens in want]
        assert [c.score for c in ours] == pytest.approx([score for score, _ in want], rel=1e-4, abs=1e-4)
    return rows


@pytest.mark.parametrize("options", [
    {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0, "max_new_tokens": 10},
    {"num_beams": 6, "num_beam_groups": 3, "diversity_penalty": 0.5, "max_new_tokens": 12, "length_penalty": 0.0},
    {"num_beams": 3, "num_beam_groups": 3, "diversity_penalty": 3.0, "max_new_tokens": 8, "early_stopping": True},
    {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 0.2, "max_new_tokens": 14, "length_penalty": 2.0, "early_stopping": "never"},
])
def test_diverse_beam_search_is_transformers_group_beam_search_written_out(model: onnxgen.Model, torch_model: torch.nn.Module,
                                                                           options: dict[str, Any]) -> None:
    """A left-padded batch; every returned beam of every group, best first, as the algorithm gives for each prompt alone."""
    rows = _check(model, torch_model, options["num_beams"], **options)
    plain = model.generate(PROMPTS, num_beams=options["num_beams"], num_return_sequences=options["num_beams"], max_new_tokens=options["max_new_tokens"])
    assert [c.token_ids for row in rows for c in row] != [c.token_ids for c in plain]  # the groups do differ from one beam search


def test_the_penalty_sits_in_transformers_chain_after_the_sequence_bias(model: onnxgen.Model, torch_model: torch.nn.Module) -> None:
    """A sequence bias before it and a repetition penalty after it (which does not commute with a subtraction)."""
    bias = {(61,): 2.0, (5, 77): -1.5}
    _check(model, torch_model, 6, num_beams=6, num_beam_groups=2, diversity_penalty=0.3, max_new_tokens=10, repetition_penalty=1.3,
           sequence_bias=bias, reference_before=SequenceBiasLogitsProcessor(bias), reference_after=RepetitionPenaltyLogitsProcessor(1.3))


@pytest.mark.parametrize(("beams", "groups", "early_stopping"), [(4, 2, False), (6, 3, True), (6, 2, False)])
def test_groups_that_end_at_different_steps(model: onnxgen.Model, torch_model: torch.nn.Module, beams: int, groups: int,
                                            early_stopping: bool) -> None:
    """The end token raised, so that groups end at different steps: a group over (with early_stopping, once its
    finished slots are full) lowers the end token, the padding here, for the groups after it, not the tokens its
    beams, run on as they are, would take (transformers' padding); and at the last step the tokens a group took are
    those of the beams that would have run on, not the end token's."""
    bias = {(model.defaults.eos_ids[0],): 4.0}
    for new in (3, 12):
        _check(model, torch_model, beams, num_beams=beams, num_beam_groups=groups, diversity_penalty=0.3, max_new_tokens=new,
               sequence_bias=bias, early_stopping=early_stopping, reference_before=SequenceBiasLogitsProcessor(bias))


def test_a_callers_processor_sees_one_groups_rows_at_a_time(model: onnxgen.Model) -> None:
    """As transformers' group beam search calls processors: with each group's rows (its input ids), group by group."""
    seen: list[int] = []

    def processor(input_ids: Any, scores: Any) -> Any:
        seen.append(len(input_ids))
        return scores

    model.generate(PROMPTS, num_beams=6, num_beam_groups=3, diversity_penalty=1.0, max_new_tokens=3, min_new_tokens=3,
                   logits_processors=[processor])
    assert seen == [len(PROMPTS) * 2] * 9  # 3 steps x 3 groups, 2 beams of each prompt's group


@pytest.mark.parametrize(("options", "message"), [
    ({"num_beams": 4, "num_beam_groups": 3, "diversity_penalty": 1.0}, "divide num_beams into groups of equal size"),
    ({"num_beams": 4, "num_beam_groups": 2}, "needs diversity_penalty > 0"),
    ({"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0, "do_sample": True}, "it does not sample"),
    ({"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0, "regex": "[a-z]+"}, "diverse beam search\\) and regex"),
    ({"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": -1.0}, "diversity_penalty must be in"),
    ({"num_beams": 4, "num_beam_groups": 0, "diversity_penalty": 1.0}, "num_beam_groups must divide"),
])
def test_bad_groups_are_refused(model: onnxgen.Model, options: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        model.generate("It was", max_new_tokens=2, **options)


def test_a_folders_generation_config_and_the_server_and_command_line_take_it(model: onnxgen.Model, exported: Path, tmp_path: Path) -> None:
    """generation_config.json's num_beam_groups and diversity_penalty are taken (they were warned of and left out);
    the server's extra fields and the CLI's --num-beam-groups and --diversity-penalty give generate's results."""
    import httpx

    from onnxgen.serve import create_app

    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 0.7}))
    taken = GenerationOptions.from_folder(tmp_path)
    assert (taken.num_beams, taken.num_beam_groups, taken.diversity_penalty) == (4, 2, 0.7)

    options = {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 0.7}
    want = model.generate("It was", max_new_tokens=6, num_return_sequences=2, **options)

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(model, "tiny")), base_url="http://x") as http:
            return await http.post("/v1/completions", json={"prompt": "It was", "max_tokens": 6, "n": 2, **options})

    reply = asyncio.run(ask())
    assert reply.status_code == 200, reply.text
    assert [c["text"] for c in reply.json()["choices"]] == [c.text for c in want]

    cli = subprocess.run([sys.executable, "-m", "onnxgen", "generate", "It was", "--model", str(exported), "--max-new-tokens", "6",
                          "--num-beams", "4", "--num-beam-groups", "2", "--diversity-penalty", "0.7", "--num-return-sequences", "2",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert [c["text"] for c in json.loads(cli.stdout)["completions"]] == [c.text for c in want]
