"""Constrained decoding: schemas refused or enforced whole, compiled grammars cached and bounded in
time, and the engine's rows drawing only what their grammar allows (on the tiny model, whose random
weights would produce anything: every valid answer is the grammar's doing)."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest

from jaxlora.adapter_store import AdapterStore
from jaxlora.engine import EngineConfig
from jaxlora.errors import InvalidRequest
from jaxlora.grammar import GrammarCompiler, json_object_grammar, json_schema_grammar
from jaxlora.replica import build_replica
from jaxlora.sampling import SamplingParams
from jaxlora.scheduler import Scheduler
from jaxlora.tokenizer import load_tokenizer
from tests.engine_fixtures import collect
from tests.json_schemas import PERSON, SCHEMAS

def test_a_schema_is_enforced_whole_or_refused_naming_the_keyword():
    for schema in SCHEMAS:
        assert json_schema_grammar(schema)
    for keyword, schema in [("uniqueItems", {"type": "array", "uniqueItems": True}),
                            ("not", {"not": {"type": "string"}}),
                            ("phone", {"type": "string", "format": "phone"})]:
        with pytest.raises(InvalidRequest) as e:
            json_schema_grammar(schema)
        assert e.value.param == "response_format" and keyword in str(e.value)
    with pytest.raises(InvalidRequest, match="objekt"):
        json_schema_grammar({"type": "objekt"})
    with pytest.raises(InvalidRequest, match="must be an object"):
        json_schema_grammar(["type", "object"])


@pytest.fixture(scope="module")
def tiny_replica(demo_model_dir, tmp_path_factory):
    config = EngineConfig(max_batch_size=8, max_seq_len=128, prefill_chunk=32, decode_steps=4, num_adapter_slots=2,
                          max_lora_rank=8)
    replica = build_replica(demo_model_dir, AdapterStore(tmp_path_factory.mktemp("fs")), config)
    compiler = GrammarCompiler(load_tokenizer(demo_model_dir), replica.model_config.vocab_size,
                               replica.scheduler.eos_token_ids)
    yield replica, compiler
    compiler.close()
    replica.close()


def test_compiled_grammars_are_cached_and_a_slow_compile_is_refused(tiny_replica, monkeypatch):
    _, compiler = tiny_replica
    grammar = json_schema_grammar(PERSON)
    before = compiler.stats()
    a, b = compiler.matcher(grammar), compiler.matcher(grammar)
    assert a.ll is not b.ll  # each request its own copy
    after = compiler.stats()
    assert after["compiles"] - before["compiles"] <= 1 and after["cache_hits"] - before["cache_hits"] >= 1

    release = threading.Event()
    slow = GrammarCompiler._compile

    def stalled(tokenizer, source):
        release.wait()
        return slow(tokenizer, source)

    monkeypatch.setattr(GrammarCompiler, "_compile", staticmethod(stalled))
    other = json_schema_grammar({"type": "array", "items": {"type": "integer"}})
    try:
        for _ in range(2):  # the second is refused without compiling again
            with pytest.raises(InvalidRequest, match="longer than 0.05 s to compile") as e:
                compiler.matcher(other, timeout_s=0.05)
            assert e.value.param == "response_format"
    finally:
        release.set()
    assert compiler.stats()["refused"] - after["refused"] == 2


def _scheduler(replica) -> Scheduler:
    """A new loop over the replica's engine and slots (each test starts and stops its own)."""
    sched = Scheduler(replica.engine, replica.slots, replica.scheduler.eos_token_ids)
    sched.start()
    return sched


def _text(tokenizer, tokens, eos):
    return tokenizer.decode([t for t in tokens if t not in eos])


def test_every_sampled_answer_is_valid_and_ends_where_the_grammar_does(tiny_replica, demo_model_dir):
    """100 answers at temperature 1 over 10 schemas, 8 rows at a time: each one parses, validates
    and ends with EOS (never cut by max_tokens)."""
    replica, compiler = tiny_replica
    tokenizer = load_tokenizer(demo_model_dir)
    prompt = tokenizer("Give the answer as JSON:")["input_ids"]
    sched = _scheduler(replica)
    try:
        handles = []
        for i in range(100):
            schema = SCHEMAS[i % len(SCHEMAS)]
            params = SamplingParams(max_tokens=96, temperature=1.0, seed=i)
            handles.append((schema, sched.submit(prompt, params, grammar=compiler.matcher(json_schema_grammar(schema)))))
        # any object: an unbounded grammar, which a random model ends only when "}" is likely
        close = tokenizer.convert_tokens_to_ids("}")
        handles.append((None, sched.submit(prompt, SamplingParams(max_tokens=96, temperature=1.0, seed=7,
                                                                  logit_bias=((close, 20.0),)),
                                           grammar=compiler.matcher(json_object_grammar()))))
        for schema, handle in handles:
            tokens, _, _, fin = collect(handle)
            assert fin.reason == "stop", (schema, _text(tokenizer, tokens, sched.eos_token_ids))
            value = json.loads(_text(tokenizer, tokens, sched.eos_token_ids))
            if schema is None:
                assert isinstance(value, dict)
            else:
                jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    finally:
        sched.stop()


def test_rows_without_a_grammar_are_bitwise_the_same_beside_constrained_rows(tiny_replica, demo_model_dir):
    """An unconstrained request's tokens and logprobs, and a constrained seeded request's tokens, are
    the same alone and in a batch of constrained and unconstrained neighbours."""
    replica, compiler = tiny_replica
    tokenizer = load_tokenizer(demo_model_dir)
    free = (tokenizer("The tokenizer and the cache")["input_ids"], SamplingParams(max_tokens=40, temperature=0.9, seed=3,
                                                                                   logprobs=2))
    bound = (tokenizer("Give the answer as JSON:")["input_ids"], SamplingParams(max_tokens=60, temperature=1.0, seed=4,
                                                                                 logprobs=2))
    person = json_schema_grammar(PERSON)

    def run(with_neighbours: bool):
        sched = _scheduler(replica)
        try:
            neighbours = []
            if with_neighbours:
                for i in range(3):
                    neighbours.append(sched.submit(bound[0], SamplingParams(max_tokens=60, seed=100 + i),
                                                   grammar=compiler.matcher(json_schema_grammar(SCHEMAS[i + 1]))))
                    neighbours.append(sched.submit(free[0], SamplingParams(max_tokens=30, seed=200 + i)))
            got_free = collect(sched.submit(*free))
            got_bound = collect(sched.submit(*bound, grammar=compiler.matcher(person)))
            for h in neighbours:
                collect(h)
            return got_free, got_bound
        finally:
            sched.stop()

    alone_free, alone_bound = run(False)
    busy_free, busy_bound = run(True)
    assert alone_free[:3] == busy_free[:3]
    assert alone_bound[:3] == busy_bound[:3]
    jsonschema.validate(json.loads(_text(tokenizer, alone_bound[0], replica.scheduler.eos_token_ids)), PERSON)


def test_a_grammar_refuses_ignore_eos(tiny_replica):
    replica, compiler = tiny_replica
    with pytest.raises(InvalidRequest) as e:
        replica.scheduler.submit([1, 2, 3], SamplingParams(ignore_eos=True),
                                 grammar=compiler.matcher(json_object_grammar()))
    assert e.value.param == "ignore_eos"
