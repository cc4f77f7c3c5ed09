"""The adapter store on real files: layout, resolution, atomic publishing, confinement."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from jaxlora.adapter_store import MANIFEST, AdapterStore, sha256_of
from jaxlora.errors import AdapterNotFoundError, InvalidAdapterRef


def _writer(payload: str):
    def write(folder: Path) -> None:
        (folder / "params.json").write_text(json.dumps({"payload": payload}))
    return write


def _payload(store: AdapterStore, user: str, ref: str) -> str:
    return json.loads((store.resolve(user, ref).path / "params.json").read_text())["payload"]


def test_publish_resolve_pin_and_latest(tmp_path):
    store = AdapterStore(tmp_path)
    v1 = store.publish("alice", "faq", _writer("one"), base_model={"name": "demo", "fingerprint": "abc"})
    v2 = store.publish("alice", "faq", _writer("two"))
    assert (v1.version, v2.version) == ("v0001", "v0002")
    adir = tmp_path / "users/alice/adapters/faq"
    assert os.readlink(adir / "latest") == "v0002"  # relative link
    assert _payload(store, "alice", "faq") == "two"
    assert _payload(store, "alice", "faq@v0001") == "one"
    assert store.resolve("alice", "faq").key == ("user:alice", "faq", "v0002")
    m1, m2 = (json.loads((v.path / MANIFEST).read_text()) for v in (v1, v2))
    assert m1["parent_version"] is None and m2["parent_version"] == "v0001"
    assert m1["base_model"] == {"name": "demo", "fingerprint": "abc"}
    assert m1["weights_sha256"] == {"params.json": sha256_of(v1.path / "params.json")}
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(m1["created_at"])
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=5)  # an aware UTC time of publishing
    with pytest.raises(AdapterNotFoundError, match="has no version v0009; available: v0001, v0002"):
        store.resolve("alice", "faq@v0009")


def test_newest_version_without_latest_link(tmp_path):
    store = AdapterStore(tmp_path)
    store.publish("alice", "faq", _writer("one"))
    store.publish("alice", "faq", _writer("two"))
    (tmp_path / "users/alice/adapters/faq/latest").unlink()
    assert store.resolve("alice", "faq").version == "v0002"


def test_shared_adapters_and_tenant_isolation(tmp_path):
    store = AdapterStore(tmp_path)
    store.publish(None, "common", _writer("shared"))
    store.publish("alice", "private", _writer("alice's"))
    assert _payload(store, "bob", "common") == "shared"
    assert store.resolve("bob", "common").owner == "shared"
    with pytest.raises(AdapterNotFoundError, match="adapter 'private' does not exist"):
        store.resolve("bob", "private")  # exactly like a missing one
    assert [a.adapter_id for a in store.list("alice")] == ["private", "common"]
    assert [a.adapter_id for a in store.list("bob")] == ["common"]
    store.publish("bob", "common", _writer("bob's own"))  # a tenant's own adapter shadows a shared one
    assert _payload(store, "bob", "common") == "bob's own"


@pytest.mark.parametrize("ref", ["../alice/adapters/private", "/etc/passwd", "a/b", "..", ".hidden", "x" * 65,
                                 "faq@latest", "faq@v1", "faq@../../x", "", "faq@v0001/..", "fa q"])
def test_malformed_refs_are_refused(tmp_path, ref):
    store = AdapterStore(tmp_path)
    store.publish("alice", "faq", _writer("one"))
    with pytest.raises(InvalidAdapterRef):
        store.resolve("bob", ref)


@pytest.mark.parametrize("user", ["../alice", "/", "alice/..", ""])
def test_malformed_user_ids_are_refused(tmp_path, user):
    with pytest.raises(InvalidAdapterRef, match="invalid user id"):
        AdapterStore(tmp_path).resolve(user, "faq")


def test_symlinks_that_escape_are_refused(tmp_path):
    store = AdapterStore(tmp_path / "fs")
    store.publish("alice", "private", _writer("secret"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "params.json").write_text(json.dumps({"payload": "outside"}))
    bob = tmp_path / "fs/users/bob/adapters"
    bob.mkdir(parents=True)
    # An adapter folder that is a link to another tenant's adapter.
    (bob / "steal").symlink_to(tmp_path / "fs/users/alice/adapters/private")
    # A version folder that is a link out of the store.
    (bob / "escape").mkdir()
    (bob / "escape/v0001").symlink_to(outside)
    # A `latest` link pointing at another tenant's version.
    (bob / "sneaky").mkdir()
    (bob / "sneaky/latest").symlink_to("../../../alice/adapters/private/v0001")
    for ref in ("steal", "escape", "escape@v0001"):
        with pytest.raises(InvalidAdapterRef, match="points outside its folder"):
            store.resolve("bob", ref)
    with pytest.raises(AdapterNotFoundError):  # `latest` must name a version; anything else is ignored
        store.resolve("bob", "sneaky")


def test_registered_folders_must_lie_inside_allowed_roots(tmp_path):
    (tmp_path / "ceph/team/ad/v0001").mkdir(parents=True)
    (tmp_path / "ceph/team/ad/v0001/params.json").write_text(json.dumps({"payload": "ceph"}))
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(InvalidAdapterRef, match="outside the allowed roots"):
        AdapterStore(tmp_path / "fs", registered={"x": tmp_path / "elsewhere"}, allowed_roots=[tmp_path / "ceph"])
    with pytest.raises(InvalidAdapterRef, match="outside the allowed roots"):
        AdapterStore(tmp_path / "fs", registered={"x": tmp_path / "ceph/../elsewhere"}, allowed_roots=[tmp_path / "ceph"])
    store = AdapterStore(tmp_path / "fs", registered={"team-ad": tmp_path / "ceph/team/ad"}, allowed_roots=[tmp_path / "ceph"])
    assert _payload(store, "anyone", "team-ad") == "ceph"
    assert store.resolve("anyone", "team-ad").key == ("registered", "team-ad", "v0001")


def _publish_many(fs_root: str, tag: str, n: int, size: int) -> list[str]:
    store = AdapterStore(fs_root)
    return [store.publish("alice", "race", _writer(f"{tag}-{i}-" + "x" * size)).version for i in range(n)]


def test_two_concurrent_publishers_and_a_polling_reader(tmp_path):
    store = AdapterStore(tmp_path)
    store.publish("alice", "race", _writer("seed"))
    seen, problems, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                r = store.resolve("alice", "race")
                manifest = json.loads((r.path / "manifest.json").read_text())
                if sha256_of(r.path / "params.json") != manifest["weights_sha256"]["params.json"]:
                    problems.append(f"{r.version}: weights do not match the manifest")
                json.loads((r.path / "params.json").read_text())
                seen.add(r.version)
            except Exception as e:  # any partial state is a failure
                problems.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_publish_many, [(str(tmp_path), "A", 6, 200_000), (str(tmp_path), "B", 6, 200_000)])
    deadline = time.monotonic() + 10
    while "v0013" not in seen and not problems:  # the reader has also checked the final version
        assert time.monotonic() < deadline, f"the reader never saw v0013, only {sorted(seen)}"
        time.sleep(0.01)
    stop.set()
    t.join()
    published = results[0] + results[1]
    assert problems == []
    assert len(set(published)) == 12  # two publishers, twelve distinct versions
    assert AdapterStore.versions(tmp_path / "users/alice/adapters/race") == [f"v{i:04d}" for i in range(1, 14)]
    assert store.resolve("alice", "race").version == "v0013"  # latest ends on the newest
    assert len(seen) > 1
    payloads = {_payload(store, "alice", f"race@{v}").split("-")[0] + _payload(store, "alice", f"race@{v}").split("-")[1]
                for v in published}
    assert payloads == {f"{tag}{i}" for tag in "AB" for i in range(6)}
    assert not [p for p in (tmp_path / "users/alice/adapters/race").iterdir() if p.name.startswith(".tmp-")]


def test_failed_publish_leaves_nothing_visible(tmp_path):
    store = AdapterStore(tmp_path)
    store.publish("alice", "faq", _writer("one"))

    def broken(folder: Path) -> None:
        (folder / "params.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        store.publish("alice", "faq", broken)
    adir = tmp_path / "users/alice/adapters/faq"
    assert AdapterStore.versions(adir) == ["v0001"]
    assert os.readlink(adir / "latest") == "v0001"
    assert not [p for p in adir.iterdir() if p.name.startswith(".tmp-")]
