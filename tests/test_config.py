"""Configuration read at the edges: `ModelConfig` from hand-written config.json files of real model
families (each derived size worked out by hand, and the same config after transformers rewrote it),
`EngineConfig`'s bounds each named in its refusal, and the Serve app's `AppArgs`: refused and moved
names, and the deployment options it owns, checked one by one. Errors met through a checkpoint
(an unknown architecture, a yarn RoPE) are in test_checkpoint_errors.py; the shipped YAML and its
deploy are in test_serve_config.py."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from pydantic import ValidationError

from jaxlora.config import ModelConfig, RopeScaling
from jaxlora.engine import EngineConfig
from jaxlora.errors import ModelLoadError
from serve_app.config import _MOVED, OWNED_OPTIONS, AppArgs, deployment_options, option_mismatches

# Hand-written config.json files, in the layout of the hub repositories (transformers 4: `rope_theta`
# beside `rope_scaling`), trimmed to the fields a config reader looks at.
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}
QWEN2_5_0_5B = {
    "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_act": "silu",
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
    "sliding_window": 32768, "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643,
}
MISTRAL_7B_V0_1 = {
    "architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
    "sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2,
}
# Mistral NeMo: head_dim is given and is not hidden_size / num_attention_heads (5120 / 32 = 160).
MISTRAL_NEMO = {**MISTRAL_7B_V0_1, "vocab_size": 131072, "hidden_size": 5120, "num_hidden_layers": 40,
                "head_dim": 128, "rope_theta": 1000000.0, "max_position_embeddings": 1024000, "sliding_window": None}


def _read(tmp_path, d: dict) -> ModelConfig:
    (tmp_path / "config.json").write_text(json.dumps(d))
    return ModelConfig.from_dir(tmp_path)


EXPECTED = {
    "llama_3_1_8b": (LLAMA_3_1_8B, ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
        tie_word_embeddings=False, attention_bias=False, o_bias=False, mlp_bias=False, sliding_window=None,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009))),
    # Qwen2 always has q/k/v biases and never an o_proj bias; its sliding_window is off unless
    # use_sliding_window, which is refused.
    "qwen2_5_0_5b": (QWEN2_5_0_5B, ModelConfig(
        architecture="Qwen2ForCausalLM", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=RopeScaling(),
        max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True, o_bias=False, mlp_bias=False,
        sliding_window=None, bos_token_id=151643, eos_token_ids=(151643,))),
    "mistral_7b": (MISTRAL_7B_V0_1, ModelConfig(
        architecture="MistralForCausalLM", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=RopeScaling(),
        max_position_embeddings=32768, tie_word_embeddings=False, attention_bias=False, o_bias=False, mlp_bias=False,
        sliding_window=4096, bos_token_id=1, eos_token_ids=(2,))),
    "mistral_nemo": (MISTRAL_NEMO, ModelConfig(
        architecture="MistralForCausalLM", vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_layers=40,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0, rope_scaling=RopeScaling(),
        max_position_embeddings=1024000, tie_word_embeddings=False, attention_bias=False, o_bias=False, mlp_bias=False,
        sliding_window=None, bos_token_id=1, eos_token_ids=(2,))),
}
SIZES = {"llama_3_1_8b": (4096, 1024), "qwen2_5_0_5b": (896, 128), "mistral_7b": (4096, 1024),
         "mistral_nemo": (4096, 1024)}  # (q_size, kv_size) = heads * head_dim, kv heads * head_dim


@pytest.mark.parametrize("name", EXPECTED)
def test_config_json_of_each_family_reads_field_for_field(tmp_path, name):
    d, expected = EXPECTED[name]
    cfg = _read(tmp_path, d)
    assert cfg == expected
    assert (cfg.q_size, cfg.kv_size) == SIZES[name]
    assert hash(cfg) == hash(expected)  # a static argument of jax.jit: eos ids are a tuple, not the file's list


@pytest.mark.parametrize("name", EXPECTED)
def test_the_same_config_after_transformers_rewrote_it_reads_the_same(name):
    """transformers 5 re-saves rope_theta and rope_scaling as rope_parameters, adds head_dim and
    clears a Qwen2 sliding_window that is not used: a checkpoint it saved must read the same."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    d, expected = EXPECTED[name]
    hf_class = {"LlamaForCausalLM": LlamaConfig, "Qwen2ForCausalLM": Qwen2Config, "MistralForCausalLM": MistralConfig}
    rewritten = hf_class[d["architectures"][0]](**d).to_dict()
    assert "rope_parameters" in rewritten and "rope_scaling" not in rewritten  # the other layout indeed
    assert ModelConfig.from_hf_dict(rewritten) == expected


