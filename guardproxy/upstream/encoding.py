"""Content-codings of upstream responses: the proxy relays bodies DECODED.

Requests ask for ``accept-encoding: identity``, but some upstreams compress anyway. The
aiohttp transport does not decompress (httpx-aiohttp passes ``auto_decompress=False``)
and ``aiter_raw`` yields the bytes as sent, so decoding happens here, once: the client
and the response stages see plain bytes, and the response loses its
``content-encoding`` and ``content-length`` (``UpstreamApp`` sets the decoded length on
bodies it buffers). ``gzip``, ``x-gzip`` and ``deflate`` (zlib-wrapped or raw) are
decoded, stacked codings too. A coding that cannot be decoded here (``br``, ``zstd``, an
unknown token) leaves the body untouched and its header in place, so that the client
can decode it and the stages know to leave it alone.

Decoded output comes in pieces of at most ``PIECE`` bytes, so that a small compressed
chunk cannot expand into one huge message (a decompression bomb).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

PIECE = 1 << 18  # bytes of decoded output per piece, at most


class DecodingError(ValueError):
    """The body does not decode as its ``content-encoding`` says (corrupt or truncated)."""


def _codings(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    tokens: list[str] = []
    for name, value in headers:
        if name.lower() == b"content-encoding":
            tokens += [t.strip().lower() for t in value.decode("latin-1").split(",")]
    return [t for t in tokens if t and t != "identity"]


class _Zlib:
    """One gzip or deflate layer. gzip may hold several members, one after another."""

    def __init__(self, coding: str) -> None:
        self.gzip = coding in ("gzip", "x-gzip")
        self.raw_fallback = not self.gzip  # "deflate" is zlib-wrapped, or raw in practice
        self.started = False
        self.obj = self._new()

    def _new(self, raw: bool = False) -> zlib._Decompress:
        return zlib.decompressobj(-zlib.MAX_WBITS if raw else
                                  zlib.MAX_WBITS | (16 if self.gzip else 0))

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data or self.started:
            if self.obj.eof:  # trailing data: a further gzip member (else ignored)
                if not (self.gzip and data.strip(b"\x00")):
                    return
                self.obj = self._new()
            try:
                out = self.obj.decompress(data, PIECE)
            except zlib.error as exc:
                if self.raw_fallback and not self.started:
                    self.raw_fallback = False
                    self.obj = self._new(raw=True)
                    continue
                raise DecodingError(f"invalid compressed body: {exc}") from exc
            self.started = True
            if out:
                yield out
            if self.obj.unconsumed_tail:
                data = self.obj.unconsumed_tail
            elif self.obj.eof:
                data = self.obj.unused_data
            elif len(out) == PIECE:
                data = b""  # input consumed but the output was capped: more may be pending
            else:
                return

    def flush(self) -> Iterator[bytes]:
        if not self.started:
            return  # an empty body stays empty
        if not self.obj.eof:
            if tail := self.obj.flush():
                yield tail
            raise DecodingError("compressed body is truncated")


class Decoder:
    """Undoes a response's content-codings, last applied first."""

    def __init__(self, codings: list[str]) -> None:
        self.layers = [_Zlib(c) for c in reversed(codings)]

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decoded pieces (each <= ``PIECE`` bytes) of the next body chunk."""
        return self._run(0, data)

    def flush(self) -> Iterator[bytes]:
        """The end of the body; raises ``DecodingError`` if a layer is incomplete."""
        return self._finish(0)

    def _run(self, i: int, data: bytes) -> Iterator[bytes]:
        if i == len(self.layers):
            if data:
                yield data
            return
        for piece in self.layers[i].feed(data):
            yield from self._run(i + 1, piece)

    def _finish(self, i: int) -> Iterator[bytes]:
        if i == len(self.layers):
            return
        for piece in self.layers[i].flush():
            yield from self._run(i + 1, piece)
        yield from self._finish(i + 1)


_DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})


def content_decoder(headers: Iterable[tuple[bytes, bytes]]) -> Decoder | None:
    """A decoder for the response's content-coding, or None when the body is relayed as
    it is: no coding, or one this module cannot decode (whose header then stays)."""
    codings = _codings(headers)
    if not codings or not _DECODABLE.issuperset(codings):
        return None
    return Decoder(codings)
