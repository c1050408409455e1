"""The canary response stage: marks the text of a response as it passes.

Only text is rewritten: OpenAI ``message.content`` / ``delta.content`` / ``text``, the
Responses API's ``output_text`` parts and ``response.output_text.delta`` (see
``responses_api``), and Anthropic ``text`` blocks / ``text_delta``. Every other event
and field is passed on byte-identical; an event whose text changed has that one string
value swapped in its raw bytes (re-encoded only when that is ambiguous).

A stream holds back at most one partial word per choice (or content block, or part).
The held-back text goes out with the event that ends its choice when that event carries
the choice's text (vLLM, llama.cpp and TGI send the last text and ``finish_reason`` in
one chunk), else in an event of its own just before it, so the text keeps its order.
In shadow mode the stage only records the text for the ledger: the client gets the
upstream's bytes unchanged.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from guardproxy.canary import responses_api as rapi
from guardproxy.canary.marker import Marker
from guardproxy.response.chat_chunk import ChatChunk
from guardproxy.response.events import (
    BaseStage,
    BodyKind,
    Ending,
    ResponseHead,
    SSEEvent,
    WholeBody,
)
from guardproxy.response.sse import encode_event, event_fields

log = logging.getLogger("guardproxy.canary")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _quote(value: str, ascii_only: bool) -> str:
    if '"' not in value and "\\" not in value and value.isprintable() \
            and (not ascii_only or value.isascii()):
        # what json.dumps writes, without its cost: it escapes only '"', '\\' and
        # control characters (and, ascii_only, what is not ASCII)
        return f'"{value}"'
    return json.dumps(value, ensure_ascii=ascii_only)


def _swap(block: bytes, key: str, old: str, new: str) -> bytes | None:
    """Replace one JSON string value in the raw event, leaving every other byte as the
    upstream wrote it; None when the value is not found exactly once."""
    for ascii_only in (False, True):
        for sep in (":", ": "):
            needle = f'"{key}"{sep}{_quote(old, ascii_only)}'.encode("utf-8", "surrogatepass")
            if block.count(needle) == 1:
                value = _quote(new, ascii_only)
                return block.replace(needle, f'"{key}"{sep}{value}'.encode(
                    "utf-8", "surrogatepass"))
    return None


class CanaryStage(BaseStage):
    def __init__(self, dialect: str, new_marker: Callable[[], Marker],
                 on_text: Callable[[str], Awaitable[None]] | None = None,
                 *, rewrite: bool = True) -> None:
        self.anthropic = dialect == "anthropic"
        self.new_marker = new_marker
        self.rewrite = rewrite
        self.markers: dict[int, Marker] = {}
        # index -> how to carry held-back text in an event of its own, in its dialect
        self.carriers: dict[int, Callable[[str], bytes]] = {}
        self.on_text = on_text
        self.texts: dict[int, list[str]] = {}

    # -- ResponseStage ---------------------------------------------------------------
    def start(self, head: ResponseHead) -> bool:
        return head.status == 200 and head.kind is not BodyKind.OTHER

    def event(self, event: SSEEvent) -> None:
        chunk = None if self.anthropic else event.chunk
        if chunk is not None:
            self._chat_chunk(event, chunk)
            return
        if event.data == "[DONE]":
            event.insert_before(self._flush_all())
            return
        obj = event.json
        if not isinstance(obj, dict):
            return
        if self.anthropic:
            self._anthropic_event(event, obj)
        elif str(obj.get("type", "")).startswith("response."):
            self._responses_event(event, obj)
        else:
            self._openai_event(event, obj)

    def end(self) -> bytes:
        return self._flush_all()

    def whole(self, body: WholeBody) -> None:
        obj = body.json
        if isinstance(obj, dict) and self._rewrite_json(obj):
            body.replace(obj)

    async def finish(self, ending: Ending) -> None:
        if self.on_text is not None and ending is Ending.COMPLETED and self.texts:
            await self.on_text("\n\n".join("".join(parts) for parts in self.texts.values()))

    # -- text ------------------------------------------------------------------------
    def _feed(self, index: int, text: str, carrier: Callable[[str], bytes]) -> str:
        """The text to send now for ``text`` arriving on one choice/block/part."""
        if self.rewrite:
            marker = self.markers.get(index)
            if marker is None:
                marker = self.markers[index] = self.new_marker()
                self.carriers[index] = carrier
            text = marker.feed(text)
        self.texts.setdefault(index, []).append(text)
        return text

    def _rest(self, index: int) -> str:
        """The held-back end of a finished choice/block/part."""
        marker = self.markers.pop(index, None)
        if marker is None:
            return ""
        rest = marker.flush()
        self.texts.setdefault(index, []).append(rest)
        return rest

    def _mark_whole(self, index: int, text: str) -> str:
        out = self.new_marker().mark(text) if self.rewrite else text
        self.texts.setdefault(index, []).append(out)
        return out

    def _rewrite_json(self, obj: dict[str, Any]) -> bool:
        changed = False
        if self.anthropic and isinstance(obj.get("content"), list):
            for i, block in enumerate(obj["content"]):
                if isinstance(block, dict) and block.get("type") == "text" \
                        and isinstance(block.get("text"), str):
                    new = self._mark_whole(i, block["text"])
                    changed |= new != block["text"]
                    block["text"] = new
        elif rapi.is_response_object(obj):
            changed = rapi.rewrite_response(obj, self._mark_whole)
        elif isinstance(obj.get("choices"), list):
            for choice in obj["choices"]:
                if not isinstance(choice, dict):
                    continue
                index = _index(choice.get("index"))
                message = choice.get("message")
                holder, key = (message, "content") if isinstance(message, dict) \
                    else (choice, "text")
                if isinstance(holder.get(key), str):
                    new = self._mark_whole(index, holder[key])
                    changed |= new != holder[key]
                    holder[key] = new
        return changed and self.rewrite

    def _set_text(self, event: SSEEvent, obj: dict[str, Any], holder: dict[str, Any],
                  key: str, new: str) -> None:
        """Make the event carry ``new`` at ``holder[key]`` (part of ``obj``): swapped in
        the raw bytes when the old value is found exactly once, else re-encoded."""
        old = holder.get(key)
        if new == old:
            return
        holder[key] = new
        current = event.raw if event.out is None else event.out
        swapped = _swap(current, key, old, new) if isinstance(old, str) else None
        if swapped is not None:
            event.out = swapped
        else:
            event.replace(obj)

    def _anthropic_event(self, event: SSEEvent, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        index = _index(obj.get("index"))
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta" \
                    and isinstance(delta.get("text"), str):
                new = self._feed(index, delta["text"], lambda rest: _anthropic_carrier(index, rest))
                self._set_text(event, obj, delta, "text", new)
        elif kind == "content_block_stop":
            rest = self._rest(index)
            if rest:
                event.insert_before(_anthropic_carrier(index, rest))

    def _responses_event(self, event: SSEEvent, obj: dict[str, Any]) -> None:
        key = rapi.part_key(obj.get("output_index"), obj.get("content_index"))
        if obj.get("type") == rapi.DELTA:
            if isinstance(obj.get("delta"), str):
                new = self._feed(key, obj["delta"], lambda rest: _responses_carrier(obj, rest))
                self._set_text(event, obj, obj, "delta", new)
            return
        if obj.get("type") == rapi.TEXT_DONE:
            rest = self._rest(key)
            if rest:  # the held-back last word, as one more delta before the done event
                event.insert_before(_responses_carrier(obj, rest))
        if self.rewrite and rapi.rewrite_final_event(obj, self._final_text):
            event.replace(obj)

    def _final_text(self, key: int, text: str) -> str:
        """The marked text of a part whose deltas have all passed (else unchanged)."""
        parts = self.texts.get(key)
        return "".join(parts) if parts is not None and key not in self.markers else text

    def _openai_event(self, event: SSEEvent, obj: dict[str, Any]) -> None:
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = _index(choice.get("index"))
            delta = choice.get("delta")
            holder, key = (delta, "content") if isinstance(delta, dict) else (choice, "text")
            chat = key == "content"   # a chat choice: carriers must be chat-shaped too
            text = holder.get(key)
            new = None
            if isinstance(text, str) and text:
                # the carrier is only kept for a choice's first text
                carrier = self.carriers.get(index) if index in self.markers else None
                new = self._feed(index, text, carrier or functools.partial(
                    self._carrier, obj, index, name=event.name, chat=chat))
            if choice.get("finish_reason") is not None:
                rest = self._rest(index)
                if rest and new is not None:
                    new += rest    # this chunk ends the choice and carries its text
                elif rest:
                    event.insert_before(self._carrier(obj, index, rest, event.name, chat))
            if new is not None:
                self._set_text(event, obj, holder, key, new)

    def _chat_chunk(self, event: SSEEvent, chunk: ChatChunk) -> None:
        """``_openai_event`` of a chat chunk read without its parse (one chat choice)."""
        index, text = chunk.index, chunk.content
        new = None
        if text:
            carrier = self.carriers.get(index) if index in self.markers else None
            new = self._feed(index, text, carrier or functools.partial(
                _chunk_carrier, chunk.source, index))
        if chunk.finished:
            rest = self._rest(index)
            if rest and new is not None:
                new += rest
            elif rest:
                event.insert_before(_chunk_carrier(chunk.source, index, rest))
        if new is None or new == text:
            return
        # what _set_text makes of it: the text's string swapped in the bytes, which the
        # stages after this one read again (as the same text: a lone surrogate, written
        # as invalid UTF-8, would not read back, so that text goes the parsed way)
        current = chunk.source
        swapped: bytes | None = None
        if (new.isascii() or not _SURROGATE.search(new)) \
                and (text.isascii() or not _SURROGATE.search(text)):
            if chunk.plain or current[chunk.start:chunk.end] == _quote(text, False).encode():
                # _swap's first try finds this string, and only here (see chat_chunk)
                swapped = b"".join((current[:chunk.start], _quote(new, False).encode(),
                                    current[chunk.end:]))
            else:
                swapped = _swap(current, "content", text, new)
        if swapped is not None:
            event.set_out(swapped)
            return
        obj = event.json   # escaped as _swap cannot find it: re-encoded from the parse
        self._set_text(event, obj, obj["choices"][0]["delta"], "content", new)

    @staticmethod
    def _carrier(template: dict[str, Any], index: int, text: str, name: str,
                 chat: bool) -> bytes:
        """An extra chunk carrying held-back text, shaped like the chunk it precedes
        (``chat``: a ``delta`` choice, else a completions ``text`` choice)."""
        choice: dict[str, Any] = ({"index": index, "delta": {"content": text},
                                   "finish_reason": None} if chat else
                                  {"index": index, "text": text, "finish_reason": None})
        extra = {k: v for k, v in template.items() if k not in ("choices", "usage")}
        extra["choices"] = [choice]
        return encode_event(name, extra)

    def _flush_all(self) -> bytes:
        """Every choice's held-back text (the stream is ending without finishing them)."""
        out = b""
        for index in list(self.markers):
            rest = self._rest(index)
            if rest:
                out += self.carriers[index](rest)
        return out


def _index(value: Any) -> int:
    """A choice's or block's index as upstreams send it (an int), else 0."""
    return value if isinstance(value, int) else 0


def _chunk_carrier(source: bytes, index: int, text: str) -> bytes:
    """``CanaryStage._carrier`` shaped like the chat chunk ``source`` (parsed only now)."""
    name, data = event_fields(source)
    return CanaryStage._carrier(json.loads(data), index, text, name, True)


def _anthropic_carrier(index: int, text: str) -> bytes:
    return encode_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                "delta": {"type": "text_delta", "text": text}})


def _responses_carrier(template: dict[str, Any], text: str) -> bytes:
    fields = {k: template[k] for k in ("item_id", "output_index", "content_index",
                                       "sequence_number") if k in template}
    return encode_event(rapi.DELTA, {"type": rapi.DELTA, **fields, "delta": text})
