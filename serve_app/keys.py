"""API keys: a JSON file of sha256 hashes mapped to user ids; keys themselves are never stored.

    python -m serve_app.keys add alice --file keys.json     # prints a new key for alice, once
    python -m serve_app.keys remove alice --file keys.json  # revokes every key of alice

File format: {"keys": [{"user": "alice", "sha256": "<hex digest of the key>", "tier": "gold"}, ...],
"tiers": {"gold": {"weight": 2.0, "requests_per_minute": 600, "tokens_per_minute": 200000,
"max_rows": 4, "max_queued": 16}}}. "tier", "tiers" and every field of a tier are optional: a
tenant without a tier has weight 1 and the deployment's defaults. `Tier` says what each field
does; every key of one tenant names the same tier.
Lookup hashes the presented key and compares it with every entry in constant time
(`hmac.compare_digest`), so neither timing nor the file reveals a key.

`KeysFile` follows the file while serving: a changed file (both commands replace it atomically) is
read on the next lookup, so adding or revoking a key, or moving a tenant to another tier, needs no
redeploy. A new file that does not parse, or has a tier with a bad value, is refused with a logged
error and the keys read before keep working.
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
    """A tenant's share and limits. Every limit's None means the deployment's default: `AppArgs`'
    requests_per_minute / tokens_per_minute (serve_app/limits.py), the engine's max_rows_per_tenant /
    max_queued_per_tenant (`jaxlora.engine.EngineConfig`)."""
    weight: float = 1.0  # share under fair scheduling: 2 gets twice the tokens of 1 when both wait
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + max_tokens reserved per request, settled to its usage
    max_rows: int | None = None  # decode rows it may hold while other tenants wait
    max_queued: int | None = None  # its requests waiting for a row before the next gets 429

    def __post_init__(self):
        if isinstance(self.weight, bool) or not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ValueError(f"needs a weight > 0, got {self.weight!r}")
        for name in ("requests_per_minute", "tokens_per_minute", "max_rows", "max_queued"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a whole number >= 1 (or absent: the deployment's default), got {v!r}")


class ApiKeys:
    def __init__(self, entries: list[tuple[str, str]], tiers: dict[str, Tier] | None = None):
        self._entries = [(bytes.fromhex(digest), user) for user, digest in entries]
        self._tiers = tiers or {}  # user -> tier; users not in it have the default tier

    @classmethod
    def load(cls, path: str | Path) -> "ApiKeys":
        data = json.loads(Path(path).read_text())
        tiers = {}
        fields = [f.name for f in dataclasses.fields(Tier)]
        for name, t in (data.get("tiers") or {}).items():
            unknown = set(t) - set(fields)
            if unknown:
                raise ValueError(f"{path}: tier {name!r} has unknown field(s) {sorted(unknown)}; a tier has {fields}")
            try:
                tiers[name] = Tier(**t)
            except ValueError as e:
                raise ValueError(f"{path}: tier {name!r} {e}") from None
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

    def lookup(self, key: str) -> tuple[str, Tier] | None:
        """The user a key belongs to and their tier; None for an unknown key."""
        digest = bytes.fromhex(hash_key(key))
        found = None
        for stored, user in self._entries:  # no early exit: the time taken does not depend on the match
            if hmac.compare_digest(stored, digest):
                found = user
        return None if found is None else (found, self._tiers.get(found, Tier()))


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

    def lookup(self, key: str) -> tuple[str, Tier] | None:
        """`ApiKeys.lookup` on the file as it is now (one stat per call)."""
        return self._current().lookup(key)

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
            cmd.add_argument("--tier", help="one of the file's 'tiers' (default: weight 1 and the deployment's limits)")
    args = ap.parse_args(argv)
    if args.cmd == "add":
        print(add_key(args.file, args.user, args.tier))
    else:
        print(f"removed {remove_keys(args.file, args.user)} key(s) of {args.user}")


if __name__ == "__main__":
    main()
