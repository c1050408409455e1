"""Turn a request's credentials into an ``Account``, or refuse it with 401."""

from __future__ import annotations

from collections.abc import Mapping

from guardproxy.dialects.base import Dialect
from guardproxy.errors import AuthenticationError
from guardproxy.identity.client_ip import client_ip, is_trusted
from guardproxy.identity.keys import hash_key
from guardproxy.policy.model import Account, Policy


class Identifier:
    def __init__(self, policy: Policy, dialect: Dialect) -> None:
        self.keys = policy.keys
        self.by_id = {a.id: a for a in policy.keys.values()}
        self.trust_header = policy.accounts.trust_header
        self.trusted = policy.clients.trusted_proxies
        self.dialect = dialect

    def client_ip(self, peer: str, forwarded: str) -> str:
        """``forwarded``: every X-Forwarded-For line joined (``forwarded_for``)."""
        return client_ip(peer, forwarded, self.trusted)

    def peer_trusted(self, peer: str) -> bool:
        """Whether the peer is one of ``clients.trusted_proxies`` (headers it sets about
        the client, such as an edge's TLS fingerprint, can be believed)."""
        return is_trusted(peer, self.trusted)

    def account(self, peer: str, headers: Mapping[str, str]) -> Account:
        if self.trust_header:
            # Only a trusted gateway may name the account; anyone else must show a key.
            named = headers.get(self.trust_header)
            if named and is_trusted(peer, self.trusted):
                return self.by_id.get(named) or Account(id=named, org=named, tier="default")
        key = self.dialect.api_key(headers)
        if not key:
            raise AuthenticationError("Missing API key. Send it as "
                                      + ("'x-api-key'." if self.dialect.name == "anthropic"
                                         else "'Authorization: Bearer <key>'."))
        account = self.keys.get(hash_key(key))
        if account is None:
            raise AuthenticationError("Incorrect API key provided.")
        return account
