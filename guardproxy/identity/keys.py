"""The accounts file: SHA-256 of each API key -> account. Keys never appear in clear.

    accounts:
      - id: alice
        org: acme
        tier: free
        key_sha256: [9f86d081…, …]     # one hash or a list
        attributes: {payment: card-1234, email: a@example.com}
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from guardproxy.errors import Problem
from guardproxy.policy.model import Account
from guardproxy.policy.reader import Reader
from guardproxy.policy.source import LocDict, read_yaml

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
KEY_PREFIX = "gp-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def read_accounts(path: Path, env: Mapping[str, str],
                  problems: list[Problem]) -> dict[str, Account]:
    """The accounts file as key hash -> ``Account``; every problem (file:line) goes to
    ``problems``, whatever the file holds: this never raises."""
    doc = read_yaml(path, env, problems)
    if doc is None:
        return {}
    if not isinstance(doc, LocDict):
        problems.append(Problem(str(path), 1, "", "an accounts file is a mapping: "
                                "'accounts:' and a list of {id, org, tier, key_sha256}"))
        return {}
    top = Reader(str(path), doc, "", problems)
    top.allow(("accounts",))
    by_hash: dict[str, Account] = {}
    ids: set[str] = set()
    for r in top.children("accounts"):
        r.allow(("id", "org", "tier", "key_sha256", "attributes"), required=("id",))
        account_id = r.string("id") or ""
        if r.has("id") and not account_id.strip():
            r.problem("must not be empty", "id")
        elif account_id in ids:
            r.problem(f"duplicate account id {account_id!r}", "id")
        ids.add(account_id)
        account = Account(
            id=account_id,
            org=r.string("org", account_id) or account_id,
            tier=r.string("tier", "default") or "default",
            attributes=tuple(sorted(r.string_map("attributes").items())),
        )
        for digest in r.string_list("key_sha256"):
            digest = digest.lower()
            if not _HEX64.match(digest):
                r.problem("must be the 64-hex-digit SHA-256 of a key "
                          "(use 'guardproxy keys add' to make one)", "key_sha256")
            elif digest in by_hash:
                r.problem(f"key hash already belongs to account {by_hash[digest].id!r}",
                          "key_sha256")
            else:
                by_hash[digest] = account
    return by_hash


def add_key(path: Path, account_id: str, org: str | None, tier: str | None) -> str:
    """Generate a key for an account (created if new), store its hash, return the key.

    The file is rewritten atomically; comments in it are not preserved.
    """
    data: dict[str, Any] = {"accounts": []}
    if path.exists():
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict) or not isinstance(loaded.get("accounts", []), list):
            raise ValueError(f"{path}: 'accounts' must be a list")
        data = loaded
        data.setdefault("accounts", [])
    key = new_key()
    entry = next((a for a in data["accounts"] if a.get("id") == account_id), None)
    if entry is None:
        entry = {"id": account_id, "org": org or account_id, "tier": tier or "default",
                 "key_sha256": []}
        data["accounts"].append(entry)
    else:
        if org:
            entry["org"] = org
        if tier:
            entry["tier"] = tier
    hashes = entry.get("key_sha256") or []
    entry["key_sha256"] = [*([hashes] if isinstance(hashes, str) else hashes), hash_key(key)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        yaml.safe_dump(data, out, sort_keys=False)
    os.replace(tmp, path)
    return key
