"""The benchmark model: an 8-layer, 512-wide Llama (vocab 8192) and rank-16 PEFT adapters on all
seven projections, built with transformers + peft so that both sides load the very same files."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

BENCH_LLAMA = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_model(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(seed)
    cfg = LlamaConfig(**BENCH_LLAMA, architectures=["LlamaForCausalLM"])
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(out)
    return out


def build_adapters(model_dir: Path, out: Path, n: int, r: int = 16) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from jaxlora.model import PROJECTIONS

    dirs = []
    for i in range(n):
        d = out / f"adapter{i}"
        if not (d / "adapter_model.safetensors").is_file():
            torch.manual_seed(100 + i)
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(PROJECTIONS),
                                                    init_lora_weights=False))
            model.save_pretrained(d)
        dirs.append(d)
    return dirs


MODELS = ("bench", "smollm2")
"""`--model` of the benchmarks: the 8-layer, 512-wide random Llama above, or the real default model
(SmolLM2-135M-Instruct: 30 layers of width 576, vocab 49152), exported from its GGUF to a Hugging
Face folder so that both sides load the very same float32 weights."""


def bench_model(work_dir: str | Path, adapters: int, model: str = "bench") -> tuple[Path, list[Path]]:
    """The benchmark model `model` (one of MODELS) and `adapters` PEFT adapters for it, built under
    `work_dir` unless there."""
    work = Path(work_dir)
    if model == "bench":
        model_dir = build_model(work / "llama8x512")
    elif model == "smollm2":
        from jaxlora.demo import default_model
        from jaxlora.gguf_export import export_hf

        model_dir = work / "smollm2-hf"
        if not model_dir.is_dir():
            export_hf(default_model(), model_dir)
    else:
        raise ValueError(f"unknown benchmark model {model!r}; one of {', '.join(MODELS)}")
    return model_dir, build_adapters(model_dir, work / f"{model}-adapters", adapters)


def peft_peer(model_dir: Path, peft_dirs: list[Path]):
    """The peer: transformers + PEFT on every core, each adapter loaded under its folder's name."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, peft_dirs[0], adapter_name=peft_dirs[0].name)
    for d in peft_dirs[1:]:
        model.load_adapter(d, adapter_name=d.name)
    return model.eval()


def publish_random_adapters(fs: str | Path, model_dir: Path, names: list[str], seed: int) -> None:
    """Random rank-8 PEFT adapters of `model_dir` published as the tenant `local`'s `names`
    (adapter i from seed + i), into the store at `fs`."""
    from jaxlora.adapter_format import write_peft
    from jaxlora.adapter_store import AdapterStore
    from jaxlora.config import ModelConfig
    from jaxlora.tiny_model import random_adapter
    from jaxlora.hf_checkpoint import model_fingerprint

    cfg, store = ModelConfig.from_dir(model_dir), AdapterStore(fs)
    base = {"name": model_dir.name, "fingerprint": model_fingerprint(model_dir)}
    for i, name in enumerate(names):
        adapter = random_adapter(cfg, r=8, alpha=16, seed=seed + i, std=0.5)
        store.publish("local", name, lambda d, a=adapter: write_peft(a, d), base_model=base)


def start_local_serve() -> int:
    """A local Ray and one Serve instance on a free loopback port (returned), in Serve's
    high-throughput mode as ./dev and the README's cluster walk run it (read when Ray starts). Each
    benchmark's apps then run in turn on it; the caller shuts Serve and Ray down."""
    import socket

    import ray
    from ray import serve

    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")  # no load balancer to drain for
    ray.init(include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def model_handle(app: str):
    """A driver-side handle to the app's LoRAModel deployment. The driver has no event loop, so the
    handle routes on Serve's own thread (private in Ray 2.60), in either of Serve's modes."""
    from ray import serve

    handle = serve.get_deployment_handle("LoRAModel", app_name=app)
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=True)
    return handle


def machine() -> dict:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}


def emit(result: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps(result, sort_keys=True))
