"""Request and lease ids: unique within a source and across sources."""

from __future__ import annotations

from guardproxy.ids import IdSource


def test_ids_are_unique_within_and_across_sources() -> None:
    a, b = IdSource(), IdSource()
    ids = [a() for _ in range(5000)] + [b() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert a.prefix != b.prefix and all(len(i) >= 17 for i in ids)
