"""API keys: a JSON file of sha256 hashes mapped to user ids; keys themselves are never stored.

    python -m serve_app.keys add alice --file keys.json     # prints a new key for alice, once
    python -m serve_app.keys remove alice --file keys.json  # revokes every key of alice

File format: {"keys": [{"user": "alice", "sha256": "<hex digest of the key>", "tier": "gold"}, ...],
"tiers": {"gold": {"weight": 2.0}}}. "tier" and "tiers" are optional: a tenant without a tier has
weight 1. A tier's weight is its share under fair scheduling (`jaxlora/fairness.py`); every key
of one tenant names the same tier.
Lookup hashes the presented key and compares it with every entry in constant time
(`hmac.compare_digest`), so neither timing nor the file reveals a key.

`KeysFile` follows the file while serving: a changed file (both commands replace it atomically) is
read on the next lookup, so adding or revoking a key needs no redeploy. A new file that does not
parse is refused with a logged error and the keys read before keep working.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from pathlib import Path

from jaxlora.adapter_store import check_id
from jaxlora.errors import JaxLoraError

log = logging.getLogger("ray.serve")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Tier:
    weight: float = 1.0  # share under fair scheduling: 2 gets twice the tokens of 1 when both wait


class ApiKeys:
    def __init__(self, entries: list[tuple[str, str]], tiers: dict[str, Tier] | None = None):
        self._entries = [(bytes.fromhex(digest), user) for user, digest in entries]
        self._tiers = tiers or {}  # user -> tier; users not in it have the default tier

    @classmethod
    def load(cls, path: str | Path) -> "ApiKeys":
        data = json.loads(Path(path).read_text())
        tiers = {}
        for name, t in (data.get("tiers") or {}).items():
            tiers[name] = Tier(**t)
            if not (isinstance(tiers[name].weight, (int, float)) and tiers[name].weight > 0):
                raise ValueError(f"{path}: tier {name!r} needs a weight > 0, got {tiers[name].weight!r}")
        entries, user_tier = [], {}
        for e in data.get("keys", []):
            check_id(e["user"], "user id")
            if len(e["sha256"]) != 64:
                raise ValueError(f"{path}: sha256 of user {e['user']!r} is not a 64-hex-digit digest")
            tier = e.get("tier")
            if tier is not None and tier not in tiers:
                raise ValueError(f"{path}: user {e['user']!r} has tier {tier!r}, which 'tiers' does not define")
            if user_tier.setdefault(e["user"], tier) != tier:
                raise ValueError(f"{path}: the keys of user {e['user']!r} name different tiers")
            entries.append((e["user"], e["sha256"]))
        return cls(entries, {user: tiers[t] for user, t in user_tier.items() if t is not None})

    def tier_of(self, user: str) -> Tier:
        return self._tiers.get(user, Tier())

    def user_for(self, key: str) -> str | None:
        digest = bytes.fromhex(hash_key(key))
        found = None
        for stored, user in self._entries:  # no early exit: the time taken does not depend on the match
            if hmac.compare_digest(stored, digest):
                found = user
        return found


class KeysFile:
    """`ApiKeys` of a file, re-read when the file changes (new inode, size or mtime)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen = self._identity()
        self._keys = ApiKeys.load(self.path)  # a bad file at start is an error: the replica does not start

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def user_for(self, key: str) -> str | None:
        return self._current().user_for(key)

    def tier_of(self, user: str) -> Tier:
        return self._current().tier_of(user)

    def _current(self) -> ApiKeys:
        identity = self._identity()
        if identity != self._seen:
            with self._lock:
                if identity != self._seen:
                    self._seen = identity  # a bad file is reported once, not on every request
                    try:
                        self._keys = ApiKeys.load(self.path)
                        log.info("API keys reloaded from %s", self.path)
                    except (OSError, ValueError, KeyError, TypeError, AttributeError, JaxLoraError) as e:
                        log.error("API keys file %s is not valid (%s); the keys read before stay in use", self.path, e)
        return self._keys


def _replace(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def add_key(path: Path, user: str, tier: str | None = None) -> str:
    check_id(user, "user id")
    data = json.loads(path.read_text()) if path.is_file() else {"keys": []}
    if tier is not None and tier not in (data.get("tiers") or {}):
        raise ValueError(f"{path} defines no tier {tier!r}: add it under 'tiers' first")
    key = "sk-" + secrets.token_urlsafe(32)
    data["keys"].append({"user": user, "sha256": hash_key(key)} | ({"tier": tier} if tier else {}))
    _replace(path, data)
    return key


def remove_keys(path: Path, user: str) -> int:
    """Revokes every key of `user`; returns how many there were."""
    data = json.loads(path.read_text())
    kept = [e for e in data["keys"] if e["user"] != user]
    removed = len(data["keys"]) - len(kept)
    _replace(path, {**data, "keys": kept})
    return removed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Manage hashed API keys for the serving app.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("add", "create a key for USER and print it (only its hash is stored)"),
                        ("remove", "revoke every key of USER")):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("user")
        cmd.add_argument("--file", required=True, type=Path)
        if name == "add":
            cmd.add_argument("--tier", help="one of the file's 'tiers' (default: weight 1)")
    args = ap.parse_args(argv)
    if args.cmd == "add":
        print(add_key(args.file, args.user, args.tier))
    else:
        print(f"removed {remove_keys(args.file, args.user)} key(s) of {args.user}")


if __name__ == "__main__":
    main()
