"""Asks a running serving app what a just-trained adapter answers: the last step of `./dev train`.

    python -m training.ask configs/train/demo_faq.yaml --fs-root ./jaxlora-fs --url http://127.0.0.1:8000

Reads the newest version of the spec's adapter from the store, waits (up to `--wait` seconds) until
the app serves that version (its `system_fingerprint`), then asks a few of the spec's training
questions greedily and prints each answer beside the trained one and the base model's, and the
adapter's answers to a few questions outside the training data. Exits 1 if the version is not
served in time. Plain HTTP through the standard library: no Ray, no test dependencies.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from jaxlora.adapter_store import AdapterStore
from jaxlora.fetch import SMOLLM2
from jaxlora.hf_checkpoint import model_name
from training.spec import TrainSpec


OUTSIDE = ("What is the capital of France?", "Name three primary colors.", "What is 12 times 3?")
"""Questions outside the demo FAQ: the adapter should still answer them sensibly."""


def _ask(url: str, model: str, turn: dict, max_tokens: int) -> dict:
    """A greedy completion of `turn`, {"prompt": ...} or {"messages": [...]}, with `model`."""
    path = "/v1/chat/completions" if "messages" in turn else "/v1/completions"
    body = json.dumps({"model": model, **turn, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}{path}", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _text(reply: dict) -> str:
    choice = reply["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def _question(row: dict) -> tuple[dict, str]:
    """A training row as (what to send, the answer it was trained to give)."""
    if "messages" in row:
        return {"messages": row["messages"][:-1]}, row["messages"][-1]["content"]
    return {"prompt": row["prompt"]}, row["completion"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--fs-root", required=True, help="the store the app serves (its fs_root)")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--wait", type=float, default=30.0)
    args = ap.parse_args(argv)
    spec = TrainSpec.from_yaml(args.spec)
    version = AdapterStore(Path(args.fs_root)).resolve(spec.user_id, spec.adapter_id).version
    fingerprint = f"{spec.adapter_id}@{version}"
    rows = [json.loads(line) for line in Path(spec.data).read_text().splitlines() if line.strip()][: args.questions]
    deadline = time.monotonic() + args.wait
    while True:
        try:
            served = _ask(args.url, spec.adapter_id, _question(rows[0])[0], 1).get("system_fingerprint")
        except urllib.error.URLError as e:
            served = f"unreachable ({e})"
        if served == fingerprint or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if served != fingerprint:
        print(f"{args.url} serves {served}, not {fingerprint} (is ./dev serve running on the same fs_root?)",
              file=sys.stderr)
        return 1
    print(f"{args.url} serves {fingerprint}")
    base = model_name(spec.model_dir or SMOLLM2.filename)
    for row in rows:
        turn, trained = _question(row)
        print(json.dumps({**turn, "trained": trained, "adapter": _text(_ask(args.url, spec.adapter_id, turn, 48)),
                          "base": _text(_ask(args.url, base, turn, 48))}, ensure_ascii=False))
    for question in OUTSIDE:
        turn = {"messages": [{"role": "user", "content": question}]}
        print(json.dumps({**turn, "adapter": _text(_ask(args.url, spec.adapter_id, turn, 48))}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
