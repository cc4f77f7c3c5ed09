"""The operator's path on a real two-node Ray cluster on this machine (not a test: it takes minutes).

    python -m bench.cluster [--keep]

Runs, with RAY_AUTH_MODE=token as Ray 2.59+ requires for the clusters it starts (and
RAY_SERVE_THROUGHPUT_OPTIMIZED=1 unless the environment says otherwise, as the README's walk sets):
  1. `ray start --head` (1 CPU) and a second node with `ray start --address` (1 CPU);
  2. the shared demo adapters into ./jaxlora-fs, then `serve deploy serve_config.yaml` (the shipped
     file, unchanged) and `serve status` until the app runs;
  3. a chat completion on a demo adapter;
  4. the README's training job: `ray job submit --working-dir . -- python -m training
     configs/train/demo_faq.yaml --fs-root $PWD/jaxlora-fs`;
  5. `python -m training.ask`, which waits until the app serves the new version and asks it the
     trained questions;
then stops the two nodes (unless --keep). Its processes are found by the cluster's own --temp-dir,
so other Ray instances on the machine are left alone (`ray stop` would stop every one of them).
Prints one JSON object last: each step's seconds and outcome, the nodes the model replica and the
training task ran on, and how many trained answers came back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMP_DIR = "/tmp/jaxlora-cluster"


def _env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    # The README's walk: token authentication, and Serve's high-throughput mode on every node
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", **os.environ, "RAY_AUTH_MODE": "token",
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}


def _run(cmd: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def _http(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _wait_running(dashboard: str, deadline_s: float = 600) -> dict:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        out = _run(["serve", "status", "--address", dashboard], check=False)
        if "RUNNING" in out.stdout and "DEPLOY_FAILED" not in out.stdout and "DEPLOYING" not in out.stdout:
            return {"serve_status": out.stdout}
        if "DEPLOY_FAILED" in out.stdout:
            raise RuntimeError(f"deploy failed:\n{out.stdout}")
        time.sleep(2)
    raise TimeoutError("the app did not reach RUNNING")


def _where(gcs: str) -> dict:
    """Which node each model replica and training task ran on (Ray's state API)."""
    code = ("import json, ray\nfrom ray.util.state import list_actors, list_tasks\n"
            f"ray.init(address='{gcs}', log_to_driver=False)\n"
            "model = list_actors(filters=[('class_name', '=', 'ServeReplica:jaxlora:LoRAModel')])\n"
            "train = list_tasks(filters=[('name', '=', 'train:local/demo-faq')])\n"
            "print(json.dumps({'alive_nodes': sum(n['Alive'] for n in ray.nodes()),\n"
            "                  'model_replica_nodes': sorted({a.node_id[:12] for a in model}),\n"
            "                  'train_task_nodes': sorted({t.node_id[:12] for t in train})}))\n")
    out = _run([sys.executable, "-c", code], check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("{")), None)
    return json.loads(line) if line else {"error": out.stderr[-500:]}


def _stop_cluster() -> int:
    """Ends every process of this cluster (their command lines name TEMP_DIR); returns how many."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if TEMP_DIR in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()
    return len(procs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=6390)
    ap.add_argument("--dashboard-port", type=int, default=8265)
    ap.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = ap.parse_args(argv)
    dashboard = f"http://127.0.0.1:{args.dashboard_port}"
    fs = ROOT / "jaxlora-fs"
    steps: dict[str, dict] = {}

    def step(name: str, fn):
        t0 = time.monotonic()
        result = fn()
        steps[name] = {"seconds": round(time.monotonic() - t0, 1), **(result or {})}
        print(f"{name}: {steps[name]['seconds']} s", file=sys.stderr, flush=True)
        return result

    _stop_cluster()  # a cluster an earlier run left behind
    try:
        step("auth_token", lambda: {"generated": bool(_run(["ray", "get-auth-token", "--generate"]).stdout)})
        step("head", lambda: {"out": _run(["ray", "start", "--head", f"--port={args.port}", "--num-cpus=1",
                                           f"--temp-dir={TEMP_DIR}", "--dashboard-host=127.0.0.1",
                                           f"--dashboard-port={args.dashboard_port}"]).stdout.splitlines()[-1:]})
        step("worker_node", lambda: {"out": _run(["ray", "start", f"--address=127.0.0.1:{args.port}", "--num-cpus=1",
                                                  f"--temp-dir={TEMP_DIR}"]).stdout.splitlines()[-1:]})
        def unauthenticated():
            out = _run(["env", "-u", "RAY_AUTH_MODE", "ray", "job", "list", "--address", dashboard], check=False)
            return {"refused_without_RAY_AUTH_MODE": out.returncode != 0 and "Authentication" in out.stdout + out.stderr}

        step("auth_required", unauthenticated)
        step("demo_adapters", lambda: {"out": _run([sys.executable, "-m", "jaxlora.demo", "--adapters", str(fs)]
                                                   ).stdout.splitlines()[-1:]})
        step("serve_deploy", lambda: (_run(["serve", "deploy", "serve_config.yaml", "--address", dashboard]),
                                      _wait_running(dashboard))[1])
        reply = step("chat", lambda: {"reply": _http("http://127.0.0.1:8000/v1/chat/completions", {
            "model": "demo-concise", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})})
        assert reply["reply"]["system_fingerprint"].startswith("demo-concise@"), reply
        job = step("ray_job_submit", lambda: {"tail": _run(
            ["ray", "job", "submit", "--address", dashboard, "--working-dir", ".", "--", "python", "-m", "training",
             "configs/train/demo_faq.yaml", "--fs-root", str(fs)], timeout=1200).stdout.splitlines()[-8:]})
        published = [json.loads(x) for x in job["tail"] if x.startswith('{"adapter"')]
        ask = step("served", lambda: {"out": _run([sys.executable, "-m", "training.ask", "configs/train/demo_faq.yaml",
                                                   "--fs-root", str(fs), "--questions", "8"]).stdout.splitlines()})
        answers = [json.loads(x) for x in ask["out"] if x.startswith("{")]
        where = _where(f"127.0.0.1:{args.port}")
        result = {"bench": "cluster", "steps": steps, "published": published, "placement": where,
                  "trained_answers_correct": sum(a["answer"].strip() == a["trained"].strip() for a in answers),
                  "questions": len(answers)}
    finally:
        if not args.keep:
            print(f"stopped {_stop_cluster()} processes of the cluster", file=sys.stderr)
    print(json.dumps(result))
    return 0 if result["trained_answers_correct"] == result["questions"] else 1


if __name__ == "__main__":
    sys.exit(main())
