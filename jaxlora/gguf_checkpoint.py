"""Reads a GGUF checkpoint (llama.cpp's one-file format) as what a Hugging Face folder gives: a
config dict and float32 tensors under Hugging Face's names and layout, so that everything after
loading is shared with `hf_checkpoint.py`.

A model path names a GGUF when it is a `.gguf` file, or a folder holding one `.gguf` and no
`config.json` (`gguf_file`). Its metadata becomes a Hugging Face-style config dict (`hf_config`),
which `ModelConfig.from_hf_dict` validates like any `config.json`. Its tensors are found by the GGUF
names of the checkpoint's one name table (`hf_checkpoint.checkpoint_tensors`), shape-checked,
dequantized to float32 with the `gguf` package (numpy only) and returned `[out, in]` as Hugging Face
stores them (GGUF lists dimensions innermost first, so a GGUF `[in, out]` is numpy's `[out, in]`).
For the `llama` architecture, llama.cpp's converter reorders the rows of q and k inside each head
(for GGML's RoPE, which rotates adjacent pairs where Hugging Face rotates halves); `read_tensors`
puts them back, as transformers' GGUF loader does. Qwen2 is converted unpermuted.

What it deliberately does not do: keep weights quantized (they are dequantized once, at load),
read the tokenizer (`gguf_tokenizer.py`), or import torch.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, GGUFReader, Keys
from gguf.quants import dequantize

from jaxlora.config import ModelConfig
from jaxlora.errors import ModelLoadError
from jaxlora.model import PROJECTIONS

# GGUF `general.architecture` -> the Hugging Face architecture its config becomes. The GGUF name is
# also the config's `model_type` (what transformers' AutoConfig dispatches on) for each of these.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Tensor types dequantized at load; any other is refused by name.
TENSOR_TYPES = tuple(GGMLQuantizationType[t] for t in
                     ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"))

# Hugging Face config key -> the GGUF metadata key that holds it (`{arch}` is general.architecture).
_HPARAMS = {
    "num_hidden_layers": Keys.LLM.BLOCK_COUNT,
    "max_position_embeddings": Keys.LLM.CONTEXT_LENGTH,
    "hidden_size": Keys.LLM.EMBEDDING_LENGTH,
    "intermediate_size": Keys.LLM.FEED_FORWARD_LENGTH,
    "num_attention_heads": Keys.Attention.HEAD_COUNT,
    "num_key_value_heads": Keys.Attention.HEAD_COUNT_KV,
    "rope_theta": Keys.Rope.FREQ_BASE,
    "rms_norm_eps": Keys.Attention.LAYERNORM_RMS_EPS,
}
# Without these the model's shape is unknown; the others have the defaults of `from_hf_dict`.
_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
# The key llama.cpp wrote linear RoPE scaling under before `rope.scaling.type` existed.
_OLD_SCALE_LINEAR = "{arch}.rope.scale_linear"
# The output head, absent when it is tied to the embedding (names from gguf's own table); also the
# GGUF name of `lm_head` in hf_checkpoint's name table.
OUTPUT_TENSOR = f"{TENSOR_NAMES[MODEL_TENSOR.OUTPUT]}.weight"
# llama.cpp stores Llama 3's RoPE scaling as this tensor of per-frequency factors, not as metadata.
_ROPE_FREQS = f"{TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS]}.weight"
# The hash of a GGUF covers its header (metadata and tensor table) and this much of its tensor data.
_FINGERPRINT_DATA_BYTES = 4 << 20


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file a model path names: the path itself if it is a `.gguf` file, the one `.gguf` in
    a folder without `config.json`, or None (a Hugging Face folder, or nothing there)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model path {path} is a file but not a .gguf: point it at a GGUF file "
                                 f"or at a Hugging Face model directory")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(found) > 1:
        raise ModelLoadError(f"{path} holds several GGUF files ({', '.join(p.name for p in found)}): "
                             f"point the model path at the one to load")
    return found[0] if found else None


def open_gguf(path: Path) -> GGUFReader:
    """A reader over the memory-mapped file. Parsing the header reads the whole vocabulary (~3 s for
    SmolLM2's 49k tokens) and a replica's start reads the config, the weights, the fingerprint and
    the tokenizer from it, so the last readers are kept, keyed by the file's identity (a rewritten
    file is parsed again)."""
    st = path.stat()
    return _open_gguf(path.resolve(), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: Path, mtime_ns: int, size: int) -> GGUFReader:
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise ModelLoadError(f"cannot read {path} as GGUF: {e} (is the file truncated or corrupt?)") from e
    if reader.byte_order != "I":
        raise ModelLoadError(f"{path} is a GGUF of the other byte order (big-endian): convert it with gguf's "
                             f"gguf_convert_endian script")
    return reader


def _meta(reader: GGUFReader, key: str) -> Any:
    """A metadata value as Python data (a list for arrays), or None when the file lacks the key."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def hf_config(reader: GGUFReader, path: Path) -> dict[str, Any]:
    """The file's metadata as the keys of a Hugging Face `config.json` that `ModelConfig.from_hf_dict` reads."""
    arch = _meta(reader, Keys.General.ARCHITECTURE)
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} in {path}; supported: {', '.join(ARCHITECTURES)}")
    tensor_names = {t.name for t in reader.tensors}
    if _ROPE_FREQS in tensor_names:
        raise ModelLoadError(f"{path} carries {_ROPE_FREQS} (Llama 3 RoPE scaling as GGUF stores it), which is "
                             f"not supported from GGUF: load the model's Hugging Face checkpoint instead")

    def key(template: str) -> str:
        return template.format(arch=arch)

    d: dict[str, Any] = {"architectures": [ARCHITECTURES[arch]], "model_type": arch}
    for hf_key, gguf_key in _HPARAMS.items():
        value = _meta(reader, key(gguf_key))
        if value is not None:
            d[hf_key] = value
        elif hf_key in _REQUIRED:
            raise ModelLoadError(f"{path} lacks GGUF metadata {key(gguf_key)} (the model's {hf_key})")
    d["head_dim"] = _head_dim(reader, key, path)
    d["vocab_size"] = _meta(reader, key(Keys.LLM.VOCAB_SIZE))
    if d["vocab_size"] is None:
        tokens = reader.get_field(Keys.Tokenizer.LIST)
        if tokens is None:
            raise ModelLoadError(f"{path} has neither {key(Keys.LLM.VOCAB_SIZE)} nor {Keys.Tokenizer.LIST}: "
                                 f"its vocabulary size is unknown")
        d["vocab_size"] = len(tokens.data)
    d["tie_word_embeddings"] = OUTPUT_TENSOR not in tensor_names
    d.update(_rope_scaling(reader, key, path))
    d["bos_token_id"] = _meta(reader, Keys.Tokenizer.BOS_ID)
    eos = (_meta(reader, Keys.Tokenizer.EOS_ID), _meta(reader, Keys.Tokenizer.EOT_ID))  # end of text, of turn
    d["eos_token_id"] = list(dict.fromkeys(i for i in eos if i is not None))
    return d


