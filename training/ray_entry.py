"""The thin Ray layer of training: one `@ray.remote` task per adapter, and the job entry point.

    python -m training configs/train/demo_faq.yaml [more.yaml ...]
    ray job submit --working-dir . -- python -m training configs/train/demo_faq.yaml

Connects to the current Ray cluster (RAY_ADDRESS, as `ray job submit` sets it) or starts a local
one, trains every spec in parallel (each task reserves the spec's `num_gpus`), and prints where
each new version was published. A task that dies is retried and resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import ray

from training.spec import TrainSpec
from training.trainer import TrainingService


@ray.remote(max_retries=3, retry_exceptions=False)
def train_task(spec_dict: dict) -> dict:
    result = TrainingService().train(TrainSpec(**spec_dict))
    return dataclasses.asdict(result)


def submit(specs: list[TrainSpec]) -> list[ray.ObjectRef]:
    return [train_task.options(num_gpus=s.num_gpus, name=f"train:{s.user_id}/{s.adapter_id}").remote(s.model_dump())
            for s in specs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train LoRA adapters as Ray tasks and publish them.")
    ap.add_argument("specs", nargs="+", help="TrainSpec YAML files")
    args = ap.parse_args(argv)
    try:
        specs = [TrainSpec.from_yaml(p) for p in args.specs]
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
