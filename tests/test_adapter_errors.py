"""Adapters that cannot be served are refused with a message that says what to change."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxlora.adapter_format import read_adapter, write_peft
from jaxlora.tiny_model import random_adapter
from jaxlora.config import ModelConfig
from jaxlora.errors import AdapterFormatError
from tests.hf_models import TINY_CONFIGS


@pytest.fixture(scope="module")
def cfg(tiny_checkpoints):
    return ModelConfig.from_dir(tiny_checkpoints["llama_gqa"])


@pytest.fixture
def adapter_dir(tmp_path, cfg):
    d = tmp_path / "ad"
    write_peft(random_adapter(cfg, r=4, alpha=8, modules=("q_proj", "v_proj")), d)
    return d


def _edit_config(d, **changes):
    c = json.loads((d / "adapter_config.json").read_text())
    c.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(c))


def test_valid_adapter_reads(adapter_dir, cfg):
    assert read_adapter(adapter_dir, cfg, max_rank=4).target_modules == ("q_proj", "v_proj")


def test_rank_above_max(adapter_dir, cfg):
    with pytest.raises(AdapterFormatError, match="rank r=4 is above this server's max_lora_rank=2; retrain with r <= 2"):
        read_adapter(adapter_dir, cfg, max_rank=2)


def test_target_module_the_model_lacks(adapter_dir, cfg):
    t = load_file(adapter_dir / "adapter_model.safetensors")
    t["base_model.model.model.layers.0.self_attn.c_attn.lora_A.weight"] = np.zeros((4, 64), np.float32)
    t["base_model.model.model.layers.0.self_attn.c_attn.lora_B.weight"] = np.zeros((64, 4), np.float32)
    save_file(t, adapter_dir / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="model.layers.0.self_attn.c_attn', which this model lacks"):
        read_adapter(adapter_dir, cfg, max_rank=8)


def test_lm_head_lora_is_refused(adapter_dir, cfg):
    t = load_file(adapter_dir / "adapter_model.safetensors")
    t["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 64), np.float32)
    save_file(t, adapter_dir / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="'base_model.model.lm_head', which this model lacks"):
        read_adapter(adapter_dir, cfg, max_rank=8)


@pytest.mark.parametrize("change,message", [
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] is not supported; train without fully fine-tuned modules"),
    ({"use_dora": True}, r"DoRA \(use_dora=true\) is not supported"),
    ({"peft_type": "IA3"}, r"peft_type 'IA3' is not supported; only LORA"),
    ({"bias": "all"}, r"training biases .* is not supported; train with bias='none'"),
    ({"rank_pattern": {"q_proj": 2}}, r"rank_pattern / alpha_pattern is not supported"),
    ({"r": 0}, r"needs a positive number 'r'"),
])
def test_unsupported_peft_features(adapter_dir, cfg, change, message):
    _edit_config(adapter_dir, **change)
    with pytest.raises(AdapterFormatError, match=message):
        read_adapter(adapter_dir, cfg, max_rank=8)


def test_adapter_for_another_base_model(tmp_path, cfg):
    other = ModelConfig.from_hf_dict(TINY_CONFIGS["qwen2_bias"]().to_dict() | {"architectures": ["Qwen2ForCausalLM"]})
    write_peft(random_adapter(other, r=2, alpha=2, modules=("q_proj",)), tmp_path / "other")
    with pytest.raises(AdapterFormatError, match=r"model.layers.0.self_attn.q_proj has A \(2, 64\) / B \(96, 2\).*needs A \(2, 64\) / B \(64, 2\); the adapter was trained for another base model"):
        read_adapter(tmp_path / "other", cfg, max_rank=8)


def test_truncated_weights(adapter_dir, cfg):
    p = adapter_dir / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(AdapterFormatError, match="cannot read adapter_model.safetensors.*truncated or corrupt"):
        read_adapter(adapter_dir, cfg, max_rank=8)


def test_corrupt_config(adapter_dir, cfg):
    (adapter_dir / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="adapter_config.json is not valid JSON"):
        read_adapter(adapter_dir, cfg, max_rank=8)


def test_nan_weights(adapter_dir, cfg):
    t = load_file(adapter_dir / "adapter_model.safetensors")
    t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = np.nan
    save_file(t, adapter_dir / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="model.layers.1.self_attn.v_proj holds NaN"):
        read_adapter(adapter_dir, cfg, max_rank=8)


def test_pickle_is_never_loaded(adapter_dir, cfg):
    (adapter_dir / "adapter_model.safetensors").unlink()
    (adapter_dir / "adapter_model.bin").write_bytes(b"\x80\x04 not really a pickle, and never opened")
    with pytest.raises(AdapterFormatError, match=r"only pickled weights \(adapter_model.bin\), which are never loaded; convert them to safetensors"):
        read_adapter(adapter_dir, cfg, max_rank=8)


def test_empty_directory(tmp_path, cfg):
    with pytest.raises(AdapterFormatError, match="no adapter_config.json"):
        read_adapter(tmp_path, cfg, max_rank=8)


def test_legacy_matrix_of_wrong_shape(tmp_path, cfg):
    (tmp_path / "params.json").write_text(json.dumps({"model.layers.0.self_attn.q_proj.A": [[1.0, 2.0]] * 3,
                                                      "model.layers.0.self_attn.q_proj.B": [[0.0] * 64] * 2}))
    with pytest.raises(AdapterFormatError, match="q_proj has A .* but this model .* needs"):
        read_adapter(tmp_path, cfg, max_rank=8)


def test_target_modules_config_naming_missing_modules(adapter_dir, cfg):
    _edit_config(adapter_dir, target_modules=["q_proj", "query_key_value"])
    with pytest.raises(AdapterFormatError, match=r"target_modules \['query_key_value'\] are not in this model; LoRA is supported on q_proj"):
        read_adapter(adapter_dir, cfg, max_rank=8)
