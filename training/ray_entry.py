"""The thin Ray layer of training: one `@ray.remote` task per adapter, and the job entry point.

    python -m training configs/train/demo_faq.yaml [more.yaml ...] [--fs-root /shared/lora]
    ray job submit --working-dir . -- python -m training configs/train/demo_faq.yaml --fs-root $PWD/jaxlora-fs

Connects to the current Ray cluster (RAY_ADDRESS, as `ray job submit` sets it) or starts a local
one, trains every spec in parallel (each task reserves the spec's `num_gpus`), and prints where
each new version was published. A task that dies is retried and resumes from its last checkpoint.

Where adapters are published: `--fs-root` (for every spec) or the spec's `fs_root`, made absolute
here, before any task starts, so every task publishes to the same place. A relative root is
resolved against the current directory, except inside a Ray job with a `--working-dir`: there the
current directory is Ray's temporary copy, which no server reads and which is deleted, so a
relative root is refused and the message says to pass `--fs-root` (the serving app's fs_root).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import ray

from jaxlora.compile_cache import use_compilation_cache
from training.spec import TrainSpec
from training.trainer import train


@ray.remote(max_retries=3, retry_exceptions=False)
def train_task(spec_dict: dict) -> dict:
    use_compilation_cache()
    result = train(TrainSpec(**spec_dict))
    return dataclasses.asdict(result)


def submit(specs: list[TrainSpec]) -> list[ray.ObjectRef]:
    return [train_task.options(num_gpus=s.num_gpus, name=f"train:{s.user_id}/{s.adapter_id}").remote(s.model_dump())
            for s in specs]


def job_working_dir() -> str | None:
    """The `--working-dir` of the Ray job this process is the entry point of, or None."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not config:
        return None
    try:
        return (json.loads(config).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return None


def resolve_roots(spec: TrainSpec, fs_root: str | None) -> TrainSpec:
    """The spec with absolute fs_root and checkpoint_dir (see the module docstring)."""
    update = {}
    for field, value in (("fs_root", fs_root or spec.fs_root), ("checkpoint_dir", spec.checkpoint_dir)):
        if value is None:
            continue
        if not Path(value).is_absolute() and job_working_dir():
            raise ValueError(
                f"{spec.user_id}/{spec.adapter_id}: {field} {value!r} is relative, and this Ray job runs in a temporary "
                f"copy of its --working-dir ({os.getcwd()}), where no server reads it and which Ray deletes; pass "
                f"--fs-root /absolute/path (the serving app's fs_root) or give an absolute {field} in the spec")
        update[field] = str(Path(value).resolve())
    return spec.model_copy(update=update)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train LoRA adapters as Ray tasks and publish them.")
    ap.add_argument("specs", nargs="+", help="TrainSpec YAML files")
    ap.add_argument("--fs-root", help="publish every spec's adapter here (the serving app's fs_root); "
                    "default: each spec's fs_root")
    args = ap.parse_args(argv)
    try:
        specs = [resolve_roots(TrainSpec.from_yaml(p), args.fs_root) for p in args.specs]
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        print(f"invalid spec: {e}", file=sys.stderr)
        return 2
    if not ray.is_initialized():
        ray.init()
    failed = 0
    for spec, ref in zip(specs, submit(specs)):
        try:
            r = ray.get(ref)
            print(json.dumps({"adapter": f"{r['user_id']}/{r['adapter_id']}", "version": r["version"],
                              "path": r["path"], "final_loss": r["final_loss"]}))
        except Exception as e:  # one bad adapter does not hide the others' results
            failed += 1
            print(f"{spec.user_id}/{spec.adapter_id} failed: {e}", file=sys.stderr)
    return 1 if failed else 0
