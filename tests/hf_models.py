"""Tiny random-weight checkpoints made with `transformers` (PyTorch), the reference for parity tests.

Weights are drawn with a larger spread than Hugging Face's default init (and biases and norm
weights are made non-trivial) so that a wrong transpose, bias or norm shows up in the logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

# Max abs difference of float32 logits between two computations that sum the same products in
# different orders: JAX vs PyTorch (different kernels), or XLA at different shapes (its CPU matmul
# blocking depends on the number of rows). Each such sum differs by a few ulps, which at logits up
# to ~15 measured at most 3.4e-5 (AMD EPYC, also with XLA's codegen capped at AVX2 or at AVX without
# FMA, PyTorch's at AVX2 or baseline, MKL on its conservative path): 1e-4 holds on any x86-64 host.
LOGIT_TOL = 1e-4

_COMMON = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

TINY_CONFIGS = {
    # GQA 4:1, untied head.
    "llama_gqa": lambda: LlamaConfig(**_COMMON, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5),
    # Tied embeddings and Llama 3 RoPE scaling (small original context so every band is exercised).
    "llama_tied_rope3": lambda: LlamaConfig(
        **_COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    ),
    # q/k/v biases, explicit head_dim different from hidden / heads.
    "qwen2_bias": lambda: Qwen2Config(**_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                      rms_norm_eps=1e-6, use_sliding_window=False),
    # Sliding-window attention narrower than the test prompts.
    "mistral": lambda: MistralConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=1, sliding_window=6),
}


def make_tiny(name: str, seed: int = 0) -> torch.nn.Module:
    return make_random(TINY_CONFIGS[name](), seed)


def make_random(cfg, seed: int = 0) -> torch.nn.Module:
    """A float32 model of `cfg` with the spread-out random weights described above."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def save_tiny(name: str, out: Path, **save_kwargs) -> Path:
    make_tiny(name).save_pretrained(out, **save_kwargs)
    return out


def load_reference(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()


def random_prompts(vocab: int, lens, seed: int = 1) -> list[list[int]]:
    """Token ids drawn past the special ones (0, 1, 2), one prompt per length."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lens]


def hf_logits(model: torch.nn.Module, prompt: list[int]) -> np.ndarray:
    """transformers' float32 logits [T, V] for one prompt."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].numpy()
