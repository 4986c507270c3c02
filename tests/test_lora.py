"""LoRA adapters at run time (export --lora, onnxgen/adapters.py): one base model, many PEFT LoRA adapters, each row of
a batch with its own, held token for token to peft's own model of the adapter beside the base's weights (unmerged)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import torch

import onnxgen
from onnxgen.batcher import Batcher
from onnxgen.errors import AdapterWarning, ExportError, ModelFolderError, OptionsError
from onnxgen.export import ExportOptions, export

from .conftest import make_adapter, make_checkpoint
from .test_batcher import GREEDY, alone, result, submit, together

PROMPTS = ["It is a truth", "Call me", "Once upon a time there was"]


@pytest.fixture(scope="module")
def served(lora_base: Path, lora_adapters: dict[str, Path]) -> onnxgen.Model:
    return onnxgen.load(lora_base, threads=1, adapters=lora_adapters)


@pytest.fixture(scope="module")
def reference(checkpoint: Path, peft_adapters: dict[str, Path]) -> Any:
    """peft's model with both adapters loaded (unmerged), eager attention as the export's check runs it."""
    import peft
    from transformers import GPT2LMHeadModel

    model = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation="eager"),
                                           str(peft_adapters["one"]), adapter_name="one")
    model.load_adapter(str(peft_adapters["two"]), adapter_name="two")
    return model.eval()


def peft_generate(reference: Any, ids: list[int], adapter: str | None, **options: Any) -> list[int]:
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                out = reference.generate(torch.tensor([ids]), pad_token_id=0, eos_token_id=None, **options)
        else:
            reference.set_adapter(adapter)
            out = reference.generate(torch.tensor([ids]), pad_token_id=0, eos_token_id=None, **options)
    return out[0, len(ids):].tolist()


def test_a_lora_base_without_an_adapter_is_the_base(lora_base: Path, exported: Path) -> None:
    """The LoRA inputs at rank 0 add nothing: every position's logits are the plain export's, and the manifest counts
    the four linear layers of each layer."""
    plain, lora = onnxgen.load(exported, threads=1), onnxgen.load(lora_base, threads=1)
    ids = np.asarray([plain.tokenizer.encode(PROMPTS[2])])
    assert np.abs(lora.runtime.all_logits(ids) - plain.runtime.all_logits(ids)).max() < 1e-5
    assert json.loads((lora_base / "onnxgen.json").read_text())["graph"]["lora_layers"] == 4 * lora.dims.n_layer
    assert lora.adapters == {} and plain.runtime.lora is None


def test_each_adapter_generates_as_peft_does(served: onnxgen.Model, reference: Any) -> None:
    """Greedy and beam search with each adapter (and with none) give peft's tokens, and the adapters change the text."""
    texts = {}
    for adapter in ("one", "two", None):
        for prompt in PROMPTS[:2]:
            ids = served.tokenizer.encode(prompt)
            tokens = served.generate([ids], max_new_tokens=12, adapter=adapter, **GREEDY)[0].token_ids
            assert tokens == peft_generate(reference, ids, adapter, max_new_tokens=12, do_sample=False)
            texts[adapter, prompt] = tokens
        ids = served.tokenizer.encode(PROMPTS[2])
        beams = served.generate([ids], max_new_tokens=8, num_beams=3, adapter=adapter, eos_token_id=None)[0].token_ids
        assert beams == peft_generate(reference, ids, adapter, max_new_tokens=8, num_beams=3, do_sample=False)
    assert len({tuple(texts[a, PROMPTS[0]]) for a in ("one", "two", None)}) == 3


def test_other_layouts_of_a_lora_base_take_adapters_too(checkpoint: Path, lora_base: Path, lora_adapters: dict[str, Path], served: onnxgen.Model,
                                                         tmp_path: Path) -> None:
    """A LoRA base exported with --growing-cache (its beams reordered by copying), and one whose weights are mapped
    packed (prepacked.py, which runs the graph to check its copy), give an adapter's text as the default one does."""
    export(str(checkpoint), tmp_path / "growing", ExportOptions(lora=True, cache_in_place=False), quiet=True)
    growing = onnxgen.load(tmp_path / "growing", threads=1, adapters=lora_adapters)
    mapped = onnxgen.load(lora_base, threads=1, adapters=lora_adapters, mapped_weights=True)
    for adapter in ("one", "two"):
        for options in (GREEDY, {"num_beams": 3, "eos_token_id": None}):
            expected = served.generate(PROMPTS[2], max_new_tokens=8, adapter=adapter, **options)[0].token_ids
            assert growing.generate(PROMPTS[2], max_new_tokens=8, adapter=adapter, **options)[0].token_ids == expected
            assert mapped.generate(PROMPTS[2], max_new_tokens=8, adapter=adapter, **options)[0].token_ids == expected


