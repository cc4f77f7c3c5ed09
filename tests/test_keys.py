"""API keys follow their file while serving (`serve_app.keys.KeysFile`): added and revoked keys
take effect on the next lookup; a broken new file is refused and the old keys keep working."""

import json
import logging
import os

import pytest

from serve_app.keys import KeysFile, add_key, remove_keys


def test_added_and_revoked_keys_take_effect_without_a_restart(tmp_path):
    path = tmp_path / "keys.json"
    alice = add_key(path, "alice")
    keys = KeysFile(path)
    assert keys.user_for(alice) == "alice"
    carol = add_key(path, "carol")
    assert keys.user_for(carol) == "carol"  # the file changed: read again on this lookup
    assert remove_keys(path, "alice") == 1
    assert keys.user_for(alice) is None
    assert keys.user_for(carol) == "carol"


def test_a_broken_new_file_is_refused_and_the_old_keys_keep_working(tmp_path, caplog):
    path = tmp_path / "keys.json"
    alice = add_key(path, "alice")
    keys = KeysFile(path)
    tmp = tmp_path / "new.json"
    tmp.write_text('{"keys": [{"user": "bob"')  # half a file
    os.replace(tmp, path)
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        assert keys.user_for(alice) == "alice"
        assert keys.user_for(alice) == "alice"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "is not valid" in errors[0].getMessage()  # reported once, not per request
    tmp.write_text('{"keys": [{"user": "../x", "sha256": "00"}]}')  # parses, but not a valid entry
    os.replace(tmp, path)
    assert keys.user_for(alice) == "alice"
    path.unlink()
    bob = add_key(path, "bob")  # a good file again: its keys, and only its keys
    assert keys.user_for(bob) == "bob" and keys.user_for(alice) is None


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
    assert (keys.user_for(gold), keys.tier_of("alice").weight) == ("alice", 2.0)
    assert (keys.user_for(plain), keys.tier_of("bob").weight) == ("bob", 1.0)
    with pytest.raises(ValueError, match="defines no tier 'silver'"):
        add_key(path, "carol", tier="silver")


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
