"""The demo: the default model (SmolLM2-135M-Instruct, a real instruct model) and its demo adapters.

    python -m jaxlora.demo                                  # fetch the model (first run only), print its path
    python -m jaxlora.demo --prompt "What is the capital of France?"   # ... and answer one chat turn
    python -m jaxlora.demo --adapters ./jaxlora-fs          # ... and publish the demo adapters there

The model is fetched once into a cache (`fetch.py`) and is the default wherever a model is needed
and none is given (the serving app, `LocalJaxLoRABackend`, training). The demo adapters are
shared with every tenant; their LoRA weights are random but small, so each one shifts the model's
answers while they stay answers (a trained one comes from `./dev train`, configs/train/demo_faq.yaml).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxlora.fetch import SMOLLM2, fetch

DEMO_ADAPTERS = {"demo-concise": 1, "demo-verbose": 3}  # shared adapter id -> seed
DEMO_ADAPTER_STD = 0.03
"""Standard deviation of the demo adapters' A and B: enough to change some greedy answers of the
default model, small enough to keep them answers. (Seed 2 at 0.02 already turns "What is the
capital of France?" into French verse: which seed matters more than the scale.)"""


def default_model() -> Path:
    """The model served and trained when none is given: SmolLM2-135M-Instruct as a GGUF file."""
    return fetch(SMOLLM2)


def publish_demo_adapters(fs_root: str | Path, model_dir: str | Path) -> list[str]:
    """Publishes the demo adapters (random rank-8 LoRA for `model_dir`, shared with every tenant)
    unless present. Returns their ids."""
    from jaxlora.adapter_format import write_peft
    from jaxlora.adapter_store import AdapterStore
    from jaxlora.config import ModelConfig
    from jaxlora.hf_checkpoint import model_fingerprint, model_name
    from jaxlora.tiny_model import random_adapter

    store = AdapterStore(fs_root)
    cfg = ModelConfig.from_dir(model_dir)
    base = {"name": model_name(model_dir), "fingerprint": model_fingerprint(model_dir)}
    for adapter_id, seed in DEMO_ADAPTERS.items():
        if not AdapterStore.versions(store.adapters_dir(None) / adapter_id):
            adapter = random_adapter(cfg, r=8, alpha=16, seed=seed, std=DEMO_ADAPTER_STD)
            store.publish(None, adapter_id, lambda d, a=adapter: write_peft(a, d, base_model=base["name"]), base_model=base)
    return list(DEMO_ADAPTERS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Hugging Face folder or a GGUF file (default: the default model)")
    parser.add_argument("--adapters", metavar="FS_ROOT", help="publish the demo adapters into this store")
    parser.add_argument("--prompt", help="answer this as one chat turn (greedy)")
    parser.add_argument("--adapter", help="with --prompt: answer through this adapter (needs --adapters)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    model = Path(args.model) if args.model else default_model()
    print(f"model: {model}")
    if args.adapters:
        print(f"demo adapters in {args.adapters}: {', '.join(publish_demo_adapters(args.adapters, model))}")
    if args.prompt is not None:
        import tempfile

        from jaxlora.backend import LocalJaxLoRABackend
        from jaxlora.compile_cache import use_compilation_cache
        from jaxlora.engine import EngineConfig

        use_compilation_cache()

        backend = LocalJaxLoRABackend(model, fs_root=args.adapters or tempfile.mkdtemp(), warm_up=False,
                                      engine_config=EngineConfig(max_batch_size=1, max_seq_len=1024))
        try:
            out = backend.generate(messages=[{"role": "user", "content": args.prompt}], adapter=args.adapter,
                                   max_tokens=args.max_tokens, temperature=0.0)
        finally:
            backend.close()
        print(json.dumps({"prompt": args.prompt, "adapter": args.adapter, "completion": out.text,
                          "finish_reason": out.finish_reason, "completion_tokens": out.usage.completion_tokens},
                         ensure_ascii=False))


if __name__ == "__main__":
    main()