def test_rows_with_different_adapters_run_in_one_pass(served: onnxgen.Model, reference: Any) -> None:
    """One cache whose rows have different adapters (and one none): a prompt pass of rows of different lengths and a
    decode step give each row the logits peft gives it alone with its adapter."""
    rows = ["one", None, "two", "one"]
    prompts = [served.tokenizer.encode(p) for p in (PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[1])]
    cache = served.runtime.new_cache(len(rows), 32)
    cache.adapters = [served.runtime.adapter(name) for name in rows]
    first = cache.prefill(prompts)
    step = cache.decode(first.argmax(-1))
    for row, (adapter, ids) in enumerate(zip(rows, prompts)):
        with torch.no_grad():
            if adapter is None:
                with reference.disable_adapter():
                    logits = reference(torch.tensor([[*ids, int(first[row].argmax())]])).logits[0, -2:].numpy()
            else:
                reference.set_adapter(adapter)
                logits = reference(torch.tensor([[*ids, int(first[row].argmax())]])).logits[0, -2:].numpy()
        assert np.abs(first[row] - logits[0]).max() < 1e-4 and np.abs(step[row] - logits[1]).max() < 1e-4
        alone = served.runtime.new_cache(1, 32, adapter=cache.adapters[row])  # the same bits as in the mixed pass (fp32)
        assert np.array_equal(alone.prefill([ids]), first[row : row + 1])
        assert np.array_equal(alone.decode(first[row : row + 1].argmax(-1)), step[row : row + 1])


def test_the_batcher_runs_requests_of_different_adapters_together(served: onnxgen.Model) -> None:
    """Requests for different adapters (and none) share the batcher's steps, each answer what it gives alone, seeded
    sampling included (fp32: each row computed alone)."""
    batcher = Batcher(served, max_batch=6)
    # the first ends early: the last row moves down into its place, with its adapter (batcher._compact)
    asks = [("one", PROMPTS[0], 3, GREEDY), (None, PROMPTS[0], 10, GREEDY), ("two", PROMPTS[1], 10, GREEDY),
            ("two", PROMPTS[2], 10, {"do_sample": True, "seed": 3, "eos_token_id": None})]
    inboxes = together(batcher, served, lambda: [submit(batcher, served, [p], adapter=a, max_new_tokens=n, **o) for a, p, n, o in asks])
    for (adapter, prompt, n, options), inbox in zip(asks, inboxes):
        assert [c.token_ids for c in result(inbox)] == alone(served, [prompt], adapter=adapter, max_new_tokens=n, **options)
    assert batcher.steps < 2 * 10 and batcher.jobs == 5 and batcher.moved >= 1  # the held job, then four sharing their steps


def test_a_prompt_cache_keeps_each_adapters_caches_apart(lora_base: Path, lora_adapters: dict[str, Path], served: onnxgen.Model) -> None:
    """A cache kept after a call with one adapter holds that adapter's keys and values: a call with another adapter (or
    none) on the same text does not take it, and its text is what it gives without a prompt cache."""
    cached = onnxgen.load(lora_base, threads=1, adapters=lora_adapters, prompt_cache_mib=16)
    prompt = cached.tokenizer.encode(" ".join([PROMPTS[2]] * 8))[:48]
    cached.generate([prompt], max_new_tokens=4, adapter="one", **GREEDY)
    two = cached.runtime.adapter("two")
    assert cached.runtime.take_kept(prompt + [5], two) is None and cached.runtime.take_kept(prompt + [5], None) is None
    for adapter in ("two", None, "one"):
        tokens = cached.generate([prompt + [5]], max_new_tokens=8, adapter=adapter, **GREEDY)[0].token_ids
        assert tokens == served.generate([prompt + [5]], max_new_tokens=8, adapter=adapter, **GREEDY)[0].token_ids


