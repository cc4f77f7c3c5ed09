"""`build_app(args)`: the Ray Serve application builder.

    serve run serve_app.app:build_app fs_root=/data/lora            # any AppArgs field as key=value
    serve run serve_config.yaml                                     # or serve deploy it on a cluster

Graph: Ingress (HTTP, OpenAI API) -> Tokenizer (CPU), -> LoRAModel (one engine per replica,
GPU-reservable), -> TenantState (one replica: what every ingress replica shares per tenant) and
JobController (one replica: starts tenants' fine-tuning jobs as Ray tasks, `serve_app.fine_tuning`). The deployment options that follow from `args` are set here, from
`serve_app.config.deployment_options`, and nowhere else (each replica checks it got them).
"""

from __future__ import annotations

from pathlib import Path

import ray
from ray.serve import Application

from serve_app.config import AppArgs, deployment_options
from serve_app.deployments import LoRAModel, TenantState, Tokenizer
from serve_app.fine_tuning import JobController
from serve_app.ingress import Ingress


def build_app(args: dict) -> Application:
    a = AppArgs(**(args or {}))
    working_dir = ray.get_runtime_context().runtime_env.get("working_dir") if ray.is_initialized() else None
    if working_dir and not Path(a.fs_root).is_absolute():
        raise ValueError(f"fs_root {a.fs_root!r} is relative, and this app is built in a temporary copy of its "
                         f"runtime_env working_dir ({Path.cwd()}), where no trainer publishes; give an absolute fs_root "
                         "(the shared filesystem every node mounts)")
    # Every replica must see the same store, whatever its working directory.
    plain = AppArgs(**(a.model_dump() | {"fs_root": str(Path(a.fs_root).resolve())})).model_dump(mode="json")
    options = deployment_options(a)
    tokenizer = Tokenizer.options(**options["Tokenizer"]).bind(plain)
    model = LoRAModel.options(**options["LoRAModel"]).bind(plain)
    return Ingress.options(**options["Ingress"]).bind(tokenizer, model, TenantState.bind(), JobController.bind(plain),
                                                      plain)
