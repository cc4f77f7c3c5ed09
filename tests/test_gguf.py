"""GGUF checkpoints: the real SmolLM2 file against transformers' own GGUF loading, and small GGUFs
written here (every supported tensor type, llama's q/k row order, qwen2's biases, what is refused).

The small files are written the way llama.cpp's converter writes them: names from the `gguf`
package's own Hugging Face -> GGUF table (`gguf.get_tensor_name_map`, not the loader's), q and k
permuted for `llama` as `convert_hf_to_gguf.py` does, 1-D tensors in F32.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM, LlamaConfig

from jaxlora.config import ModelConfig
from jaxlora.errors import ModelLoadError
from jaxlora.hf_checkpoint import load_params, model_fingerprint
from jaxlora.model import Params, forward
from tests.hf_models import LOGIT_TOL, hf_logits, make_random, make_tiny, random_prompts

# --- writing GGUFs --------------------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """`LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py, on rows (of floats or of quantized blocks)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """`w` [out, in] stored as `qtype`: gguf's quantizer where it has one. It has none for the
    K-quants: those get random blocks whose every byte is < 0x20, so every f16 scale in them is
    finite and small; what is tested is where the loader puts the values, not how they are made."""
    try:
        return gguf.quants.quantize(w, qtype)
    except NotImplementedError:
        shape = gguf.quants.quant_shape_to_byte_shape(w.shape, qtype)
        return rng.integers(0, 0x20, size=shape, dtype=np.uint8)


def hf_to_gguf(state: dict[str, np.ndarray], arch: str, n_layers: int, heads: tuple[int, int] | None,
               qtype: Q = Q.F32, seed: int = 0) -> tuple[dict[str, tuple[np.ndarray, Q]], dict[str, np.ndarray]]:
    """A Hugging Face state dict as GGUF tensors (name -> (data, type)), and the float32 values the
    loader must produce for each Hugging Face name: the dequantized data, in Hugging Face's row order.
    `heads` (query, kv) permutes q and k as llama.cpp does for `llama`. A quantized row is whole blocks,
    so permuting the rows of the data permutes the rows of its dequantized values."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    rng = np.random.default_rng(seed)
    tensors, expected = {}, {}
    for hf_name, w in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        t = qtype if w.ndim == 2 else Q.F32
        data = encode(np.ascontiguousarray(w, np.float32), t, rng)
        expected[hf_name] = gguf.quants.dequantize(data, t)
        if heads and name.endswith((".attn_q.weight", ".attn_k.weight")):
            data = llama_cpp_permute(data, heads[0] if ".attn_q." in name else heads[1])
        tensors[name] = (data, t)
    return tensors, expected


def hf_metadata(c: LlamaConfig) -> dict[str, int | float]:
    """The hyperparameters llama.cpp writes for a Llama-family config ({arch} is filled in by `write_gguf`)."""
    return {
        "{arch}.block_count": c.num_hidden_layers, "{arch}.context_length": c.max_position_embeddings,
        "{arch}.embedding_length": c.hidden_size, "{arch}.feed_forward_length": c.intermediate_size,
        "{arch}.attention.head_count": c.num_attention_heads, "{arch}.attention.head_count_kv": c.num_key_value_heads,
        "{arch}.rope.freq_base": float(c.rope_parameters["rope_theta"]),
        "{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "{arch}.vocab_size": c.vocab_size,
        "tokenizer.ggml.bos_token_id": c.bos_token_id, "tokenizer.ggml.eos_token_id": c.eos_token_id,
    }


def write_gguf(path: Path, arch: str, meta: dict, tensors: dict[str, tuple[np.ndarray, Q]]) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    for key, value in meta.items():
        key = key.format(arch=arch)
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


# --- reading Params back ----------------------------------------------------------------------------

_HF_PROJECTIONS = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                   "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
_HF_BIASES = {"bq": "self_attn.q_proj", "bk": "self_attn.k_proj", "bv": "self_attn.v_proj"}


def as_hf(params: Params) -> dict[str, np.ndarray]:
    """Loaded Params under Hugging Face's names and layout, spelled out here, apart from the loader's table."""
    out = {"model.embed_tokens.weight": params.embed, "model.norm.weight": params.final_norm}
    if params.lm_head is not None:
        out["lm_head.weight"] = params.lm_head.T
    for i, layer in enumerate(params.layers):
        out[f"model.layers.{i}.input_layernorm.weight"] = layer.attn_norm
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = layer.mlp_norm
        for field, name in _HF_PROJECTIONS.items():
            out[f"model.layers.{i}.{name}.weight"] = getattr(layer, field).T
        for field, name in _HF_BIASES.items():
            if getattr(layer, field) is not None:
                out[f"model.layers.{i}.{name}.bias"] = getattr(layer, field)
    return {k: np.asarray(v) for k, v in out.items()}


def our_logits(params: Params, cfg: ModelConfig, prompt: list[int]) -> np.ndarray:
    logits, _ = forward(params, np.array([prompt], np.int32), np.arange(len(prompt), dtype=np.int32)[None], cfg)
    return np.asarray(logits[0])


# --- the real file ------------------------------------------------------------------------------------

# Token ids of SmolLM2's tokenizer for real text: "The capital of France is", a Python snippet, and a
# chat turn in its template (<|im_start|> = 1, <|im_end|> = 2).
SMOLLM2_PROMPTS = [
    [504, 3575, 282, 4649, 314],
    [1604, 3987, 46477, 24, 94, 727, 472, 585, 304, 2067, 216, 34, 42, 448, 1003, 304],
    [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198],
]
# Max abs logit difference to transformers on the real model. The weights are bit-equal (the test
# below), so all of it is float32 rounding in different orders, which 30 layers (logits up to ~40)
# amplify past the tiny models' 1e-4: measured 1.7e-4 on these prompts. The floor is the model's,
# not ours: transformers' own float32 logits differ from its float64 ones by up to 7e-4 on random
# token prompts (ours from float64: up to 9.8e-4). 1e-3 still fails a 10% error in rms_norm_eps
# (1.0e-3 to 2.1e-3 on these prompts); any wrong weight, RoPE base or row order is >= 1.
REAL_LOGIT_TOL = 1e-3


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, smollm2_reference):
    """Our load and transformers' load of the real file, once each."""
    start = time.perf_counter()
    params, cfg = load_params(smollm2_gguf)
    print(f"load_params({Path(smollm2_gguf).name}): {time.perf_counter() - start:.1f} s")
    return params, cfg, smollm2_reference[0]


def test_smollm2_config_from_gguf_metadata(smollm2):
    _, cfg, _ = smollm2
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("LlamaForCausalLM", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert (cfg.rope_theta, cfg.tie_word_embeddings, cfg.bos_token_id, cfg.eos_token_ids) == (100000.0, True, 1, (2,))


def test_smollm2_weights_equal_transformers_dequantized(smollm2):
    """Every tensor (Q4_1, Q8_0, F32; q and k un-permuted) bit for bit as transformers loads it."""
    params, _, ref = smollm2
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
    np.testing.assert_array_equal(theirs.pop("lm_head.weight"), theirs["model.embed_tokens.weight"])  # tied
    ours = as_hf(params)
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_smollm2_logits_match_transformers(smollm2):
    params, cfg, ref = smollm2
    for prompt in SMOLLM2_PROMPTS:
        diff = np.abs(our_logits(params, cfg, prompt) - hf_logits(ref, prompt)).max()
        print(f"{len(prompt)} tokens: max abs logit difference {diff:.2e}")
        assert diff <= REAL_LOGIT_TOL


def test_the_exported_hugging_face_folder_loads_as_the_gguf(smollm2, smollm2_gguf, tmp_path):
    """`python -m jaxlora.gguf_export`: the folder loads here with the GGUF's weights bit for bit, and
    in transformers with the GGUF's config and the tokenizer built from its metadata (same ids, same
    chat prompt)."""
    from transformers import AutoConfig, AutoTokenizer

    from jaxlora.gguf_export import export_hf, main
    from jaxlora.tokenizer import load_tokenizer

    params, cfg, _ = smollm2
    out = tmp_path / "hf"
    main([str(smollm2_gguf), str(out)])
    assert load_params(out)[1] == cfg
    ours, exported = as_hf(params), as_hf(load_params(out)[0])
    assert ours.keys() == exported.keys()
    for name, value in ours.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    assert AutoConfig.from_pretrained(out).num_hidden_layers == cfg.num_layers
    theirs, gguf_tok = AutoTokenizer.from_pretrained(out), load_tokenizer(smollm2_gguf)
    text = "Prices: 1234.5 euros,   3 items; café 東京 🙂\n\tdef f(x):  return x**2 <|im_end|>"
    assert theirs(text)["input_ids"] == gguf_tok(text)["input_ids"]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert (theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == gguf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    with pytest.raises(ModelLoadError, match="exists"):
        export_hf(smollm2_gguf, out)


# --- small files: tensor types, row order, biases ----------------------------------------------------------


def test_llama_rows_of_q_and_k_are_put_back_as_transformers_does(tmp_path):
    """A random Llama written the way llama.cpp writes it: transformers' GGUF loader gives the Hugging
    Face model's logits (the writer is right), and so do we (the un-permutation is right)."""
    model = make_tiny("llama_gqa")
    c = model.config
    tensors, _ = hf_to_gguf(state_dict(model), "llama", c.num_hidden_layers, (c.num_attention_heads, c.num_key_value_heads))
    meta = {**hf_metadata(c), "{arch}.rope.dimension_count": c.head_dim}
    path = write_gguf(tmp_path / "tiny.gguf", "llama", meta, tensors)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    params, cfg = load_params(path)
    for prompt in random_prompts(cfg.vocab_size, [13, 4]):
        expected = hf_logits(ref, prompt)
        assert np.abs(hf_logits(model, prompt) - expected).max() <= LOGIT_TOL
        assert np.abs(our_logits(params, cfg, prompt) - expected).max() <= LOGIT_TOL


def test_qwen2_biases_and_head_dim_load_unpermuted(tmp_path):
    """Qwen2 (q/k/v biases, head_dim 24 from attention.key_length, not hidden / heads = 16) is
    converted without permutation; the Hugging Face model is the reference."""
    model = make_tiny("qwen2_bias")
    c = model.config
    tensors, _ = hf_to_gguf(state_dict(model), "qwen2", c.num_hidden_layers, heads=None)
    meta = {**hf_metadata(c), "{arch}.attention.key_length": c.head_dim, "{arch}.attention.value_length": c.head_dim}
    params, cfg = load_params(write_gguf(tmp_path / "qwen2.gguf", "qwen2", meta, tensors))
    assert (cfg.architecture, cfg.head_dim, cfg.attention_bias) == ("Qwen2ForCausalLM", 24, True)
    for prompt in random_prompts(cfg.vocab_size, [13, 4]):
        assert np.abs(our_logits(params, cfg, prompt) - hf_logits(model, prompt)).max() <= LOGIT_TOL


def _block_sized_llama(tie: bool) -> torch.nn.Module:
    """A one-layer Llama whose every matrix row is whole blocks of every type (256 for the K-quants)."""
    return make_random(LlamaConfig(vocab_size=40, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                   tie_word_embeddings=tie))


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_every_supported_type_loads_as_its_dequantized_data(tmp_path, qtype):
    model = _block_sized_llama(tie=qtype == "Q8_0")  # like the real file: a Q8_0 embedding that is also the head
    c = model.config
    state = state_dict(model)
    tensors, expected = hf_to_gguf(state, "llama", 1, (c.num_attention_heads, c.num_key_value_heads), Q[qtype])
    params, _ = load_params(write_gguf(tmp_path / f"{qtype}.gguf", "llama", hf_metadata(c), tensors))
    ours = as_hf(params)
    assert ours.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    if qtype == "F16":  # and the float weights, within F16 rounding
        w = state["model.layers.0.self_attn.q_proj.weight"]
        assert np.abs(ours["model.layers.0.self_attn.q_proj.weight"] - w).max() <= np.abs(w).max() * 2.0**-11


# --- paths, config metadata, fingerprint ----------------------------------------------------------------------


def _tiny_llama_gguf(path: Path, meta: dict | None = None, arch: str = "llama", qtypes: dict[str, Q] | None = None,
                     seed: int = 0, tensors: dict[str, np.ndarray | None] | None = None) -> Path:
    """The tiny Llama (hidden 64) as an F32 GGUF, with metadata overrides, per-tensor types and
    tensor overrides (None removes a key or a tensor)."""
    model = make_tiny("llama_gqa", seed=seed)
    c = model.config
    written, _ = hf_to_gguf(state_dict(model), "llama", c.num_hidden_layers, (c.num_attention_heads, c.num_key_value_heads))
    for name, qtype in (qtypes or {}).items():
        written[name] = (gguf.quants.quantize(gguf.quants.dequantize(*written[name]), qtype), qtype)
    for name, data in (tensors or {}).items():
        if data is None:
            del written[name]
        else:
            written[name] = (data, Q.F32)
    meta = {k: v for k, v in {**hf_metadata(c), **(meta or {})}.items() if v is not None}
    return write_gguf(path, arch, meta, written)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return _tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_a_folder_with_one_gguf_loads_as_the_file(tmp_path, tiny_gguf):
    shutil.copy(tiny_gguf, tmp_path / "m.gguf")
    a, cfg_a = load_params(tiny_gguf)
    b, cfg_b = load_params(tmp_path)
    assert cfg_a == cfg_b == ModelConfig.from_dir(tmp_path)
    np.testing.assert_array_equal(np.asarray(a.layers[1].wk), np.asarray(b.layers[1].wk))
    assert model_fingerprint(tmp_path) == model_fingerprint(tiny_gguf)


def test_a_folder_with_config_json_stays_a_hugging_face_folder(tmp_path, tiny_checkpoints, tiny_gguf):
    folder = shutil.copytree(tiny_checkpoints["qwen2_bias"], tmp_path / "hf")
    shutil.copy(tiny_gguf, folder / "stray.gguf")
    _, cfg = load_params(folder)
    assert cfg == ModelConfig.from_dir(folder) and cfg.architecture == "Qwen2ForCausalLM"


def test_a_folder_with_several_ggufs_is_refused_naming_them(tmp_path, tiny_gguf):
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(tiny_gguf, tmp_path / name)
    for call in (load_params, ModelConfig.from_dir, model_fingerprint):
        with pytest.raises(ModelLoadError, match=r"several GGUF files \(a\.gguf, b\.gguf\)"):
            call(tmp_path)


def test_fingerprint_follows_metadata_and_weights(tmp_path, tiny_gguf):
    same = _tiny_llama_gguf(tmp_path / "same.gguf")
    other_weights = _tiny_llama_gguf(tmp_path / "weights.gguf", seed=1)
    other_meta = _tiny_llama_gguf(tmp_path / "meta.gguf", meta={"{arch}.context_length": 512})
    assert model_fingerprint(same) == model_fingerprint(tiny_gguf)
    assert len({model_fingerprint(p) for p in (tiny_gguf, other_weights, other_meta)}) == 3


def test_end_of_turn_is_an_extra_eos_and_linear_rope_scaling_is_read(tmp_path):
    path = _tiny_llama_gguf(tmp_path / "m.gguf", meta={"tokenizer.ggml.eot_token_id": 7,
                                                       "{arch}.rope.scaling.type": "linear", "{arch}.rope.scaling.factor": 4.0})
    cfg = ModelConfig.from_dir(path)
    assert cfg.eos_token_ids == (2, 7)
    assert (cfg.rope_scaling.rope_type, cfg.rope_scaling.factor) == ("linear", 4.0)


def test_vocab_size_falls_back_to_the_token_list(tmp_path):
    tokens = [f"t{i}" for i in range(211)]
    path = _tiny_llama_gguf(tmp_path / "m.gguf", meta={"{arch}.vocab_size": None, "tokenizer.ggml.tokens": tokens})
    assert ModelConfig.from_dir(path).vocab_size == 211


# --- what is refused ----------------------------------------------------------------------------------------


def test_unsupported_tensor_type_is_refused_naming_tensor_and_type(tmp_path):
    path = _tiny_llama_gguf(tmp_path / "m.gguf", qtypes={"blk.1.ffn_down.weight": Q.Q5_0})
    with pytest.raises(ModelLoadError, match=r"tensor blk\.1\.ffn_down\.weight .* has type Q5_0, which is not supported; "
                                             r"supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K"):
        load_params(path)


def test_unsupported_architecture_is_refused_naming_it(tmp_path):
    path = _tiny_llama_gguf(tmp_path / "m.gguf", arch="phi3")
    with pytest.raises(ModelLoadError, match=r"unsupported GGUF architecture 'phi3' .*; supported: llama, qwen2"):
        ModelConfig.from_dir(path)


def test_unsupported_rope_scaling_is_refused(tmp_path):
    path = _tiny_llama_gguf(tmp_path / "m.gguf", meta={"{arch}.rope.scaling.type": "yarn", "{arch}.rope.scaling.factor": 4.0})
    with pytest.raises(ModelLoadError, match=r"unsupported GGUF RoPE scaling llama\.rope\.scaling\.type='yarn'.*supported: none, linear"):
        load_params(path)


def test_tensor_shape_is_checked_against_the_metadata(tmp_path):
    path = _tiny_llama_gguf(tmp_path / "m.gguf", meta={"{arch}.feed_forward_length": 64})
    with pytest.raises(ModelLoadError, match=r"tensor blk\.0\.ffn_gate\.weight .* has shape \(64, 96\) \(GGUF order\) "
                                             r"but the metadata implies \(64, 64\)"):
        load_params(path)


def test_missing_and_extra_tensors_are_named(tmp_path):
    missing = _tiny_llama_gguf(tmp_path / "missing.gguf", tensors={"blk.1.ffn_up.weight": None})
    with pytest.raises(ModelLoadError, match=r"missing tensor blk\.1\.ffn_up\.weight \(expected shape \(64, 96\) in GGUF order\)"):
        load_params(missing)
    # A Llama's q bias (attention_bias) is not in GGUF's llama metadata: refused, never silently dropped.
    extra = _tiny_llama_gguf(tmp_path / "extra.gguf", tensors={"blk.0.attn_q.bias": np.zeros(64, np.float32)})
    with pytest.raises(ModelLoadError, match=r"holds tensor blk\.0\.attn_q\.bias that a LlamaForCausalLM of this config does not have"):
        load_params(extra)


def test_llama3_rope_frequencies_are_refused(tmp_path):
    path = _tiny_llama_gguf(tmp_path / "m.gguf", tensors={"rope_freqs.weight": np.ones(4, np.float32)})
    with pytest.raises(ModelLoadError, match=r"carries rope_freqs\.weight \(Llama 3 RoPE scaling"):
        ModelConfig.from_dir(path)


def test_missing_metadata_is_named(tmp_path):
    path = _tiny_llama_gguf(tmp_path / "m.gguf", meta={"{arch}.block_count": None})
    with pytest.raises(ModelLoadError, match=r"lacks GGUF metadata llama\.block_count \(the model's num_hidden_layers\)"):
        ModelConfig.from_dir(path)


def test_a_file_that_is_not_gguf_is_refused(tmp_path, tiny_gguf):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:20])
    with pytest.raises(ModelLoadError, match="cannot read .*cut.gguf as GGUF"):
        load_params(truncated)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"is a file but not a \.gguf"):
        load_params(other)
