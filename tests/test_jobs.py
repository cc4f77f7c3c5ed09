"""The core of files and fine-tuning jobs, without Ray: upload checks, the job records and their
lifecycle under concurrent writers, bounds on what a tenant may ask for, and the controller's choice
of which queued jobs start (fair between tenants)."""

from __future__ import annotations

import json
import threading

import pytest

from jaxlora.adapter_store import AdapterStore
from jaxlora.errors import DataError, InvalidRequest, ResourceNotFound, TenantOverLimit
from training.data import check_upload
from training.files import FileLimits, FileStore
from training.jobs import JobRequest, JobSettings, JobStore, adapter_id_of, new_job, next_to_start, page

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
PREF = {"input": {"messages": [{"role": "user", "content": "hi"}]},
        "preferred_output": [{"role": "assistant", "content": "hello"}],
        "non_preferred_output": [{"role": "assistant", "content": "go away"}]}


def _jsonl(*rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def test_uploads_accept_openai_and_project_formats_and_name_the_first_bad_line():
    kinds = check_upload(_jsonl({"prompt": "a", "completion": "b"}, CHAT, PREF, {"prompt": "p", "chosen": "c", "rejected": "r"}))
    assert kinds == {"completion": 1, "chat": 1, "chat_preference": 1, "preference": 1}
    for rows, message in (
        ((CHAT, {"messages": [{"role": "user", "content": "only a question"}]}), "line 2: the conversation has no assistant turn"),
        ((CHAT, {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}), "line 2: messages[0] has role 'robot'"),
        ((CHAT, {"messages": [{"role": "assistant", "content": "x", "weight": 0}]}), "line 2: messages[0] has fields ['weight']"),
        ((PREF | {"preferred_output": []},), "line 1: 'preferred_output' must be a non-empty list"),
        ((PREF | {"non_preferred_output": [{"role": "user", "content": "x"}]},), "line 1: 'non_preferred_output' must hold exactly one assistant"),
        (({"text": "x"},), "line 1: expected 'prompt'+'completion'"),
    ):
        with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
            check_upload(_jsonl(*rows))
    with pytest.raises(DataError, match="line 3: not valid JSON"):
        check_upload(_jsonl(CHAT) + b"\n{oops\n")
    with pytest.raises(DataError, match="holds no rows"):
        check_upload(b"\n\n")
    with pytest.raises(DataError, match="not UTF-8"):
        check_upload(b"\xff\xfe")


def test_file_store_keeps_tenants_apart_and_bounds_their_bytes(tmp_path):
    files = FileStore(tmp_path, FileLimits(max_file_bytes=200, max_total_bytes=300))
    data = _jsonl({"prompt": "a", "completion": "b"})
    f = files.create("alice", "../../etc/passwd", "fine-tune", data)
    assert f.filename == "passwd" and files.path("alice", f.id).read_bytes() == data
    with pytest.raises(ResourceNotFound) as theirs:
        files.get("bob", f.id)
    with pytest.raises(ResourceNotFound) as missing:
        files.get("bob", "file-" + "0" * 24)
    assert str(theirs.value).replace(f.id, "X") == str(missing.value).replace("file-" + "0" * 24, "X")
    with pytest.raises(ResourceNotFound):
        files.path("alice", "../bob")  # not a file id: never a path
    with pytest.raises(InvalidRequest, match="more than the limit of 200"):
        files.create("alice", "big", "fine-tune", data * 10)
    while True:  # fill the tenant's 300 bytes
        try:
            files.create("alice", "more", "fine-tune", data)
        except TenantOverLimit as e:
            assert "delete files first" in str(e)
            break
    assert files.create("bob", "his", "fine-tune", data)  # another tenant's total is its own
    files.delete("alice", f.id)
    assert f.id not in [x.id for x in files.list("alice")]


def _settings(**kw) -> JobSettings:
    return JobSettings(**({"base_model": "base", "max_queued_per_tenant": 2} | kw))


def test_job_requests_are_bounded_and_recorded_with_openai_fields(tmp_path):
    files, jobs, adapters = FileStore(tmp_path), JobStore(tmp_path), AdapterStore(tmp_path)
    f = files.create("alice", "d.jsonl", "fine-tune", _jsonl({"prompt": "a", "completion": "b"}))

    def create(**kw):
        return new_job(JobRequest(**({"model": "base", "training_file": f.id} | kw)), "alice", _settings(), files,
                       adapters, jobs)

    for kw, param in (({"hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs"),
                      ({"hyperparameters": {"learning_rate_multiplier": 100.0}}, "hyperparameters.learning_rate_multiplier"),
                      ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.5}}}}, "beta"),
                      ({"lora": {"r": 32}}, "lora.r"), ({"training_file": "file-" + "1" * 24}, "training_file"),
                      ({"model": "nobody"}, "model")):
        with pytest.raises(InvalidRequest) as e:
            create(**kw)
        assert e.value.param == param, kw
    job = create(suffix="faq", method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})
    assert job["status"] == "validating_files" and job["hyperparameters"] == {
        "n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0, "beta": 0.2}
    assert job["lora"] == {"r": 16, "alpha": 32.0, "target_modules": list(job["lora"]["target_modules"])}
    assert adapter_id_of(job) == f"ft-faq-{job['id'][-8:]}" and jobs.get("alice", job["id"]) == job
    create()
    with pytest.raises(TenantOverLimit, match="the limit is 2"):
        create()
    assert len(jobs.list("alice")) == 2 and jobs.list("bob") == []


def test_concurrent_updates_of_one_job_lose_no_write(tmp_path):
    jobs = JobStore(tmp_path)
    job = jobs.create("alice", {"created_at": 0, "status": "queued", "n": 0})

    def bump():
        for _ in range(50):
            jobs.update("alice", job["id"], lambda j: j | {"n": j["n"] + 1})

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert jobs.get("alice", job["id"])["n"] == 200


def test_the_controller_starts_the_tenant_with_fewest_running_first_then_the_oldest_job():
    def job(i: int) -> dict:
        return {"id": f"ftjob-{i:024x}", "created_at": i}

    queued = [("a", job(1)), ("a", job(2)), ("a", job(3)), ("b", job(4)), ("c", job(5))]
    # a's three jobs are older, yet b and c each start before a's second: fewest running first.
    picked = next_to_start(queued, running={}, free=4, per_tenant=2)
    assert [(t, j["created_at"]) for t, j in picked] == [("a", 1), ("b", 4), ("c", 5), ("a", 2)]
    assert next_to_start(queued, running={"a": 2}, free=5, per_tenant=2) == [("b", job(4)), ("c", job(5))]
    assert next_to_start(queued, running={}, free=0, per_tenant=2) == []


def test_pages_follow_the_after_cursor():
    items = [{"id": f"x{i}"} for i in range(5)]
    first = page(items, None, 2)
    assert [i["id"] for i in first["data"]] == ["x0", "x1"] and first["has_more"]
    last = page(items, "x2", 5)
    assert [i["id"] for i in last["data"]] == ["x3", "x4"] and not last["has_more"]
