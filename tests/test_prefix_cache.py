"""Chunked prefill and the prefix cache: a hit gives bitwise the tokens of no hit, greedy output
over shared prefixes equals transformers + PEFT, a new adapter version never reads the old one's
KV, the store keeps to its bytes, and a long prompt's chunks interleave with decode calls."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from jaxlora.adapter_store import AdapterStore
from jaxlora.adapter_versions import AdapterVersions
from jaxlora.engine import ChunkKV, EngineConfig
from jaxlora.hf_checkpoint import model_fingerprint
from jaxlora.prefix_cache import PrefixCache
from jaxlora.replica import build_replica
from jaxlora.requests import TokenEvent
from jaxlora.sampling import SamplingParams
from jaxlora.scheduler import Scheduler
from tests.engine_fixtures import build_tiny_engine, collect
from tests.peft_adapters import load_peft, make_peft_adapter, peft_greedy

GREEDY = dict(temperature=0.0, ignore_eos=True)
SAMPLINGS = [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, top_k=40, seed=77, repetition_penalty=1.2)]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints, tmp_path_factory):
    return build_tiny_engine(tiny_checkpoints["llama_gqa"], tmp_path_factory.mktemp("prefix"))


def _prompt(rng, n):
    return rng.integers(3, 211, size=n).tolist()


def _run(sched: Scheduler, *requests):
    handles = [sched.submit(*r) for r in requests]
    return [collect(h) for h in handles]


# -- the store alone -------------------------------------------------------------------------------

def _kv(value: float, nbytes: int = 64) -> ChunkKV:
    return ChunkKV(k=(np.full(nbytes // 8, value, np.float32),), v=(np.full(nbytes // 8, value, np.float32),))


def test_chunk_keys_fix_the_whole_prefix_and_the_base_model():
    cache = PrefixCache(1 << 20, chunk=4, base="m1")
    a = cache.chunk_keys([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(a) == 2  # complete chunks only
    b = cache.chunk_keys([0, 2, 3, 4, 5, 6, 7, 8])
    assert a[1] != b[1]  # the same second chunk after another first one is another key
    assert cache.chunk_keys([1, 2, 3, 4, 5, 6, 7, 8]) == a
    assert PrefixCache(1 << 20, chunk=4, base="m2").chunk_keys([1, 2, 3, 4]) != a[:1]


def test_the_store_keeps_to_its_bytes_evicting_later_chunks_first():
    cache = PrefixCache(capacity_bytes=4 * 64, chunk=4)
    keys = cache.chunk_keys(list(range(4 * 8)))
    for i, key in enumerate(keys[:4]):
        cache.put(None, key, _kv(i))
    assert cache.bytes == 4 * 64 and len(cache) == 4
    assert [float(kv.k[0][0]) for kv in cache.lookup(None, keys[:4])] == [0, 1, 2, 3]
    # that lookup touched chunk 3 first and chunk 0 last: a new entry evicts chunk 3, then 2
    other = cache.chunk_keys([9] * 8)
    cache.put(None, other[0], _kv(9))
    cache.put(None, other[1], _kv(9))
    assert cache.bytes <= cache.capacity_bytes and cache.stats.evictions == 2
    assert len(cache.lookup(None, keys[:4])) == 2  # chunks 0 and 1 are still there
    cache.put(None, keys[5], _kv(5, nbytes=10 * 64))  # larger than the whole budget: not kept
    assert (None, keys[5]) not in cache and cache.bytes <= cache.capacity_bytes


def test_drop_forgets_one_adapter_version_only():
    cache = PrefixCache(1 << 20, chunk=4)
    key = cache.chunk_keys([1, 2, 3, 4])[0]
    v1, v2 = ("user:t", "a", "v0001"), ("user:t", "a", "v0002")
    for adapter in (v1, v2, None):
        cache.put(adapter, key, _kv(1))
    cache.drop(v1)
    assert not cache.lookup(v1, [key]) and cache.lookup(v2, [key]) and cache.lookup(None, [key])
    assert cache.stats.dropped == 1 and cache.bytes == 2 * 64


# -- on the engine ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded"])
def test_a_cache_hit_is_bitwise_the_same_alone_and_in_a_busy_batch(tiny, sampling):
    rng = np.random.default_rng(5)
    shared = _prompt(rng, 37)  # four complete chunks of 8, then more
    needle = (shared + _prompt(rng, 6), SamplingParams(max_tokens=16, logprobs=5, ignore_eos=True, **sampling),
              tiny.adapters["b_all_r8_rslora"])
    sched = tiny.scheduler(start=False)
    sched.prefix = PrefixCache(0, tiny.engine.config.prefill_chunk)  # off: nothing kept, nothing found
    sched.start()
    try:
        expected = _run(sched, needle)[0]
    finally:
        sched.stop()
    assert expected[3].cached_tokens == 0

    sched = tiny.scheduler()
    try:
        warm = (shared + _prompt(rng, 3), SamplingParams(max_tokens=2, **GREEDY), needle[2])
        _run(sched, warm)
        hit = _run(sched, needle)[0]
        assert hit[3].cached_tokens == 32  # the needle's first four chunks came from the warm request
        names = [None, *tiny.adapters]
        fillers = [(shared[:int(rng.integers(1, 37))] + _prompt(rng, int(rng.integers(1, 12))),
                    SamplingParams(max_tokens=int(rng.integers(4, 24)), temperature=float(rng.choice([0.0, 1.0])),
                                   seed=int(rng.integers(0, 2**31)), ignore_eos=True),
                    tiny.adapters.get(names[int(rng.integers(0, len(names)))])) for _ in range(9)]
        busy = _run(sched, *fillers[:4], needle, *fillers[4:])[4]
    finally:
        sched.stop()
    for got in (hit, busy):
        assert got[:3] == expected[:3]  # tokens, logprobs (float equality) and alternatives
    assert busy[3].cached_tokens == 40  # by then its own first five chunks were cached too


def test_greedy_over_shared_prefixes_with_the_cache_equals_peft(tiny):
    rng = np.random.default_rng(6)
    system = _prompt(rng, 30)
    jobs = [(a, system + _prompt(rng, int(n))) for a, n in
            [(None, 4), ("a_qv_r4", 9), ("b_all_r8_rslora", 2), ("c_mlp_r2", 12), ("a_qv_r4", 5), (None, 11)]]
    sched = tiny.scheduler()
    try:
        _run(sched, *[(p, SamplingParams(max_tokens=1, **GREEDY), tiny.adapters.get(a)) for a, p in jobs])  # fill the cache
        results = _run(sched, *[(p, SamplingParams(max_tokens=16, **GREEDY), tiny.adapters.get(a)) for a, p in jobs])
    finally:
        sched.stop()
    # every chunk before the last of each prompt: the three of the shared 30 tokens, and its own
    assert [r[3].cached_tokens for r in results] == [(len(p) - 1) // 8 * 8 for _, p in jobs]
    assert min(r[3].cached_tokens for r in results) == 24
    peft_model = load_peft(tiny.base_dir, tiny.peft_dirs)
    for (adapter, p), got in zip(jobs, results):
        assert got[0] == peft_greedy(peft_model, adapter, p, 16), adapter


def test_a_new_adapter_version_never_reads_the_old_versions_kv(tiny, tmp_path):
    store = tiny.store
    v1 = store.resolve("alice", "c_mlp_r2")
    fingerprint = model_fingerprint(tiny.base_dir)
    other = make_peft_adapter(tiny.base_dir, "c_mlp_r2", tmp_path / "v2", seed=99)
    rng = np.random.default_rng(7)
    prompt = _prompt(rng, 29)
    ask = SamplingParams(max_tokens=12, logprobs=2, **GREEDY)

    sched = tiny.scheduler()
    versions = AdapterVersions(store, tiny.slots, retired=sched.prefix.drop)
    try:
        assert versions.current("alice", "c_mlp_r2") == v1
        old = _run(sched, (prompt, ask, v1))[0]
        assert old[3].cached_tokens == 0 and len(sched.prefix) == 3
        v2 = store.publish("alice", "c_mlp_r2", lambda d: [(d / f.name).write_bytes(f.read_bytes()) for f in other.iterdir()],
                           base_model={"name": "tiny", "fingerprint": fingerprint})
        # Pinned, v2 finds no entry of v1's (the key holds the version), though they are all there
        pinned = _run(sched, (prompt, ask, store.resolve("alice", f"c_mlp_r2@{v2.version}")))[0]
        assert pinned[3].cached_tokens == 0
        # Followed through `latest`: once v2 serves, v1's entries are dropped
        loaded = threading.Event()
        versions.poll_once()
        tiny.slots.prefetch(v2).add_done_callback(lambda _: loaded.set())
        assert loaded.wait(30)  # AdapterVersions' own callback on that load ran first: v2 is current
        assert versions.current("alice", "c_mlp_r2") == v2
        assert sched.prefix.stats.dropped == 3
        again = _run(sched, (prompt, ask, versions.current("alice", "c_mlp_r2")))[0]
        assert again[3].cached_tokens == 24  # v2's own chunks, from the pinned request
    finally:
        sched.stop()
    fresh = tiny.scheduler()
    try:
        expected = _run(fresh, (prompt, ask, v2))[0]
    finally:
        fresh.stop()
    assert old[0] != expected[0]  # the versions differ, so serving v1's KV would show
    assert pinned[:3] == again[:3] == expected[:3]
    store.set_latest("alice", "c_mlp_r2", v1.version)  # other tests of this module see v1


def test_with_more_prefixes_than_fit_the_store_keeps_its_bytes_and_results_hold(tiny):
    chunk_bytes = 2 * tiny.replica.model_config.num_layers * 8 * tiny.replica.model_config.num_kv_heads \
        * tiny.replica.model_config.head_dim * 4
    rng = np.random.default_rng(8)
    prefixes = [_prompt(rng, 17) for _ in range(6)]  # two complete chunks each, 12 in all; room for 5
    requests = [(prefixes[int(i)] + _prompt(rng, 3), SamplingParams(max_tokens=6, **GREEDY)) for i in rng.integers(0, 6, 30)]
    expected = []
    for r in requests:  # each alone on an empty cache
        sched = tiny.scheduler()
        try:
            expected.append(_run(sched, r)[0][0])
        finally:
            sched.stop()
    sched = tiny.scheduler(start=False)
    sched.prefix = PrefixCache(5 * chunk_bytes, 8)
    sched.start()
    try:
        got = []
        for r in requests:
            got.append(_run(sched, r)[0])
            assert sched.prefix.bytes <= 5 * chunk_bytes
    finally:
        sched.stop()
    assert [g[0] for g in got] == expected
    stats = sched.prefix.stats
    assert stats.evictions > 0 and stats.hits > 0 and len(sched.prefix) == 5


def test_a_long_prompt_prefills_in_chunks_while_other_rows_keep_decoding(tiny, tmp_path):
    config = EngineConfig(max_batch_size=2, max_seq_len=2112, prefill_chunk=256, decode_steps=4, prefill_batch=1,
                          num_adapter_slots=2, max_lora_rank=8, prefix_cache_bytes=0)  # no hits: every chunk computed
    replica = build_replica(tiny.base_dir, AdapterStore(tmp_path / "fs"), config)
    calls = []
    engine = replica.engine
    prefill, generate = engine.prefill, engine.generate
    engine.prefill = lambda lora, state, items: (calls.append(("prefill", len(items[0].prompt), items[0].start)),
                                                 prefill(lora, state, items))[1]
    engine.generate = lambda lora, state: (calls.append(("generate",)), generate(lora, state))[1]
    rng = np.random.default_rng(9)
    long_prompt = _prompt(rng, 2048)
    sched = replica.scheduler
    sched.start()
    try:
        alone = _run(sched, (long_prompt, SamplingParams(max_tokens=8, **GREEDY)))[0]
        calls.clear()
        streaming = sched.submit(_prompt(rng, 5), SamplingParams(max_tokens=60, **GREEDY))
        stream = iter(streaming)
        assert isinstance(next(stream), TokenEvent)  # decoding now
        beside = _run(sched, (long_prompt, SamplingParams(max_tokens=8, **GREEDY)))[0]
        rest = collect(streaming)
    finally:
        replica.close()
    chunks = [i for i, c in enumerate(calls) if c[0] == "prefill" and c[1] == 2048]
    assert [calls[i][2] for i in chunks] == list(range(0, 2048, 256))  # eight chunks, in order
    between = [calls[a + 1:b].count(("generate",)) for a, b in zip(chunks, chunks[1:])]
    assert all(n >= 1 for n in between), between  # the streaming row decoded between every two chunks
    assert beside[:3] == alone[:3]  # and the long prompt's tokens did not depend on it
    assert rest[3].reason == "length" and len(rest[0]) == 59
