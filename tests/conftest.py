"""Shared fixtures: tiny random-weight Hugging Face checkpoints written with `save_pretrained`."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# In Serve's high-throughput mode (./dev sets it) an ingress replica drains 30 s before it stops, for
# load balancers; the tests' Ray stops and starts apps and has none.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, "os.PathLike"]:
    """name -> directory, one per architecture variant in `hf_models.TINY_CONFIGS`."""
    root = tmp_path_factory.mktemp("ckpt")
    return {name: hf_models.save_tiny(name, root / name) for name in hf_models.TINY_CONFIGS}


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    from jaxlora.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for every test that needs it (started on first use)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
