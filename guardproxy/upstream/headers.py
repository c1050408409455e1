"""Header hygiene between client, proxy and upstream."""

from __future__ import annotations

from collections.abc import Iterable

from guardproxy.dialects import CLIENT_CREDENTIAL_HEADERS

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
})
_CREDENTIALS = frozenset(name.encode() for name in CLIENT_CREDENTIAL_HEADERS)
# Recomputed for the forwarded request; compression is refused upstream so that
# response stages can read bodies (sidecar traffic is local). ``expect`` is answered by
# the server in front (the proxy has the body already); ``cookie`` is a credential for
# the proxy's clients, never for the upstream.
_REQUEST_DROP = HOP_BY_HOP | _CREDENTIALS | {
    b"host", b"content-length", b"accept-encoding", b"expect", b"cookie"}
# ``content-length`` is recomputed (bodies are decoded, stages may resize them). The
# upstream's cookies and auth challenges concern the proxy's own upstream session and
# credentials, which the client neither holds nor should steer: a 401 challenge would
# tell the client its key is wrong when the proxy's is.
_LOCATIONS = frozenset({b"location", b"content-location"})
_RESPONSE_DROP = HOP_BY_HOP | {
    b"content-length", b"set-cookie", b"set-cookie2", b"www-authenticate",
    b"authentication-info", b"proxy-authentication-info"}


def _named_in_connection(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(v.strip().lower() for v in value.split(b","))
    return names


def request_headers(client: Iterable[tuple[bytes, bytes]],
                    upstream: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """Client headers minus hop-by-hop and credentials, plus the upstream's own."""
    client = list(client)
    drop = _REQUEST_DROP | _named_in_connection(client)
    configured = list(upstream)
    replaced = {name for name, _ in configured}
    out = [(n, v) for n, v in client if n.lower() not in drop and n.lower() not in replaced]
    out.extend(configured)
    out.append((b"accept-encoding", b"identity"))
    return out


def response_headers(upstream: Iterable[tuple[bytes, bytes]], *, decoded: bool = False,
                     secrets: Iterable[bytes] = (), origin: bytes = b"") -> RawHeaders:
    """The upstream's response headers minus hop-by-hop, ``content-length``, cookies and
    auth challenges; minus ``content-encoding`` when the body is relayed ``decoded``; and
    minus any header whose value contains one of ``secrets`` (the upstream's own
    credentials, should it echo them back). The upstream's ``origin``
    (``http://host:port``) never reaches a client: a ``location`` or
    ``content-location`` under it becomes a relative path, any other header naming it is
    dropped."""
    upstream = list(upstream)
    drop = _RESPONSE_DROP | _named_in_connection(upstream)
    if decoded:
        drop = drop | {b"content-encoding"}
    secrets = [s for s in secrets if len(s) >= 8]
    out: RawHeaders = []
    for name, value in upstream:
        lowered = name.lower()
        if lowered in drop or any(s in value for s in secrets):
            continue
        if origin and origin in value.lower():
            if lowered in _LOCATIONS and value.lower().startswith(origin):
                value = value[len(origin):] or b"/"
                if not value.startswith(b"/"):
                    continue
            else:
                continue
        out.append((name, value))
    return out
