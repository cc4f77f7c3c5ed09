"""The application's arguments: what `serve run serve_app.app:build_app key=value ...` and the
`args:` block of `serve_config.yaml` accept, validated once here (pydantic) and then handed to the
deployments as plain values.

One place per setting. Engine options are `jaxlora.engine.EngineConfig` itself (its fields, bounds
and defaults; nothing is restated here). The Serve options that depend on the engine or on the
hardware (replicas, queue sizes, GPUs), and the model's request router (`model_router`: which replica
a request goes to, `serve_app.routing`), are `args` fields too, turned into deployment options by
`deployment_options` for `build_app`; `OWNED_OPTIONS` lists them with the field that sets each. A
`deployments:` block in the config file would silently replace them, so every replica compares
what it runs with against this table at start and refuses a mismatch, naming the field to use.
Serve options not in the table (health checks, graceful shutdown, logging) belong in `deployments:`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jaxlora.adapter_store import DEFAULT_FS_ROOT
from jaxlora.engine import EngineConfig

# (deployment, option, where to set it): the Serve options build_app derives from `args`.
OWNED_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("Ingress", "num_replicas", "args.ingress_replicas"),
    ("Tokenizer", "num_replicas", "args.tokenizer_replicas"),
    ("LoRAModel", "num_replicas", "args.model_replicas"),
    ("LoRAModel", "max_ongoing_requests", "args.engine.max_batch_size + args.engine.max_queue (computed)"),
    ("LoRAModel", "max_queued_requests", "args.model_max_queued_requests"),
    ("LoRAModel", "ray_actor_options.num_cpus", "args.model_num_cpus"),
    ("LoRAModel", "ray_actor_options.num_gpus", "args.model_num_gpus"),
    ("LoRAModel", "ray_actor_options.runtime_env.env_vars", "args.model_runtime_env.env_vars"),
    ("LoRAModel", "request_router_config.request_router_class", "args.model_router"),
)

# args.model_router -> the request router class of the LoRAModel handles (Serve imports it by this path).
ROUTERS = {
    "adapter_home": "serve_app.routing:AdapterHomeRouter",
    "power_of_two": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",  # Serve's default
}

# Former or mistaken names, with where the setting lives instead.
_MOVED = {
    "num_replicas": "ingress_replicas, tokenizer_replicas or model_replicas",
    "num_gpus": "model_num_gpus",
    "num_cpus": "model_num_cpus",
    "runtime_env": "model_runtime_env",
    "max_queued_requests": "model_max_queued_requests",
    "max_ongoing_requests": "engine.max_batch_size and engine.max_queue (it is computed from them)",
    "deployments": "the top level of the config file, beside args (and only for options not owned by args)",
}


class FineTuningArgs(BaseModel):
    """Tenants' fine-tuning jobs and files (`/v1/files`, `/v1/fine_tuning/jobs`): what runs where, and
    how much any tenant may ask for. The LoRA rank is bounded by `engine.max_lora_rank`."""
    model_config = ConfigDict(extra="forbid")

    max_running_jobs: int = Field(1, ge=0, description="jobs training at once, all tenants together (0: none run)")
    max_running_per_tenant: int = Field(1, ge=1)
    max_queued_per_tenant: int = Field(4, ge=1, description="jobs waiting per tenant; more get 429")
    job_num_cpus: float = Field(1, ge=0, description="CPUs each job's Ray task reserves")
    job_num_gpus: float = Field(0, ge=0, description="GPUs each job's Ray task reserves")
    max_epochs: int = Field(50, ge=1)
    max_batch_size: int = Field(32, ge=1)
    max_steps: int = Field(2000, ge=1, description="optimizer steps of one job, whatever its data and epochs")
    max_length: int = Field(256, ge=16, description="tokens per training row")
    base_learning_rate: float = Field(3e-3, gt=0, description="what learning_rate_multiplier=1 means")
    max_file_bytes: int = Field(16 << 20, ge=1024, description="one uploaded file")
    max_total_file_bytes: int = Field(256 << 20, ge=1024, description="every file of one tenant together")
    max_adapter_bytes: int = Field(256 << 20, ge=1024, description="one uploaded PEFT adapter (POST /v1/models/{id}/versions)")
    poll_interval_s: float = Field(1.0, gt=0, description="how often the controller looks for jobs to start")
    heartbeat_timeout_s: float = Field(
        60.0, gt=0, description="a running job whose task has not reported for this long is requeued (it resumes "
        "from its last checkpoint): its task died with a controller that restarted")


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(None, description="Hugging Face checkpoint directory; default: the demo model")
    model_id: str | None = Field(None, description="the base model's name in the API; default: the directory name")
    fs_root: str = Field(DEFAULT_FS_ROOT, description="adapter store root (shared filesystem on a cluster)")
    auth: bool = Field(False, description="require API keys (Authorization: Bearer ...)")
    api_keys_file: str | None = Field(None, description="JSON file of hashed API keys; required when auth is on")
    registered_adapters: dict[str, str] = Field(default_factory=dict, description="adapter id -> fs_dir/cephfs_dir")
    allowed_roots: list[str] = Field(default_factory=list, description="folders registered adapters may live in")
    poll_interval_s: float = Field(1.0, gt=0, description="how often replicas check `latest` for new versions")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies are refused (413)")
    max_prompts: int = Field(
        64, ge=1, description="prompts in one /v1/completions request (a batch); more are refused (400). Each is "
        "admitted as a request of its own (rate limits, fair scheduling, the tenant's queue limit)")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="jaxlora.engine.EngineConfig, field for field")
    requests_per_minute: int | None = Field(None, ge=1, description="per tenant, unless its tier sets its own; None: no limit")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="per tenant, unless its tier sets its own: prompt + max_tokens reserved per request, "
        "settled to its usage; None: no limit")
    rate_limit_timeout_s: float = Field(
        0.5, gt=0, description="how long a request waits for TenantState to check its limits; past it, it is served "
        "unchecked (fail open, counted in jaxlora_rate_limit_unchecked)")
    stream_interval: int = Field(
        1, ge=1, description="tokens per streamed message after the first (vLLM's --stream-interval): larger cuts "
        "the per-message CPU of replica, ingress, proxy and client when many streams run, for a coarser stream")
    stream_messages_per_s: float | None = Field(
        None, gt=0, description="a model replica's streamed messages per second, all its streams together "
        "(jaxlora.requests.MessagePacer): each stream's messages after the first are (streams / this) seconds "
        "apart at least, so a flood of streams sends coarser deltas while a lone stream keeps every decode "
        "call's; first tokens and last messages never wait. None: no spacing")
    tool_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto", description="how the model writes tool calls (jaxlora.tool_calls): auto detects it from the chat "
        "template (hermes where it names none, and for templates without tool support)")
    grammar_timeout_s: float = Field(
        10.0, gt=0, description="how long a model replica compiles a new grammar (response_format, tools) before it "
        "refuses it (400); compiled grammars are cached, so the next request with the same one starts at once")
    fine_tuning: FineTuningArgs = Field(default_factory=FineTuningArgs)
    ingress_replicas: int = Field(1, ge=1)
    tokenizer_replicas: int = Field(1, ge=1)
    model_replicas: int = Field(1, ge=1, description="model replicas (engines); each holds the base model")
    model_num_cpus: float = Field(
        1, ge=0, description="CPUs reserved per model replica; on CPU also its engine's compute threads (at least 1)")
    model_num_gpus: float = Field(0, ge=0, description="GPUs per model replica (1 on a GPU cluster: one engine per GPU)")
    model_max_queued_requests: int = Field(64, ge=-1, description="handle-level queue per model deployment; -1 = unbounded")
    model_runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime_env of the model replicas (env_vars such as XLA_FLAGS, a worker_process_setup_hook)")
    model_router: Literal["adapter_home", "power_of_two"] = Field(
        "adapter_home", description="which model replica a request goes to. adapter_home: each adapter's requests "
        "to its home replica, leaving it only past 1.25 x the average load (serve_app.placement); the base model "
        "to the least loaded. power_of_two: Serve's default (two random replicas, the less loaded), which keeps "
        "no adapter on a replica; for comparison (python -m bench.routing)")

    @property
    def engine_compute_threads(self) -> int | None:
        """The XLA compute threads of a model replica on CPU: the CPUs it reserves, at least one
        (`jaxlora.cpu_threads`). None, XLA's default of one per core: on a GPU, or with no CPU reserved."""
        if self.model_num_gpus > 0 or self.model_num_cpus == 0:
            return None
        return max(1, int(self.model_num_cpus))

    @model_validator(mode="before")
    @classmethod
    def _name_moved_settings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key in _MOVED:
                    raise ValueError(f"args has no field {key!r}: set {_MOVED[key]} instead")
        return data

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"api_keys_file {v} does not exist")
        return v

    @model_validator(mode="after")
    def _auth_needs_keys(self) -> "AppArgs":
        if self.auth and not self.api_keys_file:
            raise ValueError("auth=true needs api_keys_file (create one with: python -m serve_app.keys add USER --file F)")
        return self


