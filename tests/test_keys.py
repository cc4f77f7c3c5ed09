"""API keys follow their file while serving (`serve_app.keys.KeysFile`): added and revoked keys
take effect on the next lookup; a broken new file is refused and the old keys keep working."""

import json
import logging
import os
import re

import pytest

from serve_app.keys import KeysFile, Tier, add_key, remove_keys


def _user(keys: KeysFile, key: str) -> str | None:
    found = keys.lookup(key)
    return None if found is None else found[0]


def test_added_and_revoked_keys_take_effect_without_a_restart(tmp_path):
    path = tmp_path / "keys.json"
    alice = add_key(path, "alice")
    keys = KeysFile(path)
    assert _user(keys, alice) == "alice"
    carol = add_key(path, "carol")
    assert _user(keys, carol) == "carol"  # the file changed: read again on this lookup
    assert remove_keys(path, "alice") == 1
    assert _user(keys, alice) is None
    assert _user(keys, carol) == "carol"


def test_a_broken_new_file_is_refused_and_the_old_keys_keep_working(tmp_path, caplog):
    path = tmp_path / "keys.json"
    alice = add_key(path, "alice")
    keys = KeysFile(path)
    tmp = tmp_path / "new.json"
    tmp.write_text('{"keys": [{"user": "bob"')  # half a file
    os.replace(tmp, path)
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        assert _user(keys, alice) == "alice"
        assert _user(keys, alice) == "alice"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "is not valid" in errors[0].getMessage()  # reported once, not per request
    tmp.write_text('{"keys": [{"user": "../x", "sha256": "00"}]}')  # parses, but not a valid entry
    os.replace(tmp, path)
    assert _user(keys, alice) == "alice"
    path.unlink()
    bob = add_key(path, "bob")  # a good file again: its keys, and only its keys
    assert _user(keys, bob) == "bob" and _user(keys, alice) is None


def test_a_bad_file_at_start_is_an_error(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text("not json")
    with pytest.raises(ValueError):
        KeysFile(path)


def test_tiers_give_each_tenant_its_weight(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tiers": {"gold": {"weight": 2.0}}, "keys": []}))
    gold = add_key(path, "alice", tier="gold")
    add_key(path, "alice", tier="gold")  # a second key of the same tenant
    plain = add_key(path, "bob")
    keys = KeysFile(path)
    assert keys.lookup(gold) == ("alice", Tier(weight=2.0))
    assert keys.lookup(plain) == ("bob", Tier())
    with pytest.raises(ValueError, match="defines no tier 'silver'"):
        add_key(path, "carol", tier="silver")


def test_tiers_carry_limits_and_re_tiering_takes_effect_on_the_next_lookup(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tiers": {"metered": {"requests_per_minute": 30, "tokens_per_minute": 5000,
                                                      "max_rows": 2, "max_queued": 4},
                                          "roomy": {"weight": 3, "tokens_per_minute": 90000}}, "keys": []}))
    key = add_key(path, "alice", tier="metered")
    keys = KeysFile(path)
    assert keys.lookup(key) == ("alice", Tier(1.0, 30, 5000, 2, 4))
    data = json.loads(path.read_text())
    data["keys"][0]["tier"] = "roomy"
    path.write_text(json.dumps(data))
    assert keys.lookup(key) == ("alice", Tier(weight=3, tokens_per_minute=90000))  # the others: the defaults


@pytest.mark.parametrize("tier,why", [
    ({"requests_per_minute": 0}, "requests_per_minute must be a whole number >= 1"),
    ({"tokens_per_minute": 2.5}, "tokens_per_minute must be a whole number >= 1"),
    ({"max_rows": "4"}, "max_rows must be a whole number >= 1"),
    ({"max_queued": True}, "max_queued must be a whole number >= 1"),
    ({"weight": -1}, "needs a weight > 0"),
    ({"rpm": 10}, r"has unknown field\(s\) \['rpm'\]"),
])
def test_a_tier_with_a_bad_value_is_refused_and_the_old_keys_keep_working(tmp_path, caplog, tier, why):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tiers": {"gold": {"requests_per_minute": 10}}, "keys": []}))
    alice = add_key(path, "alice", tier="gold")
    keys = KeysFile(path)
    data = json.loads(path.read_text())
    data["tiers"]["gold"] = tier
    tmp = tmp_path / "new.json"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        assert keys.lookup(alice) == ("alice", Tier(requests_per_minute=10))  # the tier read before
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and re.search(f"tier 'gold' {why}", errors[0]), errors


@pytest.mark.parametrize("data,why", [
    ({"tiers": {"gold": {"weight": 0}}, "keys": []}, "needs a weight > 0"),
    ({"keys": [{"user": "a", "sha256": "0" * 64, "tier": "gold"}]}, "which 'tiers' does not define"),
    ({"tiers": {"gold": {"weight": 2}}, "keys": [{"user": "a", "sha256": "0" * 64, "tier": "gold"},
                                                  {"user": "a", "sha256": "1" * 64}]}, "name different tiers"),
])
def test_inconsistent_tiers_are_refused(tmp_path, data, why):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=why):
        KeysFile(path)
