"""Generation options: transformers' GenerationConfig names and defaults, checked before any work."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from .errors import OptionsError
from .folder import GENERATION_CONFIG

# The decoding presets of the CLI's --strategy, `onnxgen bench` and the benchmark suite: one table.
STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "beam": {"do_sample": False, "num_beams": 4},
    "sample": {"do_sample": True, "num_beams": 1, "top_k": 0, "top_p": 1.0},
    "top-k": {"do_sample": True, "num_beams": 1, "top_k": 50, "top_p": 1.0},
    "top-p": {"do_sample": True, "num_beams": 1, "top_k": 0, "top_p": 0.9},
    "top-k-top-p": {"do_sample": True, "num_beams": 1, "top_k": 50, "top_p": 0.9, "temperature": 0.8, "seed": 0},
}
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's API allows


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # sampling only, as in transformers; 0 disables
    top_p: float = 1.0  # sampling only; 1.0 disables
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings: generation ends when the text contains one
    seed: int | None = None  # makes sampling reproducible
    truncate_prompt: bool = False  # drop the prompt's oldest tokens instead of refusing a too-long prompt
    logprobs: int | None = None  # per new token its log-probability, and this many most likely alternatives
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to those tokens' scores (OpenAI's option)
    # transformers' conventions on numpy arrays: processor(input_ids, scores) -> scores, after the built-in
    # processors and before temperature/top-k/top-p; criterion(input_ids, scores) -> bool per row (or one bool).
    logits_processors: list[Callable[[Any, Any], Any]] = field(default_factory=list)
    stopping_criteria: list[Callable[[Any, Any], Any]] = field(default_factory=list)

    def validate(self) -> GenerationOptions:
        if self.max_new_tokens < 1:
            raise OptionsError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise OptionsError(f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise OptionsError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OptionsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise OptionsError(f"top_k must be >= 0, got {self.top_k}")
        if self.num_beams < 1:
            raise OptionsError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise OptionsError("beam search with sampling is not supported: use num_beams=1 with do_sample, or do_sample=False with beams")
        if self.num_return_sequences < 1:
            raise OptionsError(f"num_return_sequences must be at least 1, got {self.num_return_sequences}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise OptionsError(f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise OptionsError("greedy decoding returns one sequence per prompt: set do_sample=True or num_beams >= num_return_sequences")
        if not self.repetition_penalty > 0:
            raise OptionsError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise OptionsError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.early_stopping not in (True, False, "never"):
            raise OptionsError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1 and self.stop:
            raise OptionsError("stop strings are not supported with beam search")
        if any(not s for s in self.stop):
            raise OptionsError("stop strings must not be empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise OptionsError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        if any(not callable(f) for f in [*self.logits_processors, *self.stopping_criteria]):
            raise OptionsError("logits_processors and stopping_criteria must be callables")
        return self

    def with_overrides(self, **overrides: Any) -> GenerationOptions:
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise OptionsError(f"unknown generation option(s): {', '.join(unknown)}")
        if isinstance(overrides.get("stop"), str):
            overrides["stop"] = [overrides["stop"]]
        if overrides.get("logit_bias"):  # JSON gives its keys as strings
            overrides["logit_bias"] = {int(k): float(v) for k, v in overrides["logit_bias"].items()}
        return replace(self, **overrides).validate()

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_folder(cls, folder: Path) -> GenerationOptions:
        """Defaults from the folder's generation_config.json; keys onnxgen does not use are ignored."""
        path = folder / GENERATION_CONFIG
        saved = json.loads(path.read_text()) if path.is_file() else {}
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names and v is not None}).validate()