def test_missing_optional_fields_take_the_documented_defaults():
    d = {k: v for k, v in LLAMA_3_1_8B.items() if k not in {
        "num_key_value_heads", "rope_theta", "rope_scaling", "rms_norm_eps", "max_position_embeddings",
        "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "hidden_act"}}
    cfg = ModelConfig.from_hf_dict(d)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.kv_size) == (32, 128, 4096)  # no num_key_value_heads: one per head
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rms_norm_eps, cfg.max_position_embeddings) == (
        10000.0, RopeScaling(), 1e-6, 2048)
    assert (cfg.tie_word_embeddings, cfg.attention_bias, cfg.o_bias, cfg.bos_token_id, cfg.eos_token_ids) == (
        False, False, False, None, ())
    assert ModelConfig.from_hf_dict({**d, "num_key_value_heads": None, "head_dim": None}) == cfg


def test_llama_attention_bias_covers_o_proj_and_mlp_bias_is_read():
    cfg = ModelConfig.from_hf_dict({**LLAMA_3_1_8B, "attention_bias": True, "mlp_bias": True})
    assert (cfg.attention_bias, cfg.o_bias, cfg.mlp_bias) == (True, True, True)
    assert ModelConfig.from_hf_dict({**LLAMA_3_1_8B, "sliding_window": 512}).sliding_window is None  # Mistral only


def test_the_first_supported_architecture_is_taken():
    d = {**LLAMA_3_1_8B, "architectures": ["LlamaForSequenceClassification", "LlamaForCausalLM"]}
    assert ModelConfig.from_hf_dict(d).architecture == "LlamaForCausalLM"


@pytest.mark.parametrize("rope,expected", [
    ({"rope_scaling": {"type": "linear", "factor": 4.0}}, RopeScaling("linear", 4.0)),  # transformers < 4.45 spelling
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, RopeScaling("linear", 4.0)),
    ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}}, RopeScaling("linear", 4.0)),
    ({"rope_scaling": None}, RopeScaling()),
    ({"rope_scaling": {"rope_type": "default"}}, RopeScaling()),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 2.0,
                          "high_freq_factor": 8.0, "original_max_position_embeddings": 4096}},
     RopeScaling("llama3", 32.0, 2.0, 8.0, 4096)),
], ids=["linear_type", "linear_rope_type", "linear_rope_parameters", "null", "default", "llama3_rope_parameters"])
def test_rope_scaling_in_either_layout(rope, expected):
    d = {k: v for k, v in LLAMA_3_1_8B.items() if k not in ("rope_scaling", "rope_theta")}
    cfg = ModelConfig.from_hf_dict({**d, "rope_theta": 500000.0, **rope})
    assert (cfg.rope_theta, cfg.rope_scaling) == (500000.0, expected)


def test_rope_theta_is_read_from_rope_parameters():
    d = {k: v for k, v in QWEN2_5_0_5B.items() if k != "rope_theta"}
    assert ModelConfig.from_hf_dict({**d, "rope_parameters": {"rope_type": "default", "rope_theta": 2e6}}).rope_theta == 2e6


@pytest.mark.parametrize("change,message", [
    ({"architectures": []}, r"unsupported architecture \(none given\) in config.json; "
                            r"supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
    ({"architectures": None}, r"unsupported architecture \(none given\)"),
    ({"hidden_act": "gelu"}, r"unsupported hidden_act 'gelu'; only 'silu' \(SwiGLU\) is supported"),
    ({"num_key_value_heads": 3}, r"num_attention_heads=32 is not a multiple of num_key_value_heads=3"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}},
     r"unsupported rope_scaling type 'dynamic'; supported: default, linear, llama3"),
])
def test_what_the_forward_cannot_run_is_refused_naming_it(change, message):
    with pytest.raises(ModelLoadError, match=message):
        ModelConfig.from_hf_dict({**LLAMA_3_1_8B, **change})


