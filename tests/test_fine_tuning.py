"""Tenants train their own adapters through the API (issue 15), on real Ray Serve with the official
`openai` client: files, fine-tuning jobs run as Ray tasks by the JobController, the result served
by name without a restart, and tenants kept apart (404 with the message of a missing resource)."""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from serve_app.app import build_app  # noqa: E402
from serve_app.keys import add_key  # noqa: E402

FAQ = Path("tests/data/toy_faq.jsonl")  # 32 short answers: the tiny model learns them in seconds
# 512 tokens: room for a tools prompt (the tiny model's tokenizer spends about a token a character on JSON)
ENGINE = {"max_batch_size": 8, "max_seq_len": 512, "prefill_chunk": 16, "decode_steps": 4, "max_queue": 64,
          "num_adapter_slots": 4, "max_lora_rank": 16}


class App:
    def __init__(self, url: str, keys: dict[str, str], model_dir: Path, fs: Path):
        self.url, self.keys, self.model_dir, self.base, self.fs = url, keys, model_dir, model_dir.name, fs

    def client(self, user: str = "alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[user], max_retries=0, timeout=120)

    def get(self, path: str, user: str = "alice") -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers={"Authorization": f"Bearer {self.keys[user]}"}, timeout=60)


@pytest.fixture(scope="module")
def app(ray_local, demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    keys_file = root / "keys.json"
    keys = {u: add_key(keys_file, u) for u in ("alice", "bob")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model_dir": str(demo_model_dir), "fs_root": str(root / "fs"), "poll_interval_s": 0.25,
            "model_num_cpus": 0, "auth": True, "api_keys_file": str(keys_file), "engine": ENGINE,
            "fine_tuning": {"poll_interval_s": 0.2, "max_queued_per_tenant": 2, "max_file_bytes": 65536,
                            "heartbeat_timeout_s": 5, "max_length": 512}}
    serve.run(build_app(args), name="ft", route_prefix="/")
    app = App(f"http://127.0.0.1:{port}", keys, demo_model_dir, root / "fs")
    app.args = args
    yield app
    serve.shutdown()


def _wait(client: openai.OpenAI, job_id: str, until: tuple[str, ...], timeout: float = 600):
    deadline = time.monotonic() + timeout
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in until:
        assert time.monotonic() < deadline, f"job {job_id} still {job.status} after {timeout} s"
        time.sleep(0.2)
    return job


def test_the_whole_loop_with_the_openai_client_serves_the_trained_faq(app):
    client = app.client()
    training = client.files.create(file=("faq.jsonl", FAQ.read_bytes()), purpose="fine-tune")
    assert training.bytes == len(FAQ.read_bytes()) and training.purpose == "fine-tune"
    validation = client.files.create(file=("valid.jsonl", b"".join(FAQ.read_bytes().splitlines(True)[:4])),
                                     purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=app.base, training_file=training.id, validation_file=validation.id, suffix="faq", seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 30, "batch_size": 8}}},
        extra_body={"lora": {"r": 16, "alpha": 32}})
    assert job.status == "validating_files" and job.fine_tuned_model is None
    done = _wait(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model and done.trained_tokens > 0 and done.finished_at >= done.created_at

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics"]
    assert len(losses) >= 100 and losses[-1] < losses[0] / 10  # the loss falls
    valid = [e.data["valid_loss"] for e in reversed(events) if e.type == "metrics"]
    assert len(valid) == len(losses) and valid[-1] < valid[0] / 10  # rows it trains on: the validation loss falls too
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in checkpoints.data] == [120, 100, 75, 50, 25]
    csv = client.files.content(done.result_files[0]).text.splitlines()
    assert csv[0] == "step,train_loss,valid_loss,tokens_per_s" and len(csv) == len(losses) + 1

    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    rows = [json.loads(line) for line in FAQ.read_text().splitlines()]

    def answered(model: str) -> int:
        return sum(client.completions.create(model=model, prompt=r["prompt"], max_tokens=12, temperature=0)
                   .choices[0].text == r["completion"] for r in rows)

    assert answered(done.fine_tuned_model) >= 30
    assert answered(app.base) == 0

    # Training further from it: the job starts from its weights (a low first loss), keeps its LoRA shape,
    # records where it came from, and serves a new model beside it.
    more = client.fine_tuning.jobs.create(model=done.fine_tuned_model, training_file=training.id, suffix="more",
                                          hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.1})
    assert more.to_dict()["parent_model_version"] == f"{done.fine_tuned_model}@v0001"
    assert more.to_dict()["lora"]["r"] == 16 and more.to_dict()["lora"]["alpha"] == 32
    more = _wait(client, more.id, ("succeeded", "failed", "cancelled"))
    assert more.status == "succeeded", more.error
    first = [e.data["train_loss"] for e in reversed(list(client.fine_tuning.jobs.list_events(more.id, limit=100)))
             if e.type == "metrics"][0]
    assert first < losses[0] / 10
    assert answered(more.fine_tuned_model) >= 30
    with pytest.raises(openai.BadRequestError) as e:  # another LoRA shape cannot continue it
        client.fine_tuning.jobs.create(model=done.fine_tuned_model, training_file=training.id, extra_body={"lora": {"r": 4}})
    assert e.value.param == "lora"
    # Another tenant cannot see it: not listed, and 404 as a model that does not exist.
    bob = app.client("bob")
    assert done.fine_tuned_model not in [m.id for m in bob.models.list()]
    with pytest.raises(openai.NotFoundError):
        bob.completions.create(model=done.fine_tuned_model, prompt="x", max_tokens=1)


