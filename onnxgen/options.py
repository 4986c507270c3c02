"""Generation options: transformers' GenerationConfig names and defaults, checked before any work."""

from __future__ import annotations

import difflib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import IgnoredOptionWarning, OptionsError
from .folder import GENERATION_CONFIG
from .guidance import CONSTRAINTS, grammar

# The decoding presets of the CLI's --strategy, `onnxgen bench` and the benchmark suite: one table.
STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "beam": {"do_sample": False, "num_beams": 4},
    "sample": {"do_sample": True, "num_beams": 1, "top_k": 0, "top_p": 1.0},
    "top-k": {"do_sample": True, "num_beams": 1, "top_k": 50, "top_p": 1.0},
    "top-p": {"do_sample": True, "num_beams": 1, "top_k": 0, "top_p": 0.9},
    "top-k-top-p": {"do_sample": True, "num_beams": 1, "top_k": 50, "top_p": 0.9, "temperature": 0.8, "seed": 0},
    "contrastive": {"do_sample": False, "num_beams": 1, "top_k": 4, "penalty_alpha": 0.6},  # Su et al.'s settings
}
# generation_config.json keys that change transformers' output and that onnxgen does not take, with transformers'
# defaults: a folder that sets one to something else gets a warning, not a silent difference.
NOT_TAKEN = {"force_words_ids": None, "constraints": None, "dola_layers": None}
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's API allows
MAX_TEMPERATURE = 100.0
# Scores are float32: divided by a temperature below this (after the strongest repetition penalty's 100x pull) they
# could pass float32's largest and sample NaN; decoding reaches the greedy limit far above it (do_sample=False).
MIN_TEMPERATURE = 1e-30
MAX_REPETITION_PENALTY = 100.0
MIN_REPETITION_PENALTY = 1 / MAX_REPETITION_PENALTY  # as strong a pull to seen tokens as the largest push away
MAX_LENGTH_PENALTY = 10.0
# Each earlier group's beam that took a token lowers the token's log-probability by this much: 100 puts it below any
# token a model gives any weight to, and far larger ones would overflow float32
MAX_DIVERSITY_PENALTY = 100.0
MAX_OPENAI_PENALTY = 2.0  # presence_penalty and frequency_penalty
INTS = {"max_new_tokens", "min_new_tokens", "top_k", "num_beams", "num_beam_groups", "num_return_sequences", "no_repeat_ngram_size", "num_assistant_tokens",
        "encoder_no_repeat_ngram_size", "dry_allowed_length", "dry_penalty_last_n"}
OPTIONAL_INTS = {"pad_token_id", "seed", "logprobs", "prompt_lookup_num_tokens", "max_matching_ngram_size", "max_length", "min_length",
                 "forced_bos_token_id"}
OPTIONAL_FLOATS = {"max_time", "guidance_scale"}
MAX_GUIDANCE_SCALE = 100.0
FLOATS = {"temperature", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "length_penalty", "repetition_penalty", "encoder_repetition_penalty",
          "presence_penalty", "frequency_penalty", "assistant_confidence_threshold", "dry_multiplier", "dry_base", "xtc_probability",
          "xtc_threshold", "top_n_sigma", "penalty_alpha", "diversity_penalty"}
BOOLS = {"do_sample", "truncate_prompt", "remove_invalid_values", "renormalize_logits", "include_stop_str_in_output", "token_healing"}
TOKEN_LISTS = {"suppress_tokens", "begin_suppress_tokens"}
SequenceBias = dict[tuple[int, ...], float]