def test_qwen2_sliding_window_is_refused_with_the_fix():
    with pytest.raises(ModelLoadError, match="Qwen2 use_sliding_window=true is not supported; set it to false"):
        ModelConfig.from_hf_dict({**QWEN2_5_0_5B, "use_sliding_window": True})


def test_a_config_json_that_is_not_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(ModelLoadError, match=r"config\.json is not valid JSON"):
        ModelConfig.from_dir(tmp_path)


# (field, the lowest value accepted, a value just past the bound): every bound of __post_init__.
ENGINE_BOUNDS = [
    ("max_batch_size", 1, 0), ("decode_steps", 1, 0), ("prefill_batch", 1, 0), ("max_lora_rank", 1, 0),
    ("host_adapter_cache", 1, 0), ("max_queue", 0, -1), ("max_seq_len", 8, 7), ("num_adapter_slots", 2, 1),
    ("prefill_chunk", 1, 0), ("prefill_tokens_per_turn", 1, 0), ("prefix_cache_bytes", 0, -1), ("dtype", "bfloat16", "float16"),
    ("scheduling", "fifo", "lottery"), ("completion_token_weight", 1e-6, 0.0),
    ("max_queued_per_tenant", 1, 0), ("max_rows_per_tenant", 1, 0), ("max_preemptions", 0, -1),
]


@pytest.mark.parametrize("field,ok,bad", ENGINE_BOUNDS)
def test_each_engine_bound_is_exact_and_named_in_its_refusal(field, ok, bad):
    EngineConfig(**{field: ok})  # the bound itself is accepted
    with pytest.raises(ValueError, match=f"^{field} must be"):
        EngineConfig(**{field: bad})


def test_engine_bounds_cover_every_field_and_reach_the_app_args_error():
    assert {f for f, _, _ in ENGINE_BOUNDS} == {f.name for f in dataclasses.fields(EngineConfig)}
    with pytest.raises(ValidationError, match="max_batch_size must be >= 1, got 0"):
        AppArgs(engine={"max_batch_size": 0})


@pytest.mark.parametrize("chunk,max_seq_len,expected", [
    (16, 100, (16, 32, 64, 100)),  # the chunk times powers of two below max_seq_len, then max_seq_len
    (16, 64, (16, 32, 64)),
    (64, 64, (64,)),  # one shot
    (48, 512, (48, 96, 192, 384, 512)),
])
def test_engine_windows(chunk, max_seq_len, expected):
    config = EngineConfig(prefill_chunk=chunk, max_seq_len=max_seq_len)
    assert config.windows == expected
    # a chunk's window holds the chunk, and is a function of where the chunk starts
    for start in range(0, max_seq_len, chunk):
        assert config.window(start) == min(w for w in expected if w >= min(start + chunk, max_seq_len))


def test_a_chunk_past_the_context_is_one_shot():
    assert EngineConfig(prefill_chunk=128, max_seq_len=64) == EngineConfig(prefill_chunk=64, max_seq_len=64)
    assert EngineConfig(prefill_chunk=128, max_seq_len=64).windows == (64,)


def test_unknown_app_args_are_refused_naming_them():
    with pytest.raises(ValidationError, match="model_dri"):
        AppArgs(model_dri="/models/x")


# Each former or mistaken name and the fields its refusal must point to.
MOVED = {
    "num_replicas": ["ingress_replicas", "tokenizer_replicas", "model_replicas"],
    "num_gpus": ["model_num_gpus"],
    "num_cpus": ["model_num_cpus"],
    "runtime_env": ["model_runtime_env"],
    "max_queued_requests": ["model_max_queued_requests"],
    "max_ongoing_requests": ["engine.max_batch_size", "engine.max_queue"],
    "deployments": [],  # not a field: it belongs beside args
}


def _is_field(path: str) -> bool:
    """An `AppArgs` field, or `engine.<EngineConfig field>`."""
    head, _, rest = path.partition(".")
    if head not in AppArgs.model_fields:
        return False
    return head != "engine" or rest in {f.name for f in dataclasses.fields(EngineConfig)}


@pytest.mark.parametrize("name", MOVED)
def test_moved_names_are_refused_pointing_at_existing_fields(name):
    assert set(MOVED) == set(_MOVED), "a new moved name: add it to MOVED"
    with pytest.raises(ValidationError, match=f"args has no field '{name}': set .* instead") as e:
        AppArgs(**{name: 1})
    for target in MOVED[name]:
        assert target in str(e.value) and _is_field(target), target