def test_scores_under_an_adapter_are_peft_s(served: onnxgen.Model, reference: Any) -> None:
    ids = served.tokenizer.encode(PROMPTS[2])
    reference.set_adapter("two")
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([ids])).logits[0, :-1].double(), -1)[torch.arange(len(ids) - 1), ids[1:]]
    got = served.score([ids], adapter="two")[0].logprobs[1:]
    assert np.allclose(got, expected.numpy(), atol=1e-4)
    assert not np.allclose(served.score([ids])[0].logprobs[1:], got, atol=1e-3)


@pytest.mark.parametrize("mode", ["int8", "int4", "fp16"])
def test_quantized_lora_bases_keep_the_adapter_in_float(lora_base: Path, lora_adapters: dict[str, Path], tmp_path: Path, mode: str) -> None:
    """Quantizing a LoRA base quantizes its weights and leaves the LoRA MatMuls, whose B is an input, as they are; the
    adapters then run on it (QLoRA's arrangement), changing its text as they change the fp32 base's."""
    from onnxgen.quantize import QuantizeOptions, quantize

    made = quantize(lora_base, tmp_path / mode, QuantizeOptions(mode=mode, max_ppl_increase=0.5), quiet=True)  # type: ignore[arg-type]
    graph = onnx.load(str(tmp_path / mode / "model.onnx"), load_external_data=False).graph
    lora = [n for n in graph.node if n.op_type == "MatMul" and n.input[1].endswith((".lora_A", ".lora_B"))]
    assert len(lora) == 2 * 4 * 2 and made["quantization"]["quantized_matrices"] == made["quantization"]["weight_matrices"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterWarning)  # the quantized folder records its parent's weights: the adapters' base
        model = onnxgen.load(tmp_path / mode, threads=1, adapters=lora_adapters)
    texts = {a: model.generate(PROMPTS[0], max_new_tokens=10, adapter=a, **GREEDY)[0].token_ids for a in ("one", "two", None)}
    assert len(set(map(tuple, texts.values()))) == 3


def test_what_cannot_be_loaded_is_refused(lora_base: Path, lora_adapters: dict[str, Path], exported: Path, served: onnxgen.Model,
                                          tmp_path: Path) -> None:
    with pytest.raises(OptionsError, match="exported without --lora: it takes no LoRA adapters"):
        onnxgen.load(exported, adapters={"one": lora_adapters["one"]})
    with pytest.raises(ModelFolderError, match="is a LoRA adapter, not a model: load its base model with it"):
        onnxgen.load(lora_adapters["one"])
    with pytest.raises(ModelFolderError, match="adapter 'x': .* is not a LoRA adapter folder"):
        onnxgen.load(lora_base, adapters={"x": exported})
    with pytest.raises(ModelFolderError, match="adapter 'x': model folder not found"):
        onnxgen.load(lora_base, adapters={"x": tmp_path / "nowhere"})
    with pytest.raises(OptionsError, match="adapters must be a dict of name to adapter folder"):
        onnxgen.load(lora_base, adapters=[lora_adapters["one"]])  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match=r"adapter 'three' is not loaded \(loaded: 'one', 'two'\)"):
        served.generate("It", adapter="three")
    with pytest.raises(OptionsError, match="adapter must be an adapter's name"):
        served.score("It is", adapter=1)  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="adapter must be a string"):
        served.generate("It", adapter=1)
    with pytest.raises(OptionsError, match="this model takes no LoRA adapters"):
        onnxgen.load(exported).generate("It", adapter="one")
    deeper = make_checkpoint(tmp_path / "deeper", n_layer=3)  # an adapter of another model: a layer this one lacks
    export(str(make_adapter(deeper, tmp_path / "peft-deeper")), tmp_path / "deeper-adapter", ExportOptions(lora=True), quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterWarning)  # refused, not also warned of as trained on other weights
        with pytest.raises(ModelFolderError, match=r"has transformer\.h\.2\..*which this model's graph does not take"):
            onnxgen.load(lora_base, adapters={"deeper": tmp_path / "deeper-adapter"})


