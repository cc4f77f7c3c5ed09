"""The per-row sampling stages (logit_bias, repetition / frequency / presence penalties, min_p)
against references: a numpy form of each stage applied to transformers' logits step by step,
transformers' own repetition penalty, and the exact distribution for min_p. And the engine's
promises for them: logprobs stay the raw model's, a row is bitwise the same alone and in any batch,
nothing compiles after warm-up, and a bad value is refused naming its field.

Then the sampler alone (`sample`) on hand-worked logits: temperature, min_p, top-k and top-p keep
exactly the tokens worked out by hand and by transformers' warpers, and draw them with the
renormalised frequencies; a row's outputs depend on its own inputs, seed and index alone."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlora.engine import Engine, compile_count
from jaxlora.errors import InvalidRequest
from jaxlora.sampling import MAX_LOGIT_BIAS, RowSampling, SamplingParams, TokenHistory, first_argmax, sample
from jaxlora.scheduler import Scheduler
from tests.engine_fixtures import build_tiny_engine, collect
from tests.hf_models import load_reference

VOCAB = 211
PROMPTS = ([3, 14, 15, 92, 65], [7, 7, 7, 7, 7, 7, 7, 7, 7], [101, 17, 42, 9, 77, 3, 58, 200, 11, 5, 6])


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints, tmp_path_factory):
    return build_tiny_engine(tiny_checkpoints["llama_gqa"], tmp_path_factory.mktemp("sampling"))


@pytest.fixture(scope="module")
def hf(tiny):
    model = load_reference(tiny.base_dir)
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def run(tiny):
    sched = tiny.scheduler()
    yield lambda prompt, **kw: collect(sched.submit(prompt, SamplingParams(ignore_eos=True, **kw)))
    sched.stop()


def _raw_logits(hf, seq: list[int]) -> np.ndarray:
    """transformers' float32 logits [len(seq), V]: row i is the distribution of token i + 1."""
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].numpy()


def _processed(z_V: np.ndarray, prompt: list[int], generated: list[int], p: SamplingParams) -> np.ndarray:
    """The stages before greedy / temperature, written out: bias, repetition, frequency, presence."""
    z_V = z_V.copy()
    for token, bias in p.logit_bias:
        z_V[token] += np.float32(bias)
    count_V = np.bincount(np.array(generated, np.int64), minlength=len(z_V)).astype(np.float32)
    seen_V = count_V > 0
    seen_V[prompt] = True
    r = np.float32(p.repetition_penalty)
    z_V = np.where(seen_V, np.where(z_V > 0, z_V / r, z_V * r), z_V)
    z_V = z_V - np.float32(p.frequency_penalty) * count_V
    return z_V - np.float32(p.presence_penalty) * (count_V > 0)


def _reference_greedy(hf, prompt: list[int], n: int, p: SamplingParams) -> list[int]:
    generated: list[int] = []
    for _ in range(n):
        generated.append(int(np.argmax(_processed(_raw_logits(hf, prompt + generated)[-1], prompt, generated, p))))
    return generated


def test_logit_bias_plus_100_forces_a_token_and_logprobs_stay_raw(run, hf):
    prompt, forced = PROMPTS[0], 123
    plain, plain_lps, plain_tops, _ = run(prompt, max_tokens=8, temperature=0.0, logprobs=5)
    assert forced not in plain
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        tokens, lps, tops, _ = run(prompt, max_tokens=8, logprobs=5, logit_bias=((forced, 100.0),), **sampling)
        assert tokens == [forced] * 8, sampling
        assert tops[0] == plain_tops[0]  # the first alternatives are the raw model's, bitwise
        assert tops[0][0][0] == plain[0] != forced
    z_TxV = _raw_logits(hf, prompt + tokens)[len(prompt) - 1:-1]  # the distributions the 8 tokens were drawn from
    raw_lp_TxV = torch.log_softmax(torch.tensor(z_TxV), -1).numpy()
    np.testing.assert_allclose(lps, raw_lp_TxV[:, forced], atol=2e-4)  # the logprob of the raw distribution
    assert max(lps) < -1.0  # not the ~0 of the biased one