def _head_dim(reader: GGUFReader, key: Callable[[str], str], path: Path) -> int | None:
    """The attention head size: `attention.key_length` (written when it is not hidden / heads) or else
    `rope.dimension_count`; None lets `from_hf_dict` take hidden / heads. Rotating fewer dimensions
    than a head has (partial RoPE) is not something the Llama family does, so it is refused."""
    k, v, rope = (_meta(reader, key(t)) for t in
                  (Keys.Attention.KEY_LENGTH, Keys.Attention.VALUE_LENGTH, Keys.Rope.DIMENSION_COUNT))
    if k is not None and v is not None and k != v:
        raise ModelLoadError(f"{path}: key_length {k} != value_length {v}; only equal key and value head sizes "
                             f"are supported")
    if k is not None and rope is not None and k != rope:
        raise ModelLoadError(f"{path}: rope.dimension_count {rope} != key_length {k} (partial RoPE) is not supported")
    return k if k is not None else rope


def _rope_scaling(reader: GGUFReader, key: Callable[[str], str], path: Path) -> dict[str, Any]:
    """`rope_scaling` for the config dict: linear scaling, or nothing; any other type is refused."""
    rope_type = _meta(reader, key(Keys.Rope.SCALING_TYPE))
    factor = _meta(reader, key(Keys.Rope.SCALING_FACTOR))
    if rope_type is None and (old := _meta(reader, key(_OLD_SCALE_LINEAR))) not in (None, 1.0):
        rope_type, factor = "linear", old
    if rope_type in (None, "none"):
        return {}
    if rope_type != "linear":
        raise ModelLoadError(f"unsupported GGUF RoPE scaling {key(Keys.Rope.SCALING_TYPE)}={rope_type!r} in {path}; "
                             f"supported: none, linear")
    if factor is None:
        raise ModelLoadError(f"{path} has linear RoPE scaling but no {key(Keys.Rope.SCALING_FACTOR)}")
    return {"rope_scaling": {"rope_type": "linear", "factor": factor}}


