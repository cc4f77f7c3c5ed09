"""The demo model (deterministic, loadable by transformers and by us) and the tokenizer helpers."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
import torch

from jaxlora.hf_checkpoint import load_params
from jaxlora.tiny_model import build_tiny_model
from jaxlora.errors import ModelLoadError
from jaxlora.model import forward
from jaxlora.tokenizer import IncrementalDetokenizer, load_tokenizer, render_chat
from tests.hf_models import load_reference

# Characters the demo corpus never shows, so byte-level BPE spells them as single bytes.
MULTILINGUAL = "Le café ж 😀 serves 한국어 and Ω ≠ ✓ résumés."


def test_two_demo_builds_are_byte_identical(tmp_path, demo_model_dir):
    again = build_tiny_model(tmp_path / "again")
    names = sorted(p.name for p in demo_model_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    _, mismatch, errors = filecmp.cmpfiles(demo_model_dir, again, names, shallow=False)
    assert (mismatch, errors) == ([], [])  # cmpfiles puts each name in one of the three lists


def test_demo_model_loads_in_transformers_and_matches(demo_model_dir):
    from transformers import AutoTokenizer

    params, cfg = load_params(demo_model_dir)
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size) == ("LlamaForCausalLM", 4, 256)
    hf_tok = AutoTokenizer.from_pretrained(demo_model_dir, local_files_only=True)
    ids = hf_tok("What does the adapter do?")["input_ids"]
    assert ids == load_tokenizer(demo_model_dir)("What does the adapter do?")["input_ids"]
    with torch.no_grad():
        expected = load_reference(demo_model_dir)(torch.tensor([ids])).logits[0].numpy()
    got, _ = forward(params, np.array([ids]), np.arange(len(ids))[None], cfg)
    assert np.abs(np.asarray(got[0]) - expected).max() <= 1e-4


def test_chat_template_renders_with_generation_prompt(demo_model_dir):
    tok = load_tokenizer(demo_model_dir)
    text = render_chat(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|bos|><|start|>system\nBe brief.<|end|>\n<|start|>user\nHi<|end|>\n<|start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<|start|>") in ids


def test_chat_without_template_uses_role_lines(demo_model_dir):
    tok = load_tokenizer(demo_model_dir)
    tok.chat_template = None
    text = render_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert text == "user: Hi\nassistant: Hello\nassistant:"


def test_tokenizer_dir_without_tokenizer_files(tmp_path):
    with pytest.raises(ModelLoadError, match="missing file .*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_incremental_detokenizer_never_splits_a_character(demo_model_dir):
    tok = load_tokenizer(demo_model_dir)
    ids = tok(MULTILINGUAL, add_special_tokens=False)["input_ids"]
    # Byte-level BPE splits some of these characters over several tokens, each undecodable alone.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    tail = detok.flush()
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + tail == tok.decode(ids) == MULTILINGUAL
    assert tail == ""


def test_incremental_detokenizer_holds_back_then_flushes_a_partial_character(demo_model_dir):
    tok = load_tokenizer(demo_model_dir)
    ids = tok("ok 😀", add_special_tokens=False)["input_ids"]
    partial = next(k for k in range(1, len(ids) + 1) if tok.decode(ids[:k]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.add(i) for i in ids[:partial])
    assert text == "ok"  # the token holding " " and the emoji's first byte is held back
    tail = detok.flush()  # the stream ended mid-character: say so at the very end
    assert tail.endswith("\ufffd") and text + tail == tok.decode(ids[:partial])
