"""Loads a causal-LM checkpoint, a Hugging Face folder or a GGUF file, into a `Params` pytree.

A Hugging Face folder: `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json`. A GGUF: a `.gguf` file, or a folder holding one and no
`config.json`; `gguf_checkpoint.py` turns its metadata into a config dict and dequantizes its
tensors to float32 under Hugging Face's names. Both go through one explicit name table
(`checkpoint_tensors`: every tensor's Hugging Face and GGUF name and its shape, derived from the
model's `PROJECTIONS` plus the norms, embedding and head), every shape is checked against the
config and projections are transposed to `[in, out]`. It never reaches a hub and never unpickles:
a directory holding only `pytorch_model.bin` is refused with a note on converting it. (Training
checkpoints, the LoRA weights and optimizer state of a run, are `training/trainer.py`'s.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxlora import gguf_checkpoint
from jaxlora.config import ModelConfig
from jaxlora.errors import ModelLoadError
from jaxlora.model import PROJECTIONS, LayerParams, Params

# The tensors outside the layers: Params field -> (Hugging Face name, GGUF name).
_OUTER = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "final_norm": ("model.norm.weight", "output_norm.weight"),
    "lm_head": ("lm_head.weight", gguf_checkpoint.OUTPUT_TENSOR),
}
# LayerParams field -> (Hugging Face name under `model.layers.{i}.`, GGUF name under `blk.{i}.`), for
# the tensors of a layer that are not projections (those are in `PROJECTIONS`).
_NORMS = {
    "attn_norm": ("input_layernorm.weight", "attn_norm.weight"),
    "mlp_norm": ("post_attention_layernorm.weight", "ffn_norm.weight"),
}


class CheckpointTensor(NamedTuple):
    """One tensor of a checkpoint under its name in each format, with its shape as Hugging Face
    stores it (projection weights [out, in])."""

    hf: str
    gguf: str
    shape: tuple[int, ...]


def outer_tensors(cfg: ModelConfig) -> dict[str, CheckpointTensor]:
    """Params field -> its tensor, for the tensors outside the layers (no `lm_head` when tied)."""
    shapes = {"embed": (cfg.vocab_size, cfg.hidden_size), "final_norm": (cfg.hidden_size,),
              "lm_head": (cfg.vocab_size, cfg.hidden_size)}
    return {field: CheckpointTensor(hf, gguf, shapes[field]) for field, (hf, gguf) in _OUTER.items()
            if not (field == "lm_head" and cfg.tie_word_embeddings)}


def layer_tensors(cfg: ModelConfig, i: int) -> dict[str, CheckpointTensor]:
    """LayerParams field -> its tensor in layer `i`, for every tensor a layer of `cfg` has."""

    def tensor(hf: str, gguf: str, shape: tuple[int, ...]) -> CheckpointTensor:
        return CheckpointTensor(f"model.layers.{i}.{hf}", f"blk.{i}.{gguf}", shape)

    tensors = {field: tensor(hf, gguf, (cfg.hidden_size,)) for field, (hf, gguf) in _NORMS.items()}
    for p in PROJECTIONS.values():
        d_in, d_out = p.shape(cfg)
        tensors[p.weight] = tensor(f"{p.hf_path}.weight", f"{p.gguf}.weight", (d_out, d_in))
        if p.has_bias(cfg):
            tensors[p.bias] = tensor(f"{p.hf_path}.bias", f"{p.gguf}.bias", (d_out,))
    return tensors


def checkpoint_tensors(cfg: ModelConfig) -> list[CheckpointTensor]:
    """Every tensor a checkpoint of `cfg` holds."""
    layers = (t for i in range(cfg.num_layers) for t in layer_tensors(cfg, i).values())
    return [*outer_tensors(cfg).values(), *layers]


def hf_tensor_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a Hugging Face checkpoint must hold, with its expected shape."""
    return {t.hf: t.shape for t in checkpoint_tensors(cfg)}


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
    even for a large model and different for two random checkpoints of the same shape. A GGUF's is
    `gguf_checkpoint.fingerprint`: its header (the metadata) and first 4 MiB of tensor data."""
    gguf = gguf_checkpoint.gguf_file(model_dir)
    if gguf is not None:
        return gguf_checkpoint.fingerprint(gguf_checkpoint.open_gguf(gguf))
    model_dir = Path(model_dir)
    h = hashlib.sha256(json.dumps(json.loads((model_dir / "config.json").read_text()), sort_keys=True).encode())
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            h.update(path.name.encode() + f.read(4 << 20))
    return h.hexdigest()[:16]


def model_name(model_dir: str | Path) -> str:
    """The id a model is served and recorded under: a folder's name, or a GGUF file's without `.gguf`."""
    path = Path(model_dir)
    return path.stem if path.suffix == ".gguf" else path.name


def load_params(model_dir: str | Path, dtype=jnp.float32) -> tuple[Params, ModelConfig]:
    """Loads a checkpoint (a Hugging Face folder or a GGUF); weights are cast to `dtype` (float32 or
    bfloat16). Each host array is dropped as soon as it is on the device, so a model's weights are
    held about once, not twice: a 135M-parameter GGUF is 540 MB in float32."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelLoadError(f"model path {model_dir} does not exist (expected a Hugging Face model "
                             f"directory or a .gguf file)")
    gguf = gguf_checkpoint.gguf_file(model_dir)
    if gguf is None:
        cfg = ModelConfig.from_dir(model_dir)
        tensors = read_tensors(model_dir, cfg)
    else:
        reader = gguf_checkpoint.open_gguf(gguf)  # opened once: parsing the header is the slow part
        cfg = ModelConfig.from_hf_dict(gguf_checkpoint.hf_config(reader, gguf))
        tensors = gguf_checkpoint.read_tensors(reader, gguf, cfg, checkpoint_tensors(cfg))
        del reader

    def put(t: CheckpointTensor, transpose: bool = False) -> jax.Array:
        a = tensors.pop(t.hf)
        a = a.T if transpose else a
        return jnp.asarray(np.ascontiguousarray(a), dtype=dtype)

    weights = {p.weight for p in PROJECTIONS.values()}  # transposed to [in, out]
    layers = tuple(
        LayerParams(**{field: put(t, transpose=field in weights) for field, t in layer_tensors(cfg, i).items()})
        for i in range(cfg.num_layers)
    )
    outer = outer_tensors(cfg)
    params = Params(
        embed=put(outer["embed"]),
        layers=layers,
        final_norm=put(outer["final_norm"]),
        lm_head=put(outer["lm_head"], transpose=True) if "lm_head" in outer else None,
    )
    return params, cfg
