"""`build_app(args)`: the Ray Serve application builder.

    serve run serve_app.app:build_app fs_root=/data/lora            # any AppArgs field as key=value
    serve run serve_config.yaml                                     # or serve deploy it on a cluster

Graph: Ingress (HTTP, OpenAI API) -> Tokenizer (CPU) and -> LoRAModel (one engine per replica,
GPU-reservable). Deployment options set here are defaults; `serve_config.yaml` overrides them.
"""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application

from serve_app.config import AppArgs
from serve_app.deployments import LoRAModel, Tokenizer
from serve_app.ingress import Ingress


def build_app(args: dict) -> Application:
    a = AppArgs(**(args or {}))
    # Every replica must see the same store, whatever its working directory.
    plain = a.model_dump() | {"fs_root": str(Path(a.fs_root).resolve())}
    tokenizer = Tokenizer.options(num_replicas=a.tokenizer_replicas).bind(plain)
    model = LoRAModel.options(
        num_replicas=a.model_replicas,
        # Room for a full batch plus the engine's own queue; beyond it the handle queues, then 503s.
        max_ongoing_requests=a.engine.max_batch_size + a.engine.max_queue,
        max_queued_requests=a.model_max_queued_requests,
        ray_actor_options={"num_cpus": 0, "num_gpus": a.model_num_gpus, "runtime_env": a.model_runtime_env},
    ).bind(plain)
    return Ingress.bind(tokenizer, model, plain)