def test_logit_bias_minus_100_on_the_greedy_token_takes_the_second_best(run, hf):
    for prompt in PROMPTS:
        plain = run(prompt, max_tokens=10, temperature=0.0)[0]
        kw = dict(max_tokens=10, temperature=0.0, logit_bias=((plain[0], -100.0), (5, 2.5), (9, -3.0)))
        tokens = run(prompt, **kw)[0]
        second_best = int(np.argsort(_raw_logits(hf, prompt)[-1])[-2])
        assert tokens[0] == second_best and plain[0] not in tokens
        assert tokens == _reference_greedy(hf, prompt, 10, SamplingParams(**kw))


PENALTIES = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.8),
    "negative_presence_and_frequency": dict(presence_penalty=-0.7, frequency_penalty=0.4),
    "repetition": dict(repetition_penalty=1.8),
    "repetition_below_1": dict(repetition_penalty=0.6),
    "all_with_bias": dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5,
                          logit_bias=((7, 4.0), (42, -2.0), (150, 1.5))),
}


@pytest.mark.parametrize("penalty", PENALTIES.values(), ids=PENALTIES.keys())
def test_penalties_equal_the_reference_on_the_models_logits(run, hf, penalty):
    params = SamplingParams(max_tokens=14, temperature=0.0, **penalty)
    changed = False
    for prompt in PROMPTS:
        tokens = run(prompt, max_tokens=14, temperature=0.0, **penalty)[0]
        assert tokens == _reference_greedy(hf, prompt, 14, params), prompt
        changed |= tokens != _reference_greedy(hf, prompt, 14, SamplingParams())
    assert changed  # the penalty mattered for some prompt: the comparison can fail


def test_repetition_penalty_equals_transformers_generate(run, hf):
    changed = False
    for prompt in PROMPTS:
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                              repetition_penalty=1.5, pad_token_id=0)
        expected = out[0, len(prompt):].tolist()
        assert run(prompt, max_tokens=16, temperature=0.0, repetition_penalty=1.5)[0] == expected, prompt
        changed |= expected != run(prompt, max_tokens=16, temperature=0.0)[0]
    assert changed


def test_the_first_token_already_sees_the_prompt_through_repetition_penalty(run, hf):
    """The prefill samples the first token: a prompt whose greedy next token is in the prompt
    must have that token penalised there, before anything was generated."""
    seed_prompt = PROMPTS[0]
    plain = _reference_greedy(hf, seed_prompt, 16, SamplingParams())
    k = next(k for k in range(16) if plain[k] in seed_prompt + plain[:k])
    prompt = seed_prompt + plain[:k]
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=4, repetition_penalty=5.0,
                          pad_token_id=0)
    tokens = run(prompt, max_tokens=4, temperature=0.0, repetition_penalty=5.0)[0]
    assert tokens == out[0, len(prompt):].tolist()
    assert tokens[0] != plain[k]


def test_min_p_never_draws_below_the_threshold(tiny, run, hf):
    prompt, temperature, min_p, n, seeds = PROMPTS[2], 1.5, 0.3, 4, range(40)

    def below_threshold(tokens):
        z_TxV = _raw_logits(hf, prompt + tokens)[len(prompt) - 1:-1].astype(np.float64) / temperature
        q_TxV = np.exp(z_TxV - z_TxV.max(-1, keepdims=True))
        return [bool(q[t] < min_p * (1 - 1e-4)) for q, t in zip(q_TxV, tokens)]  # q is relative to the top token

    sched = tiny.scheduler()
    try:
        def draws(**kw):
            handles = [sched.submit(prompt, SamplingParams(max_tokens=n, temperature=temperature, seed=s, ignore_eos=True, **kw))
                       for s in seeds]
            return [collect(h)[0] for h in handles]

        with_min_p, without = draws(min_p=min_p), draws()
    finally:
        sched.stop()
    assert not any(any(below_threshold(t)) for t in with_min_p)
    assert sum(sum(below_threshold(t)) for t in without) > 10  # without min_p those tokens are drawn
    assert len({t[0] for t in with_min_p}) >= 2  # and min_p still samples
    greedy = run(prompt, max_tokens=8, temperature=0.0)[0]
    assert run(prompt, max_tokens=8, temperature=1.0, seed=5, min_p=1.0)[0] == greedy  # only the top token is left