def deployment_options(a: AppArgs) -> dict[str, dict[str, Any]]:
    """Deployment name -> the Serve options build_app sets from `args` (exactly OWNED_OPTIONS)."""
    return {
        "Ingress": {"num_replicas": a.ingress_replicas},
        "Tokenizer": {"num_replicas": a.tokenizer_replicas},
        "LoRAModel": {
            "num_replicas": a.model_replicas,
            # Room for a full batch plus the engine's own queue; beyond it the handle queues, then 503s.
            "max_ongoing_requests": a.engine.max_batch_size + a.engine.max_queue,
            "max_queued_requests": a.model_max_queued_requests,
            "ray_actor_options": {"num_cpus": a.model_num_cpus, "num_gpus": a.model_num_gpus,
                                  "runtime_env": a.model_runtime_env},
            "request_router_config": {"request_router_class": ROUTERS[a.model_router]},
        },
    }


def option_mismatches(deployment: str, a: AppArgs, running: dict[str, Any]) -> list[str]:
    """What a replica runs with that differs from what `args` set, as messages naming where to set
    it. `running` maps an OWNED_OPTIONS option path to the value the replica sees."""
    expected = deployment_options(a)[deployment]
    problems = []
    for name, option, where in OWNED_OPTIONS:
        if name != deployment or option not in running:
            continue
        want: Any = expected
        for part in option.split("."):
            want = want.get(part) if isinstance(want, dict) else None
        have = running[option]
        if option.endswith("env_vars"):  # ours must all be there; the app's runtime_env may add more
            ok = isinstance(have, dict) and all(have.get(k) == v for k, v in (want or {}).items())
        else:
            ok = (want or 0) == (have or 0)
        if not ok:
            problems.append(f"{deployment}.{option} is {have!r} but args ask for {want!r}: it is set by {where} only; "
                            f"remove it from the `deployments:` block of the config file (or from .options())")
    return problems