def test_every_owned_option_is_set_by_an_existing_field():
    for _, _, where in OWNED_OPTIONS:
        paths = re.findall(r"args\.([\w.]+)", where)
        assert paths, where
        for path in paths:
            assert _is_field(path.removesuffix(".env_vars")), where


# A hand-made case: every owned value differs from its default and from the others.
HAND_MADE = dict(ingress_replicas=2, tokenizer_replicas=3, model_replicas=4, model_num_cpus=1.5, model_num_gpus=1,
                 model_max_queued_requests=9, model_runtime_env={"env_vars": {"XLA_FLAGS": "--x"}},
                 model_router="power_of_two", engine={"max_batch_size": 5, "max_queue": 7})
SERVE_DEFAULT_ROUTER = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"
RUNNING = {  # what the replicas of HAND_MADE see, by OWNED_OPTIONS path
    "Ingress": {"num_replicas": 2},
    "Tokenizer": {"num_replicas": 3},
    "LoRAModel": {"num_replicas": 4, "max_ongoing_requests": 12, "max_queued_requests": 9,
                  "ray_actor_options.num_cpus": 1.5, "ray_actor_options.num_gpus": 1,
                  "ray_actor_options.runtime_env.env_vars": {"XLA_FLAGS": "--x"},
                  "request_router_config.request_router_class": SERVE_DEFAULT_ROUTER},
}


def test_deployment_options_of_a_hand_made_case():
    assert deployment_options(AppArgs(**HAND_MADE)) == {
        "Ingress": {"num_replicas": 2},
        "Tokenizer": {"num_replicas": 3},
        "LoRAModel": {"num_replicas": 4, "max_ongoing_requests": 5 + 7, "max_queued_requests": 9,
                      "ray_actor_options": {"num_cpus": 1.5, "num_gpus": 1, "runtime_env": {"env_vars": {"XLA_FLAGS": "--x"}}},
                      "request_router_config": {"request_router_class": SERVE_DEFAULT_ROUTER}},
    }
    assert {(d, o) for d, options in RUNNING.items() for o in options} == {(d, o) for d, o, _ in OWNED_OPTIONS}


@pytest.mark.parametrize("deployment,option,where", OWNED_OPTIONS, ids=[f"{d}.{o}" for d, o, _ in OWNED_OPTIONS])
def test_each_owned_option_changed_alone_is_the_one_mismatch(deployment, option, where):
    a = AppArgs(**HAND_MADE)
    assert option_mismatches(deployment, a, RUNNING[deployment]) == []
    have = RUNNING[deployment][option]
    changed = {"XLA_FLAGS": "--y"} if isinstance(have, dict) else "serve_app.routing:AdapterHomeRouter" \
        if isinstance(have, str) else have + 1
    problems = option_mismatches(deployment, a, {**RUNNING[deployment], option: changed})
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{deployment}.{option} is {changed!r} but args ask for ") and where in problems[0]


def test_no_gpus_asked_matches_a_replica_that_reports_none():
    assert option_mismatches("LoRAModel", AppArgs(), {"ray_actor_options.num_gpus": None}) == []
    assert option_mismatches("LoRAModel", AppArgs(model_num_gpus=1), {"ray_actor_options.num_gpus": None}) != []


@pytest.mark.parametrize("cpus,gpus,threads", [(1, 0, 1), (2, 0, 2), (1.5, 0, 1), (0.25, 0, 1), (0, 0, None), (4, 1, None)])
def test_a_replica_on_cpu_computes_on_as_many_threads_as_cpus_it_reserves(cpus, gpus, threads):
    assert AppArgs(model_num_cpus=cpus, model_num_gpus=gpus).engine_compute_threads == threads


def test_auth_needs_an_existing_keys_file(tmp_path):
    with pytest.raises(ValidationError, match=r"auth=true needs api_keys_file \(create one with: python -m serve_app.keys"):
        AppArgs(auth=True)
    with pytest.raises(ValidationError, match="api_keys_file .*missing.json does not exist"):
        AppArgs(auth=True, api_keys_file=str(tmp_path / "missing.json"))
    (tmp_path / "keys.json").write_text("{}")
    AppArgs(auth=True, api_keys_file=str(tmp_path / "keys.json"))  # accepted
