"""The tiny model: a small random-weight Llama and a byte-level BPE tokenizer, built offline.

What tests and benchmarks run on when the real model (`demo.py`) would only make them slow.
Everything is derived from fixed seeds and a corpus generated here, so building twice gives
byte-identical files. The result is an ordinary Hugging Face model directory (`config.json`,
`model.safetensors`, `tokenizer.json`, `tokenizer_config.json` with a chat template) that
`transformers` loads as well as this project. Its weights are random, so its text is noise, but
every code path is the real one. Also `random_adapter`, random LoRA weights for any model.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jaxlora.adapter_format import LoraAdapter
    from jaxlora.config import ModelConfig

TINY_NAME = "tiny-llama-v2"
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|start|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)
TINY_ARCH = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
TOKENIZER_VOCAB = 4096

_SUBJECTS = ["the adapter", "a tenant", "the server", "the model", "each request", "the engine", "a replica",
             "the tokenizer", "the cache", "this job", "la réponse", "le modèle", "das Modell", "モデル", "適応器"]
_VERBS = ["serves", "loads", "trains", "streams", "publishes", "reloads", "batches", "answers", "returns", "reads"]
_OBJECTS = ["a new version", "every token", "the prompt", "a short answer", "the latest weights", "many users",
            "questions about JAX", "the shared filesystem", "low-rank updates", "café menus", "naïve résumés",
            "emoji 🙂 and symbols ≥ ≤", "数字 and 漢字"]
_QUESTIONS = ["What does {s} do?", "How does {s} work?", "Why is {s} fast?", "When does {s} reload?"]


def tiny_corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic text to train the tokenizer on: templated sentences, questions and chat turns."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        s, v, o = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
        kind = i % 3
        if kind == 0:
            lines.append(f"{s.capitalize()} {v} {o} in {rng.randint(1, 999)} ms.")
        elif kind == 1:
            lines.append(f"Q: {rng.choice(_QUESTIONS).format(s=s)} A: {s.capitalize()} {v} {o}.")
        else:
            lines.append(f"user: tell me about {o}\nassistant: {s} {v} {o}, version v{rng.randint(1, 9999):04d}.")
    return lines


def _build_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(str(out))
    return tok.get_vocab_size()


def _build_weights(out: Path, vocab_size: int, seed: int = 0) -> None:
    from safetensors.numpy import save_file
    from transformers import LlamaConfig

    from jaxlora.hf_checkpoint import hf_tensor_names
    from jaxlora.config import ModelConfig

    bos, eos_end, eos = (SPECIAL_TOKENS.index(t) for t in ("<|bos|>", "<|end|>", "<|eos|>"))
    hf_cfg = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=bos,
        eos_token_id=[eos_end, eos],
        pad_token_id=SPECIAL_TOKENS.index("<|pad|>"),
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        **TINY_ARCH,
    ).to_dict()
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in sorted(hf_tensor_names(ModelConfig.from_hf_dict(hf_cfg)).items()):
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, np.float32)
        else:
            # The head is drawn wider than the rest so that logits can become confident: with the
            # usual 0.02 a fine-tuned adapter could never push a token's probability past a few %.
            std = 0.1 if name == "lm_head.weight" else 0.02
            tensors[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def build_tiny_model(out: str | Path) -> Path:
    """Builds the tiny model into `out` (which must not exist yet) and returns it."""
    out = Path(out)
    out.mkdir(parents=True)
    vocab = _build_tokenizer(out)
    padded_vocab = -(-vocab // 64) * 64  # a round embedding size; the extra rows are never produced by the tokenizer
    _build_weights(out, padded_vocab)
    for f in out.iterdir():
        f.chmod(0o644)  # readable by every replica, whatever the builder's umask or safetensors chose
    return out


def default_tiny_dir() -> Path:
    from jaxlora.fetch import cache_dir

    return cache_dir() / TINY_NAME


def ensure_tiny_model(path: str | Path | None = None) -> Path:
    """Returns the tiny model directory, building it first if it is not there.

    Builds into a temporary sibling and renames it into place, so concurrent callers (several
    replicas starting at once) never see a half-built directory.
    """
    path = Path(path) if path else default_tiny_dir()
    if (path / "model.safetensors").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        build_tiny_model(tmp / "m")
        try:
            os.rename(tmp / "m", path)
        except OSError:
            if not (path / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def random_adapter(
    cfg: ModelConfig, r: int, alpha: float, modules: tuple[str, ...] | None = None, seed: int = 0, std: float = 0.1,
    use_rslora: bool = False,
) -> LoraAdapter:
    """An adapter with random A and B (both non-zero), for demos, tests and benchmarks."""
    from jaxlora.adapter_format import LoraAdapter
    from jaxlora.model import PROJECTIONS

    rng = np.random.default_rng(seed)
    weights = {}
    for layer in range(cfg.num_layers):
        for m in modules or tuple(PROJECTIONS):
            d_in, d_out = PROJECTIONS[m].shape(cfg)
            a = rng.normal(0, std, (d_in, r)).astype(np.float32)
            b = rng.normal(0, std / math.sqrt(r), (r, d_out)).astype(np.float32)
            weights[(layer, m)] = (a, b)
    return LoraAdapter(r=r, alpha=alpha, use_rslora=use_rslora, weights=weights)
