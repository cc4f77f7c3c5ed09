"""Device slots with eviction, and hot reload of new versions, on real files and the real model."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from jaxlora.adapter_format import read_published, write_peft
from jaxlora.tiny_model import random_adapter
from jaxlora.adapter_store import AdapterStore
from jaxlora.hf_checkpoint import load_params, model_fingerprint
from jaxlora.errors import AdapterFormatError, AdapterNotFoundError
from jaxlora.adapter_versions import AdapterVersions
from jaxlora.lora import zeros_stack
from jaxlora.model import KVCache, forward, lora_shapes
from jaxlora.errors import NoFreeSlot
from jaxlora.slots import SlotCache

MAX_RANK = 8
MODULE_SETS = [("q_proj", "v_proj"), ("o_proj", "down_proj"), ("k_proj", "gate_proj", "up_proj"),
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), ("up_proj",)]


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    d = tiny_checkpoints["llama_gqa"]
    params, cfg = load_params(d)
    return params, cfg, model_fingerprint(d)


def _publish(store, cfg, fingerprint, user, adapter_id, seed, r=4, modules=MODULE_SETS[3]):
    ad = random_adapter(cfg, r=r, alpha=2 * r, modules=modules, seed=seed, std=0.5)
    return store.publish(user, adapter_id, lambda d: write_peft(ad, d),
                         base_model={"name": "tiny", "fingerprint": fingerprint})


def _slots(params, cfg, fingerprint, num_slots, host_capacity=64):
    return SlotCache(zeros_stack(lora_shapes(cfg), num_slots, MAX_RANK),
                     loader=lambda r: read_published(r.path, cfg, MAX_RANK, fingerprint), host_capacity=host_capacity)


def _logits(params, cfg, stack, slot, prompt):
    out, _ = forward(params, np.array([prompt]), np.arange(len(prompt))[None], cfg, lora=stack, slots_B=np.array([slot]))
    return np.asarray(out[0])


def test_more_adapters_than_slots_stays_correct(tmp_path, model):
    params, cfg, fp = model
    store = AdapterStore(tmp_path)
    refs = [_publish(store, cfg, fp, "alice", f"ad{i}", seed=i, r=2 + i, modules=MODULE_SETS[i]) for i in range(5)]
    big = _slots(params, cfg, fp, num_slots=6)
    prompt = [5, 17, 42, 99, 3, 8]
    big_slots = {r.adapter_id: big.acquire(r) for r in refs}  # each acquire donates the previous stack
    expected = {name: _logits(params, cfg, big.stack, slot, prompt) for name, slot in big_slots.items()}
    small = _slots(params, cfg, fp, num_slots=3, host_capacity=2)  # two usable slots, two host entries
    rng = np.random.default_rng(0)
    for i in rng.integers(0, 5, size=16):  # bitwise: once gathered from its slot, shapes match the big stack's
        slot = small.acquire(refs[i])
        np.testing.assert_array_equal(_logits(params, cfg, small.stack, slot, prompt), expected[refs[i].adapter_id])
        small.release(slot)
    assert small.stats.evictions > 0 and small.stats.loads > 5
    a, b = small.acquire(refs[0]), small.acquire(refs[1])  # both usable slots pinned
    with pytest.raises(NoFreeSlot, match="all 2 adapter slots are in use"):
        small.acquire(refs[2])
    small.release(a)
    small.acquire(refs[2])  # evicts the released one, never the pinned one
    np.testing.assert_array_equal(_logits(params, cfg, small.stack, b, prompt), expected["ad1"])


def _greedy(params, cfg, stack, slot, prompt, steps, cache=None, start=None):
    """Greedy tokens for one row; resumable from (cache, start) to decode across an event."""
    if cache is None:
        cache = KVCache.zeros(cfg, 1, 64)
        logits, cache = forward(params, np.array([prompt]), np.arange(len(prompt))[None], cfg, cache, stack, np.array([slot]))
        start = (int(np.argmax(logits[0, -1])), len(prompt))
    tok, pos = start
    out = []
    for _ in range(steps):
        out.append(tok)
        logits, cache = forward(params, np.array([[tok]]), np.array([[pos]]), cfg, cache, stack, np.array([slot]))
        tok, pos = int(np.argmax(logits[0, -1])), pos + 1
    return out, cache, (tok, pos)


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_version_published_mid_generation(tmp_path, model):
    params, cfg, fp = model
    store = AdapterStore(tmp_path)
    _publish(store, cfg, fp, "alice", "faq", seed=1)
    slots = _slots(params, cfg, fp, num_slots=4)
    versions = AdapterVersions(store, slots)
    prompt = [11, 12, 13, 14, 15]

    v1 = versions.current("alice", "faq")
    slot_v1 = slots.acquire(v1)
    first, cache, state = _greedy(params, cfg, slots.stack, slot_v1, prompt, 6)
    _publish(store, cfg, fp, "alice", "faq", seed=2)
    versions.poll_once()
    _wait_for(lambda: versions.current("alice", "faq").version == "v0002")
    slot_v2 = slots.acquire(versions.current("alice", "faq"))  # the new version takes another slot
    assert slot_v2 != slot_v1
    rest, _, _ = _greedy(params, cfg, slots.stack, slot_v1, prompt, 6, cache, state)
    running = first + rest

    slot_again = slots.acquire(store.resolve("alice", "faq@v0001"))
    assert slot_again == slot_v1  # the pinned version is a cache hit, same slot
    fresh_v1, _, _ = _greedy(params, cfg, slots.stack, slot_again, prompt, 12)
    fresh_v2, _, _ = _greedy(params, cfg, slots.stack, slot_v2, prompt, 12)
    assert running == fresh_v1  # the running generation finished on the version it began with
    assert fresh_v2 != fresh_v1  # ... and the versions really differ
    assert versions.stats.reloads == 1


def test_failed_new_version_leaves_the_old_one_serving(tmp_path, model, monkeypatch):
    params, cfg, fp = model
    store = AdapterStore(tmp_path)
    _publish(store, cfg, fp, "alice", "faq", seed=1)
    slots = _slots(params, cfg, fp, num_slots=4)
    started = []  # the versions whose loads the watcher started (poll_once starts them before returning)
    real_prefetch = slots.prefetch
    monkeypatch.setattr(slots, "prefetch", lambda r: started.append(r.version) or real_prefetch(r))
    versions = AdapterVersions(store, slots)
    assert versions.current("alice", "faq").version == "v0001"
    bad = _publish(store, cfg, fp, "alice", "faq", seed=2)
    weights = bad.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # damaged after publishing (e.g. a bad copy)
    versions.poll_once()
    _wait_for(lambda: versions.stats.reload_failures == 1)
    versions.poll_once()  # the same broken pointer is not retried every poll
    assert started == ["v0002"]
    assert versions.stats.reload_failures == 1 and slots.stats.load_failures == 1
    assert versions.current("alice", "faq").version == "v0001"
    _publish(store, cfg, fp, "alice", "faq", seed=3)
    versions.poll_once()
    _wait_for(lambda: versions.current("alice", "faq").version == "v0003")
    assert started == ["v0002", "v0003"]


def test_adapter_for_another_base_model_is_refused(tmp_path, model):
    params, cfg, fp = model
    store = AdapterStore(tmp_path)
    r = store.publish("alice", "other", lambda d: write_peft(random_adapter(cfg, 2, 2, ("q_proj",)), d),
                      base_model={"name": "some-other-llama", "fingerprint": "0123456789abcdef"})
    slots = _slots(params, cfg, fp, num_slots=2)
    with pytest.raises(AdapterFormatError, match="trained for base model some-other-llama .* retrain it on this base model"):
        slots.acquire(r)


def test_deleted_adapter_becomes_not_found(tmp_path, model):
    params, cfg, fp = model
    store = AdapterStore(tmp_path)
    _publish(store, cfg, fp, "alice", "gone", seed=1)
    _publish(store, cfg, fp, "alice", "stays", seed=2)
    slots = _slots(params, cfg, fp, num_slots=4)
    versions = AdapterVersions(store, slots)
    slots.acquire(versions.current("alice", "gone"))
    shutil.rmtree(tmp_path / "users/alice/adapters/gone")
    versions.poll_once()
    with pytest.raises(AdapterNotFoundError):
        versions.current("alice", "gone")
    assert versions.current("alice", "stays").version == "v0001"


def test_watcher_thread_picks_up_a_new_version(tmp_path, model):
    params, cfg, fp = model
    store = AdapterStore(tmp_path)
    _publish(store, cfg, fp, "alice", "faq", seed=1)
    slots = _slots(params, cfg, fp, num_slots=4)
    versions = AdapterVersions(store, slots, poll_interval_s=0.05)
    versions.current("alice", "faq")
    versions.start()
    try:
        _publish(store, cfg, fp, "alice", "faq", seed=2)
        _wait_for(lambda: versions.current("alice", "faq").version == "v0002", timeout=2.0)  # no poll_once here
    finally:
        versions.stop()
