"""The Python API: `load` a folder, then `generate`, `stream`, `score`, or call a transformers-style `pipeline`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
import queue
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from collections.abc import Generator as GeneratorType
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .assistant import Assistant
from .batcher import Batcher, Full, Job
from .beam import BeamSearch
from .chat import ChatTemplate
from .contrastive import ContrastiveSearch
from .errors import ContextLengthError, ModelFolderError, OnnxgenError, OptionsError, PerformanceWarning, shown
from .folder import MANIFEST, ModelFolder
from .generator import Completion, Event, Generator, Stats, token_logprobs
from .healing import heal
from .lookup import PromptLookup
from .options import MAX_LOGPROBS, GenerationOptions, WatermarkingConfig, is_int, is_number
from .runtime import Provider, Runtime
from .tokenizer import Tokenizer
from .unconditional import Unconditional
from .watermark import Greenlists, WatermarkDetection, detect

BUNDLED = Path(__file__).parent / "bundled" / "prose-mini"
# load(max_batch=N): calls that wait for the batcher beyond those decoding; past this a call is refused (OnnxgenError)
WAITING_CALLS = 1024
# Encoded by a model and its draft alike where they share a tokenizer: words, digits, punctuation, a non-ASCII letter.
_PROBE = "The 1,024 quick brown foxes — naïvely — jumped: 'over' the lazy dogs!"

Prompt = str | Sequence[int]


def _is_ids(value: Any) -> bool:
    """A 1-D run of integer token ids (bools are not ids)."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and value.dtype.kind in "iu"
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)) for t in value)


def _prompt_list(prompts: Any) -> list[Any]:
    """The prompts of a call as a list; anything that is neither text nor token ids is refused, not guessed at."""
    if isinstance(prompts, (str, bytes)) or (_is_ids(prompts) and len(prompts) > 0):
        return [prompts]
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2 and prompts.dtype.kind in "iu":
        return list(prompts)
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, (str, bytes)) or _is_ids(p) for p in prompts):
        return list(prompts)
    if isinstance(prompts, (list, tuple, np.ndarray)) and len(prompts) == 0:
        raise OptionsError("no prompt given")
    raise OptionsError("a prompt is text (str, or UTF-8 bytes) or a sequence of integer token ids; "
                       f"several prompts are a list of those; got {type(prompts).__name__} {shown(prompts)}")


@dataclass
class Score:
    """A text's log-likelihood under the model, token by token (Model.score)."""

    token_ids: list[int]
    logprobs: list[float | None]  # each token's log-probability given the tokens before it; the first token has none
    top_logprobs: list[dict[int, float] | None]  # per token, the most likely tokens at its position, best first

    @property
    def total(self) -> float:
        """The log-probability of the text after its first token."""
        return float(sum(lp for lp in self.logprobs if lp is not None))

    @property
    def perplexity(self) -> float:
        """exp(-total / scored tokens); NaN for a text of one token, which has none scored."""
        scored = len(self.logprobs) - 1
        return math.exp(-self.total / scored) if scored else math.nan