def _extended(rng) -> dict:
    """Random extension parameters, each stage used or not."""
    kw = {}
    if rng.random() < 0.5:
        ids = rng.choice(VOCAB, size=int(rng.integers(1, 6)), replace=False)
        kw["logit_bias"] = tuple((int(t), float(rng.uniform(-8, 8))) for t in ids)
    if rng.random() < 0.5:
        kw["presence_penalty"] = float(rng.uniform(-2, 2))
    if rng.random() < 0.5:
        kw["frequency_penalty"] = float(rng.uniform(-1, 2))
    if rng.random() < 0.5:
        kw["repetition_penalty"] = float(rng.uniform(0.5, 2))
    if rng.random() < 0.5:
        kw["min_p"] = float(rng.uniform(0, 0.5))
    return kw


NEEDLES = {
    "extended": dict(temperature=1.2, top_k=40, seed=1234, logit_bias=((7, 3.0), (99, -100.0)), presence_penalty=0.6,
                     frequency_penalty=0.3, repetition_penalty=1.4, min_p=0.2),
    "extended_greedy": dict(temperature=0.0, logit_bias=((7, 1.0),), frequency_penalty=0.5, repetition_penalty=1.2),
    "plain_among_extended": dict(temperature=0.9, top_p=0.9, seed=99),
}


@pytest.mark.parametrize("needle_kw", NEEDLES.values(), ids=NEEDLES.keys())
def test_needle_is_bitwise_identical_alone_and_in_a_busy_batch(tiny, needle_kw):
    rng = np.random.default_rng(5)
    needle = (PROMPTS[2], SamplingParams(max_tokens=20, ignore_eos=True, logprobs=5, **needle_kw), tiny.adapters["a_qv_r4"])
    alone = tiny.scheduler()
    try:
        expected = collect(alone.submit(*needle))
    finally:
        alone.stop()
    assert len(set(expected[0])) > 3  # a real draw, not a degenerate one that any batch would repeat
    names = [None, *tiny.adapters]
    for trial in range(3):
        position = int(rng.integers(0, 8))
        fillers = [(rng.integers(3, VOCAB, size=int(rng.integers(1, 30))).tolist(),
                    SamplingParams(max_tokens=int(rng.integers(4, 30)), temperature=float(rng.choice([0.0, 1.0])),
                                   seed=int(rng.integers(0, 2**31)), ignore_eos=True, **_extended(rng)),
                    tiny.adapters.get(names[int(rng.integers(0, len(names)))])) for _ in range(10)]
        got = tiny.run_at_row(needle, fillers, position)
        assert got[:3] == expected[:3], f"trial {trial}: row {position} differs"  # tokens, logprobs, alternatives


