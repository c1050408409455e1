"""What the response path costs per event and per response: ``python -m bench.response_path``.

An OpenAI chat completion is fed through ``ResponseDriver`` in process, one upstream
read per event, with the stages the default policy plus a canary rule create (the
``UsageMeter`` of a budget, hiding the usage chunk the proxy asked for, and an
enforcing ``CanaryStage``). Shapes:

- ``stream``: 200 ``chat.completion.chunk`` events of 1-3 words each, a ``finish_reason``
  chunk, the usage chunk and ``data: [DONE]`` (203 events), every chunk carrying
  ``"usage": null`` as OpenAI writes them with ``include_usage``;
- ``stream-nonull``: the same without ``"usage": null`` (vLLM, llama.cpp);
- ``stream-whole``: ``stream`` arriving in one read (as a fast upstream's does, through
  a proxy under load): the framer cuts many events per read;
- ``json``: a 15-word ``chat.completion`` body (the canary's fixed cost per response).

Stage sets (``bare``: the driver with no stage, ``usage``, ``canary``, ``all``) run in
alternating rounds and each keeps its fastest round. Reports CPU µs per response and,
for streams, per event; ``--profile`` runs cProfile over the ``all`` stream instead.
Also a check: the client bytes and the settled usage are printed as a digest, so runs
before and after a change can be compared for identity.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import pstats
import random
import time
from collections.abc import Callable
from typing import Any

from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.marker import Marker
from guardproxy.canary.slots import RECOMMENDED
from guardproxy.canary.stage import CanaryStage
from guardproxy.dialects import get_dialect
from guardproxy.response.driver import ResponseDriver
from guardproxy.response.events import Ending, ResponseStage
from guardproxy.response.usage import Usage, UsageMeter

_PROSE = ("it is often simple to choose a large useful plan and then gradually improve "
          "the result because we don't know what will happen next so the team can't "
          "wait very long before they begin working on something quite different")
_WORDS = tuple(_PROSE.split())
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]
_JSON = [(b"content-type", b"application/json")]
MAX_EVENT = 4 << 20


def _chunk(delta: dict[str, Any], finish: str | None, usage_null: bool) -> bytes:
    obj: dict[str, Any] = {
        "id": "chatcmpl-AbC123xyz", "object": "chat.completion.chunk", "created": 1732960000,
        "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_0ba0d124f1",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if usage_null:
        obj["usage"] = None
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def stream_events(usage_null: bool, events: int = 200, seed: int = 7) -> list[bytes]:
    """A chat completion stream: ``events`` text chunks, finish, usage, [DONE]."""
    rng = random.Random(seed)
    out = [_chunk({"role": "assistant", "content": "", "refusal": None}, None, usage_null)]
    for i in range(events - 1):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(1, 3))]
        text = (" " if i else "") + " ".join(words) + ("." if rng.random() < 0.08 else "")
        out.append(_chunk({"content": text}, None, usage_null))
    out.append(_chunk({}, "stop", usage_null))
    usage = {"id": "chatcmpl-AbC123xyz", "object": "chat.completion.chunk",
             "created": 1732960000, "model": "gpt-4o-mini-2024-07-18",
             "system_fingerprint": "fp_0ba0d124f1", "choices": [],
             "usage": {"prompt_tokens": 31, "completion_tokens": 412, "total_tokens": 443}}
    out.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def json_answer() -> bytes:
    return json.dumps({
        "id": "chatcmpl-AbC123xyz", "object": "chat.completion", "created": 1732960000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": {
            "role": "assistant", "refusal": None,
            "content": "It is often simple to choose a large, useful plan and then "
                       "gradually improve it."}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28},
        "system_fingerprint": "fp_0ba0d124f1"}).encode()


class _Lease:
    """A budget lease that only remembers what it was settled with."""

    ttl = 60.0

    def __init__(self) -> None:
        self.usage: Usage | None = None

    async def renew(self) -> None:
        return None

    async def close(self, usage: Usage, ending: Ending, status: int) -> None:
        self.usage = usage


_KEYS = CanaryKeys("bench-canary-secret-0123456789", 1.0, RECOMMENDED, False)
_CODE = _KEYS.code("bench")
_DIALECT = get_dialect("openai")


def _stages(kind: str, leases: list[_Lease], texts: list[str]) -> list[ResponseStage]:
    stages: list[ResponseStage] = []
    if kind in ("usage", "all"):
        lease = _Lease()
        leases.append(lease)
        stages.append(UsageMeter(_DIALECT, [lease], 20, True, 1024))
    if kind in ("canary", "all"):
        def new_marker() -> Marker:
            return Marker(_KEYS, _CODE, channels=RECOMMENDED, tripwire=False, stops=())

        async def record(text: str) -> None:
            texts.append(text)

        stages.append(CanaryStage("openai", new_marker, record, rewrite=True))
    return stages


async def one_response(kind: str, headers: list[tuple[bytes, bytes]], reads: list[bytes],
                       sink: Callable[[bytes], None], leases: list[_Lease],
                       texts: list[str]) -> None:
    driver = ResponseDriver(_stages(kind, leases, texts), MAX_EVENT)
    driver.start(200, headers)
    last = len(reads) - 1
    for i, data in enumerate(reads):
        sink(driver.body(data, i == last))
    await driver.finish(Ending.COMPLETED)


async def one_round(kind: str, headers: list[tuple[bytes, bytes]], reads: list[bytes],
                    responses: int) -> tuple[float, str]:
    """CPU µs per response, and a digest of the client bytes + settled usage."""
    out: list[bytes] = []
    leases: list[_Lease] = []
    texts: list[str] = []
    start = time.process_time()
    for _ in range(responses):
        out.clear()
        await one_response(kind, headers, reads, out.append, leases, texts)
        leases.clear()
    spent = time.process_time() - start
    await one_response(kind, headers, reads, out.append, leases, texts)  # the check, untimed
    digest = hashlib.sha256(b"".join(out) + repr([x.usage for x in leases]).encode()
                            + "\0".join(texts[-1:]).encode()).hexdigest()[:12]
    return spent / responses * 1e6, digest


SHAPES: dict[str, tuple[list[tuple[bytes, bytes]], list[bytes]]] = {
    "stream": (_SSE, stream_events(True)),
    "stream-nonull": (_SSE, stream_events(False)),
    "stream-whole": (_SSE, [b"".join(stream_events(True))]),
    "json": (_JSON, [json_answer()]),
}
KINDS = ("bare", "usage", "canary", "all")


async def main_async(responses: int, rounds: int, shapes: list[str]) -> None:
    best: dict[tuple[str, str], float] = {}
    digests: dict[tuple[str, str], str] = {}
    for shape in shapes:  # warm-up
        for kind in KINDS:
            await one_round(kind, *SHAPES[shape], 20)
    for _ in range(rounds):
        for shape in shapes:
            n = responses if shape != "json" else responses * 20
            for kind in KINDS:
                value, digest = await one_round(kind, *SHAPES[shape], n)
                key = (shape, kind)
                best[key] = min(best.get(key, float("inf")), value)
                digests[key] = digest
    print("| shape | stages | CPU µs / response | µs / event | over bare µs/resp | digest |")
    print("|---|---|---|---|---|---|")
    for (shape, kind), value in best.items():
        events = len(stream_events(True)) if shape.startswith("stream") else 0
        per_event = f"{value / events:.2f}" if events else "—"
        over = value - best[(shape, "bare")]
        print(f"| {shape} | {kind} | {value:.1f} | {per_event} | {over:+.1f} | "
              f"{digests[(shape, kind)]} |")


def profile(responses: int, shape: str) -> None:
    async def run() -> None:
        await one_round("all", *SHAPES[shape], responses)
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(run())
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.response_path",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=int, default=100, help="streams per round (100; "
                        "json: 20x)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--profile", metavar="SHAPE", help="cProfile the 'all' stages")
    args = parser.parse_args()
    if args.profile:
        profile(args.responses, args.profile)
        return
    asyncio.run(main_async(args.responses, args.rounds, args.shapes.split(",")))


if __name__ == "__main__":
    main()
