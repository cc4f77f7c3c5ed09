"""The shipped serve_config.yaml, deployed the way `serve deploy` deploys it (the controller's
apply_config), on real Ray Serve: every setting in its `args` reaches the running deployments, and
a `deployments:` entry that would silently override one of them is refused at start, naming the
field to use. Runs after test_serve.py (a config deploy replaces every app of the Serve instance)."""

from __future__ import annotations

import copy
import socket
import time

import httpx
import pytest
import yaml

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from jaxlora.engine import EngineConfig  # noqa: E402
from serve_app.config import AppArgs  # noqa: E402
from tests.test_serve import _model_stats  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shipped() -> dict:
    with open("serve_config.yaml") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def serve_instance(ray_local):
    port = _free_port()
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield _get_global_client(), f"http://127.0.0.1:{port}"
    serve.shutdown()


def _deploy(client, config: dict, name: str, timeout: float = 240):
    """Applies a config document as `serve deploy` does; returns the app's final status overview."""
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status in ("RUNNING", "DEPLOY_FAILED"):
            return status
        time.sleep(0.5)
    raise TimeoutError(f"app {name} neither ran nor failed in {timeout} s: {serve.status()}")


def test_shipped_config_is_a_valid_deploy_config_whose_args_build(shipped):
    app = ServeDeploySchema.model_validate(shipped).applications[0]
    assert app.import_path == "serve_app.app:build_app"
    assert not app.deployments, "deployment options belong in args (serve_app/config.py, OWNED_OPTIONS)"
    AppArgs(**app.args)


def test_every_engine_option_has_one_definition_settable_from_yaml():
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    changed = {"max_batch_size": 3, "max_seq_len": 96, "prefill_chunk": 24, "decode_steps": 2, "prefill_batch": 2,
               "max_queue": 5, "num_adapter_slots": 3, "max_lora_rank": 4, "host_adapter_cache": 7, "dtype": "bfloat16",
               "scheduling": "fifo", "completion_token_weight": 3.0, "max_queued_per_tenant": 2, "max_rows_per_tenant": 1,
               "max_preemptions": 3, "prefill_tokens_per_turn": 100, "prefix_cache_bytes": 12345}
    assert set(changed) == set(fields), "a new EngineConfig field: add it here"
    engine = AppArgs(**yaml.safe_load(yaml.safe_dump({"engine": changed}))).engine
    assert engine == EngineConfig(**changed)
    assert AppArgs().engine == EngineConfig()  # one set of defaults
    with pytest.raises(ValueError, match="bogus"):
        AppArgs(engine={"bogus": 1})
    with pytest.raises(ValueError, match="set model_num_gpus instead"):
        AppArgs(num_gpus=1)


def test_changed_args_of_the_shipped_config_reach_the_running_deployments(serve_instance, shipped, demo_model_dir, tmp_path):
    client, url = serve_instance
    config = copy.deepcopy(shipped)
    config["http_options"] = {"host": "127.0.0.1", "port": int(url.rsplit(":", 1)[1])}
    app = config["applications"][0]
    app["args"].update({
        "model_dir": str(demo_model_dir), "fs_root": str(tmp_path / "fs"),
        "engine": {**app["args"]["engine"], "max_batch_size": 3, "max_queue": 5, "max_seq_len": 128,
                   "prefill_chunk": 16},
        "tokenizer_replicas": 2, "model_replicas": 2, "model_num_cpus": 0.25, "model_max_queued_requests": 7,
        "model_runtime_env": {"env_vars": {"JAXLORA_CONFIG_PROBE": "yes"}},
    })
    status = _deploy(client, config, app["name"])
    assert status.status == "RUNNING", status
    details = client.get_serve_details()["applications"][app["name"]]["deployments"]
    model = details["LoRAModel"]["deployment_config"]
    assert model["num_replicas"] == 2 and model["max_ongoing_requests"] == 3 + 5 and model["max_queued_requests"] == 7
    assert model["ray_actor_options"]["num_cpus"] == 0.25
    assert model["ray_actor_options"]["runtime_env"]["env_vars"] == {"JAXLORA_CONFIG_PROBE": "yes"}
    assert details["Tokenizer"]["deployment_config"]["num_replicas"] == 2
    assert {d: len([r for r in details[d]["replicas"] if r["state"] == "RUNNING"]) for d in details} == \
        {"Ingress": 1, "Tokenizer": 2, "LoRAModel": 2, "TenantState": 1, "JobController": 1}
    r = httpx.post(f"{url}/v1/completions", json={"model": demo_model_dir.name, "prompt": "x", "max_tokens": 2}, timeout=120)
    assert r.status_code == 200, r.text
    assert _model_stats(app["name"])["compute_threads"] == 1  # a quarter CPU reserved: XLA computes on one thread


def test_a_deployments_block_that_overrides_args_is_refused_naming_the_field(serve_instance, shipped, demo_model_dir,
                                                                           tmp_path):
    client, url = serve_instance
    config = copy.deepcopy(shipped)
    config["http_options"] = {"host": "127.0.0.1", "port": int(url.rsplit(":", 1)[1])}
    app = config["applications"][0]
    app["args"].update({"model_dir": str(demo_model_dir), "fs_root": str(tmp_path / "fs"), "model_num_cpus": 0,
                        "model_replicas": 2, "tokenizer_replicas": 2})
    app["deployments"] = [  # what the shipped file used to hold; one replica and one constructor retry keep it short
        {"name": "LoRAModel", "num_replicas": 1, "max_ongoing_requests": 1, "max_constructor_retry_count": 1},
        {"name": "Tokenizer", "num_replicas": 1, "max_constructor_retry_count": 1},
    ]
    status = _deploy(client, config, app["name"])
    assert status.status == "DEPLOY_FAILED", status
    expected = {"LoRAModel": ["LoRAModel.num_replicas is 1 but args ask for 2", "args.model_replicas",
                              "LoRAModel.max_ongoing_requests is 1", "args.engine.max_batch_size + args.engine.max_queue"],
                "Tokenizer": ["Tokenizer.num_replicas is 1 but args ask for 2", "args.tokenizer_replicas"]}
    for name, words in expected.items():
        message = status.deployments[name].message
        assert all(w in message for w in words) and "deployments:" in message, (name, message)


def test_option_check_names_the_field_and_allows_what_the_app_adds():
    from serve_app.config import option_mismatches

    a = AppArgs(model_replicas=2, model_runtime_env={"env_vars": {"XLA_FLAGS": "--x"}})
    ok = {"num_replicas": 2, "max_ongoing_requests": a.engine.max_batch_size + a.engine.max_queue,
          "ray_actor_options.num_gpus": 0, "ray_actor_options.runtime_env.env_vars": {"XLA_FLAGS": "--x", "APP": "1"}}
    assert option_mismatches("LoRAModel", a, ok) == []  # env vars the app-level runtime_env adds are fine
    assert option_mismatches("LoRAModel", AppArgs(), {"ray_actor_options.runtime_env.env_vars": {"APP": "1"}}) == []
    bad = option_mismatches("LoRAModel", a, {**ok, "num_replicas": 1, "ray_actor_options.runtime_env.env_vars": {}})
    assert len(bad) == 2 and "args.model_replicas" in bad[0] and "args.model_runtime_env.env_vars" in bad[1]
    assert option_mismatches("Tokenizer", AppArgs(), {"num_replicas": 3}) == [
        "Tokenizer.num_replicas is 3 but args ask for 1: it is set by args.tokenizer_replicas only; "
        "remove it from the `deployments:` block of the config file (or from .options())"]