def test_no_compilation_when_such_requests_arrive_after_warm_up(tiny):
    engine = Engine(tiny.engine.params, tiny.engine.model_config, tiny.engine.config)  # fresh jits: nothing compiled before
    engine.warm_up(tiny.slots.stack)
    sched = Scheduler(engine, tiny.slots, engine.model_config.eos_token_ids)
    sched.start()
    rng = np.random.default_rng(8)
    names = [None, *tiny.adapters]
    try:
        before = compile_count()
        handles = [sched.submit(rng.integers(3, VOCAB, size=int(rng.integers(1, 40))).tolist(),
                                SamplingParams(max_tokens=int(rng.integers(1, 20)), temperature=float(rng.choice([0.0, 0.7])),
                                               top_k=int(rng.integers(0, 50)), logprobs=int(rng.integers(0, 6)), **_extended(rng)),
                                tiny.adapters.get(names[int(rng.integers(0, len(names)))]))
                   for _ in range(40)]
        handles.append(sched.submit([5, 6], SamplingParams(max_tokens=3, logit_bias=tuple((t, 1.0) for t in range(VOCAB)))))
        for h in handles:
            assert collect(h)[3].reason in ("stop", "length")
        assert compile_count() - before == 0
    finally:
        sched.stop()


@pytest.mark.parametrize("kwargs,param", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(frequency_penalty=-2.1), "frequency_penalty"), (dict(frequency_penalty="1"), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=10.5), "repetition_penalty"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.01), "min_p"),
    (dict(logit_bias=((5, 100.5),)), "logit_bias"), (dict(logit_bias=((5, float("inf")),)), "logit_bias"),
    (dict(logit_bias=((-1, 1.0),)), "logit_bias"), (dict(logit_bias=((5, 1.0), (5, 2.0))), "logit_bias"),
    (dict(logit_bias=((5.0, 1.0),)), "logit_bias"), (dict(logit_bias=((5, 1.0, 2.0),)), "logit_bias"),
    (dict(logit_bias={5: 1.0}), "logit_bias"), (dict(logit_bias=tuple((t, 1.0) for t in range(MAX_LOGIT_BIAS + 1))), "logit_bias"),
    (dict(logit_bias=((VOCAB, 1.0),)), "logit_bias"),  # past this model's vocabulary: refused where it is known
])
def test_invalid_sampling_extensions_are_named(tiny, kwargs, param):
    sched = tiny.scheduler(start=False)
    with pytest.raises(InvalidRequest, match=f"invalid {param}") as e:
        sched.submit([1, 2, 3], SamplingParams(**kwargs))
    assert e.value.param == param


# --- The sampler itself, on hand-worked logits -------------------------------------------------
#
# `sample` is called directly (jitted once per batch shape) on a vocabulary of 8 tokens whose
# probabilities are known, N rows at a time that differ only in their seed: one call gives N
# independent draws of one distribution.

V_SMALL, N_DRAWS = 8, 8192
RANK_PROBS = np.array([0.30, 0.22, 0.16, 0.12, 0.08, 0.06, 0.04, 0.02])  # the r-th most likely token's probability
RANK_TOKEN = np.array([5, 2, 7, 0, 3, 6, 1, 4])  # its id: sorted position and token id differ
LOGITS_8 = np.zeros(V_SMALL, np.float32)
LOGITS_8[RANK_TOKEN] = np.log(RANK_PROBS)
_sample = jax.jit(sample)


def _history(B: int) -> TokenHistory:
    return TokenHistory(generated=jnp.zeros((B, V_SMALL), jnp.uint16), in_prompt=jnp.zeros((B, V_SMALL), jnp.bool_))


def _counts(logits_V: np.ndarray, p: SamplingParams) -> np.ndarray:
    """How often each token is drawn by N_DRAWS rows with params `p` and seeds 2**33 + i."""
    one = RowSampling.of([(p.validate(), 0)])
    s = dataclasses.replace(jax.tree.map(lambda x: jnp.repeat(x, N_DRAWS, axis=0), one),
                            seed_hi=jnp.full((N_DRAWS,), 2, jnp.uint32), seed_lo=jnp.arange(N_DRAWS, dtype=jnp.uint32))
    token_B = _sample(jnp.broadcast_to(jnp.asarray(logits_V), (N_DRAWS, V_SMALL)), s, _history(N_DRAWS),
                      jnp.zeros((N_DRAWS,), jnp.int32))[0]
    return np.bincount(np.asarray(token_B), minlength=V_SMALL)