@dataclass(frozen=True)
class WatermarkingConfig:
    """transformers' WatermarkingConfig: its names, defaults and meaning (a dict of them is taken too, as
    generation_config.json holds it)."""

    greenlist_ratio: float = 0.25  # the vocabulary's share that is green each step
    bias: float = 2.0  # added to the green tokens' scores (transformers advises 0.5 to 2.0)
    hashing_key: int = 15485863  # transformers' default, the millionth prime: deploy your own, and keep it private
    # "lefthash": the green list follows from the last token; "selfhash": a token is green where it is in the list its
    # own hash and those of the context_width - 1 tokens before it make (the best 40 scores are tried)
    seeding_scheme: Literal["lefthash", "selfhash"] = "lefthash"
    context_width: int = 1  # tokens the seed looks at; a row shorter than this is left as it is

    @classmethod
    def of(cls, value: Any) -> WatermarkingConfig:
        """`value` (a WatermarkingConfig, or a dict of its fields) checked, or an OptionsError that says what is wrong."""
        if isinstance(value, cls):
            given = asdict(value)
        elif isinstance(value, dict):
            given = dict(value)
        else:
            raise OptionsError(f"watermarking_config must be a WatermarkingConfig or a dict of its fields, got {type(value).__name__}")
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise OptionsError(f"watermarking_config has no field(s) {', '.join(map(repr, unknown))}")
        config = cls(**given)
        ratio, bias, key, width = config.greenlist_ratio, config.bias, config.hashing_key, config.context_width
        if not (is_number(ratio) and 0 < ratio < 1):
            raise OptionsError(f"watermarking_config's greenlist_ratio must be in (0, 1), got {ratio!r}")
        if not is_number(bias):
            raise OptionsError(f"watermarking_config's bias must be a finite number, got {bias!r}")
        if not (is_int(key) and 0 <= key < 2**63):  # torch multiplies it in int64
            raise OptionsError(f"watermarking_config's hashing_key must be an integer in [0, 2**63), got {key!r}")
        if config.seeding_scheme not in ("lefthash", "selfhash"):
            raise OptionsError(f"watermarking_config's seeding_scheme must be 'lefthash' or 'selfhash', got {config.seeding_scheme!r}")
        if not (is_int(width) and width >= 1):
            raise OptionsError(f"watermarking_config's context_width must be an integer >= 1, got {width!r}")
        return cls(float(ratio), float(bias), int(key), config.seeding_scheme, int(width))