def test_what_cannot_run_apart_is_refused_at_export(checkpoint: Path, tmp_path: Path) -> None:
    import peft
    from transformers import GPT2LMHeadModel

    with pytest.raises(ExportError, match="trains whole modules too .*wte.*export it merged"):
        export(str(make_adapter(checkpoint, tmp_path / "wte", modules_to_save=["wte"])), tmp_path / "x", ExportOptions(lora=True), quiet=True)
    head = make_adapter(checkpoint, tmp_path / "head", target_modules=["c_attn", "lm_head"])
    with pytest.raises(ExportError, match="adapts lm_head: a base folder takes LoRA on"):
        export(str(head), tmp_path / "x", ExportOptions(lora=True), quiet=True)
    ia3 = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(checkpoint), peft.IA3Config(target_modules=["c_attn"], feedforward_modules=[],
                                                                                       fan_in_fan_out=True))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ExportError, match="is a IA3 adapter: --lora keeps LoRA adapters apart"):
        export(str(tmp_path / "ia3"), tmp_path / "x", ExportOptions(lora=True), quiet=True)
    with pytest.raises(ExportError, match="--lora edits the optimized graph"):
        export(str(checkpoint), tmp_path / "x", ExportOptions(lora=True, optimize=False), quiet=True)
    assert not (tmp_path / "x").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxgen", *args], capture_output=True, text=True, timeout=300, check=False)


def test_the_command_line_exports_and_runs_an_adapter(lora_base: Path, peft_adapters: dict[str, Path], served: onnxgen.Model,
                                                      tmp_path: Path) -> None:
    made = run_cli("export", str(peft_adapters["two"]), "-o", str(tmp_path / "two"), "--lora")
    assert made.returncode == 0 and f"--adapter {tmp_path / 'two'}" in made.stdout, made.stderr
    expected = served.generate(PROMPTS[0], max_new_tokens=8, adapter="two", **GREEDY)[0].text
    out = run_cli("generate", PROMPTS[0], "--model", str(lora_base), "--adapter", str(tmp_path / "two"), "--strategy", "greedy",
                  "--max-new-tokens", "8")
    assert out.returncode == 0 and out.stdout == expected + "\n", out.stderr
    timed = run_cli("bench", "--model", str(lora_base), "--adapter", str(tmp_path / "two"), "--new-tokens", "4", "--runs", "1", "--json")
    assert timed.returncode == 0 and json.loads(timed.stdout)["adapter"] == str(tmp_path / "two"), timed.stderr
    two = run_cli("generate", "It", "--model", str(lora_base), "--adapter", f"a={tmp_path / 'two'}", "--adapter", f"b={tmp_path / 'two'}")
    assert two.returncode == 1 and two.stderr.strip() == "onnxgen: error: --adapter: one adapter for this command (serve and run-batch take several)"
    checked = run_cli("verify", "--model", str(tmp_path / "two"))
    assert checked.returncode == 0 and checked.stdout.strip() == f"{tmp_path / 'two'}: every file matches the manifest", checked.stderr
    data = bytearray((tmp_path / "two" / "adapter.onnx_adapter").read_bytes())
    data[-1] ^= 1  # a bit of its last weight
    (tmp_path / "two" / "adapter.onnx_adapter").write_bytes(bytes(data))
    broken = run_cli("verify", "--model", str(tmp_path / "two"))
    assert broken.returncode == 1 and "adapter.onnx_adapter does not match its sha256" in broken.stderr
    wrong = run_cli("serve", "--model", str(lora_base), "--name", "two", "--adapter", str(tmp_path / "two"), "--port", "1")
    assert wrong.returncode != 0 and "'two' is the model's own name here" in wrong.stderr and "Traceback" not in wrong.stderr


