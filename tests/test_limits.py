"""The rate limiter (`serve_app.limits`) on a fake clock: token buckets that refill continuously,
reservations settled to the usage, refusals that take nothing, and the headers and 429 OpenAI sends."""

import pytest

from serve_app.limits import Decision, Limiter, Limits, duration


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def test_a_full_bucket_admits_up_to_its_limit_then_refills_at_limit_per_60_s(clock):
    limiter, rpm = Limiter(clock), Limits(requests_per_minute=3)
    assert [limiter.admit("a", rpm, 1, 1).admitted for _ in range(4)] == [True, True, True, False]
    clock.now += 19.9  # one request comes back every 60 / 3 = 20 s
    assert not limiter.admit("a", rpm, 1, 1).admitted
    clock.now += 0.1
    assert limiter.admit("a", rpm, 1, 1).admitted
    clock.now += 3600  # a bucket never holds more than its limit
    assert [limiter.admit("a", rpm, 1, 1).admitted for _ in range(4)] == [True, True, True, False]


def test_a_refusal_takes_nothing_and_names_when_it_would_fit(clock):
    limiter, tpm = Limiter(clock), Limits(tokens_per_minute=600)  # 10 tokens a second
    assert limiter.admit("a", tpm, 100, 400).budgets["tokens"].remaining == 100
    refused = limiter.admit("a", tpm, 50, 100)  # 150 asked, 100 left: 5 s short
    assert (refused.refused, refused.retry_after_s, refused.reserved) == ("tokens", 5.0, 0)
    assert refused.budgets["tokens"].remaining == 100  # nothing was taken
    assert limiter.admit("a", tpm, 50, 50).admitted  # what does fit still does
    clock.now += 5
    assert limiter.admit("a", tpm, 0, 50).budgets["tokens"].remaining == 0


def test_a_request_takes_from_both_buckets_only_if_both_have_room(clock):
    limiter, both = Limiter(clock), Limits(requests_per_minute=2, tokens_per_minute=120)  # 2 tokens a second
    assert limiter.admit("a", both, 10, 90).admitted  # tokens: 20 left; requests: 1
    short = limiter.admit("a", both, 10, 20)  # the request fits, its 30 tokens do not (5 s)
    assert short.refused == "tokens" and short.budgets["requests"].remaining == 1
    assert limiter.admit("a", both, 10, 10).admitted  # requests: 0 left, tokens: 0
    both_short = limiter.admit("a", both, 10, 60)  # requests: 30 s away; tokens: 35 s away
    assert (both_short.refused, both_short.retry_after_s) == ("tokens", 35.0)  # the longer wait is the answer
    clock.now += 35
    assert limiter.admit("a", both, 10, 60).admitted


def test_settle_gives_back_the_unused_reservation(clock):
    limiter, tpm = Limiter(clock), Limits(tokens_per_minute=1000)
    d = limiter.admit("a", tpm, 20, 500)
    assert (d.reserved, d.budgets["tokens"].remaining) == (520, 480)
    assert not limiter.admit("a", tpm, 20, 500).admitted
    limiter.settle("a", d.reserved, 20 + 30)  # stopped after 30 of its 500
    assert limiter.admit("a", tpm, 20, 500).budgets["tokens"].remaining == 1000 - 50 - 520
    limiter.settle("a", 520, 600)  # a request that used more than it reserved is charged for it too
    assert limiter.admit("a", tpm, 0, 1).budgets["tokens"].remaining == 1000 - 50 - 600 - 1
    limiter.settle("a", 1000, 0)  # a refund never fills a bucket past its limit
    assert limiter.admit("a", tpm, 0, 1).budgets["tokens"].remaining == 999


def test_a_reservation_over_the_whole_limit_is_refused_without_a_retry_time(clock):
    limiter, tpm = Limiter(clock), Limits(requests_per_minute=10, tokens_per_minute=100)
    d = limiter.admit("a", tpm, 30, 80)
    assert (d.refused, d.retry_after_s) == ("tokens", None)
    e = d.error()
    assert e.status == 429 and e.type == "tokens" and e.code == "rate_limit_exceeded"
    assert "Request too large for tokens per min (TPM): Limit 100, Requested 110" in e.message
    assert "can never fit" in e.message and "lower max_tokens or shorten the prompt" in e.message
    assert "Retry-After" not in e.headers and e.headers["x-ratelimit-limit-tokens"] == "100"
    assert d.budgets["requests"].remaining == 10  # it took no request either
    assert limiter.admit("a", tpm, 30, 70).admitted  # exactly the limit fits