def _assert_drawn_from(counts_V: np.ndarray, q_V: np.ndarray) -> None:
    """counts_V are N_DRAWS independent draws of the distribution q_V: exactly its support is drawn,
    and each count is within 5 standard errors of N q. A count is Binomial(N, q_t), standard error
    sqrt(N q_t (1 - q_t)); a correct sampler lands outside 5 of them with probability 5.7e-7 (normal
    tail), under 3e-4 over the ~400 comparisons of this file. Every q_t > 0 here is >= 0.01, so
    N q_t - 5 sigma > 0 and "never drawn" cannot hide inside the tolerance."""
    expected_V = N_DRAWS * q_V
    sigma_V = np.sqrt(N_DRAWS * q_V * (1 - q_V))
    table = f"counts {counts_V.tolist()}, expected {np.round(expected_V).astype(int).tolist()}"
    np.testing.assert_array_equal(counts_V > 0, q_V > 0, err_msg=f"support differs: {table}")
    assert np.all(np.abs(counts_V - expected_V) <= 5 * sigma_V), table


def _renormalised(kept_ranks, temperature: float) -> np.ndarray:
    """p^(1/T) on the kept ranks, renormalised, as a distribution over token ids."""
    q_V = np.zeros(V_SMALL)
    ranks = np.array(sorted(kept_ranks))
    q_V[RANK_TOKEN[ranks]] = RANK_PROBS[ranks] ** (1 / temperature)
    return q_V / q_V.sum()


# (params, the ranks that survive), worked by hand on RANK_PROBS; cumulative: .30 .52 .68 .80 .88 .94 .98 1.
# top_p keeps the shortest prefix of the sorted tokens whose probability reaches top_p, i.e. a token
# stays when the mass strictly before it is < top_p (vLLM's and transformers' rule: drop where the
# ascending cumulative sum is <= 1 - top_p). At an exact tie of that mass with top_p the token is
# dropped; float rounding makes such a tie a property of the arithmetic, so the cases sit 0.01 away.
HAND_WORKED = {
    "no_cut": (dict(), range(8)),
    "top_k_equal_to_vocab_is_no_cut": (dict(top_k=8), range(8)),
    "top_k_3": (dict(top_k=3), range(3)),
    "top_k_1": (dict(top_k=1), [0]),
    "top_p_0.29_the_top_token_reaches_it": (dict(top_p=0.29), [0]),
    "top_p_0.31_needs_a_second": (dict(top_p=0.31), [0, 1]),
    "top_p_0.67": (dict(top_p=0.67), range(3)),
    "top_p_0.69": (dict(top_p=0.69), range(4)),
    # top-p over the top 4 renormalised (.375 .275 .2 .15: .85 before the 4th); over all 8 it would keep 4.
    "top_k_4_then_top_p_0.8_of_what_is_left": (dict(top_k=4, top_p=0.8), range(3)),
    # min_p keeps p >= min_p * 0.30: 0.12 is 0.4 of the top.
    "min_p_0.39": (dict(min_p=0.39), range(4)),
    "min_p_0.41": (dict(min_p=0.41), range(3)),
    # min_p sees the tempered distribution: at T=2 the ratios are sqrt(p / .30), 0.447 for 0.06, 0.365 for 0.04.
    "min_p_0.41_after_temperature_2": (dict(min_p=0.41, temperature=2.0), range(6)),
    # top-p over what min_p left (.441 .324 .235: .765 before the 3rd); over all it would keep 3.
    "min_p_0.41_then_top_p_0.75_of_what_is_left": (dict(min_p=0.41, top_p=0.75), [0, 1]),
    # at T=2 the probabilities are sqrt(p) / 2.632 = .208 .178 .152 ...: .538 before the 4th.
    "top_p_0.5_after_temperature_2": (dict(top_p=0.5, temperature=2.0), range(3)),
    "top_p_0.5": (dict(top_p=0.5), [0, 1]),
    "temperature_0.5": (dict(temperature=0.5), range(8)),
    "temperature_2": (dict(temperature=2.0), range(8)),
    "top_k_3_after_temperature_0.5": (dict(top_k=3, temperature=0.5), range(3)),
}


