"""Scale-out on a local single-node Ray cluster: the serve app as a Ray Serve deployment, and Ray Data batch
generation; both give what the model gives in-process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray

import onnxgen

from .test_serve import _free_port

METRICS_PORT = _free_port()  # where the node's Ray exports the metrics of its workers (replicas included)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, _metrics_export_port=METRICS_PORT,
             _system_config={"metrics_report_interval_ms": 200})  # the default 10 s would make the test wait for it
    yield
    ray.shutdown()


def _ray_series(name: str, **labels: str) -> float:
    """The sum over replicas of a series in the node's Ray metrics (0 until it appears)."""
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(w in line for w in wanted))


def test_ray_data_generates_like_the_model(local_ray: None, exported: Path, model: onnxgen.Model) -> None:
    from onnxgen.scale import generate_dataset

    prompts = ["It is a truth", "Call me", "The", "Once upon", "A"]
    ds = generate_dataset(ray.data.from_items([{"prompt": p} for p in prompts]), str(exported), batch_size=2,
                          max_new_tokens=6, do_sample=False)
    rows = sorted(ds.take_all(), key=lambda r: prompts.index(r["prompt"]))
    assert [r["generated_text"] for r in rows] == [c.text for c in model.generate(prompts, max_new_tokens=6, do_sample=False)]


def test_ray_serve_deployment_answers_like_onnxgen_serve(local_ray: None, exported: Path, model: onnxgen.Model, tmp_path: Path) -> None:
    """...chats with the template given to the command (chat_template=FILE), and Ray's metrics count its requests and
    tokens over the replicas (each replica's /metrics has its own), and hold the replicas' batcher state."""
    from ray import serve

    from onnxgen.scale import app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:  # the builder `serve run onnxgen.scale:app model_dir=... num_replicas=2 name=tiny mapped_weights=1 max_batch=4` calls
        template = tmp_path / "template.jinja"  # the folder has none: the replicas get this one
        template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
        serve.run(app({"model_dir": str(exported), "num_replicas": "2", "name": "tiny", "mapped_weights": "1", "max_batch": "4",
                       "chat_template": str(template)}), name="onnxgen", route_prefix="/")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "It is a truth", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == model.generate("It is a truth", max_new_tokens=8, do_sample=False)[0].text
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json() == {"status": "ok"}
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={"prompt": "x", "max_tokens": 8, "top_p": 2})
        assert bad.status_code == 400
        usage = r.json()["usage"]
        expected = {("ray_onnxgen_requests_total", "completed"): 1, ("ray_onnxgen_requests_total", "invalid"): 1,
                    ("ray_onnxgen_generation_tokens_total", None): usage["completion_tokens"],
                    ("ray_onnxgen_prompt_tokens_total", None): usage["prompt_tokens"],
                    ("ray_onnxgen_request_duration_seconds_count", None): 1,
                    # the batchers' state, which each replica sets in Ray's metrics every second: 2 x 4 rows, none busy
                    # now, and one decode step a token after the first (which the prompt pass gives)
                    ("ray_onnxgen_rows", None): 8, ("ray_onnxgen_rows_busy", None): 0,
                    ("ray_onnxgen_decode_steps_total", None): usage["completion_tokens"] - 1}
        def seen() -> dict[tuple[str, str | None], float]:
            return {(n, o): _ray_series(n, deployment="onnxgen", **({"outcome": o} if o else {})) for n, o in expected}

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and seen() != expected:
            time.sleep(0.5)
        assert seen() == expected
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == model.generate(
            "user: Hi\nassistant:", max_new_tokens=5, do_sample=False)[0].text
    finally:
        serve.shutdown()


def test_ray_serve_deployment_serves_lora_adapters(local_ray: None, lora_base: Path, lora_adapters: dict[str, Path]) -> None:
    """`adapters=NAME=DIR,...`: each replica loads them beside the base, and a request's "model" names one."""
    from ray import serve

    from onnxgen.scale import app

    served = onnxgen.load(lora_base, threads=1, adapters=lora_adapters)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app({"model_dir": str(lora_base), "name": "tiny", "adapters": f"one={lora_adapters['one']},{lora_adapters['two']}"}),
                  name="onnxgen", route_prefix="/")
        for model, adapter in (("one", "one"), ("two", "two"), ("tiny", None)):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"model": model, "prompt": "It is a truth", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == served.generate("It is a truth", max_new_tokens=8, do_sample=False, adapter=adapter)[0].text
    finally:
        serve.shutdown()


def test_replicas_take_as_many_requests_as_they_decode_rows(exported: Path) -> None:
    """Ray's default of 5 requests a replica left batcher rows idle; "auto" scales by rows in use."""
    from onnxgen.scale import app, deployment, replica_options
    from onnxgen.serve import Limits

    assert replica_options("cpu", 2, 3, 4, Limits(max_batch=12)) == {
        "num_replicas": 3, "max_ongoing_requests": 12, "ray_actor_options": {"num_cpus": 2, "num_gpus": 0}}
    auto = replica_options("cpu", None, "auto", 6, Limits())
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 4} and "num_replicas" not in auto
    from ray.serve.config import (
        AutoscalingConfig,  # Ray ignores keys it does not know: each must be one of its fields
    )

    assert set(auto["autoscaling_config"]) <= set(getattr(AutoscalingConfig, "model_fields", None) or AutoscalingConfig.__fields__)
    deployment(str(exported), num_replicas="auto", max_replicas=6)  # and takes their values: it checks them when made
    app({"model_dir": str(exported), "num_replicas": "auto", "max_replicas": "3", "max_batch": "6"})
    for bad in ({"num_replicas": 0}, {"num_replicas": "many"}, {"num_replicas": True}, {"num_replicas": "auto", "max_replicas": 0}):
        with pytest.raises(onnxgen.OptionsError, match="replicas"):
            deployment(str(exported), **bad)  # type: ignore[arg-type]
    with pytest.raises(onnxgen.OptionsError, match="max_batch must be an integer"):
        app({"model_dir": str(exported), "max_batch": "lots"})
    with pytest.raises(onnxgen.OptionsError, match="cannot read chat_template /no/such.jinja: No such file"):
        app({"model_dir": str(exported), "chat_template": "/no/such.jinja"})
    with pytest.raises(onnxgen.OptionsError, match="adapter 'a=': give NAME=FOLDER or FOLDER, each name once"):
        app({"model_dir": str(exported), "adapters": "a="})


def test_replicas_on_cuda_ask_for_a_gpu_each() -> None:
    from onnxgen.scale import resources

    assert resources("cuda", 2) == {"num_cpus": 2, "num_gpus": 1}
    assert resources("cpu", None) == {"num_cpus": 1, "num_gpus": 0}
