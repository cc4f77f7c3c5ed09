"""Model configuration: the subset of a Hugging Face `config.json` the JAX forward needs.

`ModelConfig` is frozen and hashable so it can be a static argument of `jax.jit`. It is read from a
checkpoint's `config.json` (or a GGUF's metadata, turned into the same keys by `gguf_checkpoint.py`)
by `ModelConfig.from_hf_dict`, which refuses what the forward cannot run
(an unknown architecture, an unsupported RoPE scaling type) with a message naming what is supported.
One field is not read from the checkpoint: `decode_kernels`, the engine's choice of decode kernels,
carried here so that the forward sees it as static configuration. It deliberately knows nothing
about weights or tokenizers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxlora.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling; `rope_type` is one of SUPPORTED_ROPE_TYPES."""

    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only: the band of wavelengths that is interpolated between scaled and unscaled.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    """q/k/v projections carry a bias (always for Qwen2, `attention_bias` for Llama)."""
    o_bias: bool
    """o_proj carries a bias (Llama's `attention_bias`; never Qwen2)."""
    mlp_bias: bool
    sliding_window: int | None
    """Keys further back than this many positions are masked (Mistral); None means full attention."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    decode_kernels: bool = False
    """Decode steps (one token per row against a KV cache) run attention and LoRA through the CPU
    kernels (`jaxlora.kernels`). Never read from config.json: the engine decides once, when it is
    built, and sets it on its decode steps' config only; a forward with more tokens per row, or
    without a cache, refuses it."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or '(none given)'} in config.json; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"unsupported hidden_act {d['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
        num_heads = int(d["num_attention_heads"])
        num_kv_heads = int(d.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // num_heads
        qwen2 = arch == "Qwen2ForCausalLM"
        if qwen2 and d.get("use_sliding_window"):
            raise ModelLoadError("Qwen2 use_sliding_window=true is not supported; set it to false")
        sliding_window = d.get("sliding_window") if arch == "MistralForCausalLM" else None
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        rope_theta, rope_scaling = _rope_from_hf(d)
        return cls(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=True if qwen2 else bool(d.get("attention_bias", False)),
            o_bias=False if qwen2 else bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=int(sliding_window) if sliding_window else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        """From a Hugging Face folder's config.json, or from a GGUF's metadata (a `.gguf` file, or a
        folder holding one and no config.json)."""
        # Imported here: gguf_checkpoint reads the model's name table, whose module imports this one.
        from jaxlora import gguf_checkpoint

        gguf = gguf_checkpoint.gguf_file(model_dir)
        if gguf is not None:
            return cls.from_hf_dict(gguf_checkpoint.hf_config(gguf_checkpoint.open_gguf(gguf), gguf))
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"missing file {path}: a model directory needs a Hugging Face config.json "
                                 f"(or a .gguf file)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(d)


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Reads RoPE settings from either the older (`rope_theta` + `rope_scaling`) or the newer
    (`rope_parameters`) config layout of transformers."""
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    merged = {**params, **scaling}
    theta = float(merged.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(merged["factor"]))
    return theta, RopeScaling(
        rope_type="llama3",
        factor=float(merged["factor"]),
        low_freq_factor=float(merged["low_freq_factor"]),
        high_freq_factor=float(merged["high_freq_factor"]),
        original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
    )