class Model:
    def __init__(self, path: Path, provider: Provider = "cpu", threads: int | None = None, verify: bool = False,
                 mapped_weights: bool = False, cuda_graph: bool = False, spinning: bool = True, prompt_cache_mib: int = 0,
                 chat_template: str | None = None, adapters: dict[str, str | Path] | None = None,
                 max_batch: int | None = None) -> None:
        self.folder = ModelFolder.read(path)
        if chat_template is not None and not isinstance(chat_template, str):
            raise OptionsError(f"chat_template is a Jinja template's text, got {type(chat_template).__name__}")
        self._chat_template = chat_template
        if verify:
            self.folder.verify()
        self.manifest, self.dims = self.folder.manifest, self.folder.dims
        self.context_length = self.dims.n_positions
        self.tokenizer = Tokenizer(self.folder.tokenizer_file, self.folder.clean_up_tokenization_spaces)
        if self.tokenizer.vocab_size > self.dims.vocab_size:
            raise ModelFolderError(f"{self.folder.tokenizer_file} has {self.tokenizer.vocab_size} tokens, more than the model's "
                                   f"vocabulary of {self.dims.vocab_size}")
        self.defaults = GenerationOptions.from_folder(path)
        self.runtime = Runtime(self.folder, provider, threads, mapped_weights, cuda_graph, spinning, prompt_cache_mib, adapters)
        self._calls = threading.local()  # each thread's latest finished call, for last_stats
        self._batcher = None if max_batch is None else self._batching(max_batch)

    def _batching(self, max_batch: int) -> Batcher:
        """load(max_batch=N): generate and stream calls go through the server's continuous batcher (batcher.py)."""
        if not (is_int(max_batch) and max_batch >= 1):
            raise OptionsError(f"max_batch must be an integer >= 1 (or None: each call runs alone), got {max_batch!r}")
        if not self.runtime.in_place:
            raise OptionsError(f"max_batch: {self.folder.path} was exported with --growing-cache, whose rows share one width: "
                               "calls could not join each other's steps (export it again without --growing-cache)")
        return Batcher(self, max_batch, WAITING_CALLS)

    def __repr__(self) -> str:
        """What a notebook shows: the folder, its weights (and cache where quantized), shape and device."""
        d, quantized = self.dims, self.manifest.get("quantization") or {}
        options = quantized.get("options", {})
        cache = options.get("kv_cache", "float")  # "float": the activations' type
        around = " in float16" if options.get("float16") else ""  # int4 for CUDA (quantize --float16)
        return (f"<onnxgen.Model {self.folder.path.name!r}: {quantized.get('mode', self.manifest['dtype'])} weights{around}"
                f"{f', {cache} cache' if cache != 'float' else ''}, {d.n_layer} layers x {d.n_embd} ({d.n_head} heads), vocabulary "
                f"{d.vocab_size}, context {d.n_positions}{f', LoRA adapters {sorted(self.adapters)}' if self.adapters else ''}, "
                f"on {self.runtime.device}>")

    @property
    def adapters(self) -> dict[str, Path]:
        """The LoRA adapters loaded, name -> folder: a call's `adapter` option names one (a server's `model` field)."""
        return self.runtime.lora.folders() if self.runtime.lora is not None else {}

    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Load a LoRA adapter folder beside the model (one exported with --lora) for later calls to name; the
        adapters given to load() are loaded so. Raises OptionsError where the name is taken."""
        self.runtime.load_adapter(name, folder)

    def unload_adapter(self, name: str) -> None:
        """Later calls can no longer name the adapter; calls running with it finish with it."""
        self.runtime.unload_adapter(name)

    @property
    def last_stats(self) -> Stats | None:
        """Timings of this thread's latest generate() or fully consumed stream(); a generator has its own."""
        return getattr(self._calls, "stats", None)

    # -- options and prompts ---------------------------------------------------------------------
    def options(self, options: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
        """The folder's defaults, then `options`, then keyword overrides; validated."""
        if options is not None and not isinstance(options, GenerationOptions):
            raise OptionsError(f"options must be a GenerationOptions, got {type(options).__name__}: pass the options "
                               "themselves as keywords (generate(prompt, max_new_tokens=20, ...))")
        return (options or self.defaults).with_overrides(**overrides)

    def prompt_ids(self, prompts: Prompt | Sequence[Prompt], opts: GenerationOptions) -> list[list[int]]:
        """The prompts as token ids, one list per prompt, checked as generate() checks them (with the token ids
        the options name). A prompt is text (str, or bytes in UTF-8) or token ids (a sequence or 1-D array of
        integers); several prompts are a list of those or a 2-D integer array."""
        self._check_special_ids(opts)
        if opts.max_length is not None and opts.max_length > self.context_length:
            raise ContextLengthError(f"max_length ({opts.max_length}) exceeds the context window ({self.context_length})")
        # With max_length, what is left after the prompt is generated (at least a token: for_prompts).
        budget = self.context_length - (opts.max_new_tokens if opts.max_length is None else 1)
        if budget < 1:
            raise ContextLengthError(f"max_new_tokens ({opts.max_new_tokens}) must be below the context window ({self.context_length})")
        result = []
        for prompt in _prompt_list(prompts):
            ids = self._encode(prompt)
            if not ids:  # an empty prompt starts from the beginning-of-text token, as transformers does
                if self.folder.bos_token_id is None:
                    raise OptionsError("empty prompt and the model has no bos_token_id")
                ids = [self.folder.bos_token_id]
            if len(ids) > budget:
                if not opts.truncate_prompt:
                    raise ContextLengthError(
                        f"prompt of {len(ids)} tokens + max_new_tokens {opts.max_new_tokens} exceeds the context window "
                        f"of {self.context_length}; shorten it, lower max_new_tokens, or pass truncate_prompt=True"
                    )
                ids = ids[-budget:]
            result.append(ids)
        return result

    def _encode(self, prompt: str | bytes | Sequence[int]) -> list[int]:
        if isinstance(prompt, bytes):
            try:
                prompt = prompt.decode("utf-8")
            except UnicodeDecodeError as e:
                raise OptionsError(f"prompt is not valid UTF-8: {e}") from None
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate: bytes that were not UTF-8 (the command line's, say)
                raise OptionsError(f"prompt is not valid text: {e.object[e.start:e.end]!r} at character {e.start} is not "
                                   "a character (input that was not UTF-8?)") from None
            return self.tokenizer.encode(prompt)  # within the model's vocabulary: checked at load
        outside = [int(t) for t in prompt if not 0 <= t < self.dims.vocab_size]
        if outside:
            raise OptionsError(f"token ids must be in [0, {self.dims.vocab_size}), got {outside[0]}")
        return [int(t) for t in prompt]

    def _check_special_ids(self, opts: GenerationOptions) -> None:
        vocab = self.dims.vocab_size
        for name, ids in (("eos_token_id", opts.eos_ids), ("pad_token_id", [] if opts.pad_token_id is None else [opts.pad_token_id]),
                          ("logit_bias", list(opts.logit_bias)), ("suppress_tokens", opts.suppress_tokens),
                          ("begin_suppress_tokens", opts.begin_suppress_tokens),
                          ("forced_eos_token_id", opts.forced_eos_ids),
                          ("forced_bos_token_id", [] if opts.forced_bos_token_id is None else [opts.forced_bos_token_id]),
                          ("sequence_bias", [t for sequence in opts.sequence_bias for t in sequence]),
                          ("bad_words_ids", [t for words in opts.bad_words_ids for t in words])):
            outside = [t for t in ids if not 0 <= t < vocab]
            if outside:
                raise OptionsError(f"{name} token ids must be in [0, {vocab}), got {outside[0]}")
        if len(set(opts.suppress_tokens) | set(opts.begin_suppress_tokens)) >= vocab:  # the first token has both
            raise OptionsError(f"suppress_tokens (with begin_suppress_tokens) hold every one of the {vocab} tokens: nothing is left to generate")
        if opts.forced_eos_ids and set(opts.forced_eos_ids) <= set(opts.suppress_tokens):
            raise OptionsError("forced_eos_token_id is in suppress_tokens: nothing is left to generate as the last token")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None) -> str:
        """A conversation ([{"role": "user", "content": "..."}, ...]) as the prompt text the checkpoint's chat template
        makes of it, what transformers' tokenizer.apply_chat_template(messages, tokenize=False, ...) returns: with
        `add_generation_prompt`, ending where the assistant's reply begins; with `continue_final_message` (and
        add_generation_prompt=False), inside the last message, for the model to go on with it; `tools`: the functions
        the template tells the model of (JSON schemas: [{"type": "function", "function": {...}}, ...])."""
        if self._chat is None:
            raise OptionsError(f"the model {self.folder.path.name!r} has no chat template (its checkpoint's tokenizer_config.json "
                               "had none): pass the prompt as text, or load it with one (chat_template=, --chat-template FILE)")
        return self._chat.render(messages, add_generation_prompt, continue_final_message, tools)

    @functools.cached_property
    def _chat(self) -> ChatTemplate | None:
        """Parsed when first used: a template that does not parse keeps the model from chatting, not from loading.
        The one given at load where one was, else the checkpoint's."""
        if self._chat_template is not None:
            return ChatTemplate(self._chat_template, self.folder.special_tokens)
        chat = self.folder.chat_template
        return ChatTemplate(*chat) if chat else None

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None or self.folder.chat_template is not None

    # -- generation ------------------------------------------------------------------------------
    def generator(self, prompts: Prompt | Sequence[Prompt], options: GenerationOptions | None = None,
                  **overrides: Any) -> Generator | BeamSearch:
        """The decode loop for these prompts, for the caller to drive (see generator.py); options and
        prompts are checked now. Rows go prompt by prompt, num_return_sequences rows each."""
        return self._made(*self._call(prompts, options, overrides))

    def _call(self, prompts: Prompt | Sequence[Prompt], options: GenerationOptions | None,
              overrides: dict[str, Any]) -> tuple[list[list[int]], GenerationOptions]:
        """A call's prompts as token ids and its options, checked, its lengths worked out from its prompts."""
        opts = self.options(options, **overrides)
        ids = self.prompt_ids(prompts, opts)
        return ids, opts.for_prompts(max(len(p) for p in ids))

    def _made(self, ids: list[list[int]], opts: GenerationOptions) -> Generator | BeamSearch:
        healing = [heal(self.tokenizer, prompt) for prompt in ids] if opts.token_healing else None
        if healing:  # everything the call runs starts from the healed prompts
            ids = [h.prompt if h else prompt for h, prompt in zip(healing, ids)]
        if opts.num_beams > 1:
            return BeamSearch(self.runtime, self.tokenizer, ids, opts, opts.pad_id, healing)
        if opts.contrastive:
            if self.runtime.hidden_dtype is None or not self.runtime.in_place:
                raise OptionsError(f"penalty_alpha (contrastive search) needs a folder with its hidden states and the cache in place: "
                                   f"{self.folder.path} was exported {'with --growing-cache' if not self.runtime.in_place else 'before onnxgen wrote them'}; "
                                   "export it again")
            return ContrastiveSearch(self.runtime, self.tokenizer, ids, opts, opts.pad_id, healing)
        return Generator(self.runtime, self.tokenizer, ids, opts, opts.pad_id, self._guesser(ids, opts), self._unconditional(ids, opts),
                         healing)

    def _unconditional(self, ids: list[list[int]], opts: GenerationOptions) -> Unconditional | None:
        """Classifier-free guidance's twin rows, num_return_sequences for each prompt: each starts from the negative
        prompt, else from its prompt's last token (transformers' default)."""
        if not opts.guided:
            return None
        negative = None if opts.negative_prompt is None else self.prompt_ids(opts.negative_prompt, opts)[0]
        assert opts.guidance_scale is not None
        return Unconditional(self.runtime, [negative or p[-1:] for p in ids], opts.pad_id, opts.max_new_tokens,
                             opts.guidance_scale, opts.adapter, opts.num_return_sequences)

    def _guesser(self, ids: list[list[int]], opts: GenerationOptions) -> PromptLookup | Assistant | None:
        """Where a call's guesses come from (prompt lookup, a draft model), checked against the call."""
        name = "prompt_lookup_num_tokens" if opts.prompt_lookup_num_tokens is not None else "assistant_model"
        if opts.prompt_lookup_num_tokens is None and opts.assistant_model is None:
            return None
        if len(ids) * opts.num_return_sequences != 1:
            raise OptionsError(f"{name} decodes one sequence a call, as in transformers: pass one prompt and num_return_sequences=1")
        if opts.guided:
            raise OptionsError(f"{name} and guidance_scale: a guess would need the unconditional rows' guesses too; use one of them")
        if not self.runtime.in_place:
            raise OptionsError(f"{name} needs a folder with the cache in place (the export default); {self.folder.path} was "
                               "exported with --growing-cache")
        if opts.prompt_lookup_num_tokens is not None:
            return PromptLookup(opts.prompt_lookup_num_tokens, opts.max_matching_ngram_size or 2, opts.eos_ids)  # transformers' default n-gram
        draft = opts.assistant_model
        if not isinstance(draft, Model):
            raise OptionsError(f"assistant_model must be a loaded onnxgen model (onnxgen.load(folder)), got {type(draft).__name__}")
        if draft.dims.vocab_size != self.dims.vocab_size or draft.tokenizer.encode(_PROBE) != self.tokenizer.encode(_PROBE):
            raise OptionsError(f"assistant_model {draft.folder.path} does not share this model's tokenizer: its tokens would mean other words")
        if not draft.runtime.in_place:
            raise OptionsError(f"assistant_model {draft.folder.path} was exported with --growing-cache: a draft needs the cache in place")
        if len(ids[0]) + opts.max_new_tokens > draft.context_length:
            raise OptionsError(f"assistant_model's context window ({draft.context_length}) is shorter than this call's prompt "
                               f"({len(ids[0])} tokens) + max_new_tokens ({opts.max_new_tokens})")
        if self.runtime.device == "cpu" and (self.runtime.spinning or draft.runtime.spinning):
            warnings.warn("assistant_model: load the model and its draft with spinning=False (onnxgen.load), or each one's "
                          "threads spin on after its run, taking the cores the other needs (twice the time a step)",
                          PerformanceWarning, stacklevel=3)
        return Assistant(draft.runtime, ids[0], len(ids[0]) + opts.max_new_tokens, opts.num_assistant_tokens, opts.assistant_confidence_threshold)

    def generate(self, prompts: Prompt | Sequence[Prompt], options: GenerationOptions | None = None, **overrides: Any) -> list[Completion]:
        """Generate for one or many prompts; returns num_return_sequences completions per prompt, in order."""
        events = self._events(*self._checked(prompts, options, overrides))
        for _ in events:
            pass
        return self._finished(events.result)

    def stream(self, prompts: Prompt | Sequence[Prompt], options: GenerationOptions | None = None, **overrides: Any) -> Iterator[Event]:
        """Yield every row's new text as it is decoded, one Event (a str, tagged with its row) per row and
        step; stop iterating to cancel. Options are checked now, before the first piece is asked for."""
        return self._streamed(self._events(*self._checked(prompts, options, overrides, streamed=True)))

    async def agenerate(self, prompts: Prompt | Sequence[Prompt], options: GenerationOptions | None = None,
                        **overrides: Any) -> list[Completion]:
        """generate() for asyncio: the event loop stays free while the call runs (its steps in worker threads, or with
        load(max_batch) in the batcher's, sharing steps with the calls made at once); a cancelled task ends its rows."""
        async for item in self._aevents(*self._checked(prompts, options, overrides)):
            if isinstance(item, tuple):
                return self._finished(item)
        raise AssertionError("a call's events end with its result")

    async def astream(self, prompts: Prompt | Sequence[Prompt], options: GenerationOptions | None = None,
                      **overrides: Any) -> AsyncIterator[Event]:
        """stream() for asyncio (`async for piece in model.astream(...)`), as agenerate runs it; stopping early, or a
        cancelled task, ends the rows. Options are checked when the first piece is asked for."""
        async for item in self._aevents(*self._checked(prompts, options, overrides, streamed=True)):
            if isinstance(item, tuple):
                self._finished(item)
            else:
                yield item

    def _checked(self, prompts: Prompt | Sequence[Prompt], options: GenerationOptions | None, overrides: dict[str, Any],
                 streamed: bool = False) -> tuple[Generator | BeamSearch, list[list[int]], GenerationOptions]:
        """A call's generator, prompts as token ids and options, all checked as the call will run them."""
        ids, opts = self._call(prompts, options, overrides)
        generator = self._made(ids, opts)
        if streamed and isinstance(generator, BeamSearch):
            raise OptionsError("stream() cannot stream beam search, which revises earlier tokens: use generate()")
        return generator, ids, opts

    def _streamed(self, events: Events) -> Iterator[Event]:
        yield from events
        self._finished(events.result)

    def _finished(self, result: tuple[list[Completion], Stats] | None) -> list[Completion]:
        """A call's completions; its timings become this thread's last_stats."""
        assert result is not None
        self._calls.stats = result[1]
        return result[0]

    def _events(self, generator: Generator | BeamSearch, ids: list[list[int]], opts: GenerationOptions) -> Events:
        """A call's events, run alone, or through load(max_batch)'s batcher, which runs the generator in its thread;
        stopping early ends the call."""
        if self._batcher is None:
            return Events(_alone(generator))
        news: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        return Events(_pulled(self._job(generator, ids, opts, news.put), news.get))

    async def _aevents(self, generator: Generator | BeamSearch, ids: list[list[int]],
                       opts: GenerationOptions) -> AsyncIterator[Event | tuple[list[Completion], Stats]]:
        """_events for asyncio, the call's result last: a call alone steps in worker threads; the batcher's news come
        into the event loop as its thread sends them (no thread waits for them)."""
        if self._batcher is None:
            events = Events(_alone(generator))
            async for event in _in_threads(events):
                yield event
            assert events.result is not None
            yield events.result
            return
        loop, news = asyncio.get_running_loop(), asyncio.Queue[tuple[str, Any]]()
        job = self._job(generator, ids, opts, lambda item: loop.call_soon_threadsafe(news.put_nowait, item))
        try:
            next(job)
            while True:
                yield job.send(await news.get())
        except StopIteration as done:
            yield done.value
        finally:
            job.close()

    def _job(self, generator: Generator | BeamSearch, ids: list[list[int]], opts: GenerationOptions,
             put: Callable[[tuple[str, Any]], Any]) -> GeneratorType[Event | None, tuple[str, Any], tuple[list[Completion], Stats]]:
        """A call handed to load(max_batch)'s batcher, whose thread gives each piece of its news to `put`: yields None
        once the job is handed over, then, for each piece of news sent in, its event; returns the completions and
        timings (or raises the call's error). Closed early, the job's rows end at the batcher's next step."""
        assert self._batcher is not None
        job = Job(ids, opts, lambda kind, value: put((kind, value)), generator=generator)
        try:
            self._batcher.submit(job)
        except Full as e:
            raise OnnxgenError(f"this model's batcher (load's max_batch) is full: {e}; make fewer calls at once") from None
        try:
            kind, value = yield None
            while kind == "event":
                kind, value = yield value[1]
            if kind == "error":
                raise value
            return value  # "done" ("dropped" only follows a cancel, which ends the iteration first)
        finally:
            job.cancelled.set()

    # -- scoring ---------------------------------------------------------------------------------
    def score(self, texts: Prompt | Sequence[Prompt], top_logprobs: int = 0, stride: int | None = None,
              progress: Callable[[int, int], None] | None = None, adapter: str | None = None) -> list[Score]:
        """Each text's tokens' log-probabilities, each given the tokens before it (perplexity, reranking, the
        log-likelihoods of evaluation harnesses), with the `top_logprobs` (0-20) most likely tokens at every
        position. A text longer than the context window needs `stride`: it is scored in windows of the context's
        length that start `stride` tokens apart, each token given the window's tokens before it (at least
        context - stride of them: the usual way to measure perplexity past the window). One pass per window,
        which holds every position's scores: positions x vocabulary floats (200 MB for GPT-2 at 1,024 tokens).
        `progress(scored, tokens)` is called after each window: the text's tokens scored so far, and its tokens.
        `adapter`: scored under that LoRA adapter (one the model was loaded with)."""
        lora = self.runtime.adapter(adapter)
        if not (is_int(top_logprobs) and 0 <= top_logprobs <= MAX_LOGPROBS):
            raise OptionsError(f"top_logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {top_logprobs!r}")
        if stride is not None and not (is_int(stride) and 1 <= stride < self.context_length):  # windows overlap: every token has one before it
            raise OptionsError(f"stride must be an integer from 1 to {self.context_length - 1} (below the context window), got {stride!r}")
        scores = []
        for text in _prompt_list(texts):
            ids = self._encode(text)
            if not ids:
                raise OptionsError("nothing to score: an empty text has no tokens")
            if len(ids) > self.context_length and stride is None:
                raise ContextLengthError(f"a text of {len(ids)} tokens exceeds the context window of {self.context_length}: "
                                         "pass stride to score it in windows")
            logprobs: list[float | None] = [None]
            top: list[dict[int, float] | None] = [None]
            for begin in range(0, len(ids), stride or len(ids)):
                end = min(begin + self.context_length, len(ids))
                window = ids[begin:end]
                every = self.runtime.all_logits(np.asarray([window]), lora)[0, :-1]  # position i scores token i + 1
                chosen, best = token_logprobs(every, np.asarray(window[1:], dtype=np.int64), top_logprobs)
                new = len(logprobs) - begin - 1  # the window's tokens scored already, by earlier windows
                logprobs += map(float, chosen[new:])
                top += best[new:]
                if progress is not None:
                    progress(end, len(ids))
                if end == len(ids):
                    break
            scores.append(Score(ids, logprobs, top))
        return scores

    def detect_watermark(self, texts: Prompt | Sequence[Prompt], watermarking_config: WatermarkingConfig | dict[str, Any] | None = None,
                         z_threshold: float = 3.0, ignore_repeated_ngrams: bool = False) -> list[WatermarkDetection]:
        """Whether each text (or token ids) was written under a watermark (generate's watermarking_config; by default
        the folder's own): how many of its tokens are green, and the z-score that says how unlikely that is without
        it (above z_threshold: watermarked), as transformers' WatermarkDetector counts. Give the generated text
        without its prompt. `ignore_repeated_ngrams`: a token after the same context counts once."""
        config = self.defaults.watermarking_config if watermarking_config is None else WatermarkingConfig.of(watermarking_config)
        if config is None:
            raise OptionsError("no watermarking_config: give the one the text was written with (the command line's "
                               "--watermark-key); this folder's generation_config.json has none")
        if not is_number(z_threshold):
            raise OptionsError(f"z_threshold must be a finite number, got {z_threshold!r}")
        if not isinstance(ignore_repeated_ngrams, bool):
            raise OptionsError(f"ignore_repeated_ngrams must be True or False, got {ignore_repeated_ngrams!r}")
        lists = Greenlists(config, self.dims.vocab_size)
        return [detect(self._encode(text), lists, float(z_threshold), ignore_repeated_ngrams) for text in _prompt_list(texts)]


def load(path: str | Path | None = None, provider: Provider = "cpu", threads: int | None = None, verify: bool = False,
         mapped_weights: bool = False, cuda_graph: bool = False, spinning: bool = True, prompt_cache_mib: int = 0,
         chat_template: str | None = None, adapters: dict[str, str | Path] | None = None, max_batch: int | None = None) -> Model:
    """Load an onnxgen model folder; with no path, the small model that ships with onnxgen. `verify` also
    checks every file's sha256 against the manifest (a few seconds a GB). `mapped_weights` (CPU) maps the
    weights packed for this machine from a file (made at the first such load; prepacked.py) instead of packing
    a private copy: processes that load the same folder then share one copy, which the kernel can also
    reclaim. `cuda_graph` (CUDA, a folder with the cache in place) replays each call's decode step as one
    captured CUDA graph. `spinning=False` (CPU) stops onnxruntime's threads spinning when a run returns, for
    models that take turns in one process (assisted generation's model and draft): a model's threads spinning on
    after its run take the cores the other one needs (gpt2 fp32's step 23 ms alone, 55 ms after an int4 draft's
    step, 24 ms with both loaded so); alone, a model decodes 2-4% faster with spinning on. `prompt_cache_mib`
    (CPU): up to this many MiB of finished one-row calls' key/value caches are kept, and a later call whose prompt
    starts with one's tokens (a chat's next turn: the conversation so far, then a new message) takes it and
    computes only the rest of its prompt; 0 (the default) keeps none. `chat_template`: a Jinja chat template (its
    text) that apply_chat_template, chat and the server use instead of the checkpoint's, or where it had none (vLLM's
    --chat-template). `adapters` (a model exported with --lora): LoRA adapter folders (`onnxgen export ADAPTER --lora`)
    by the names calls give as their `adapter` option; every row of a batch may have its own. `max_batch` (a folder with
    the cache in place): generate() and stream() calls made at once, from several threads, share steps, up to this
    many rows decoding together, as the server's requests do (batcher.py: continuous batching; a call joins at the
    next step); None (the default): each call runs on its own. A generator() loop is the caller's and runs alone."""
    if path is not None and not isinstance(path, (str, Path)):
        raise ModelFolderError(f"a model folder is a path (str or Path), got {type(path).__name__}")
    folder = Path(path) if path is not None else BUNDLED
    if path is None and not (folder / MANIFEST).is_file():
        raise ModelFolderError("this onnxgen install has no bundled model: pass a model folder")
    return Model(folder, provider, threads, verify, mapped_weights, cuda_graph, spinning, prompt_cache_mib, chat_template, adapters,
                 max_batch)


class Events:
    """A call's events, one step's at a time; once they are all out, `result` holds its completions and timings (the
    return value of the generator function that makes them)."""

    def __init__(self, steps: GeneratorType[Event, None, tuple[list[Completion], Stats]]) -> None:
        self._steps = steps
        self.result: tuple[list[Completion], Stats] | None = None

    def __iter__(self) -> Events:
        return self

    def __next__(self) -> Event:
        try:
            return next(self._steps)
        except StopIteration as done:
            self.result = done.value
            raise

    def close(self) -> None:
        self._steps.close()


def _pulled(job: GeneratorType[Event | None, tuple[str, Any], tuple[list[Completion], Stats]],
            get: Callable[[], tuple[str, Any]]) -> GeneratorType[Event, None, tuple[list[Completion], Stats]]:
    """A batcher's job (Model._job) run by a thread that waits for each piece of its news with `get`."""
    try:
        next(job)
        while True:
            event = job.send(get())
            assert event is not None
            yield event
    except StopIteration as done:
        return done.value
    finally:
        job.close()


def _alone(generator: Generator | BeamSearch) -> GeneratorType[Event, None, tuple[list[Completion], Stats]]:
    """A call run on its own: its events step by step, then its completions and timings."""
    try:
        while not generator.done:
            yield from generator.step()
    finally:
        if not generator.done:  # a caller that stopped iterating: the cache goes back now
            generator.cancel()
    return generator.completions(), generator.stats


async def _in_threads(events: Events) -> AsyncIterator[Event]:
    """`events`, each next() in a worker thread; let go of early (a break, a cancelled task), the call is closed,
    which ends its rows, once the step in flight is over (a generator cannot be closed while it runs)."""
    step: concurrent.futures.Future[Event | None] | None = None
    try:
        while True:
            step = _STEPS.submit(next, events, None)
            event = await asyncio.wrap_future(step)
            if event is None:
                return
            yield event
    finally:
        if step is None or step.done():
            events.close()
        else:
            step.add_done_callback(lambda _: events.close())


_STEPS = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="onnxgen-async")  # agenerate's and astream's steps