def under_key(config: WatermarkingConfig | None, key: Any) -> WatermarkingConfig:
    """A command's or server's private watermark key (--watermark-key) over the folder's watermarking_config, or over
    transformers' defaults where it has none."""
    return WatermarkingConfig.of(replace(config or WatermarkingConfig(), hashing_key=key))


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    # transformers' lengths that count the prompt (a batch's longest): where set, a call's max_new_tokens and
    # min_new_tokens are worked out from them (for_prompts). An explicit max_new_tokens or min_new_tokens wins,
    # as in transformers: given, it clears them (with_overrides; a folder's generation_config.json alike).
    max_length: int | None = None
    min_length: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # sampling only, as in transformers; 0 disables
    top_p: float = 1.0  # sampling only; 1.0 disables
    min_p: float = 0.0  # sampling only: drop tokens less likely than min_p x the most likely one; 0.0 disables
    typical_p: float = 1.0  # sampling only: locally typical sampling's mass (transformers'); 1.0 disables
    # Sampling only, truncation sampling (Hewitt et al. 2022; transformers' warpers); 0.0 disables. epsilon: drop tokens
    # less likely than this; eta: than min(eta, sqrt(eta) x exp(-entropy)), a cut that loosens where the row is flat.
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    num_beams: int = 1
    # Diverse beam search (transformers' group beam search; Vijayakumar et al. 2016): the beams split into
    # num_beam_groups groups that search one after another each step, each group's scores lowered by diversity_penalty
    # for every beam of an earlier group that took the same token this step (Hamming diversity), so that the groups'
    # results differ; the results are the best of all groups' (beam.py). 1 group is beam search, the penalty unused.
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    # Contrastive search (transformers' penalty_alpha; Su et al. 2022, on GPT-2): with do_sample off, one beam and
    # top_k > 1, each step weighs the top_k most likely tokens, each one's probability x (1 - penalty_alpha) against
    # penalty_alpha x its hidden state's greatest cosine similarity to the text's so far, and takes the best: text that
    # stays likely without repeating itself (contrastive.py). 0 is off; 0.6 with top_k 4 is the paper's.
    penalty_alpha: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # transformers' "encoder" options, which a decoder-only model's generate applies to its prompt: above 1 raises the
    # prompt's tokens (keeps the text near its input); n > 0 bans copying any n-gram of the prompt.
    encoder_repetition_penalty: float = 1.0
    encoder_no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] = field(default_factory=list)  # token sequences never to generate (transformers')
    suppress_tokens: list[int] = field(default_factory=list)  # tokens never to generate (transformers')
    begin_suppress_tokens: list[int] = field(default_factory=list)  # tokens never to generate first (transformers')
    # transformers': added to a token's score where the row's last tokens are the rest of the sequence (a sequence of
    # one token: always). A dict of token-id tuples, or generation_config.json's list of [token ids, bias] pairs.
    sequence_bias: SequenceBias = field(default_factory=dict)
    # transformers': (start, factor): after `start` new tokens, the end token's score grows by factor ** (n - start)
    # (n new tokens so far), so that text tends to end soon after `start` without a hard cut.
    exponential_decay_length_penalty: tuple[int, float] | None = None
    forced_eos_token_id: int | list[int] | None = None  # the token(s) forced as the last one at max_new_tokens
    # transformers': forced as the first new token where the prompts are one token long (its cur_len == 1: text from the
    # beginning-of-text token alone); begin_suppress_tokens then ban the second new token instead of the first
    forced_bos_token_id: int | None = None
    remove_invalid_values: bool = False  # NaN scores become 0 and infinite ones float32's limits (fp16 overflow)
    # Log-softmax the scores after every processor and warper: beam search then ranks continuations by probabilities
    # that sum to 1 again (transformers' advice where processors change scores); a token's choice is unchanged.
    renormalize_logits: bool = False
    # transformers' watermark (watermark.py; a WatermarkingConfig or a dict of its fields): a key's pseudo-random green
    # part of the vocabulary, seeded by the tokens before, gets a bias each step, after every other processor, so that
    # detect_watermark can tell the text from text written without the key. Every strategy.
    watermarking_config: WatermarkingConfig | None = None
    max_time: float | None = None  # seconds: rows still running after this long since the call began end ("time")
    # Prompt lookup decoding (transformers'): each step also runs up to this many tokens guessed from the text so far
    # (what followed the last max_matching_ngram_size tokens (default 2) where they occurred before) and keeps those
    # the model would have chosen itself, so the text is the one plain decoding gives (to the rounding of a pass of
    # several positions), in fewer steps where the output repeats its input (summaries, quotes, code edits).
    # One sequence a call, greedy or sampling.
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    # Assisted generation (transformers'): a smaller loaded onnxgen model with the same tokenizer drafts up to
    # num_assistant_tokens tokens a step greedily (fewer after a token it gives less than the threshold), and
    # the model keeps those it would have chosen itself; the same text as plain decoding. One sequence a call.
    assistant_model: Any = None  # an onnxgen Model (options.py cannot name the type: model.py imports this module)
    num_assistant_tokens: int = 20
    assistant_confidence_threshold: float = 0.4
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings: generation ends when the text contains one
    include_stop_str_in_output: bool = False  # the text goes on to the end of the stop string that ended it (vLLM's name)
    # transformers' stop strings: a row ends with the token that completes one, kept whole (stopping.py)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None  # makes sampling reproducible
    truncate_prompt: bool = False  # drop the prompt's oldest tokens instead of refusing a too-long prompt
    # transformers' token healing (healing.py): each prompt's last token is taken back and the first new token is one
    # whose text begins with it, so that a prompt ending in a space or mid-word goes on as running text does; the
    # text still starts where the prompt ends (its first token re-covers the prompt's end: Completion.healed).
    token_healing: bool = False
    logprobs: int | None = None  # per new token its log-probability, and this many most likely alternatives
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to those tokens' scores (OpenAI's option)
    # OpenAI's: subtracted from the score of every token already generated (not the prompt's), once (presence) and
    # once per time it was (frequency); [-2, 2], negative values encourage repeats.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # DRY, "don't repeat yourself" (llama.cpp's and text-generation-webui's dry_* options; logits.dry): a token that would
    # extend a repeat of earlier text, n tokens long so far with n >= dry_allowed_length, loses
    # dry_multiplier x dry_base ** (n - dry_allowed_length); repeats do not reach across a token holding one of the
    # sequence breakers; dry_penalty_last_n: tokens looked back over (-1: all, 0: DRY off). dry_multiplier 0 is off.
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: list[str] = field(default_factory=lambda: ["\n", ":", '"', "*"])
    # XTC, "exclude top choices" (llama.cpp's xtc_*; sampling only): at each step, with xtc_probability, the tokens at least
    # xtc_threshold likely go but the least likely of them, so the text leaves its most obvious path. 0 is off.
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    # Top-nσ (llama.cpp's top_n_sigma; sampling only): keep the tokens scored within n standard deviations of the row's
    # scores below its best (about 1.0 is usual); the same tokens at any temperature. 0 is off.
    top_n_sigma: float = 0.0
    # Constrained decoding (guidance.py, llguidance): the text held to a JSON schema (a dict, or its JSON text; compact
    # JSON unless the schema's "x-guidance" says otherwise), a regular expression, or a Lark grammar (llguidance's
    # dialect). At most one; greedy decoding or sampling; the end token ends the text where it is complete.
    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    grammar: str | None = None
    # Classifier-free guidance (transformers' guidance_scale and its generate's negative_prompt_ids; Sanchez et al.
    # 2023): each step also runs the model on `negative_prompt` (text or token ids, for every row; by default each
    # prompt's last token) followed by the tokens generated so far, and the log-probabilities become
    # unconditional + guidance_scale x (conditional - unconditional): above 1 the text holds closer to its prompt and
    # away from the negative one (a second pass a step). None or 1 is off; greedy decoding or sampling.
    guidance_scale: float | None = None
    negative_prompt: str | list[int] | None = None
    # A LoRA adapter the model was loaded with (onnxgen.load(..., adapters={name: folder})), by name: every row of the
    # call runs with it; None runs the base model.
    adapter: str | None = None
    # transformers' conventions on numpy arrays: processor(input_ids, scores) -> scores, after the built-in
    # processors and before temperature/top-k/top-p; criterion(input_ids, scores) -> bool per row (or one bool).
    logits_processors: list[Callable[[Any, Any], Any]] = field(default_factory=list)
    stopping_criteria: list[Callable[[Any, Any], Any]] = field(default_factory=list)
    # transformers' generate(prefix_allowed_tokens_fn=...): fn(batch_id, input_ids) -> the token ids allowed next, for
    # each row (batch_id: the row's index, or its prompt's with beams; input_ids: its tokens so far, left-padded with
    # the pad token as transformers hands them), among the built-in processors where transformers runs it.
    prefix_allowed_tokens_fn: Callable[[int, Any], Any] | None = None

    def validate(self) -> GenerationOptions:
        """Check every option's type and range; returns the options with numpy numbers made plain Python ones."""
        typed = replace(self, **{f.name: _typed(f.name, getattr(self, f.name)) for f in fields(self)})
        typed._check_ranges()
        return typed

    def _check_ranges(self) -> None:
        if self.max_length is not None and self.max_length < 1:
            raise OptionsError(f"max_length must be at least 1 (or None), got {self.max_length}")
        if self.min_length is not None and self.min_length < 0:
            raise OptionsError(f"min_length must be at least 0 (or None), got {self.min_length}")
        if self.max_new_tokens < 1:
            raise OptionsError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise OptionsError(f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}")
        # Past 100 every GPT-2 distribution is uniform to float32's precision: a typo, not a wish.
        if self.do_sample and not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise OptionsError(f"temperature must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] when sampling (do_sample=False for "
                               f"greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OptionsError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise OptionsError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.typical_p <= 1:
            raise OptionsError(f"typical_p must be in (0, 1], got {self.typical_p}")
        for name in ("epsilon_cutoff", "eta_cutoff"):
            if not 0 <= getattr(self, name) < 1:
                raise OptionsError(f"{name} must be in [0, 1) (0 disables it), got {getattr(self, name)}")
        if self.exponential_decay_length_penalty is not None:
            start, factor = self.exponential_decay_length_penalty
            if start < 0 or not factor > 0:
                raise OptionsError(f"exponential_decay_length_penalty must be (start >= 0, factor > 0), got {self.exponential_decay_length_penalty}")
        if self.guidance_scale is not None and not 0 <= self.guidance_scale <= MAX_GUIDANCE_SCALE:
            raise OptionsError(f"guidance_scale must be in [0, {MAX_GUIDANCE_SCALE}] (1 is off), got {self.guidance_scale}")
        if self.negative_prompt is not None and not self.guided:
            raise OptionsError("negative_prompt is classifier-free guidance's: give guidance_scale (other than 1) too")
        if self.guided and self.num_beams > 1:
            raise OptionsError("guidance_scale guides greedy decoding or sampling, not beam search (its second pass does not "
                               "follow the beams, as in transformers)")
        if self.max_time is not None and not self.max_time > 0:
            raise OptionsError(f"max_time must be a number of seconds > 0, got {self.max_time}")
        if any(not words for words in self.bad_words_ids):
            raise OptionsError("bad_words_ids must not hold an empty sequence")
        if self.top_k < 0:
            raise OptionsError(f"top_k must be >= 0, got {self.top_k}")
        if self.num_beams < 1:
            raise OptionsError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.num_return_sequences < 1:
            raise OptionsError(f"num_return_sequences must be at least 1, got {self.num_return_sequences}")
        if self.num_beam_groups < 1 or self.num_beams % self.num_beam_groups:
            raise OptionsError(f"num_beam_groups must divide num_beams into groups of equal size, got {self.num_beam_groups} for "
                               f"{self.num_beams} beams")
        if not 0 <= self.diversity_penalty <= MAX_DIVERSITY_PENALTY:
            raise OptionsError(f"diversity_penalty must be in [0, {MAX_DIVERSITY_PENALTY}] (0 is off), got {self.diversity_penalty}")
        if self.num_beam_groups > 1:
            if self.do_sample:
                raise OptionsError("num_beam_groups (diverse beam search) chooses the best beams, it does not sample: set do_sample=False")
            if self.diversity_penalty == 0:
                raise OptionsError("num_beam_groups (diverse beam search) needs diversity_penalty > 0: without it every group "
                                   "searches alike")
            for name in CONSTRAINTS:
                if getattr(self, name) is not None:
                    raise OptionsError(f"num_beam_groups (diverse beam search) and {name}: not both")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise OptionsError(f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise OptionsError("greedy decoding returns one sequence per prompt: set do_sample=True or num_beams >= num_return_sequences")
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            # Beam scores are divided by length ** length_penalty: past 10, a float overflows (transformers raises OverflowError).
            raise OptionsError(f"length_penalty must be in [-{MAX_LENGTH_PENALTY}, {MAX_LENGTH_PENALTY}], got {self.length_penalty}")
        for name in ("repetition_penalty", "encoder_repetition_penalty"):
            if not MIN_REPETITION_PENALTY <= getattr(self, name) <= MAX_REPETITION_PENALTY:
                raise OptionsError(f"{name} must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}], got {getattr(self, name)}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_OPENAI_PENALTY <= getattr(self, name) <= MAX_OPENAI_PENALTY:
                raise OptionsError(f"{name} must be in [-{MAX_OPENAI_PENALTY}, {MAX_OPENAI_PENALTY}] (OpenAI's range), got {getattr(self, name)}")
        for name in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
            if getattr(self, name) < 0:
                raise OptionsError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("prompt_lookup_num_tokens", "max_matching_ngram_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise OptionsError(f"{name} must be at least 1 (or None), got {getattr(self, name)}")
        if self.num_assistant_tokens < 1:
            raise OptionsError(f"num_assistant_tokens must be at least 1, got {self.num_assistant_tokens}")
        if not 0 <= self.assistant_confidence_threshold <= 1:
            raise OptionsError(f"assistant_confidence_threshold must be in [0, 1], got {self.assistant_confidence_threshold}")
        for name in ("prompt_lookup_num_tokens", "assistant_model"):
            if self.num_beams > 1 and getattr(self, name) is not None:
                raise OptionsError(f"{name} works with greedy decoding and sampling, not beam search")
        if self.prompt_lookup_num_tokens is not None and self.assistant_model is not None:
            raise OptionsError("guesses come from prompt_lookup_num_tokens or from assistant_model, not both")
        if any(not s for s in self.stop + self.stop_strings):
            raise OptionsError("stop strings must not be empty")
        if self.dry_multiplier < 0 or self.dry_base < 1 or self.dry_allowed_length < 1 or self.dry_penalty_last_n < -1:
            raise OptionsError(f"DRY takes dry_multiplier >= 0, dry_base >= 1, dry_allowed_length >= 1 and dry_penalty_last_n >= -1, got "
                               f"{self.dry_multiplier}, {self.dry_base}, {self.dry_allowed_length} and {self.dry_penalty_last_n}")
        if not 0 <= self.penalty_alpha <= 1:
            raise OptionsError(f"penalty_alpha must be in [0, 1] (0 is off), got {self.penalty_alpha}")
        if self.penalty_alpha > 0 and not self.do_sample and self.num_beams == 1 and not self.contrastive:  # top_k <= 1: greedy
            raise OptionsError(f"penalty_alpha (contrastive search) weighs the top_k most likely tokens: give top_k > 1, got {self.top_k}")
        if self.contrastive:
            for name, value in (("guidance_scale", self.guided), ("prompt_lookup_num_tokens", self.prompt_lookup_num_tokens is not None),
                                ("assistant_model", self.assistant_model is not None),
                                *((name, getattr(self, name) is not None) for name in CONSTRAINTS)):
                if value:
                    raise OptionsError(f"penalty_alpha (contrastive search) and {name}: not both")
        if self.top_n_sigma < 0:
            raise OptionsError(f"top_n_sigma must be >= 0 (0 is off), got {self.top_n_sigma}")
        if not (0 <= self.xtc_probability <= 1 and 0 < self.xtc_threshold <= 1):
            raise OptionsError(f"XTC takes xtc_probability in [0, 1] and xtc_threshold in (0, 1], got {self.xtc_probability} and "
                               f"{self.xtc_threshold}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise OptionsError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise OptionsError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        bad_bias = [v for v in self.logit_bias.values() if not -100 <= v <= 100]
        if bad_bias:
            raise OptionsError(f"logit_bias values must be in [-100, 100] (OpenAI's range), got {bad_bias[0]}")
        constraints = [name for name in CONSTRAINTS if getattr(self, name) is not None]
        if constraints:
            if len(constraints) > 1:
                raise OptionsError(f"one constraint a call: got {' and '.join(constraints)}")
            if not self.eos_ids:
                raise OptionsError(f"{constraints[0]} needs an end token (eos_token_id): it ends the text where the text is complete")
            if self.token_healing:
                raise OptionsError(f"token_healing and {constraints[0]}: not both (the first token re-covers the prompt's end, "
                                   "which the constraint does not hold)")
            grammar(self.json_schema, self.regex, self.grammar)  # llguidance installed, and the constraint usable

    def with_overrides(self, **overrides: Any) -> GenerationOptions:
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            near = difflib.get_close_matches(unknown[0], names, n=1)  # a misspelt name (max_new_token)
            raise OptionsError(f"unknown generation option(s): {', '.join(map(repr, unknown))}"
                               + (f" (did you mean {near[0]!r}?)" if near else ""))
        # Asking for beams asks for beam search, and penalty_alpha for contrastive search: a sampling default (the
        # bundled model's) gives way, unless sampling is asked for in the same call too (then beams are beam sampling,
        # and penalty_alpha is left unused, as transformers leaves it).
        asks_beams = is_int(overrides.get("num_beams")) and overrides["num_beams"] > 1
        asks_contrast = is_number(overrides.get("penalty_alpha")) and overrides["penalty_alpha"] > 0
        if (asks_beams or asks_contrast) and "do_sample" not in overrides:
            overrides["do_sample"] = False
        return replace(replace(self, **overrides).validate(), **_counted_lengths_cleared(overrides))  # checked, then given way

    def for_prompts(self, width: int) -> GenerationOptions:
        """The options of a call whose longest prompt is `width` tokens: max_length and min_length, where set,
        become max_new_tokens and min_new_tokens (transformers' arithmetic on the padded width)."""
        if self.max_length is None and self.min_length is None:
            return self
        new = self.max_new_tokens
        if self.max_length is not None:
            if self.max_length <= width:
                raise OptionsError(f"max_length ({self.max_length}) counts the prompt, which is {width} tokens: pass a larger "
                                   "max_length, or max_new_tokens")
            new = self.max_length - width
        least = self.min_new_tokens if self.min_length is None else min(max(self.min_length - width, 0), new)
        return replace(self, max_new_tokens=new, min_new_tokens=least, max_length=None, min_length=None).validate()

    @property
    def contrastive(self) -> bool:
        """Whether the call is contrastive search: transformers' rule (penalty_alpha > 0 and top_k > 1, greedy, one beam)."""
        return self.penalty_alpha > 0 and self.top_k > 1 and not self.do_sample and self.num_beams == 1

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance is on."""
        return self.guidance_scale is not None and self.guidance_scale != 1

    @property
    def pad_id(self) -> int:
        """The token rows are padded with: pad_token_id, else the end token (transformers pads GPT-2 so), else 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else 0

    @property
    def eos_ids(self) -> list[int]:
        return _ids(self.eos_token_id)

    @property
    def forced_eos_ids(self) -> list[int]:
        return _ids(self.forced_eos_token_id)

    @classmethod
    def from_folder(cls, folder: Path) -> GenerationOptions:
        """Defaults from the folder's generation_config.json. Keys onnxgen does not use are ignored, with an
        IgnoredOptionWarning for those that would change transformers' output (NOT_TAKEN)."""
        path = folder / GENERATION_CONFIG
        saved = json.loads(path.read_text()) if path.is_file() else {}
        differs = {k: v for k, v in saved.items() if k in NOT_TAKEN and v != NOT_TAKEN[k]}
        if differs:
            warnings.warn(f"{path} sets {', '.join(f'{k}={v!r}' for k, v in differs.items())}, which onnxgen does not take: "
                          "its generation may differ from transformers'", IgnoredOptionWarning, stacklevel=2)
        names = {f.name for f in fields(cls)}
        # max_length 20 is transformers' default, written by configs made from a model's config: not a choice.
        taken = {k: v for k, v in saved.items() if k in names and v is not None and (k, v) != ("max_length", 20)}
        return replace(cls(**taken).validate(), **_counted_lengths_cleared(taken))


def _counted_lengths_cleared(given: dict[str, Any]) -> dict[str, None]:
    """max_length and min_length give way to max_new_tokens and min_new_tokens given beside them (transformers')."""
    return {counted: None for new, counted in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")) if new in given}


def _ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def returned(value: Any) -> str:
    """What a caller's processor or criterion returned, for an error that says so: its type, and its shape."""
    shape = getattr(value, "shape", None)
    return type(value).__name__ + (f" of shape {tuple(shape)}" if shape is not None else "")


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return (is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)


def _typed(name: str, value: Any) -> Any:
    """`value` as option `name` takes it (numpy numbers become Python ones), or an OptionsError naming both."""
    def refuse(expected: str) -> OptionsError:
        return OptionsError(f"{name} must be {expected}, got {value!r}")

    if name in INTS or (name in OPTIONAL_INTS and value is not None):
        if not is_int(value):
            raise refuse("an integer")
        return int(value)
    if name in FLOATS or (name in OPTIONAL_FLOATS and value is not None):
        if not is_number(value):
            raise refuse("a finite number")
        return float(value)
    if name in BOOLS:
        if not isinstance(value, (bool, np.bool_)):
            raise refuse("True or False")
        return bool(value)
    if name == "early_stopping":
        if value not in (True, False, "never") or not isinstance(value, (bool, np.bool_, str)):
            raise refuse("True, False or 'never'")
        return value if value == "never" else bool(value)
    if name in ("eos_token_id", "forced_eos_token_id"):
        if value is None:
            return None
        ids = [value] if is_int(value) else value
        if not isinstance(ids, (list, tuple, np.ndarray)) or not all(is_int(i) for i in ids):
            raise refuse("a token id, a list of token ids, or None")
        return int(ids[0]) if is_int(value) else [int(i) for i in ids]
    if name == "dry_sequence_breakers":
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
            raise refuse("a list of non-empty strings")
        return list(value)
    if name == "negative_prompt":
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, (list, tuple, np.ndarray)) or not all(is_int(t) for t in value):
            raise refuse("text or a list of token ids")
        return [int(t) for t in value]
    if name in ("stop", "stop_strings"):
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise refuse("a string or a list of strings")
        return list(stops)
    if name == "logit_bias":
        items = value.items() if isinstance(value, dict) else [(None, None)]
        # JSON gives the keys as strings of digits
        keys = [int(k) if is_int(k) or (isinstance(k, str) and k.isdigit()) else None for k, _ in items]
        numbers = [v for _, v in items if is_int(v) or (isinstance(v, (float, np.floating)) and not math.isnan(v))]
        if None in keys or len(numbers) != len(keys):
            raise refuse("a dict of token id to bias")
        return {k: float(v) for k, v in zip(keys, numbers)}
    if name in TOKEN_LISTS:
        if not isinstance(value, (list, tuple, np.ndarray)) or not all(is_int(t) for t in value):
            raise refuse("a list of token ids")
        return [int(t) for t in value]
    if name == "sequence_bias":
        pairs = list(value.items()) if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else None
        if pairs is None or not all(isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], (list, tuple))
                                    and pair[0] and all(is_int(t) for t in pair[0]) and is_number(pair[1]) for pair in pairs):
            raise refuse("a dict of token id tuples to a bias, or a list of [token ids, bias] pairs")
        return {tuple(int(t) for t in ids): float(bias) for ids, bias in pairs}
    if name == "exponential_decay_length_penalty":
        if value is None:
            return None
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and is_int(value[0]) and is_number(value[1])):
            raise refuse("a pair (start, factor): a number of new tokens and a number")
        return int(value[0]), float(value[1])
    if name == "bad_words_ids":
        if not isinstance(value, (list, tuple)) or not all(isinstance(w, (list, tuple)) and all(is_int(t) for t in w) for w in value):
            raise refuse("a list of token id lists")
        return [[int(t) for t in words] for words in value]
    if name == "watermarking_config":
        return None if value is None else WatermarkingConfig.of(value)
    if name == "json_schema":
        if value is not None and not isinstance(value, (dict, str)):
            raise refuse("a JSON schema: a dict, or its JSON text")
        return value
    if name in ("regex", "grammar", "adapter"):
        if value is not None and not isinstance(value, str):
            raise refuse("a string")
        return value
    if name == "prefix_allowed_tokens_fn":
        if value is not None and not callable(value):
            raise refuse("a function (batch_id, input_ids) -> allowed token ids")
        return value
    if name in ("logits_processors", "stopping_criteria"):
        if not isinstance(value, (list, tuple)) or not all(callable(f) for f in value):
            raise refuse("a list of callables")
        return list(value)
    return value
