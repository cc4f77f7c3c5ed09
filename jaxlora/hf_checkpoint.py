"""Loads a Hugging Face causal-LM checkpoint from a local directory into a `Params` pytree.

Reads `config.json` and either `model.safetensors` or a sharded `model.safetensors.index.json`,
maps every tensor through one explicit name table (`hf_tensor_names`, derived from the model's
`PROJECTIONS` plus the norms), checks every shape against the config and transposes projections to
`[in, out]`. It never reaches a hub and never unpickles: a directory holding only
`pytorch_model.bin` is refused with a note on converting it. (Training checkpoints, the LoRA
weights and optimizer state of a run, are `training/trainer.py`'s.)
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
from jaxlora.model import PROJECTIONS, LayerParams, Params

# LayerParams field -> Hugging Face name under `model.layers.{i}.`, for the tensors that are not projections.
_NORMS = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight"}


def layer_tensors(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """LayerParams field -> (Hugging Face name under `model.layers.{i}.`, its shape there) of every
    tensor one layer of `cfg` has; Hugging Face stores projection weights [out, in]."""
    tensors = {field: (name, (cfg.hidden_size,)) for field, name in _NORMS.items()}
    for p in PROJECTIONS.values():
        d_in, d_out = p.shape(cfg)
        tensors[p.weight] = (f"{p.hf_path}.weight", (d_out, d_in))
        if p.has_bias(cfg):
            tensors[p.bias] = (f"{p.hf_path}.bias", (d_out,))
    return tensors


def hf_tensor_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its expected shape."""
    names = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    layer = layer_tensors(cfg).values()
    for i in range(cfg.num_layers):
        for name, shape in layer:
            names[f"model.layers.{i}.{name}"] = shape
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

    layer = layer_tensors(cfg)
    weights = {p.weight for p in PROJECTIONS.values()}  # transposed to [in, out]
    layers = tuple(
        LayerParams(**{field: put(tensors[f"model.layers.{i}.{name}"], transpose=field in weights)
                       for field, (name, _) in layer.items()})
        for i in range(cfg.num_layers)
    )
    params = Params(
        embed=put(tensors["model.embed_tokens.weight"]),
        layers=layers,
        final_norm=put(tensors["model.norm.weight"]),
        lm_head=None if cfg.tie_word_embeddings else put(tensors["lm_head.weight"], transpose=True),
    )
    return params, cfg