def read_tensors(reader: GGUFReader, path: Path, cfg: ModelConfig,
                 expected: list[tuple[str, str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """Every tensor of `expected` ((Hugging Face name, GGUF name, shape [out, in])) as float32 under its
    Hugging Face name. Names, shapes and types are all checked before anything is dequantized."""
    in_file = {t.name: t for t in reader.tensors}
    wanted = {gguf_name for _, gguf_name, _ in expected}
    missing = [(g, s) for _, g, s in expected if g not in in_file]
    if missing:
        raise ModelLoadError(f"{path} is missing tensor {missing[0][0]} (expected shape {missing[0][1][::-1]} in "
                             f"GGUF order)" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    unused = sorted(set(in_file) - wanted)
    if unused:
        more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
        raise ModelLoadError(f"{path} holds tensor {unused[0]}{more} that a {cfg.architecture} of this config "
                             f"does not have; refusing rather than ignoring it")
    for _, name, shape in expected:
        t = in_file[name]
        got = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        if got != shape:
            raise ModelLoadError(f"tensor {name} in {path} has shape {got[::-1]} (GGUF order) but the metadata "
                                 f"implies {shape[::-1]}")
        if t.tensor_type not in TENSOR_TYPES:
            raise ModelLoadError(f"tensor {name} in {path} has type {t.tensor_type.name}, which is not supported; "
                                 f"supported: {', '.join(q.name for q in TENSOR_TYPES)}")
    permuted = _permuted_heads(cfg) if cfg.architecture == ARCHITECTURES["llama"] else {}
    out: dict[str, np.ndarray] = {}
    for hf_name, name, _ in expected:
        t = in_file[name]
        a = dequantize(t.data, t.tensor_type)  # [out, in], float32
        if t.tensor_type == GGMLQuantizationType.F32:
            a = a.copy()  # a view of the memory-mapped file: no weight keeps the file mapped
        heads = permuted.get(name.split(".", 2)[-1])
        out[hf_name] = a if heads is None else _unpermute_rows(a, heads)
    return out


def _permuted_heads(cfg: ModelConfig) -> dict[str, int]:
    """GGUF name under `blk.{i}.` -> head count, of the weights llama.cpp permutes for `llama`."""
    return {f"{PROJECTIONS['q_proj'].gguf}.weight": cfg.num_heads,
            f"{PROJECTIONS['k_proj'].gguf}.weight": cfg.num_kv_heads}


def _unpermute_rows(w_OxI: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of llama.cpp's `permute` (convert_hf_to_gguf.py), which stores row `s*H/2 + j` of
    each head (s in {0, 1}: the half of the head, j < H/2) as row `2j + s`: back to halves."""
    rows, d_in = w_OxI.shape
    return w_OxI.reshape(heads, rows // heads // 2, 2, d_in).swapaxes(1, 2).reshape(rows, d_in)


def fingerprint(reader: GGUFReader) -> str:
    """A short identity of a GGUF: the hash of its header (the metadata, tensor names, types and
    offsets) and of the first 4 MiB of its tensor data, like `hf_checkpoint.model_fingerprint` of a folder."""
    start = reader.data_offset
    h = hashlib.sha256(reader.data[:start])
    h.update(reader.data[start: start + _FINGERPRINT_DATA_BYTES])
    return h.hexdigest()[:16]
