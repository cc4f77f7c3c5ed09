"""Asks a running serving app what a just-trained adapter answers: the last step of `./dev train`.

    python -m training.ask configs/train/demo_faq.yaml --fs-root ./jaxlora-fs --url http://127.0.0.1:8000

Reads the newest version of the spec's adapter from the store, waits (up to `--wait` seconds) until
the app serves that version (its `system_fingerprint`), then sends a few of the spec's training
prompts greedily and prints each answer beside the trained completion. Exits 1 if the version is
not served in time. Plain HTTP through the standard library: no Ray, no test dependencies.
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
from training.spec import TrainSpec


def _complete(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


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
            served = _complete(args.url, spec.adapter_id, rows[0]["prompt"], 1).get("system_fingerprint")
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
    for row in rows:
        answer = _complete(args.url, spec.adapter_id, row["prompt"], 16)["choices"][0]["text"]
        print(json.dumps({"prompt": row["prompt"], "trained": row["completion"], "answer": answer}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