# transformers' text-generation pipeline generates with defaults of its own, over the model's: up to 256 new tokens,
# sampled at temperature 0.7 (TextGenerationPipeline._default_generation_config, transformers 4.57).
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}


# A pipeline call's parameters that are not generation options (transformers' pipeline() takes them for every call too).
CALL_PARAMETERS = ("max_length", "return_full_text", "return_tensors", "batch_size", "continue_final_message")


class TextGenerationPipeline:
    """transformers' `pipeline("text-generation")` call shape over an onnxgen model, and its defaults."""

    def __init__(self, model: Model, **given: Any) -> None:
        """`given`: what every call takes unless it says otherwise, as transformers' pipeline(..., max_new_tokens=50,
        batch_size=4) takes it: generation options, and the call's own parameters (CALL_PARAMETERS)."""
        self.model = model
        self.given = {k: v for k, v in given.items() if k in CALL_PARAMETERS}
        options = {k: v for k, v in given.items() if k not in CALL_PARAMETERS}
        self.length_given = bool({"max_new_tokens", "max_length"} & given.keys())
        # As transformers' pipeline layers them: its own defaults over the model's (a model's max_length in place of
        # the 256 new tokens), then the checkpoint's task_specific_params for text generation, whose "prefix" (for
        # models that are not GPT-2s) is not an option, then what pipeline() was given. A call's own go over these.
        own = {k: v for k, v in PIPELINE_DEFAULTS.items() if k != "max_new_tokens" or model.defaults.max_length is None}
        task = {k: v for k, v in model.folder.text_generation_params.items() if k != "prefix"}
        self.defaults = model.defaults.with_overrides(**{**own, **task, **options})

    def __call__(self, text_inputs: str | list[str] | list[dict[str, Any]] | list[list[dict[str, Any]]],
                 **kwargs: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """As transformers' pipeline: one list of results per prompt ("generated_text", or with return_tensors the
        whole sequence's "generated_token_ids"); `batch_size` prompts go through one generate call (default 1, as
        transformers': in a batch, int8 models' numbers move with the rows beside them). A chat (a list of
        {"role", "content"} messages, or a list of chats) goes through the model's chat template, and its
        generated_text is the chat with the reply as a new assistant message, or, where the chat ends with an
        assistant's message (or `continue_final_message`), with that message gone on with. `kwargs`: generation
        options and CALL_PARAMETERS, over what pipeline() was given."""
        # The pipeline's do_sample stands unless the call gives one: a call's num_beams over the sampling default is beam
        # sampling, as transformers' pipeline runs it (generate's own rule would make it beam search)
        return self._call(text_inputs, **{"do_sample": self.defaults.do_sample, **self.given, **kwargs})

    def _call(self, text_inputs: str | list[str] | list[dict[str, Any]] | list[list[dict[str, Any]]], max_length: int | None = None,
              return_full_text: bool = True, return_tensors: bool = False, batch_size: int | None = None,
              continue_final_message: bool | None = None, **options: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        chats = _chats(text_inputs)
        if chats is not None:
            return self._chat(chats, isinstance(text_inputs[0], dict), return_full_text, continue_final_message,  # type: ignore[index]
                              max_length=max_length, return_tensors=return_tensors, batch_size=batch_size, **options)
        prompts = [text_inputs] if isinstance(text_inputs, str) else list(text_inputs) if isinstance(text_inputs, (list, tuple)) else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise OptionsError("the pipeline takes a string, a list of strings, a chat (a list of messages) or a list of chats")
        if batch_size is not None and not (is_int(batch_size) and batch_size >= 1):
            raise OptionsError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        batches: list[tuple[list[str], dict[str, Any]]] = []  # neighbouring prompts with the same options, batch_size at most
        for prompt in prompts:
            overrides = self._overrides(prompt, max_length, options)
            if batches and batches[-1][1] == overrides and len(batches[-1][0]) < (batch_size or 1):
                batches[-1][0].append(prompt)
            else:
                batches.append(([prompt], overrides))
        results = []
        for batch, overrides in batches:
            completions = self.model.generate(batch, self.defaults, **overrides)
            ids = self.model.prompt_ids(batch, self.model.options(self.defaults, **overrides)) if return_tensors else []
            for i, prompt in enumerate(batch):
                results.append([{"generated_token_ids": ids[i] + c.token_ids} if return_tensors else
                                {"generated_text": (prompt if return_full_text else "") + c.text}
                                for c in completions if c.prompt_index == i])
        return results[0] if isinstance(text_inputs, str) else results

    def _chat(self, chats: list[list[dict[str, Any]]], one: bool, return_full_text: bool, continue_final_message: bool | None,
              **call: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Each chat's prompt text from the template; its results as transformers' pipeline gives a chat's."""
        goes_on = [chat[-1].get("role") == "assistant" if continue_final_message is None else continue_final_message for chat in chats]
        prompts = [self.model.apply_chat_template(chat, add_generation_prompt=not on, continue_final_message=on)
                   for chat, on in zip(chats, goes_on)]
        results = [self(prompt, return_full_text=False, **call) for prompt in prompts]
        if return_full_text and not call.get("return_tensors"):
            results = [[{"generated_text": [*chat[:-1], {**chat[-1], "content": chat[-1]["content"] + r["generated_text"]}] if on else
                         [*chat, {"role": "assistant", "content": r["generated_text"]}]} for r in result]
                       for chat, on, result in zip(chats, goes_on, results)]
        return results[0] if one else results

    def _overrides(self, prompt: str, max_length: int | None, options: dict[str, Any]) -> dict[str, Any]:
        """Each prompt's own new tokens under max_length, as transformers' pipeline runs a prompt at a time (in a
        batch of several lengths, generate() would count the longest); the pipeline's 256 new tokens, where the call
        gives no length, at most what the context window leaves after the prompt (transformers' runs past it)."""
        given = {**options, **({"max_length": max_length} if max_length is not None else {})}
        opts = self.model.options(self.defaults, **given)
        if opts.max_length is None and ("max_new_tokens" in given or self.length_given):
            return given  # a length of the caller's: nothing to count
        width = max(1, len(self.model._encode(prompt)))  # an empty prompt is the beginning-of-text token (prompt_ids)
        if opts.max_length is not None:
            return {**options, "max_new_tokens": opts.for_prompts(width).max_new_tokens}
        return {**given, "max_new_tokens": max(1, min(opts.max_new_tokens, self.model.context_length - width))}


def _chats(inputs: Any) -> list[list[dict[str, Any]]] | None:
    """The chats in a pipeline's input (one chat: a list of message dicts; or a list of such lists), or None."""
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(m, dict) for m in inputs):
        return [list(inputs)]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(c, (list, tuple)) and c and all(isinstance(m, dict) for m in c)
                                                           for c in inputs):
        return [list(c) for c in inputs]
    return None


def pipeline(task: str = "text-generation", model: str | Path | Model | None = None, device: int | str | None = None,
             threads: int | None = None, **given: Any) -> TextGenerationPipeline:
    """Drop-in for `transformers.pipeline("text-generation", model=...)`; device 0 or "cuda" selects CUDA; `given`:
    generation options and call parameters for every call (TextGenerationPipeline)."""
    if task != "text-generation":
        raise OptionsError(f"onnxgen only offers the 'text-generation' task, not {task!r}")
    if not isinstance(model, Model):
        provider: Provider = "cuda" if device == "cuda" or (isinstance(device, int) and device >= 0) else "cpu"
        model = load(model, provider=provider, threads=threads)
    return TextGenerationPipeline(model, **given)
