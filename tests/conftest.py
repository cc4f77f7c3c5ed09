"""Shared fixtures: tiny random-weight Hugging Face checkpoints written with `save_pretrained`, and the
one real model (a GGUF, fetched once)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# In Serve's high-throughput mode (./dev sets it) an ingress replica drains 30 s before it stops, for
# load balancers; the tests' Ray stops and starts apps and has none.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")

import pytest  # noqa: E402

from jaxlora.compile_cache import use_compilation_cache  # noqa: E402
from tests import hf_models  # noqa: E402

# The programs every engine of the suite compiles, kept for the next process that builds the same
# (Serve replicas, restarted replicas, training tasks, the next run): as a user's replicas do.
use_compilation_cache()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, "os.PathLike"]:
    """name -> directory, one per architecture variant in `hf_models.TINY_CONFIGS`."""
    root = tmp_path_factory.mktemp("ckpt")
    return {name: hf_models.save_tiny(name, root / name) for name in hf_models.TINY_CONFIGS}


@pytest.fixture(scope="session")
def smollm2_gguf() -> "os.PathLike":
    """The real SmolLM2-135M-Instruct GGUF (Q4_1), fetched once into the cache by `jaxlora.fetch`."""
    from jaxlora.fetch import fetch

    return fetch()


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf):
    """transformers' own loading of that GGUF (float32, eager attention) and its tokenizer: the
    numeric reference, loaded once (~20 s). A test that wraps it (PEFT) must unwrap it again."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    from jaxlora.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for every test that needs it (started on first use)."""
    ray = pytest.importorskip("ray")
    # Metrics reach Prometheus every 2 s rather than every 10 s: the metrics tests wait for them.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 2000})
    yield ray
    ray.shutdown()
