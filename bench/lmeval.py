"""lm-evaluation-harness through the app, against its own `hf` backend on the very same weights.

    python -m bench.lmeval [--model smollm2|bench] [--work DIR] [--batch-size N]

Writes two small tasks of its own (`dataset_path: json`, no download): `jaxlora_mc`, multiple
choice, which lm-evaluation-harness scores with loglikelihood requests (token ids, `echo`,
`logprobs: 1`, `max_tokens: 1`, the answer's tokens read back from the prompt's logprobs), and
`jaxlora_gen`, generate_until (greedy, up to a blank line or the next question). It runs them through the app's
/v1/completions with the harness's `local-completions` model (unchanged; its remote tokenizer reads
the app's /tokenizer_info and /tokenize) and through the harness's `hf` backend (transformers) on
the same checkpoint, then prints JSON: each task's accuracy both ways, the largest and mean
difference of an item's loglikelihood, and how many generated answers are equal. The app runs on a
local Ray started here; the default model is the real one (SmolLM2-135M-Instruct, exported from its
GGUF to a Hugging Face folder so that both sides load the same float32 weights).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.common import MODELS, bench_model, emit, machine, start_local_serve

MC_TASK, GEN_TASK = "jaxlora_mc", "jaxlora_gen"

# Questions a small instruct model answers some of: enough to tell an accuracy from chance.
_MC = [
    ("The capital of France is", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("The capital of Japan is", ["Seoul", "Tokyo", "Beijing", "Bangkok"], 1),
    ("Water freezes at a temperature of", ["100 degrees Celsius", "50 degrees Celsius", "0 degrees Celsius",
                                           "10 degrees Celsius"], 2),
    ("The largest planet in the solar system is", ["Mars", "Venus", "Earth", "Jupiter"], 3),
    ("Two plus two equals", ["four", "five", "three", "six"], 0),
    ("The color of a clear daytime sky is", ["green", "blue", "red", "purple"], 1),
    ("A week has this many days:", ["five", "six", "seven", "eight"], 2),
    ("The opposite of hot is", ["warm", "big", "fast", "cold"], 3),
    ("Bees make", ["honey", "milk", "silk", "wool"], 0),
    ("The animal known as the king of the jungle is the", ["mouse", "lion", "rabbit", "snail"], 1),
    ("The first month of the year is", ["March", "June", "January", "October"], 2),
    ("Ice is the solid form of", ["air", "salt", "sand", "water"], 3),
    ("The Sun rises in the", ["east", "west", "north", "south"], 0),
    ("A triangle has this many sides:", ["two", "three", "four", "five"], 1),
    ("The chemical symbol for gold is", ["Ag", "Fe", "Au", "Cu"], 2),
    ("Humans breathe in", ["helium", "neon", "argon", "oxygen"], 3),
]
_GEN = [
    ("Question: What is the capital of France?\nAnswer:", "Paris"),
    ("Question: What is 2 + 3?\nAnswer:", "5"),
    ("Question: What color is grass?\nAnswer:", "Green"),
    ("Question: How many legs does a spider have?\nAnswer:", "8"),
    ("Question: What is the opposite of up?\nAnswer:", "Down"),
    ("Question: Which planet do we live on?\nAnswer:", "Earth"),
    ("Question: What is the largest ocean on Earth?\nAnswer:", "Pacific"),
    ("Question: What language is spoken in Spain?\nAnswer:", "Spanish"),
]


def write_tasks(out: Path) -> Path:
    """The two tasks' data and YAML files under `out` (a TaskManager's include path), returned."""
    out.mkdir(parents=True, exist_ok=True)
    mc, gen = out / "mc.jsonl", out / "gen.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in _MC))
    gen.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in _GEN))
    common = "dataset_path: json\ntest_split: test\n"
    (out / f"{MC_TASK}.yaml").write_text(
        f"task: {MC_TASK}\n{common}dataset_kwargs:\n  data_files:\n    test: {mc}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "target_delimiter: ' '\nmetric_list:\n  - metric: acc\n")
    (out / f"{GEN_TASK}.yaml").write_text(
        f"task: {GEN_TASK}\n{common}dataset_kwargs:\n  data_files:\n    test: {gen}\noutput_type: generate_until\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: [\"\\n\\n\", \"Question:\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "  temperature: 0.0\n"
        "filter_list:\n  - name: strip\n    filter:\n      - function: regex\n        regex_pattern: '^\\s*(.*?)\\s*$'\n"
        "      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n    ignore_punctuation: true\n")
    return out


def evaluate(model: str, model_args: dict, tasks_dir: Path, batch_size: int = 1) -> dict:
    """lm-evaluation-harness's `simple_evaluate` of both tasks with `model` (its registry name), every
    sample logged."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[MC_TASK, GEN_TASK],
                                   task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True,
                                   batch_size=batch_size, device="cpu", random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


def compare(ours: dict, reference: dict) -> dict:
    """Per task: both accuracies; for the loglikelihood task the largest and mean |difference| of an
    item's (a choice's) loglikelihood, for the generation task how many answers are equal."""
    out = {}
    for task, metric in ((MC_TASK, "acc,none"), (GEN_TASK, "exact_match,strip")):
        mine = {s["doc_id"]: s for s in ours["samples"][task]}
        theirs = {s["doc_id"]: s for s in reference["samples"][task]}
        row = {"items": len(mine), "accuracy": ours["results"][task][metric],
               "reference_accuracy": reference["results"][task][metric]}
        if task == MC_TASK:
            diffs = [abs(a[0][0] - b[0][0]) for d in mine for a, b in zip(mine[d]["resps"], theirs[d]["resps"])]
            row |= {"loglikelihoods": len(diffs), "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs)}
        else:
            row |= {"answers_equal": sum(mine[d]["resps"] == theirs[d]["resps"] for d in mine),
                    "answers": {d: [mine[d]["resps"][0][0], theirs[d]["resps"][0][0]] for d in sorted(mine)}}
        out[task] = row
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="smollm2")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "jaxlora-bench"))
    p.add_argument("--batch-size", type=int, default=4, help="prompts per request the harness sends (a batch)")
    args = p.parse_args(argv)

    from ray import serve

    from serve_app.app import build_app

    work = Path(args.work)
    model_dir, _ = bench_model(work, 0, args.model)
    tasks = write_tasks(work / "lmeval-tasks")
    port = start_local_serve()
    try:
        serve.run(build_app({"model_dir": str(model_dir), "fs_root": str(work / "lmeval-fs"), "model_num_cpus": 1,
                             "engine": {"max_batch_size": 8, "max_seq_len": 512, "prefill_chunk": 64}}),
                  name="lmeval", route_prefix="/")
        ours = evaluate("local-completions", {"base_url": f"http://127.0.0.1:{port}/v1/completions",
                                              "model": model_dir.name, "max_length": 512, "num_concurrent": 1},
                        tasks, args.batch_size)
    finally:
        serve.shutdown()
    reference = evaluate("hf", {"pretrained": str(model_dir), "dtype": "float32"}, tasks, 1)
    emit({"benchmark": "lmeval", "model": args.model, "machine": machine(), "batch_size": args.batch_size,
          **compare(ours, reference)})


if __name__ == "__main__":
    main()