def test_the_server_serves_each_adapter_as_a_model(served: onnxgen.Model) -> None:
    """As vLLM's --lora-modules: /v1/models lists the adapters with the base as parent, a request's "model" names one,
    and its answer is what generate gives with it; an unknown name is a 404 naming those served."""
    from onnxgen.serve import create_app

    app = create_app(served, "tiny")

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as http:
            asks = [{"model": m, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "eos_token_id": None} for m in ("one", "tiny", "two")]
            replies = await asyncio.gather(*(http.post("/v1/completions", json=a) for a in asks))
            return [await http.get("/v1/models"), *replies, await http.post("/v1/completions", json={**asks[0], "model": "three"}),
                    await http.post("/v1/completions", json={**asks[0], "model": "tiny", "adapter": "one"}), await http.get("/metrics")]

    models, one, plain, two, unknown, extra, metrics = asyncio.run(run())
    for adapter, reply in (("one", one), ("two", two)):  # what each fine-tune served, in the server's metrics
        assert f'onnxgen_adapter_requests_total{{adapter="{adapter}"}} 1.0' in metrics.text
        assert f'onnxgen_adapter_generation_tokens_total{{adapter="{adapter}"}} {float(reply.json()["usage"]["completion_tokens"])}' in metrics.text
    listed = {m["id"]: m for m in models.json()["data"]}
    assert set(listed) == {"tiny", "one", "two"} and listed["one"]["parent"] == "tiny" and listed["two"]["root"] == str(served.adapters["two"])
    for reply, adapter in ((one, "one"), (plain, None), (two, "two")):
        assert reply.json()["choices"][0]["text"] == served.generate(PROMPTS[0], max_new_tokens=8, adapter=adapter, **GREEDY)[0].text
        assert reply.json()["model"] == adapter or (adapter is None and reply.json()["model"] == "tiny")
    assert unknown.status_code == 404 and "this server has 'tiny', 'one', 'two'" in unknown.json()["error"]["message"]
    assert extra.status_code == 400 and extra.json()["error"]["message"] == "adapter is OpenAI's model here"


def test_adapters_load_and_unload_while_the_model_serves(lora_base: Path, lora_adapters: dict[str, Path], served: onnxgen.Model) -> None:
    """load_adapter and unload_adapter change what later calls may name; a stream already running with an adapter that
    is let go finishes with it, and a name loaded again with other weights is another adapter (its kept caches too)."""
    model = onnxgen.load(lora_base, threads=1, adapters={"one": lora_adapters["one"]}, prompt_cache_mib=16)
    prompt = model.tokenizer.encode(" ".join([PROMPTS[2]] * 8))[:48]  # long enough for the prompt cache to keep
    expected = {a: served.generate([prompt], max_new_tokens=12, adapter=a, **GREEDY)[0].text for a in ("one", "two")}
    model.load_adapter("two", lora_adapters["two"])
    assert model.adapters == lora_adapters and model.generate([prompt], max_new_tokens=12, adapter="two", **GREEDY)[0].text == expected["two"]
    with pytest.raises(OptionsError, match="adapter 'two' is loaded already"):
        model.load_adapter("two", lora_adapters["one"])
    stream = model.stream([prompt], max_new_tokens=12, adapter="one", **GREEDY)
    first = next(stream)
    model.unload_adapter("one")
    assert first + "".join(stream) == expected["one"]  # went on with the adapter it started with; its cache is kept
    with pytest.raises(OptionsError, match=r"adapter 'one' is not loaded \(loaded: 'two'\)"):
        model.generate("It", adapter="one")
    with pytest.raises(OptionsError, match="adapter 'one' is not loaded"):
        model.unload_adapter("one")
    model.load_adapter("one", lora_adapters["two"])  # the name again, other weights: the old "one"'s kept cache is not its
    assert model.generate([prompt], max_new_tokens=12, adapter="one", **GREEDY)[0].text == expected["two"]