def test_a_batch_takes_one_request_per_prompt_and_one_over_the_whole_limit_never_fits(clock):
    limiter, rpm = Limiter(clock), Limits(requests_per_minute=4)
    assert limiter.admit("a", rpm, 10, 10, requests=3).budgets["requests"].remaining == 1
    wait = limiter.admit("a", rpm, 10, 10, requests=2)
    assert wait.refused == "requests" and wait.retry_after_s == pytest.approx(15.0)  # one more refills in 15 s
    never = limiter.admit("a", rpm, 10, 10, requests=5)
    assert never.refused == "requests" and never.retry_after_s is None
    e = never.error()
    assert e.status == 429 and "Requested 5 (one per prompt). It can never fit this limit" in e.message
    assert "Retry-After" not in e.headers
    assert limiter.admit("a", rpm, 10, 10, requests=1).admitted  # the refusals took nothing


def test_tenants_have_their_own_buckets(clock):
    limiter, rpm = Limiter(clock), Limits(requests_per_minute=1)
    assert limiter.admit("a", rpm, 1, 1).admitted and not limiter.admit("a", rpm, 1, 1).admitted
    assert limiter.admit("b", rpm, 1, 1).admitted
    assert limiter.admit("c", Limits(), 1, 1).budgets == {}  # no limits: nothing to report


def test_a_changed_limit_keeps_what_is_left_up_to_the_new_limit(clock):
    limiter = Limiter(clock)
    for _ in range(8):
        limiter.admit("a", Limits(requests_per_minute=10), 1, 1)
    assert limiter.admit("a", Limits(requests_per_minute=100), 1, 1).budgets["requests"].remaining == 1  # re-tiered up
    limiter.admit("a", Limits(requests_per_minute=10), 1, 1)
    clock.now += 30  # 5 back at 10 a minute
    assert [limiter.admit("a", Limits(requests_per_minute=2), 1, 1).admitted  # re-tiered down: 2 left, not 5
            for _ in range(3)] == [True, True, False]
    assert limiter.admit("a", Limits(), 1, 1).admitted  # no limit any more
    assert limiter.admit("a", Limits(requests_per_minute=1), 1, 1).admitted  # a new bucket starts full


def test_headers_and_the_429_are_openais(clock):
    limiter, both = Limiter(clock), Limits(requests_per_minute=60, tokens_per_minute=6000)  # 1 request, 100 tokens a s
    admitted = limiter.admit("a", both, 100, 250)
    assert admitted.headers() == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59", "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "5650", "x-ratelimit-reset-tokens": "3.5s"}
    for _ in range(59):
        limiter.admit("a", both, 1, 1)
    clock.now += 0.25
    refused = limiter.admit("a", both, 1, 1)
    assert refused.refused == "requests" and refused.retry_after_s == pytest.approx(0.75)
    e = refused.error()
    assert (e.status, e.type, e.param, e.code) == (429, "requests", None, "rate_limit_exceeded")
    assert e.message == "Rate limit reached for requests per min (RPM): Limit 60. Please try again in 750ms."
    assert e.headers["Retry-After"] == "1"  # whole seconds, rounded up
    assert e.headers["x-ratelimit-remaining-requests"] == "0" and e.headers["x-ratelimit-reset-requests"] == "59.75s"
    tokens = Decision({"tokens": refused.budgets["tokens"]}, 900, 100, "tokens", 12.3).error()
    assert tokens.type == "tokens" and tokens.headers["Retry-After"] == "13"
    assert "tokens per min (TPM): Limit 6000" in tokens.message and "Requested 900 (prompt 100 + max_tokens 800)" in tokens.message
    assert "try again in 12.3s, or lower max_tokens" in tokens.message


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (0.0201, "21ms"), (0.02, "20ms"), (1, "1s"), (17.28, "17.28s"),
                                          (60, "1m0s"), (360, "6m0s"), (61.5, "1m1.5s"), (3725, "1h2m5s")])
def test_durations_are_written_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text


def test_a_tier_overrides_the_defaults_kind_by_kind():
    defaults = Limits(requests_per_minute=100, tokens_per_minute=None)
    assert defaults.override(None, None) == defaults and bool(defaults)
    assert defaults.override(5, None) == Limits(5, None)
    assert defaults.override(None, 800) == Limits(100, 800)
    assert not Limits().override(None, None)
