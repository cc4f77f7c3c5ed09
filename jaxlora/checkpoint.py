"""Loads a Hugging Face causal-LM checkpoint from a local directory into a `Params` pytree.

Reads `config.json` and either `model.safetensors` or a sharded `model.safetensors.index.json`,
maps every tensor through one explicit name table (`hf_tensor_names`), checks every shape against
the config and transposes projections to `[in, out]`. It never reaches a hub and never unpickles:
a directory holding only `pytorch_model.bin` is refused with a note on converting it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxlora.config import ModelConfig
from jaxlora.errors import ModelLoadError
from jaxlora.model import LayerParams, Params

# LayerParams field -> (Hugging Face name under `model.layers.{i}.`, is a projection to transpose).
LAYER_TENSORS: dict[str, tuple[str, bool]] = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "bo": ("self_attn.o_proj.bias", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
    "b_gate": ("mlp.gate_proj.bias", False),
    "b_up": ("mlp.up_proj.bias", False),
    "b_down": ("mlp.down_proj.bias", False),
}


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face shapes ([out, in] for projections) of the tensors one layer of `cfg` has."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "attn_norm": (D,),
        "wq": (cfg.q_size, D),
        "wk": (cfg.kv_size, D),
        "wv": (cfg.kv_size, D),
        "wo": (D, cfg.q_size),
        "mlp_norm": (D,),
        "w_gate": (F, D),
        "w_up": (F, D),
        "w_down": (D, F),
    }
    if cfg.attention_bias:
        shapes |= {"bq": (cfg.q_size,), "bk": (cfg.kv_size,), "bv": (cfg.kv_size,)}
    if cfg.o_bias:
        shapes["bo"] = (D,)
    if cfg.mlp_bias:
        shapes |= {"b_gate": (F,), "b_up": (F,), "b_down": (D,)}
    return shapes


def hf_tensor_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its expected shape."""
    names = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for i in range(cfg.num_layers):
        for field, shape in layer_shapes(cfg).items():
            names[f"model.layers.{i}.{LAYER_TENSORS[field][0]}"] = shape
    return names


@contextlib.contextmanager
def _open_safetensors(path: Path):
    """`safe_open` whose failures (a truncated or corrupt file) become a ModelLoadError naming the file."""
    try:
        with safe_open(path, framework="numpy") as f:
            yield f
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e} (is the file truncated or corrupt?)") from e


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Maps each tensor name to the safetensors file that holds it."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        with _open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ModelLoadError(f"missing file {path}, listed in {index.name}")
        return files
    hint = ""
    if any((model_dir / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        hint = (
            "; this directory has only pickled PyTorch weights, which are never loaded: convert them with "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    raise ModelLoadError(f"missing file {single} (or a sharded {index.name}) in {model_dir}{hint}")


def read_tensors(model_dir: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Reads and shape-checks every tensor `cfg` needs, as numpy arrays in the file's dtype."""
    files = _tensor_files(model_dir)
    expected = hf_tensor_names(cfg)
    missing = [n for n in expected if n not in files]
    if missing:
        raise ModelLoadError(
            f"checkpoint {model_dir} is missing tensor {missing[0]} (expected shape {expected[missing[0]]})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, np.ndarray] = {}
    for path, names in by_file.items():
        with _open_safetensors(path) as f:
            for name in names:
                out[name] = f.get_tensor(name)
    for name, shape in expected.items():
        if tuple(out[name].shape) != shape:
            raise ModelLoadError(
                f"tensor {name} has shape {tuple(out[name].shape)} but config.json implies {shape}"
            )
    return out


def model_fingerprint(model_dir: str | Path) -> str:
    """A short identity of a checkpoint that adapters record and are checked against: its config
    plus the first 4 MiB of every weights file (header and leading tensor bytes), cheap to compute
    even for a large model and different for two random checkpoints of the same shape."""
    model_dir = Path(model_dir)
    h = hashlib.sha256(json.dumps(json.loads((model_dir / "config.json").read_text()), sort_keys=True).encode())
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            h.update(path.name.encode() + f.read(4 << 20))
    return h.hexdigest()[:16]


def load_params(model_dir: str | Path, dtype=jnp.float32) -> tuple[Params, ModelConfig]:
    """Loads a checkpoint directory; weights are cast to `dtype` (float32 or bfloat16)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    cfg = ModelConfig.from_dir(model_dir)
    tensors = read_tensors(model_dir, cfg)

    def put(a: np.ndarray, transpose: bool = False) -> jax.Array:
        a = a.T if transpose else a
        return jnp.asarray(np.ascontiguousarray(a), dtype=dtype)

    layers = []
    for i in range(cfg.num_layers):
        fields = {}
        for field in layer_shapes(cfg):
            hf_name, transpose = LAYER_TENSORS[field]
            fields[field] = put(tensors[f"model.layers.{i}.{hf_name}"], transpose)
        layers.append(LayerParams(**fields))
    params = Params(
        embed=put(tensors["model.embed_tokens.weight"]),
        layers=tuple(layers),
        final_norm=put(tensors["model.norm.weight"]),
        lm_head=None if cfg.tie_word_embeddings else put(tensors["lm_head.weight"], transpose=True),
    )
    return params, cfg