def test_chat_format_trains_assistant_turns_under_the_chat_template_and_chat_answers(app):
    """A file in OpenAI's chat format: training renders each conversation with the chat template the
    chat endpoint applies and learns the assistant turns only, so chat.completions gives them back."""
    rows = [json.loads(line) for line in FAQ.read_text().splitlines()][:8]
    chats = [{"messages": [{"role": "system", "content": "Answer briefly."},
                           {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
             for r in rows]
    client = app.client()
    f = client.files.create(file=("chat.jsonl", "".join(json.dumps(c) + "\n" for c in chats).encode()),
                            purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=app.base, training_file=f.id, suffix="chat", seed=0,
                                         hyperparameters={"n_epochs": 40, "batch_size": 8})
    done = _wait(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error

    def reply(model: str, c: dict) -> str:
        return client.chat.completions.create(model=model, messages=c["messages"][:2], max_tokens=12,
                                              temperature=0).choices[0].message.content

    assert sum(reply(done.fine_tuned_model, c) == c["messages"][2]["content"] for c in chats) >= 7
    assert sum(reply(app.base, c) == c["messages"][2]["content"] for c in chats) == 0


def test_an_adapter_trained_on_function_calling_rows_is_served_with_its_tools(app):
    """OpenAI's function-calling fine-tuning rows (tools, assistant tool_calls): the adapter learns to
    call the tool, and the chat endpoint, given the same tools, returns its calls as tool_calls
    (tool_choice auto: nothing forces them, the adapter makes them), where the base model makes none."""
    tool = {"type": "function", "function": {"name": "color", "parameters": {
        "type": "object", "properties": {"of": {"type": "string"}}, "required": ["of"]}}}
    rows = [json.loads(line) for line in FAQ.read_text().splitlines()][:8:2]  # four topics
    topics = [r["prompt"].split("?")[0].split()[-1] for r in rows]  # "Q: What are adapters?\nA:" -> "adapters"
    chats = [{"tools": [tool], "messages": [
        {"role": "user", "content": r["prompt"]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": "color", "arguments": json.dumps({"of": t})}}]}]}
        for i, (r, t) in enumerate(zip(rows, topics))]
    client = app.client()
    f = client.files.create(file=("calls.jsonl", "".join(json.dumps(c) + "\n" for c in chats).encode()),
                            purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=app.base, training_file=f.id, suffix="calls", seed=0,
                                         hyperparameters={"n_epochs": 40, "batch_size": 1})
    done = _wait(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error

    def calls(model: str, c: dict) -> tuple[list[tuple[str, dict]], str | None]:
        choice = client.chat.completions.create(model=model, messages=c["messages"][:1], tools=[tool], max_tokens=120,
                                                temperature=0).choices[0]
        made = [(t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls or []]
        assert bool(made) == (choice.finish_reason == "tool_calls")
        return made, choice.message.content

    # Every answer is a call the endpoint parsed, of the tool, with an argument it was trained on (which
    # topic a question wants, this random 4-layer model learns for about half of them: not the point).
    got = [calls(done.fine_tuned_model, c) for c in chats]
    assert all(len(made) == 1 and made[0][0] == "color" and made[0][1].get("of") in topics for made, _ in got), got
    assert not any(calls(app.base, c)[0] for c in chats)


def test_a_dpo_job_on_openai_preference_rows_succeeds_and_is_served(app):
    rows = [json.loads(line) for line in FAQ.read_text().splitlines()][:8]
    prefs = [{"input": {"messages": [{"role": "user", "content": r["prompt"]}]},
              "preferred_output": [{"role": "assistant", "content": r["completion"]}],
              "non_preferred_output": [{"role": "assistant", "content": " I do not know."}]} for r in rows]
    client = app.client()
    f = client.files.create(file=("prefs.jsonl", "".join(json.dumps(p) + "\n" for p in prefs).encode()),
                            purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=app.base, training_file=f.id, suffix="dpo", seed=0, method={
        "type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 10, "batch_size": 4, "beta": 0.1}}})
    done = _wait(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.method.type == "dpo" and done.hyperparameters.n_epochs == 10
    losses = [e.data["train_loss"] for e in reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100)))
              if e.type == "metrics"]
    assert losses[-1] < losses[0]  # DPO's loss starts at log(2) and falls as the preferred answer wins
    r = client.chat.completions.create(model=done.fine_tuned_model, messages=prefs[0]["input"]["messages"], max_tokens=4)
    assert r.system_fingerprint == f"{done.fine_tuned_model}@v0001"


def test_a_malformed_upload_is_refused_naming_its_line(app):
    rows = b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n'
    with pytest.raises(openai.BadRequestError) as e:
        app.client().files.create(file=("bad.jsonl", rows), purpose="fine-tune")
    assert "line 2" in e.value.message and "'completion' must be a string" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        app.client().files.create(file=("bad.jsonl", b'{"prompt": "a", "completion": "b"}\nnot json\n'),
                                  purpose="fine-tune")
    assert "line 2: not valid JSON" in e.value.message
    assert not [f for f in app.client().files.list() if f.filename == "bad.jsonl"]  # nothing kept


def test_a_valid_file_unusable_for_dpo_fails_the_job_with_code_message_and_param(app):
    client = app.client()
    f = client.files.create(file=("sft.jsonl", FAQ.read_bytes()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=app.base, training_file=f.id, method={"type": "dpo"})
    done = _wait(client, job.id, ("succeeded", "failed", "cancelled"), timeout=60)
    assert done.status == "failed" and done.fine_tuned_model is None
    assert done.error.code == "invalid_training_file" and done.error.param == "training_file"
    assert f"{f.id}:1: DPO needs preference rows" in done.error.message  # names the file and its line, not our path


def test_another_tenants_files_and_jobs_are_404_with_the_message_of_missing_ones(app):
    alice, bob = app.client(), app.client("bob")
    f = alice.files.create(file=("mine.jsonl", FAQ.read_bytes()), purpose="fine-tune")
    job = alice.fine_tuning.jobs.create(model=app.base, training_file=f.id, method={"type": "dpo"})  # fails fast
    missing_file, missing_job = "file-" + "0" * 24, "ftjob-" + "0" * 24
    for path, missing in ((f"/v1/files/{f.id}", f"/v1/files/{missing_file}"),
                          (f"/v1/files/{f.id}/content", f"/v1/files/{missing_file}/content"),
                          (f"/v1/fine_tuning/jobs/{job.id}", f"/v1/fine_tuning/jobs/{missing_job}"),
                          (f"/v1/fine_tuning/jobs/{job.id}/events", f"/v1/fine_tuning/jobs/{missing_job}/events"),
                          (f"/v1/fine_tuning/jobs/{job.id}/checkpoints", f"/v1/fine_tuning/jobs/{missing_job}/checkpoints")):
        theirs, none = app.get(path, "bob"), app.get(missing, "bob")
        assert theirs.status_code == none.status_code == 404
        assert theirs.json()["error"]["message"].replace(f.id, "X").replace(job.id, "X") == \
            none.json()["error"]["message"].replace(missing_file, "X").replace(missing_job, "X")
    with pytest.raises(openai.NotFoundError):
        bob.files.delete(f.id)
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.BadRequestError):  # a job on another tenant's file: "no such file"
        bob.fine_tuning.jobs.create(model=app.base, training_file=f.id)
    assert f.id not in [x.id for x in bob.files.list()] and job.id not in [j.id for j in bob.fine_tuning.jobs.list()]
    assert f.id in [x.id for x in alice.files.list()]
    assert alice.files.delete(f.id).deleted  # the owner can
    assert f.id not in [x.id for x in alice.files.list()] and app.get(f"/v1/files/{f.id}").status_code == 404


def test_cancelling_a_running_job_ends_it_within_seconds_and_publishes_nothing(app):
    client = app.client("bob")
    f = client.files.create(file=("faq.jsonl", FAQ.read_bytes()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=app.base, training_file=f.id, suffix="never",  # 1600 steps
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})
    _wait(client, job.id, ("running",), timeout=300)
    while not [e for e in client.fine_tuning.jobs.list_events(job.id) if e.type == "metrics"]:
        time.sleep(0.1)  # a step ran: the task is training
    t0 = time.monotonic()
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    deadline = time.monotonic() + 30
    while not any("nothing was published" in e.message for e in client.fine_tuning.jobs.list_events(job.id)):
        assert time.monotonic() < deadline, "the task did not stop within 30 s of the cancel"
        time.sleep(0.1)
    assert time.monotonic() - t0 < 30
    steps = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert steps[0]["step"] < steps[0]["total_steps"] / 2  # it stopped, it did not run to its end
    assert client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model is None
    assert not [m.id for m in client.models.list() if m.id.startswith("ft-never")]
    assert not (app.fs / "users" / "bob" / "adapters").exists() or not list((app.fs / "users" / "bob" / "adapters").iterdir())
    with pytest.raises(openai.BadRequestError):  # finished: cannot be cancelled again
        client.fine_tuning.jobs.cancel(job.id)


def test_a_tenant_over_its_queued_job_limit_gets_429(app):
    """max_queued_per_tenant=2 here; the jobs wait behind each other (one runs at a time)."""
    client = app.client("bob")
    f = client.files.create(file=("faq.jsonl", FAQ.read_bytes()), purpose="fine-tune")
    created = []
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(4):
            created.append(client.fine_tuning.jobs.create(model=app.base, training_file=f.id,
                                                          hyperparameters={"n_epochs": 50}))
    assert "the limit is 2" in e.value.message and len(created) >= 2
    for job in created:
        client.fine_tuning.jobs.cancel(job.id)
    assert {client.fine_tuning.jobs.retrieve(j.id).status for j in created} == {"cancelled"}
    page = client.fine_tuning.jobs.list(limit=1)
    assert len(page.data) == 1 and page.has_more


def test_upload_size_limit_and_unknown_fields(app):
    with pytest.raises(openai.BadRequestError) as e:
        app.client().files.create(file=("big.jsonl", io.BytesIO(b'{"prompt": "a", "completion": "b"}\n' * 2000)),
                                  purpose="fine-tune")
    assert "more than the limit of 65536" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        app.client().files.create(file=("a.jsonl", FAQ.read_bytes()), purpose="assistants")
    assert e.value.param == "purpose"
    r = httpx.post(f"{app.url}/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {app.keys['alice']}"},
                   json={"model": app.base, "training_file": "file-x", "integrations": [{"type": "wandb"}]})
    assert r.status_code == 400 and "integrations" in r.text


def _peft_files(app: App, tmp_path: Path, seed: int, r: int = 8, poison: bool = False) -> dict:
    from jaxlora.adapter_format import write_peft
    from jaxlora.config import ModelConfig
    from jaxlora.tiny_model import random_adapter

    adapter = random_adapter(ModelConfig.from_dir(app.model_dir), r=r, alpha=2 * r, seed=seed, std=0.5)
    if poison:
        next(iter(adapter.weights.values()))[0][0, 0] = float("nan")
    out = tmp_path / f"peft-{seed}-{r}-{poison}"
    write_peft(adapter, out)
    return {"config": ("adapter_config.json", (out / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (out / "adapter_model.safetensors").read_bytes())}


def _upload(app: App, model: str, files: dict, user: str = "alice") -> httpx.Response:
    return httpx.post(f"{app.url}/v1/models/{model}/versions", files=files, timeout=60,
                      headers={"Authorization": f"Bearer {app.keys[user]}"})


def _fingerprint(app: App, model: str, user: str = "alice") -> str:
    return app.client(user).completions.create(model=model, prompt="x", max_tokens=1).system_fingerprint


def _until(check, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_tenants_upload_roll_back_and_delete_their_adapters_and_a_stream_survives_the_delete(app, tmp_path):
    ok = _upload(app, "mine", _peft_files(app, tmp_path, seed=1))
    assert ok.status_code == 200 and ok.json()["version"] == "v0001", ok.text
    assert _upload(app, "mine", _peft_files(app, tmp_path, seed=2)).json()["version"] == "v0002"
    _until(lambda: _fingerprint(app, "mine") == "mine@v0002")
    for files, message in ((_peft_files(app, tmp_path, seed=3, r=32), "max_lora_rank"),
                           (_peft_files(app, tmp_path, seed=3, poison=True), "NaN or infinite")):
        bad = _upload(app, "mine", files)
        assert bad.status_code == 400 and message in bad.json()["error"]["message"], bad.text
    assert _upload(app, "mine", {"config": _peft_files(app, tmp_path, seed=1)["config"]}).status_code == 400

    auth = {"Authorization": f"Bearer {app.keys['alice']}"}
    back = httpx.post(f"{app.url}/v1/models/mine/rollback", json={"version": "v0001"}, headers=auth, timeout=30)
    assert back.status_code == 200 and back.json()["latest_version"] == "v0001", back.text
    _until(lambda: _fingerprint(app, "mine") == "mine@v0001")
    assert httpx.post(f"{app.url}/v1/models/mine/rollback", json={"version": "v0009"}, headers=auth,
                      timeout=30).status_code == 404

    body = {"model": "mine", "prompt": "x", "max_tokens": 60, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{app.url}/v1/completions", json=body, headers=auth, timeout=120) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))  # the stream runs on its version
        assert app.client().models.delete("mine").deleted
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert rest[-1]["usage"]["completion_tokens"] == 60  # it finished on the version it started with
    with pytest.raises(openai.NotFoundError):
        app.client().completions.create(model="mine", prompt="x", max_tokens=1)
    assert "mine" not in [m.id for m in app.client().models.list()]
    # Made again under the same name it goes on after v0002: no cache can mistake it for the old v0001.
    assert _upload(app, "mine", _peft_files(app, tmp_path, seed=4)).json()["version"] == "v0003"


def test_an_uploaded_adapter_with_its_own_chat_template_is_prompted_through_it(app, tmp_path):
    from jaxlora.tokenizer import load_tokenizer, render_chat

    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant, in the adapter's own words] {% endif %}")
    files = _peft_files(app, tmp_path, seed=5) | {"chat_template": ("chat_template.jinja", template.encode())}
    assert _upload(app, "templated", files).status_code == 200
    _upload(app, "plain", _peft_files(app, tmp_path, seed=5))
    messages = [{"role": "user", "content": "Hello there"}]
    tokenizer = load_tokenizer(app.model_dir)

    def prompt_tokens(model: str) -> int:
        return app.client().chat.completions.create(model=model, messages=messages, max_tokens=1).usage.prompt_tokens

    own = len(tokenizer(render_chat(tokenizer, messages, chat_template=template), add_special_tokens=False)["input_ids"])
    base = len(tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"])
    assert own != base and prompt_tokens("templated") == own and prompt_tokens("plain") == base


def test_shared_adapters_and_the_base_model_cannot_be_changed_and_others_adapters_are_404(app, tmp_path):
    from jaxlora.adapter_store import AdapterStore

    files = _peft_files(app, tmp_path, seed=5)
    store = AdapterStore(app.fs)
    store.publish(None, "common", lambda d: [(d / n).write_bytes(b) for n, b in files.values()])
    assert _upload(app, "bobs", files, user="bob").status_code == 200
    for model in ("common", app.base):
        with pytest.raises(openai.PermissionDeniedError):
            app.client().models.delete(model)
    assert _upload(app, "common", files).status_code == 403
    with pytest.raises(openai.NotFoundError) as theirs:
        app.client().models.delete("bobs")
    with pytest.raises(openai.NotFoundError) as missing:
        app.client().models.delete("nobody")
    assert theirs.value.message.replace("bobs", "X") == missing.value.message.replace("nobody", "X")
    assert _fingerprint(app, "bobs", user="bob") == "bobs@v0001"  # still there


def test_a_job_survives_its_ingress_replica_being_killed(app):
    from ray.util import list_named_actors

    client = app.client()
    f = client.files.create(file=("faq.jsonl", FAQ.read_bytes()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=app.base, training_file=f.id, suffix="kill",
                                         hyperparameters={"n_epochs": 10, "batch_size": 8})
    _wait(client, job.id, ("running",), timeout=300)
    ingress = [a for a in list_named_actors(all_namespaces=True) if "ft#Ingress" in a["name"]]
    assert len(ingress) == 1, ingress
    ray.kill(ray.get_actor(ingress[0]["name"], namespace=ingress[0]["namespace"]), no_restart=True)
    deadline = time.monotonic() + 300
    while True:  # Serve starts a new ingress replica; the job went on without it
        try:
            done = client.fine_tuning.jobs.retrieve(job.id)
            if done.status in ("succeeded", "failed", "cancelled"):
                break
        except (openai.APIConnectionError, openai.InternalServerError, openai.APIStatusError):
            pass
        assert time.monotonic() < deadline, "the job did not finish after its ingress replica was killed"
        time.sleep(0.5)
    assert done.status == "succeeded", done.error
    steps = [e.data["step"] for e in reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100)))
             if e.type == "metrics"]
    assert steps == list(range(1, 41))  # every step's event, once: nothing lost, nothing run twice
    assert _fingerprint(app, done.fine_tuned_model) == f"{done.fine_tuned_model}@v0001"


def test_a_job_whose_controller_dies_is_requeued_and_resumes_from_its_checkpoint(app):
    """The controller owns the jobs' tasks, so its death takes the running task with it (Ray's
    ownership); the replica Serve starts in its place requeues the job once its heartbeat is
    heartbeat_timeout_s old, and the job resumes from its last checkpoint and succeeds."""
    from ray.util import list_named_actors

    client = app.client()
    f = client.files.create(file=("faq.jsonl", FAQ.read_bytes()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=app.base, training_file=f.id, suffix="resume",  # 64 steps
                                         hyperparameters={"n_epochs": 2, "batch_size": 1})
    _until(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, timeout=300)  # step 25 is saved
    controller = [a for a in list_named_actors(all_namespaces=True) if "ft#JobController" in a["name"]]
    assert len(controller) == 1, controller
    ray.kill(ray.get_actor(controller[0]["name"], namespace=controller[0]["namespace"]), no_restart=True)
    done = _wait(client, job.id, ("succeeded", "failed", "cancelled"), timeout=300)
    assert done.status == "succeeded", done.error
    events = list(reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100))))
    messages = [e.message for e in events]
    assert any(m.startswith("requeued: its task stopped reporting") for m in messages), messages
    resumed = messages.index("training resumed")
    before, after = ([e.data["step"] for e in part if e.type == "metrics"] for part in (events[:resumed], events[resumed:]))
    assert after[0] - 1 in (25, 50) and after == list(range(after[0], 65))  # from a checkpoint, to the end
    # The first task reported every step up to where it died: at the checkpoint it resumed from, or
    # past it (those steps run again), depending on when the kill landed.
    assert before == list(range(1, len(before) + 1)) and len(before) >= after[0] - 1
    assert _fingerprint(app, done.fine_tuned_model) == f"{done.fine_tuned_model}@v0001"


def test_stopping_and_starting_the_whole_app_loses_no_file_job_or_model(app):
    """Last in this module: it restarts the app. Files, jobs (with their events) and models are all on the
    filesystem; the new app's replicas answer for them as the old ones did."""
    client = app.client()
    before = ([f.id for f in client.files.list()], [(j.id, j.status, j.fine_tuned_model) for j in client.fine_tuning.jobs.list(limit=100)],
              sorted(m.id for m in client.models.list()))
    job = next(j for j in client.fine_tuning.jobs.list(limit=100) if j.status == "succeeded")
    events = [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    serve.delete("ft")
    serve.run(build_app(app.args), name="ft", route_prefix="/")
    after = ([f.id for f in client.files.list()], [(j.id, j.status, j.fine_tuned_model) for j in client.fine_tuning.jobs.list(limit=100)],
             sorted(m.id for m in client.models.list()))
    assert after == before and len(before[1]) >= 5
    assert [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=100)] == events
    assert _fingerprint(app, job.fine_tuned_model) == f"{job.fine_tuned_model}@v0001"
