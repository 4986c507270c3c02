"""The Python API: `load` a folder, then `generate`, `stream`, or call a transformers-style `pipeline`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import manifest
from .beam import beam_search
from .decoding import Generator
from .errors import ContextLengthError, ModelFolderError, OptionsError
from .options import GenerationOptions
from .runtime import Provider, Runtime
from .tokenizer import TextStream, Tokenizer

BUNDLED = Path(__file__).parent / "bundled" / "prose-mini"

Prompt = str | Sequence[int]


@dataclass
class Stats:
    prompt_tokens: int  # over all rows, without padding
    new_tokens: int  # over all rows
    time_to_first_token_s: float  # call start to the first token (the prompt pass)
    decode_tokens_per_s: float  # tokens after the first, per second, over all rows
    total_s: float


@dataclass
class Completion:
    text: str  # generated text only, without the prompt (and without a stop string that ended it)
    token_ids: list[int]  # generated tokens
    finish_reason: str  # "eos", "length" or "stop"
    prompt_index: int  # which prompt it continues


def _first_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


class Model:
    def __init__(self, folder: Path, provider: Provider = "cpu", threads: int | None = None) -> None:
        self.folder = folder
        self.manifest = manifest.read(folder)
        self.dims = self.manifest["dims"]
        self.context_length: int = self.dims["n_positions"]
        self.tokenizer = Tokenizer(folder / "tokenizer.json")
        self.defaults = GenerationOptions.from_folder(folder)
        self.bos_token_id: int | None = json.loads((folder / "config.json").read_text()).get("bos_token_id")
        self.runtime = Runtime(folder / "model.onnx", self.dims, provider, threads)
        self.last_stats: Stats | None = None  # timings of the latest generate() or finished stream()

    # -- options and prompts ---------------------------------------------------------------------
    def options(self, options: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
        """The folder's defaults, then `options`, then keyword overrides; validated."""
        return (options or self.defaults).with_overrides(**overrides)

    def _prompt_ids(self, prompts: Prompt | Sequence[Prompt], opts: GenerationOptions) -> list[list[int]]:
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]  # type: ignore[list-item]
        if not prompts:
            raise OptionsError("no prompt given")
        budget = self.context_length - opts.max_new_tokens
        if budget < 1:
            raise ContextLengthError(f"max_new_tokens ({opts.max_new_tokens}) must be below the context window ({self.context_length})")
        result = []
        for prompt in prompts:  # type: ignore[union-attr]
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            if not ids:  # an empty prompt starts from the beginning-of-text token, as transformers does
                if self.bos_token_id is None:
                    raise OptionsError("empty prompt and the model has no bos_token_id")
                ids = [self.bos_token_id]
            if any(not 0 <= t < self.dims["vocab_size"] for t in ids):
                raise OptionsError(f"token ids must be in [0, {self.dims['vocab_size']})")
            if len(ids) > budget:
                if not opts.truncate_prompt:
                    raise ContextLengthError(
                        f"prompt of {len(ids)} tokens + max_new_tokens {opts.max_new_tokens} exceeds the context window "
                        f"of {self.context_length}; shorten it, lower max_new_tokens, or pass truncate_prompt=True"
                    )
                ids = ids[-budget:]
            result.append(ids)
        return result

    def _pad_id(self, opts: GenerationOptions) -> int:
        if opts.pad_token_id is not None:
            return opts.pad_token_id
        return opts.eos_ids[0] if opts.eos_ids else 0  # GPT-2 has no pad token; transformers pads with eos too

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], options: GenerationOptions | None = None, **overrides: Any) -> list[Completion]:
        """Generate for one or many prompts; returns num_return_sequences completions per prompt, in order."""
        opts = self.options(options, **overrides)
        ids = self._prompt_ids(prompts, opts)
        start = self._start_clock()
        if opts.num_beams > 1:
            beams = beam_search(self.runtime, ids, opts, self._pad_id(opts))
            completions = [Completion(self.tokenizer.decode(beam.tokens), beam.tokens, beam.finish_reason, i)
                           for i, found in enumerate(beams) for beam in found]
        else:
            rows = [p for p in ids for _ in range(opts.num_return_sequences)]
            generator = Generator(self.runtime, rows, opts, self._pad_id(opts))
            texts = [""] * len(rows)
            for pieces in self._steps(generator, opts):
                texts = [text + piece for text, piece in zip(texts, pieces)]
            completions = [Completion(texts[row], generator.generated[row], generator.finish_reasons[row] or "length",
                                      row // opts.num_return_sequences) for row in range(len(rows))]
        self._stop_clock(start, ids, [c.token_ids for c in completions])
        return completions

    def _start_clock(self) -> float:
        self.last_stats = None
        self.runtime.step_ends.clear()
        return time.perf_counter()

    def _stop_clock(self, start: float, prompts: list[list[int]], sequences: list[list[int]]) -> None:
        ends = self.runtime.step_ends
        new_tokens = sum(len(s) for s in sequences)
        decode_s = ends[-1] - ends[0]  # the first token of each sequence comes from the prompt pass
        tps = (new_tokens - len(sequences)) / decode_s if decode_s > 0 else 0.0
        self.last_stats = Stats(sum(len(p) for p in prompts), new_tokens, ends[0] - start, tps, time.perf_counter() - start)

    def stream(self, prompt: Prompt, options: GenerationOptions | None = None, **overrides: Any) -> Iterator[str]:
        """Yield the text of one completion piece by piece as it is decoded. Stop iterating to cancel."""
        opts = self.options(options, **overrides)
        if opts.num_beams > 1 or opts.num_return_sequences > 1:
            raise OptionsError("stream() produces one sequence: beam search revises earlier tokens, so it cannot stream")
        ids = self._prompt_ids(prompt, opts)
        generator = Generator(self.runtime, ids, opts, self._pad_id(opts))
        start = self._start_clock()
        for pieces in self._steps(generator, opts):
            if pieces[0]:
                yield pieces[0]
        self._stop_clock(start, ids, generator.generated)

    def _steps(self, generator: Generator, opts: GenerationOptions) -> Iterator[list[str]]:
        """Drive the generator; after each step yield every row's newly final text. A row's pieces add up
        to its whole text; text that could still turn into a stop string is held back until it cannot."""
        streams = [TextStream(self.tokenizer) for _ in generator.generated]
        emitted = [0] * len(streams)
        hold = max((len(s) for s in opts.stop), default=1) - 1
        while not generator.done:
            tokens = generator.step()
            pieces = []
            for row, stream in enumerate(streams):
                if emitted[row] < 0:  # this row's text is complete
                    pieces.append("")
                    continue
                stream.push(int(tokens[row]))  # eos decodes to nothing
                text = stream.text
                # Text before emitted[row] was checked last step with `hold` characters after it.
                cut = _first_stop(text, opts.stop, emitted[row]) if opts.stop else None
                if cut is not None:
                    generator.finish(row, "stop")
                    text = text[:cut]
                if generator.finish_reasons[row] is not None:
                    if cut is None:
                        text = self.tokenizer.decode(generator.generated[row])  # flush bytes held back
                    pieces.append(text[emitted[row] :])
                    emitted[row] = -1
                else:
                    safe = max(emitted[row], len(text) - hold)
                    pieces.append(text[emitted[row] : safe])
                    emitted[row] = safe
            yield pieces


def load(path: str | Path | None = None, provider: Provider = "cpu", threads: int | None = None) -> Model:
    """Load an onnxgen model folder; with no path, the small model that ships with onnxgen."""
    folder = Path(path) if path is not None else BUNDLED
    if path is None and not (folder / manifest.MANIFEST).is_file():
        raise ModelFolderError("this onnxgen install has no bundled model: pass a model folder")
    return Model(folder, provider, threads)


class TextGenerationPipeline:
    """transformers' `pipeline("text-generation")` call shape over an onnxgen model."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def __call__(self, text_inputs: str | list[str], max_length: int | None = None, return_full_text: bool = True,
                 **options: Any) -> list[dict[str, str]] | list[list[dict[str, str]]]:
        prompts = [text_inputs] if isinstance(text_inputs, str) else list(text_inputs)
        results = []
        for prompt in prompts:
            overrides = dict(options)
            if max_length is not None:  # transformers' max_length counts the prompt
                overrides["max_new_tokens"] = max_length - len(self.model.tokenizer.encode(prompt))
            prefix = prompt if return_full_text else ""
            results.append([{"generated_text": prefix + c.text} for c in self.model.generate(prompt, **overrides)])
        return results[0] if isinstance(text_inputs, str) else results


def pipeline(task: str = "text-generation", model: str | Path | Model | None = None, device: int | str | None = None,
             threads: int | None = None) -> TextGenerationPipeline:
    """Drop-in for `transformers.pipeline("text-generation", model=...)`; device 0 or "cuda" selects CUDA."""
    if task != "text-generation":
        raise OptionsError(f"onnxgen only offers the 'text-generation' task, not {task!r}")
    if not isinstance(model, Model):
        provider: Provider = "cuda" if device == "cuda" or (isinstance(device, int) and device >= 0) else "cpu"
        model = load(model, provider=provider, threads=threads)
    return TextGenerationPipeline(model)
