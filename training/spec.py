"""The training job spec: YAML (configs/train/*.yaml) mapped field for field onto `TrainSpec`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from jaxlora.adapter_store import DEFAULT_FS_ROOT, check_id
from jaxlora.errors import InvalidAdapterRef
from jaxlora.model import PROJECTIONS


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=256)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(PROJECTIONS))
    use_rslora: bool = False

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in PROJECTIONS]
        if unknown or not v:
            raise ValueError(f"target_modules {unknown or v} not supported; choose from {list(PROJECTIONS)}")
        return v


class TrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str
    adapter_id: str
    data: str = Field(description="JSONL file; relative paths are relative to the spec file")
    validation_data: str | None = Field(None, description="JSONL file whose loss is reported at each log step")
    init_adapter: str | None = Field(None, description="a PEFT adapter folder to start from (its rank, alpha and "
                                     "targets must match `lora`); default: PEFT's initialisation")
    fs_root: str = DEFAULT_FS_ROOT
    model_dir: str | None = Field(None, description="base checkpoint; default: the demo model")
    objective: Literal["sft", "dpo"] = "sft"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    steps: int | None = Field(None, ge=1, description="optimizer steps; or give epochs")
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1, description="a cap on the steps `epochs` comes to")
    batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8)
    precision: Literal["fp32", "bf16"] = "fp32"
    clip_norm: float = Field(1.0, gt=0)
    dpo_beta: float = Field(0.1, gt=0)
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    checkpoint_dir: str | None = Field(None, description="default: <fs_root>/users/<user>/checkpoints/<adapter>")
    log_every: int = Field(10, ge=1)
    seed: int = 0
    num_gpus: float = Field(0, ge=0, description="GPUs for the Ray task")

    @field_validator("user_id", "adapter_id")
    @classmethod
    def _ids(cls, v: str, info: ValidationInfo) -> str:
        try:
            return check_id(v, info.field_name.replace("_id", " id"))
        except InvalidAdapterRef as e:  # pydantic reports ValueErrors as validation errors
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _length(self) -> "TrainSpec":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainSpec":
        path = Path(path)
        d = yaml.safe_load(path.read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a mapping of TrainSpec fields")
        spec = cls(**d)
        for field in ("data", "validation_data"):
            value = getattr(spec, field)
            if value is not None and not Path(value).is_absolute():
                spec = spec.model_copy(update={field: str((path.parent / value).resolve())})
        return spec

    def checkpoint_path(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        return Path(self.fs_root) / "users" / self.user_id / "checkpoints" / self.adapter_id
