"""The persistent compilation cache: a second process loads what the first compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from jaxlora.compile_cache import host_tag

_PROGRAM = """
import json, jax, jax.numpy as jnp
events = []
jax.monitoring.register_event_duration_secs_listener(lambda e, d, **k: events.append(e))
jax.monitoring.register_event_listener(lambda e, **k: events.append(e))
from jaxlora.compile_cache import use_compilation_cache
path = use_compilation_cache()
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64)))
print(json.dumps({"path": str(path), "value": float(y),
                  "built": events.count("/jax/core/compile/backend_compile_duration"),
                  "loaded": events.count("/jax/compilation_cache/cache_hits")}))
"""


def _run(root, **env) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env = {**base, "JAXLORA_CACHE": str(root), "JAX_PLATFORMS": "cpu", **env}
    out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, check=True, capture_output=True, text=True,
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_program_the_first_compiled(tmp_path):
    first, second = _run(tmp_path), _run(tmp_path)
    assert first["path"] == second["path"] == str(tmp_path / "xla" / host_tag())
    assert first["built"] > 0 and first["loaded"] == 0
    assert second["built"] == second["loaded"] == first["built"]
    assert second["value"] == first["value"]


def test_a_folder_set_by_the_operator_is_kept(tmp_path):
    mine = tmp_path / "operator"
    out = _run(tmp_path / "unused", JAX_COMPILATION_CACHE_DIR=str(mine))
    assert out["path"] == str(mine) and out["built"] > 0
    assert any(mine.iterdir()) and not (tmp_path / "unused").exists()


_ENGINE = """
import json, sys, tempfile, jax
events = []
jax.monitoring.register_event_duration_secs_listener(lambda e, d, **k: events.append(e))
jax.monitoring.register_event_listener(lambda e, **k: events.append(e))
from jaxlora.compile_cache import use_compilation_cache
use_compilation_cache()
from jaxlora.adapter_store import AdapterStore
from jaxlora.engine import EngineConfig
from jaxlora.replica import build_replica
config = EngineConfig(max_batch_size=2, max_seq_len=32, prefill_chunk=32, decode_steps=2, num_adapter_slots=2,
                      max_lora_rank=4)
replica = build_replica(sys.argv[1], AdapterStore(tempfile.mkdtemp()), config)
print(json.dumps({"built": events.count("/jax/core/compile/backend_compile_duration"),
                  "loaded": events.count("/jax/compilation_cache/cache_hits"),
                  "kernels": replica.engine.decode_kernels}))
"""


def test_a_restarted_engine_loads_every_program_its_warm_up_compiled(tmp_path, demo_model_dir):
    """Including the decode program, whose grammar rows call back to the host: through a custom call
    (kernels/host_mask.cc), not jax's io_callback, which would keep it out of the cache."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla")}

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", _ENGINE, str(demo_model_dir)], env=env, check=True,
                             capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["kernels"] and first["built"] > 0 and first["loaded"] == 0
    assert second["built"] == second["loaded"] == first["built"]
