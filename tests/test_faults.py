"""Faults that must not lose data: publishing that fails part-way (no space, permission denied),
at every step of the atomic publish, leaves `latest` and every visible version as they were."""

from __future__ import annotations

import errno
import json
import os

import pytest

from jaxlora import adapter_store
from jaxlora.adapter_store import AdapterStore


def _writer(payload):
    def write(folder):
        (folder / "params.json").write_text(json.dumps({"payload": payload}))
    return write


def _visible(store: AdapterStore, adir):
    return AdapterStore.versions(adir), os.readlink(adir / "latest"), sorted(p.name for p in adir.iterdir())


@pytest.mark.parametrize("phase", ["write", "fsync", "rename", "link", "swap"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_publish_failure_at_any_phase_changes_nothing_visible(tmp_path, monkeypatch, phase, err):
    store = AdapterStore(tmp_path)
    store.publish("alice", "faq", _writer("one"))
    adir = tmp_path / "users/alice/adapters/faq"
    before = _visible(store, adir)
    boom = OSError(err, os.strerror(err))

    def fail(*_a, **_k):
        raise boom

    def half_written(folder):  # the disk fills up half-way through the files
        (folder / "params.json").write_text("{")
        raise boom

    writer = half_written if phase == "write" else _writer("two")
    if phase == "fsync":
        monkeypatch.setattr(adapter_store, "_fsync", fail)
    elif phase == "rename":
        monkeypatch.setattr(adapter_store.os, "rename", fail)
    elif phase == "link":
        monkeypatch.setattr(adapter_store.os, "symlink", fail)
    elif phase == "swap":
        monkeypatch.setattr(adapter_store.os, "replace", fail)

    with pytest.raises(OSError) as e:
        store.publish("alice", "faq", writer)
    assert e.value.errno == err
    monkeypatch.undo()
    versions, latest, names = _visible(store, adir)
    assert latest == before[1] == "v0001"
    assert store.resolve("alice", "faq").version == "v0001"
    assert not [n for n in names if n.startswith((".tmp-", ".latest-"))]  # nothing half-written left behind
    if phase in ("link", "swap"):
        # The version folder was already complete and renamed; it is whole but not `latest`, and
        # the next publish moves past it.
        assert versions == ["v0001", "v0002"]
        assert json.loads((adir / "v0002/params.json").read_text()) == {"payload": "two"}
        assert store.publish("alice", "faq", _writer("three")).version == "v0003"
    else:
        assert versions == ["v0001"]
        assert store.publish("alice", "faq", _writer("three")).version == "v0002"
    assert store.resolve("alice", "faq").version == AdapterStore.versions(adir)[-1]


@pytest.mark.parametrize("field,value", [("user_id", "../alice"), ("adapter_id", "../../etc"), ("adapter_id", "/abs"),
                                         ("user_id", "bob/../alice"), ("adapter_id", "")])
def test_training_spec_refuses_names_that_leave_the_tenant_folder(field, value):
    from pydantic import ValidationError

    from training.spec import TrainSpec

    spec = {"user_id": "alice", "adapter_id": "faq", "data": "d.jsonl", "steps": 1, field: value}
    with pytest.raises(ValidationError, match="invalid (user|adapter) id"):
        TrainSpec(**spec)


def test_api_keys_are_stored_hashed_and_checked(tmp_path):
    from serve_app.keys import ApiKeys, add_key

    path = tmp_path / "keys.json"
    key_a, key_b = add_key(path, "alice"), add_key(path, "bob")
    stored = path.read_text()
    assert key_a not in stored and key_b not in stored and oct(path.stat().st_mode & 0o777) == "0o600"
    keys = ApiKeys.load(path)
    assert (keys.lookup(key_a)[0], keys.lookup(key_b)[0]) == ("alice", "bob")
    assert keys.lookup(key_a[:-1]) is None and keys.lookup("") is None and keys.lookup("\udcff") is None
