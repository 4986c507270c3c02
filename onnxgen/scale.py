"""Past one machine, on Ray (the `ray` extra): the HTTP app of `onnxgen serve` as a Ray Serve deployment,
and batch generation over a Ray Data dataset with one loaded model per worker.

    serve run onnxgen.scale:app model_dir=/models/gpt2-int8 num_replicas=4     # Ray Serve's CLI
    ray.data.read_json("prompts.jsonl").map_batches(...)                        # see generate_dataset()

Ray schedules the replicas and workers across the cluster's machines; onnxgen adds nothing of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from .adapters import named
from .errors import OptionsError
from .model import load
from .options import is_int, under_key
from .runtime import Provider
from .serve import Limits, create_app
from .tools import PARSERS


def resources(provider: Provider, threads: int | None) -> dict[str, int]:
    """What each replica or worker asks Ray for: its threads' CPUs, and on CUDA a GPU of its own (Ray then
    places it on a machine with one free and shows it that GPU alone)."""
    return {"num_cpus": threads or 1, "num_gpus": 1 if provider == "cuda" else 0}


def replica_options(provider: Provider, threads: int | None, num_replicas: int | Literal["auto"], max_replicas: int,
                    limits: Limits) -> dict[str, Any]:
    """Ray Serve's options for the replicas. Each takes as many requests at once as its batcher decodes rows together
    (limits.max_batch; Ray's default of 5 would leave rows idle), and the rest wait at Ray's router for the first
    replica with room, not in one replica's queue. num_replicas="auto": Ray runs 1 to max_replicas replicas, adding
    them while replicas average more requests than half their rows, and removing idle ones."""
    if num_replicas == "auto":
        if not (is_int(max_replicas) and max_replicas >= 1):
            raise OptionsError(f"max_replicas must be an integer >= 1, got {max_replicas!r}")
        scaling: dict[str, Any] = {"autoscaling_config": {"min_replicas": 1, "max_replicas": max_replicas,
                                                          "target_ongoing_requests": max(1, limits.max_batch // 2)}}
    elif is_int(num_replicas) and num_replicas >= 1:
        scaling = {"num_replicas": num_replicas}
    else:
        raise OptionsError(f"num_replicas must be an integer >= 1 or 'auto', got {num_replicas!r}")
    return {**scaling, "max_ongoing_requests": limits.max_batch, "ray_actor_options": resources(provider, threads)}


def _build_app(model_dir: str, name: str | None, provider: Provider, threads: int | None, api_key: str | None,
               limits: Limits | None, mapped_weights: bool, cuda_graph: bool, chat_template: str | None,
               adapters: dict[str, Path] | None, tool_call_parser: str | None, watermark_key: int | None) -> Any:
    """Runs on each replica: load the model there and build the same app `onnxgen serve` runs."""
    model = load(model_dir, provider=provider, threads=threads, mapped_weights=mapped_weights, cuda_graph=cuda_graph,
                 chat_template=chat_template, adapters=adapters)
    # No responses kept for previous_response_id: Ray's router would send the next turn to any replica.
    return create_app(model, name or Path(model_dir).name, api_key, limits, ray_metrics=True, stored_responses=0,
                      tool_call_parser=tool_call_parser, watermark_key=watermark_key)


def deployment(model_dir: str, name: str | None = None, provider: Provider = "cpu", threads: int | None = None,
               num_replicas: int | Literal["auto"] = 1, api_key: str | None = None, limits: Limits | None = None,
               mapped_weights: bool = False, cuda_graph: bool = False, max_replicas: int = 4, chat_template: str | None = None,
               adapters: dict[str, Path] | None = None, tool_call_parser: str | None = None,
               watermark_key: int | None = None) -> Any:
    """A Ray Serve application: `num_replicas` copies of the app (or "auto": 1 to `max_replicas` by load;
    replica_options), each with its model, behind Ray's proxy. Run it with `serve.run(deployment(...))`; the
    routes are onnxgen serve's. `mapped_weights`: the replicas that Ray places on one machine share one copy of
    the weights; `cuda_graph`: on CUDA, each replica replays its decode steps as CUDA graphs; `chat_template`: a
    Jinja template's text, in place of the checkpoint's; `adapters`: LoRA adapter folders by name, which a request's
    "model" names (all onnxgen.load's; folders, as model_dir, at the same path on every node); `tool_call_parser`:
    onnxgen serve's --tool-call-parser; `watermark_key`: onnxgen serve's --watermark-key."""
    from ray import serve

    limits = limits or Limits()
    if tool_call_parser is not None and tool_call_parser not in PARSERS:  # checked before Ray starts replicas
        raise OptionsError(f"tool_call_parser {tool_call_parser!r}: onnxgen reads {', '.join(PARSERS)}")
    options = replica_options(provider, threads, num_replicas, max_replicas, limits)  # checked before Ray sees them
    if watermark_key is not None:  # checked before Ray starts replicas
        under_key(None, watermark_key)

    def build() -> Any:  # a function, not a partial: Ray tells a builder from an ASGI app that way
        return _build_app(model_dir, name, provider, threads, api_key, limits, mapped_weights, cuda_graph, chat_template, adapters,
                          tool_call_parser, watermark_key)

    return serve.deployment(serve.ingress(build)(), name="onnxgen", **options).bind()


def _flag(args: dict[str, str], name: str) -> bool:
    return args.get(name, "0") not in ("0", "false", "False", "")


def app(args: dict[str, str]) -> Any:
    """The builder `serve run onnxgen.scale:app model_dir=DIR [num_replicas=N|auto] [max_replicas=M] [max_batch=B]
    [threads=T] [provider=cuda] [mapped_weights=1] [cuda_graph=1] [chat_template=FILE] [adapters=NAME=DIR,NAME=DIR]
    [tool_call_parser=hermes] [watermark_key=KEY]` calls."""
    replicas = args.get("num_replicas", "1")
    template = None
    if "chat_template" in args:  # read here, where the command runs: the replicas may run on machines without the file
        try:
            template = Path(args["chat_template"]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise OptionsError(f"cannot read chat_template {args['chat_template']}: {getattr(e, 'strerror', None) or e}") from None
    return deployment(args["model_dir"], args.get("name"), args.get("provider", "cpu"),  # type: ignore[arg-type]
                      _int(args, "threads", None), replicas if replicas == "auto" else _int(args, "num_replicas", 1), args.get("api_key"),
                      Limits(max_batch=_int(args, "max_batch", Limits.max_batch)), mapped_weights=_flag(args, "mapped_weights"),
                      cuda_graph=_flag(args, "cuda_graph"), max_replicas=_int(args, "max_replicas", 4), chat_template=template,
                      adapters=named(args["adapters"].split(",")) if args.get("adapters") else None,
                      tool_call_parser=args.get("tool_call_parser"),
                      watermark_key=_int(args, "watermark_key", None))


def _int(args: dict[str, str], name: str, default: Any) -> Any:
    if name not in args:
        return default
    try:
        return int(args[name])
    except ValueError:
        raise OptionsError(f"{name} must be an integer, got {args[name]!r}") from None


class Generate:
    """A Ray Data `map_batches` callable: loads the model once per worker, then completes each batch of rows'
    `prompt` column into `generated_text` and `finish_reason` (one completion a prompt)."""

    def __init__(self, model_dir: str, provider: Provider = "cpu", threads: int | None = 1, mapped_weights: bool = False,
                 cuda_graph: bool = False, **options: Any) -> None:
        self.model = load(model_dir, provider=provider, threads=threads, mapped_weights=mapped_weights, cuda_graph=cuda_graph)
        self.options = self.model.options(**options)  # checked once, on the worker, before any row
        if self.options.num_return_sequences != 1:
            raise ValueError("generate_dataset makes one completion a prompt: num_return_sequences must be 1")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        completions = self.model.generate([str(p) for p in batch["prompt"]], self.options)
        return {**batch, "generated_text": np.array([c.text for c in completions], dtype=object),
                "finish_reason": np.array([c.finish_reason for c in completions], dtype=object)}


def generate_dataset(dataset: Any, model_dir: str, *, concurrency: int = 1, batch_size: int = 8, provider: Provider = "cpu",
                     threads: int | None = 1, mapped_weights: bool = False, cuda_graph: bool = False, **options: Any) -> Any:
    """`dataset` (a ray.data.Dataset with a `prompt` column) with `generated_text` and `finish_reason` added,
    by `concurrency` workers, each holding one model (`mapped_weights`, `cuda_graph`: onnxgen.load's). Lazy,
    as Ray Data is: consume it to run it."""
    return dataset.map_batches(Generate, fn_constructor_kwargs={"model_dir": str(model_dir), "provider": provider, "threads": threads,
                                                                "mapped_weights": mapped_weights, "cuda_graph": cuda_graph, **options},
                               batch_size=batch_size, concurrency=concurrency, **resources(provider, threads))
