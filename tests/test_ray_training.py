"""Training as a Ray task: a worker killed mid-run is retried by Ray and resumes from its last
checkpoint, losing no step: the result equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import psutil

from jaxlora.adapter_format import read_adapter
from jaxlora.config import ModelConfig
from training.ray_entry import main, submit
from training.spec import TrainSpec
from training.trainer import train


def _spec(demo_model_dir, tmp_path, fs: str) -> TrainSpec:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" answer {i}"}) + "\n" for i in range(16)))
    return TrainSpec(user_id="u", adapter_id="killme", data=str(data), model_dir=str(demo_model_dir),
                     fs_root=str(tmp_path / fs), steps=60, batch_size=4, max_length=32, checkpoint_every=5,
                     learning_rate=0.005, lora={"r": 4, "alpha": 8}, log_every=1000, seed=1)


def _task_process(name: str):
    for p in psutil.process_iter(["cmdline"]):
        if any(name in part for part in (p.info["cmdline"] or [])):
            return p
    return None


def test_killed_training_worker_resumes_and_loses_no_step(ray_local, demo_model_dir, tmp_path):
    spec = _spec(demo_model_dir, tmp_path, "ray")
    ref = submit([spec])[0]
    meta = spec.checkpoint_path() / "last" / "meta.json"
    deadline = time.monotonic() + 120
    while not (meta.is_file() and json.loads(meta.read_text())["step"] >= 10):
        assert time.monotonic() < deadline, "no checkpoint at step 10 within 120 s"
        time.sleep(0.05)
    worker = _task_process("train:u/killme")
    assert worker is not None, "the training task's worker process was not found"
    os.kill(worker.pid, signal.SIGKILL)
    result = ray_local.get(ref, timeout=300)
    assert result["resumed_from_step"] >= 10 and result["steps"] == 60

    straight = train(_spec(demo_model_dir, tmp_path, "local"))
    cfg = ModelConfig.from_dir(demo_model_dir)
    a, b = read_adapter(straight.path, cfg, 4), read_adapter(result["path"], cfg, 4)
    assert a.weights and a.weights.keys() == b.weights.keys()
    for k in a.weights:
        assert np.abs(a.weights[k][0] - b.weights[k][0]).max() <= 1e-6
        assert np.abs(a.weights[k][1] - b.weights[k][1]).max() <= 1e-6
    curve = json.loads(open(f"{result['path']}/manifest.json").read())["training"]["loss_curve"]
    assert len(curve) == 60 and curve == json.loads(open(f"{straight.path}/manifest.json").read())["training"]["loss_curve"]


def test_job_entry_point_trains_several_specs_and_reports_bad_ones(ray_local, demo_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q:", "completion": " A"}) + "\n")
    good = {"user_id": "u", "data": str(data), "model_dir": str(demo_model_dir), "fs_root": str(tmp_path / "fs"),
            "steps": 2, "batch_size": 1, "max_length": 16, "lora": {"r": 2, "alpha": 4}}
    paths = []
    for i in range(2):
        p = tmp_path / f"s{i}.yaml"
        p.write_text(json.dumps({**good, "adapter_id": f"job{i}"}))  # JSON is YAML
        paths.append(str(p))
    assert main(paths) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert sorted(r["adapter"] for r in lines) == ["u/job0", "u/job1"] and all(r["version"] == "v0001" for r in lines)
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**good, "adapter_id": "../escape"}))
    assert main([str(bad)]) == 2
    assert "invalid adapter id" in capsys.readouterr().err


def test_a_relative_fs_root_never_lands_in_a_ray_jobs_temporary_working_dir(monkeypatch, tmp_path, capsys):
    """Under `ray job submit --working-dir .` the job's current directory is Ray's temporary copy: a
    relative fs_root there is refused (naming --fs-root); --fs-root, made absolute, overrides every spec."""
    from training.ray_entry import resolve_roots

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(json.dumps({"user_id": "u", "adapter_id": "a", "data": "d.jsonl", "fs_root": "./rel-fs",
                                     "steps": 1}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}))
    assert main([str(spec_file)]) == 2
    err = capsys.readouterr().err
    assert "fs_root './rel-fs' is relative" in err and "--fs-root" in err
    spec = TrainSpec.from_yaml(spec_file)
    assert resolve_roots(spec, "/shared/lora").fs_root == "/shared/lora"
    assert resolve_roots(spec, "/shared/lora").checkpoint_path() == Path("/shared/lora/users/u/checkpoints/a")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # a plain `python -m training`: relative to where it runs
    assert resolve_roots(spec, None).fs_root == str(tmp_path / "rel-fs")
