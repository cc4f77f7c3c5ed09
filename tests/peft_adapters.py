"""PEFT adapters with random (non-zero) A and B, made with `peft` itself as the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tests.hf_models import load_reference

ADAPTER_SPECS = {
    "a_qv_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b_all_r8_rslora": dict(r=8, lora_alpha=16, use_rslora=True,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "c_mlp_r2": dict(r=2, lora_alpha=3, target_modules=["o_proj", "gate_proj", "down_proj"]),
}


def make_peft_adapter(base_dir: Path, name: str, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(load_reference(base_dir), LoraConfig(init_lora_weights=False, **ADAPTER_SPECS[name]))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def load_peft(base_dir: Path, adapters: dict[str, Path]) -> PeftModel:
    """A PeftModel over a fresh base with every adapter in `adapters` loaded under its name."""
    names = list(adapters)
    model = PeftModel.from_pretrained(load_reference(base_dir), adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    return model.eval()


def peft_greedy(model: PeftModel, adapter: str | None, prompt: list[int], max_new_tokens: int) -> list[int]:
    """PEFT's greedy `generate` of `prompt` on `adapter` (None: the base model), the new tokens only;
    EOS does not stop it (the engine's requests set ignore_eos to compare)."""
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def peft_logits(model: PeftModel, adapter: str | None, prompt: list[int]) -> np.ndarray:
    """PEFT's float32 logits [T, V] of `prompt` on `adapter` (None: the base model)."""
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                return model(input_ids=torch.tensor([prompt])).logits[0].numpy()
        model.set_adapter(adapter)
        return model(input_ids=torch.tensor([prompt])).logits[0].numpy()