def test_the_server_loads_and_unloads_adapters_when_allowed(lora_base: Path, lora_adapters: dict[str, Path], exported: Path,
                                                              served: onnxgen.Model) -> None:
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: an adapter loaded is a model requests name (listed, its
    answer generate's with it), one let go is a 404; a folder that is not an adapter, or the served model's own name, is
    a 400; without adapter_loading the routes do not exist."""
    from onnxgen.serve import create_app

    model = onnxgen.load(lora_base, threads=1)
    app = create_app(model, "tiny", adapter_loading=True)
    ask = {"model": "sql", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "eos_token_id": None}
    load = {"lora_name": "sql", "lora_path": str(lora_adapters["two"])}

    async def run(app: Any, *calls: tuple[str, dict[str, Any] | None]) -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as http:
            return [await (http.get(path) if body is None else http.post(path, json=body)) for path, body in calls]

    loaded, listed, answered, unloaded, gone, bad, taken = asyncio.run(run(
        app, ("/v1/load_lora_adapter", load), ("/v1/models", None), ("/v1/completions", ask),
        ("/v1/unload_lora_adapter", {"lora_name": "sql"}), ("/v1/completions", ask),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(exported)}), ("/v1/load_lora_adapter", {**load, "lora_name": "tiny"})))
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'sql' added successfully."
    assert [m["id"] for m in listed.json()["data"]] == ["tiny", "sql"]
    assert answered.json()["choices"][0]["text"] == served.generate(PROMPTS[0], max_new_tokens=6, adapter="two", **GREEDY)[0].text
    assert unloaded.text == "Success: LoRA adapter 'sql' removed successfully." and gone.status_code == 404
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path" and "not a LoRA adapter folder" in bad.json()["error"]["message"]
    assert taken.status_code == 400 and "the served model's own name" in taken.json()["error"]["message"]
    assert asyncio.run(run(create_app(model, "tiny"), ("/v1/load_lora_adapter", load)))[0].status_code == 404
    with pytest.raises(OptionsError, match="adapter loading: .* takes no LoRA adapters"):
        create_app(onnxgen.load(exported, threads=1), "tiny", adapter_loading=True)


def test_a_batchers_prompt_cache_and_guesses_keep_to_each_adapter(lora_base: Path, lora_adapters: dict[str, Path], served: onnxgen.Model) -> None:
    """In the server's batcher, a request resumes from a kept row only of its own adapter (the kept row's copy brings
    the adapter with it); prompt lookup's passes of several positions run with the call's adapter too."""
    model = onnxgen.load(lora_base, threads=1, adapters=lora_adapters, prompt_cache_mib=16)
    batcher = Batcher(model, max_batch=4)
    prompt = model.tokenizer.encode(" ".join([PROMPTS[2]] * 8))[:48]
    turns = [("one", prompt), ("two", [*prompt, 7, 9]), ("one", [*prompt, 7, 9]), (None, [*prompt, 7, 9])]
    resumed = []
    for adapter, ids in turns:
        inbox = submit(batcher, model, [ids], adapter=adapter, max_new_tokens=6, **GREEDY)  # type: ignore[list-item]
        assert [c.token_ids for c in result(inbox)] == [c.token_ids for c in served.generate([ids], max_new_tokens=6, adapter=adapter, **GREEDY)]
        resumed.append(batcher.resumed)
    assert resumed == [0, 0, 1, 1]  # only the second "one" took a kept row
    for adapter in ("one", "two"):
        ids = served.tokenizer.encode(" ".join([PROMPTS[0]] * 6))
        plain = served.generate([ids], max_new_tokens=16, adapter=adapter, **GREEDY)[0].token_ids
        assert served.generate([ids], max_new_tokens=16, adapter=adapter, prompt_lookup_num_tokens=4, **GREEDY)[0].token_ids == plain


def test_an_adapter_beside_other_weights_than_its_bases_is_warned_of(lora_adapters: dict[str, Path], tmp_path: Path) -> None:
    """The adapter's folder records its base's weights (a fingerprint), the model's folder its own: an adapter loaded
    beside a model of the same shapes but other weights (another fine-tune) runs, with an AdapterWarning; beside its
    own base, none (the quantized bases above too). The command line says it in a line."""
    other = make_checkpoint(tmp_path / "other", initializer_range=0.2)  # gpt2's shapes, other weights
    export(str(other), tmp_path / "other-base", ExportOptions(lora=True), quiet=True)
    with pytest.warns(AdapterWarning, match="adapter 'one' was trained on .*whose weights are not this model's"):
        model = onnxgen.load(tmp_path / "other-base", threads=1, adapters={"one": lora_adapters["one"]})
    assert model.generate("It", max_new_tokens=2, adapter="one")  # it runs
    said = run_cli("generate", "It", "--model", str(tmp_path / "other-base"), "--adapter", str(lora_adapters["one"]), "--max-new-tokens", "2")
    assert said.returncode == 0 and said.stderr.startswith("onnxgen: warning: adapter 'one' was trained on"), said.stderr
    assert len(said.stderr.strip().splitlines()) == 1
