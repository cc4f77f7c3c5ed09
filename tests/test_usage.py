"""The usage ledger without Ray: what an ingress replica counts and sends on as rows adds up, in
TenantState's ledger, to the totals of the requests themselves."""

from serve_app.usage import UsageLedger


def test_rows_sent_in_batches_add_up_to_the_requests_recorded_one_by_one():
    requests = [("alice", "base", 5, 8), ("alice", "a1", 3, 2), ("alice", "base", 4, 4), ("bob", "base", 7, 1),
                ("alice", "a1", 1, 9)]
    direct, shared = UsageLedger(), UsageLedger()
    for batch in (requests[:3], requests[3:]):  # two sends of one ingress replica; alice's base twice in one
        unsent = UsageLedger()
        for tenant, model, prompt, completion in batch:
            direct.record(tenant, model, prompt, completion)
            unsent.record(tenant, model, prompt, completion)
        shared.add(unsent.rows())
    for tenant in ("alice", "bob"):
        assert {k: v for k, v in shared.totals(tenant).items() if k != "since"} == \
               {k: v for k, v in direct.totals(tenant).items() if k != "since"}
    alice = shared.totals("alice")
    assert (alice["requests"], alice["prompt_tokens"], alice["completion_tokens"]) == (4, 13, 23)
    assert {m["model"]: m["requests"] for m in alice["by_model"]} == {"a1": 2, "base": 2}
    assert shared.totals("carol")["requests"] == 0 and UsageLedger().rows() == []
