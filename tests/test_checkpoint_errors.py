"""Each way a model directory can be wrong gives an error that names the problem."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxlora.hf_checkpoint import load_params
from jaxlora.errors import ModelLoadError


@pytest.fixture
def ckpt(tmp_path, tiny_checkpoints):
    """A private copy of the tiny Llama checkpoint that a test may damage."""
    dst = tmp_path / "m"
    shutil.copytree(tiny_checkpoints["llama_gqa"], dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_params(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"missing file .*config\.json"):
        load_params(ckpt)


def test_missing_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"missing file .*model\.safetensors"):
        load_params(ckpt)


def test_pickle_only_checkpoint_is_refused_with_conversion_hint(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="never loaded: convert them with .*safe_serialization=True"):
        load_params(ckpt)


def test_missing_shard(tmp_path):
    from tests.hf_models import save_tiny

    d = save_tiny("llama_gqa", tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted(d.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=f"missing file .*{victim.name}, listed in model.safetensors.index.json"):
        load_params(d)


def test_unsupported_architecture_names_the_supported_ones(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_params(ckpt)
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert arch in msg


def test_unsupported_rope_scaling(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported rope_scaling type 'yarn'; supported: default, linear, llama3"):
        load_params(ckpt)


def test_missing_tensor_is_named(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \(96, 64\)\)"):
        load_params(ckpt)


def test_misshapen_tensor_names_both_shapes(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(8, 64\) but config\.json implies \(16, 64\)"):
        load_params(ckpt)


def test_truncated_weights_file(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_params(ckpt)