@pytest.mark.parametrize("kw,kept", HAND_WORKED.values(), ids=HAND_WORKED.keys())
def test_cuts_keep_exactly_the_hand_worked_tokens_with_renormalised_frequencies(kw, kept):
    params = SamplingParams(**{"temperature": 1.0, **kw})
    _assert_drawn_from(_counts(LOGITS_8, params), _renormalised(kept, params.temperature))


def test_lower_temperature_sharpens_higher_flattens():
    top, bottom = RANK_TOKEN[0], RANK_TOKEN[-1]
    counts = [_counts(LOGITS_8, SamplingParams(temperature=t)) for t in (0.5, 1.0, 2.0)]
    assert counts[0][top] > counts[1][top] > counts[2][top]  # ~3880 > ~2460 > ~1700 of 8192
    assert counts[0][bottom] < counts[1][bottom] < counts[2][bottom]  # ~17 < ~164 < ~440


def _transformers_reference(logits_V: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution transformers' logits warpers leave, chained in this sampler's (vLLM's) order:
    temperature, min_p, top_k, top_p, each renormalising what the one before left."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = TemperatureLogitsWarper(p.temperature)(None, torch.tensor(logits_V[None]))
    if p.min_p > 0:
        scores = MinPLogitsWarper(p.min_p)(None, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    return torch.softmax(scores.double(), -1)[0].numpy()


def _random_case(i: int) -> tuple[np.ndarray, SamplingParams]:
    """Random logits and cuts, drawn again until no token sits within 1e-3 of a top_p or min_p
    boundary (float32 rounding could tip it either way) and every kept token has q >= 0.01."""
    rng = np.random.default_rng(100 + i)
    while True:
        logits_V = rng.normal(0, 1.5, V_SMALL).astype(np.float32)
        p = SamplingParams(temperature=float(rng.uniform(0.3, 2.5)), top_k=int(rng.choice([0, rng.integers(1, 9)])),
                           top_p=float(rng.choice([1.0, rng.uniform(0.2, 0.99)])),
                           min_p=float(rng.choice([0.0, rng.uniform(0.01, 0.6)])))
        q_V = _transformers_reference(logits_V, p)
        nearby = [dataclasses.replace(p, **{f: getattr(p, f) + d})
                  for f, d in (("top_p", -1e-3), ("top_p", 1e-3), ("min_p", -1e-3), ("min_p", 1e-3))
                  if 0 < getattr(p, f) < 1]
        robust = all(np.array_equal(_transformers_reference(logits_V, n) > 0, q_V > 0) for n in nearby)
        if robust and q_V[q_V > 0].min() >= 0.01 and (q_V > 0).sum() > 1:
            return logits_V, p


@pytest.mark.parametrize("i", range(24))
def test_cuts_and_frequencies_equal_transformers_warpers_on_random_logits(i):
    logits_V, p = _random_case(i)
    _assert_drawn_from(_counts(logits_V, p), _transformers_reference(logits_V, p))


def test_a_rows_token_depends_only_on_its_own_inputs_seed_and_index():
    """Needles with every stage, each alone among greedy rows that use no stage and then in busy
    batches at other positions beside rows that use every stage: bitwise the same outputs."""
    B, rng = 64, np.random.default_rng(7)

    def random_params(r) -> SamplingParams:
        return SamplingParams(
            temperature=float(rng.choice([0.0, rng.uniform(0.3, 2)])), top_k=int(rng.choice([0, rng.integers(1, 9)])),
            top_p=float(rng.choice([1.0, rng.uniform(0.3, 1)])), min_p=float(rng.choice([0.0, rng.uniform(0, 0.5)])),
            logprobs=[None, 3][r % 2], logit_bias=((int(rng.integers(V_SMALL)), float(rng.uniform(-3, 3))),) * (r % 3 == 0),
            repetition_penalty=float(rng.choice([1.0, rng.uniform(0.5, 2)])),
            frequency_penalty=float(rng.choice([0.0, rng.uniform(-1, 1)])),
            presence_penalty=float(rng.choice([0.0, rng.uniform(-1, 1)])))

    def random_row(r):  # (params, seed, index, logits, generated counts, in prompt)
        return (random_params(r), int(rng.integers(0, 2**63)), int(rng.integers(0, 1000)),
                rng.normal(0, 1.5, V_SMALL).astype(np.float32), rng.integers(0, 3, V_SMALL), rng.random(V_SMALL) < 0.3)

    def run(rows):
        s = RowSampling.of([(p.validate(), seed) for p, seed, *_ in rows])
        history = TokenHistory(generated=jnp.array(np.stack([r[4] for r in rows]), jnp.uint16),
                               in_prompt=jnp.array(np.stack([r[5] for r in rows])))
        out = _sample(jnp.array(np.stack([r[3] for r in rows])), s, history, jnp.array([r[2] for r in rows], jnp.int32))
        return [tuple(np.asarray(x[b]) for x in out) for b in range(len(rows))]

    needles = [random_row(r) for r in range(12)]
    quiet = (SamplingParams(temperature=0.0), 0, 0, np.zeros(V_SMALL, np.float32), np.zeros(V_SMALL, int), np.zeros(V_SMALL, bool))
    expected = [run([needle] + [quiet] * (B - 1))[0] for needle in needles]
    assert len({int(e[0]) for e in expected}) > 3  # the needles draw different tokens: a real comparison
    for _ in range(2):
        rows = [random_row(r) for r in range(B)]
        where = rng.choice(B, size=len(needles), replace=False)
        for needle, b in zip(needles, where):
            rows[b] = needle
        got = run(rows)
        for needle, b, e in zip(needles, where, expected):
            for x, y in zip(got[b], e):
                np.testing.assert_array_equal(x, y, err_msg=f"needle {needle[0]} at row {b}")


def test_the_key_uses_all_of_the_seed_and_the_index():
    """One row drawn at indices 0..63: the draws vary with the index, and seeds that differ only in
    their high or only in their low 32 bits give other sequences."""
    B, seed = 64, 12345

    def sequence(seed: int) -> list[int]:
        s = RowSampling.of([(SamplingParams(), seed)] * B)
        out = _sample(jnp.broadcast_to(jnp.asarray(LOGITS_8), (B, V_SMALL)), s, _history(B), jnp.arange(B, dtype=jnp.int32))
        return np.asarray(out[0]).tolist()

    base = sequence(seed)
    assert len(set(base)) >= 5  # all 64 rows share seed and logits: only the index varies
    assert base == sequence(seed)
    assert sequence(seed + 2**32) != base and sequence(seed + 1) != base


def test_first_argmax_is_argmax_ties_and_masked_rows_included():
    """The sampler's argmax (two plain reductions, for speed) picks what jnp.argmax picks: the first
    of equal maxima, index 0 of a row masked to -inf everywhere, a lone allowed token."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(64, 49152)).astype(np.float32)  # many ties
    x[1] = -np.inf
    x[2, :] = -np.inf
    x[2, 40000] = 1.5
    x[3] = rng.standard_normal(49152)
    x[4, :7] = 9.0
    got = np.asarray(jax.jit(first_argmax)(jnp.asarray(x)))
    assert got.dtype == np.int32 and got.tolist() == np.argmax(x, axis=-1).tolist()
    assert got[1] == 0 and got[2] == 40000 and got[4] == 0
