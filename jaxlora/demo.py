"""The embedded demo model: a small random-weight Llama and a byte-level BPE tokenizer, built offline.

    python -m jaxlora.demo                       # build (if missing) and print the directory
    python -m jaxlora.demo --prompt "Hello"      # ... and greedily continue a prompt with it
    python -m jaxlora.demo --out DIR --force     # build into DIR, replacing what is there

Everything is derived from fixed seeds and a corpus generated here, so building twice gives
byte-identical files. The result is an ordinary Hugging Face model directory (`config.json`,
`model.safetensors`, `tokenizer.json`, `tokenizer_config.json` with a chat template) that
`transformers` loads as well as this project. It is the default wherever a model is needed and none
is given; its weights are random, so its text is noise, but every code path is the real one.
"""

from __future__ import annotations

import argparse
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

DEMO_NAME = "demo-llama-v2"
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|start|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)
DEMO_ARCH = dict(
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


def demo_corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
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
    tok.train_from_iterator(demo_corpus(), trainer=trainer)
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
        **DEMO_ARCH,
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


def build_demo_model(out: str | Path) -> Path:
    """Builds the demo model into `out` (which must not exist yet) and returns it."""
    out = Path(out)
    out.mkdir(parents=True)
    vocab = _build_tokenizer(out)
    padded_vocab = -(-vocab // 64) * 64  # a round embedding size; the extra rows are never produced by the tokenizer
    _build_weights(out, padded_vocab)
    for f in out.iterdir():
        f.chmod(0o644)  # readable by every replica, whatever the builder's umask or safetensors chose
    return out


def default_demo_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "jaxlora" / DEMO_NAME


def ensure_demo_model(path: str | Path | None = None) -> Path:
    """Returns the demo model directory, building it first if it is not there.

    Builds into a temporary sibling and renames it into place, so concurrent callers (several
    replicas starting at once) never see a half-built directory.
    """
    path = Path(path) if path else default_demo_dir()
    if (path / "model.safetensors").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        build_demo_model(tmp / "m")
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


DEMO_ADAPTERS = {"demo-concise": 1, "demo-verbose": 2}  # shared adapter id -> seed


def publish_demo_adapters(fs_root: str | Path, model_dir: str | Path) -> list[str]:
    """Publishes the demo adapters (random rank-8 LoRA, shared with every tenant) unless present;
    random weights, so each steers the demo model to different text. Returns their ids."""
    from jaxlora.adapter_format import write_peft
    from jaxlora.adapter_store import AdapterStore
    from jaxlora.hf_checkpoint import model_fingerprint
    from jaxlora.config import ModelConfig

    store = AdapterStore(fs_root)
    cfg = ModelConfig.from_dir(model_dir)
    base = {"name": Path(model_dir).name, "fingerprint": model_fingerprint(model_dir)}
    for adapter_id, seed in DEMO_ADAPTERS.items():
        if not AdapterStore.versions(store.adapters_dir(None) / adapter_id):
            adapter = random_adapter(cfg, r=8, alpha=16, seed=seed, std=0.5)
            store.publish(None, adapter_id, lambda d, a=adapter: write_peft(a, d, base_model=base["name"]), base_model=base)
    return list(DEMO_ADAPTERS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help=f"directory to build into (default: {default_demo_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory exists")
    parser.add_argument("--prompt", help="continue this prompt greedily with the demo model")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapters", metavar="FS_ROOT", help="also publish the demo adapters into this store")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else default_demo_dir()
    if args.force and out.exists():
        shutil.rmtree(out)
    model_dir = ensure_demo_model(out)
    print(f"demo model: {model_dir}")
    if args.adapters:
        print(f"demo adapters in {args.adapters}: {', '.join(publish_demo_adapters(args.adapters, model_dir))}")
    if args.prompt is not None:
        from jaxlora.generate import greedy_generate
        from jaxlora.hf_checkpoint import load_params
        from jaxlora.tokenizer import load_tokenizer

        params, cfg = load_params(model_dir)
        tok = load_tokenizer(model_dir)
        ids = tok(args.prompt)["input_ids"]
        new_ids = greedy_generate(params, cfg, [ids], args.max_tokens)[0]
        print(json.dumps({"prompt": args.prompt, "prompt_tokens": len(ids), "completion": tok.decode(new_ids),
                          "completion_tokens": len(new_ids)}, ensure_ascii=False))


if __name__ == "__main__":
    main()
