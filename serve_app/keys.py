"""API keys: a JSON file of sha256 hashes mapped to user ids; keys themselves are never stored.

    python -m serve_app.keys add alice --file keys.json     # prints a new key for alice, once

File format: {"keys": [{"user": "alice", "sha256": "<hex digest of the key>"}, ...]}.
Lookup hashes the presented key and compares it with every entry in constant time
(`hmac.compare_digest`), so neither timing nor the file reveals a key.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from jaxlora.adapter_store import check_id


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class ApiKeys:
    def __init__(self, entries: list[tuple[str, str]]):
        self._entries = [(bytes.fromhex(digest), user) for user, digest in entries]

    @classmethod
    def load(cls, path: str | Path) -> "ApiKeys":
        data = json.loads(Path(path).read_text())
        entries = []
        for e in data.get("keys", []):
            check_id(e["user"], "user id")
            if len(e["sha256"]) != 64:
                raise ValueError(f"{path}: sha256 of user {e['user']!r} is not a 64-hex-digit digest")
            entries.append((e["user"], e["sha256"]))
        return cls(entries)

    def user_for(self, key: str) -> str | None:
        digest = bytes.fromhex(hash_key(key))
        found = None
        for stored, user in self._entries:  # no early exit: the time taken does not depend on the match
            if hmac.compare_digest(stored, digest):
                found = user
        return found


def add_key(path: Path, user: str) -> str:
    check_id(user, "user id")
    data = json.loads(path.read_text()) if path.is_file() else {"keys": []}
    key = "sk-" + secrets.token_urlsafe(32)
    data["keys"].append({"user": user, "sha256": hash_key(key)})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return key


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Manage hashed API keys for the serving app.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="create a key for USER and print it (only its hash is stored)")
    add.add_argument("user")
    add.add_argument("--file", required=True, type=Path)
    args = ap.parse_args(argv)
    print(add_key(args.file, args.user))


if __name__ == "__main__":
    main()
