"""Differential: the response path reading chat chunks without their parse
(``response.chat_chunk``) against the same path parsing every event.

Every stream goes through the stages twice, once as the proxy runs them and once with
a chunk reader that never reads (so every stage parses, as before the fast path), cut
into the same reads: the client's bytes, the usage settled, the text the canaries
record and what the usage meter counted must be identical. Streams: generated chat
streams of every server layout with hostile events mixed in
(``test_fast_parse_differential``), and hypothesis' OpenAI streams of
``test_stream_rewrite_properties``. Stage sets: the usage meter alone (hiding the usage
chunk or not), an enforcing or shadow canary alone, the proxy's order (meter, then the
canary), the reverse order, two canaries (the second marks the first's output), a
canary with stop sequences or the tripwire.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.marker import Marker
from guardproxy.canary.stage import CanaryStage
from guardproxy.dialects import get_dialect
from guardproxy.response import driver as driver_module
from guardproxy.response.chat_chunk import ChatChunk, ChunkReader
from guardproxy.response.driver import ResponseDriver
from guardproxy.response.events import Ending, ResponseStage
from guardproxy.response.usage import Usage, UsageMeter
from tests.streams import JSON, SSE, pieces
from tests.test_fast_parse_differential import chat_stream, hostile_block
from tests.test_stream_rewrite_properties import Stream, openai_streams

KEYS = CanaryKeys("fast-differential-0123456789abcdef")
WIRE_KEYS = CanaryKeys("fast-differential-0123456789abcdef", 0.7, tripwire=True)
CONFIGS = ("meter-hide", "meter", "canary", "shadow", "meter-hide+canary", "canary+meter-hide",
           "meter+canary+canary-stops", "meter-hide+canary-wire")


class _Lease:
    ttl = 60.0

    def __init__(self) -> None:
        self.usage: Usage | None = None

    async def renew(self) -> None:
        return None

    async def close(self, usage: Usage, ending: Ending, status: int) -> None:
        self.usage = usage


class _NeverReads(ChunkReader):
    """A reader that reads no chunk: every stage parses every event, as before."""

    def read(self, block: bytes) -> ChatChunk | None:
        return None

    @property
    def learning(self) -> bool:
        return False


@contextmanager
def parsing_every_event() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(driver_module, "ChunkReader", _NeverReads)
        yield


def _stages(config: str, dialect: str, texts: list[str],
            leases: list[_Lease]) -> list[ResponseStage]:
    stages: list[ResponseStage] = []
    for name in config.split("+"):
        if name.startswith("meter"):
            lease = _Lease()
            leases.append(lease)
            stages.append(UsageMeter(get_dialect(dialect), [lease], 20, name == "meter-hide", 64))
            continue
        keys = WIRE_KEYS if name == "canary-wire" else KEYS
        stops = ("often", "'") if name == "canary-stops" else ()
        enforce = name != "shadow"

        def new_marker(keys: CanaryKeys = keys, stops: tuple[str, ...] = stops,
                       enforce: bool = enforce) -> Marker:
            return Marker(keys, keys.code("alice"), channels=keys.channels if enforce else (),
                          tripwire=keys.read_wires and enforce, stops=stops)

        async def record(text: str) -> None:
            texts.append(text)

        stages.append(CanaryStage(dialect, new_marker, record, rewrite=enforce))
    return stages


def run(config: str, dialect: str, headers: list[tuple[bytes, bytes]], reads: list[bytes]
        ) -> tuple[Any, ...]:
    """What one response gave: the client's bytes, usage settled, texts recorded, the
    meter's tally and which stages were still running at the end."""
    texts: list[str] = []
    leases: list[_Lease] = []
    stages = _stages(config, dialect, texts, leases)
    driver = ResponseDriver(stages, 4 << 20)
    driver.start(200, headers)
    out = b"".join(driver.body(data, i == len(reads) - 1) for i, data in enumerate(reads))
    running = [stages.index(stage) for stage in driver.active]
    asyncio.run(driver.finish(Ending.COMPLETED))
    tallies = [(m.tally.text_bytes, m.tally.prompt, m.tally.completion, m.tally.final, m.blind)
               for m in stages if isinstance(m, UsageMeter)]
    return out, [lease.usage for lease in leases], texts, tallies, running


def same_both_ways(config: str, dialect: str, headers: list[tuple[bytes, bytes]],
                   reads: list[bytes]) -> None:
    fast = run(config, dialect, headers, reads)
    with parsing_every_event():
        slow = run(config, dialect, headers, reads)
    assert fast == slow, (config, b"".join(reads)[:2000])


@pytest.mark.parametrize("config", CONFIGS)
def test_generated_streams_reach_the_client_as_when_every_event_is_parsed(config: str) -> None:
    rng = random.Random(f"fast-{config}")
    for _ in range(60):
        events = chat_stream(rng, hostile=rng.choice([0.0, 0.05, 0.3]))
        if rng.random() < 0.2:
            events = [hostile_block(rng) for _ in range(rng.randint(1, 12))] + events
        body = b"".join(events)
        reads = events if rng.random() < 0.5 else pieces(
            body, [rng.randint(0, len(body)) for _ in range(rng.randint(0, 30))])
        same_both_ways(config, "openai", SSE, reads)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(openai_streams(), st.sampled_from(CONFIGS), st.lists(st.integers(0, 1 << 20),
                                                             max_size=20))
def test_property_streams_reach_the_client_as_when_every_event_is_parsed(
        stream: Stream, config: str, cuts: list[int]) -> None:
    same_both_ways(config, stream.dialect, SSE, pieces(stream.body(), cuts))


def test_the_fast_path_is_taken() -> None:
    """The streams above do go the fast way (else they would prove nothing)."""
    reads = {"n": 0}
    real = ChunkReader.read

    def counting(self: ChunkReader, block: bytes) -> ChatChunk | None:
        chunk = real(self, block)
        reads["n"] += chunk is not None
        return chunk

    rng = random.Random(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ChunkReader, "read", counting)
        for _ in range(20):
            run("meter-hide+canary", "openai", SSE, chat_stream(rng, hostile=0.0))
    assert reads["n"] > 200


def test_unchanged_chunks_pass_as_the_upstream_wrote_them() -> None:
    """A text the canary leaves as it is: the event's own bytes, not a copy re-encoded."""
    rng = random.Random(3)
    events = chat_stream(rng, hostile=0.0)
    texts: list[str] = []
    stages = _stages("meter-hide+shadow", "openai", texts, [])
    driver = ResponseDriver(stages, 4 << 20)
    driver.start(200, SSE)
    for event in events:
        assert driver.body(event, False) in (event, b"")   # only the usage chunk is hidden


def test_json_bodies_are_unchanged_by_the_fast_path() -> None:
    body = (b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{'
            b'"role":"assistant","content":"Everyone went toward someone."},'
            b'"finish_reason":"stop"}],"usage":{"prompt_tokens":21,"completion_tokens":4}}')
    for config in CONFIGS:
        same_both_ways(config, "openai", JSON, [body])
