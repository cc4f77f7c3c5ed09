"""The application's arguments: what `serve run serve_app.app:build_app key=value ...` and the
`args:` block of `serve_config.yaml` accept, validated once here (pydantic) and then handed to the
deployments as plain values. Engine options map 1:1 onto `jaxlora.engine.EngineConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jaxlora.adapter_store import DEFAULT_FS_ROOT
from jaxlora.engine import EngineConfig


class EngineArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, description="decode rows per model replica")
    max_seq_len: int = Field(512, ge=8, description="prompt + max_tokens limit per request")
    prefill_buckets: tuple[int, ...] = (32, 64, 128, 256, 512)
    decode_steps: int = Field(4, ge=1, description="tokens per row per device call; fewer streams sooner")
    max_queue: int = Field(64, ge=0, description="requests waiting inside a replica before 503")
    num_adapter_slots: int = Field(8, ge=2, description="device adapter slots including the base model")
    max_lora_rank: int = Field(16, ge=1)
    host_adapter_cache: int = Field(64, ge=1)
    dtype: str = Field("float32", pattern="^(float32|bfloat16)$")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump())


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
    engine: EngineArgs = Field(default_factory=EngineArgs)
    model_replicas: int = Field(1, ge=1)
    tokenizer_replicas: int = Field(1, ge=1)
    model_num_gpus: float = Field(0, ge=0, description="GPUs per model replica (1 on a GPU cluster)")
    model_max_queued_requests: int = Field(64, ge=-1, description="handle-level queue per model deployment; -1 = unbounded")
    model_runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime_env of the model replicas (env_vars such as XLA_FLAGS, a worker_process_setup_hook)")

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
