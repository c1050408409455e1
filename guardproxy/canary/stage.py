"""The canary response stage: marks the text of a response as it passes.

Only text is rewritten: OpenAI ``message.content`` / ``delta.content`` / ``text``, the
Responses API's ``output_text`` parts and ``response.output_text.delta`` (see
``responses_api``), and Anthropic ``text`` blocks / ``text_delta``. Every other event
and field is passed on byte-identical; an event whose text changed is re-encoded. A
stream holds back at most one partial word per choice (or content block, or part) and
flushes it, in an event of its own, before the event that ends it. JSON bodies are
rewritten whole.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from guardproxy.canary import responses_api as rapi
from guardproxy.canary.marker import Marker
from guardproxy.response.events import Ending
from guardproxy.response.sse import SSEFramer, event_fields

log = logging.getLogger("guardproxy.canary")
_JSON_LIMIT = 8 << 20


def _encode(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _swap(block: bytes, key: str, old: str, new: str) -> bytes | None:
    """Replace one JSON string value in the raw event, leaving every other byte as the
    upstream wrote it; None when the value is not found exactly once."""
    for ascii_only in (False, True):
        for sep in (":", ": "):
            needle = f'"{key}"{sep}{json.dumps(old, ensure_ascii=ascii_only)}'.encode()
            if block.count(needle) == 1:
                value = json.dumps(new, ensure_ascii=ascii_only)
                return block.replace(needle, f'"{key}"{sep}{value}'.encode())
    return None


def _block(name: str, obj: Any) -> bytes:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {_encode(obj)}\n\n".encode()


class CanaryStage:
    def __init__(self, dialect: str, new_marker: Callable[[], Marker],
                 on_text: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.anthropic = dialect == "anthropic"
        self.new_marker = new_marker
        self.markers: dict[int, Marker] = {}
        self.on_text = on_text
        self.texts: dict[int, list[str]] = {}
        self.active = False
        self.framer: SSEFramer | None = None
        self.body: list[bytes] = []
        self.size = 0

    # -- ResponseStage ---------------------------------------------------------------
    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        values = {k.lower(): v for k, v in headers}
        if status != 200 or values.get(b"content-encoding", b"identity") != b"identity":
            return
        self.active = True
        if values.get(b"content-type", b"").startswith(b"text/event-stream"):
            self.framer = SSEFramer()

    def chunk(self, data: bytes, final: bool) -> bytes:
        if not self.active:
            return data
        if self.framer is None:
            self.body.append(data)
            self.size += len(data)
            if self.size > _JSON_LIMIT:  # too large to hold: pass it on unmarked
                self.active = False
                return b"".join(self.body)
            return self._rewrite_json(b"".join(self.body)) if final else b""
        out = [self._event(block) for block in self.framer.feed(data)]
        if final:
            out.append(self.framer.flush())
        return b"".join(out)

    async def finish(self, ending: Ending) -> None:
        if self.on_text is not None and ending is Ending.COMPLETED and self.texts:
            await self.on_text("\n\n".join("".join(parts) for parts in self.texts.values()))

    # -- text ------------------------------------------------------------------------
    def _marker(self, index: int) -> Marker:
        marker = self.markers.get(index)
        if marker is None:
            marker = self.markers[index] = self.new_marker()
        return marker

    def _emit(self, index: int, text: str) -> str:
        self.texts.setdefault(index, []).append(text)
        return text

    def _mark_whole(self, index: int, text: str) -> str:
        marker = self.new_marker()
        return self._emit(index, marker.mark(text))

    def _rewrite_json(self, raw: bytes) -> bytes:
        try:
            obj = json.loads(raw)
        except ValueError:
            return raw
        if not isinstance(obj, dict):  # not an answer this stage knows: pass it on
            return raw
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
                index = choice.get("index", 0)
                message = choice.get("message")
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    new = self._mark_whole(index, message["content"])
                    changed |= new != message["content"]
                    message["content"] = new
                elif isinstance(choice.get("text"), str):
                    new = self._mark_whole(index, choice["text"])
                    changed |= new != choice["text"]
                    choice["text"] = new
        return _encode(obj).encode() if changed else raw

    def _event(self, block: bytes) -> bytes:
        name, data = event_fields(block)
        if not data or data == "[DONE]":
            return self._flush_all(name) + block if data == "[DONE]" else block
        try:
            obj = json.loads(data)
        except ValueError:
            return block
        if not isinstance(obj, dict):
            return block
        if self.anthropic:
            return self._anthropic_event(name, obj, block)
        if str(obj.get("type", "")).startswith("response."):
            return self._responses_event(name, obj, block)
        return self._openai_event(name, obj, block)

    def _mark_delta(self, name: str, obj: dict[str, Any], block: bytes, index: int,
                    holder: dict[str, Any], key: str) -> bytes:
        """Mark the text at ``holder[key]`` (part of ``obj``), the one text of this event:
        swap it inside the raw bytes, or re-encode the event when that is ambiguous."""
        text = holder[key]
        new = self._emit(index, self._marker(index).feed(text))
        if new == text:
            return block
        swapped = _swap(block, key, text, new)
        if swapped is not None:
            return swapped
        holder[key] = new
        return _block(name, obj)

    def _anthropic_event(self, name: str, obj: dict[str, Any], block: bytes) -> bytes:
        kind = obj.get("type")
        index = obj.get("index", 0)
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta" \
                    and isinstance(delta.get("text"), str):
                return self._mark_delta(name, obj, block, index, delta, "text")
        elif kind == "content_block_stop" and index in self.markers:
            rest = self._emit(index, self.markers.pop(index).flush())
            if rest:
                extra = {"type": "content_block_delta", "index": index,
                         "delta": {"type": "text_delta", "text": rest}}
                return _block("content_block_delta", extra) + block
        return block

    def _responses_event(self, name: str, obj: dict[str, Any], block: bytes) -> bytes:
        key = rapi.part_key(obj.get("output_index"), obj.get("content_index"))
        if obj.get("type") == rapi.DELTA:
            if not isinstance(obj.get("delta"), str):
                return block
            return self._mark_delta(name, obj, block, key, obj, "delta")
        before = b""
        if obj.get("type") == rapi.TEXT_DONE and key in self.markers:
            rest = self._emit(key, self.markers.pop(key).flush())
            if rest:  # the held-back last word, as one more delta before the done event
                carrier = {k: obj[k] for k in ("item_id", "output_index", "content_index",
                                               "sequence_number") if k in obj}
                before = _block(rapi.DELTA, {"type": rapi.DELTA, **carrier, "delta": rest})
        if rapi.rewrite_final_event(obj, self._final_text):
            return before + _block(name, obj)
        return before + block

    def _final_text(self, key: int, text: str) -> str:
        """The marked text of a part whose deltas have all passed (else unchanged)."""
        parts = self.texts.get(key)
        return "".join(parts) if parts is not None and key not in self.markers else text

    def _openai_event(self, name: str, obj: dict[str, Any], block: bytes) -> bytes:
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices:
            return block
        changed = False
        before = b""
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta")
            holder, key = (delta, "content") if isinstance(delta, dict) else (choice, "text")
            text = holder.get(key) if isinstance(holder, dict) else None
            if isinstance(text, str) and text:
                new = self._emit(index, self._marker(index).feed(text))
                if new != text:
                    holder[key] = new
                    changed = True
                    if len(choices) == 1:
                        swapped = _swap(block, key, text, new)
                        if swapped is not None:
                            block, changed = swapped, False
            if choice.get("finish_reason") is not None and index in self.markers:
                rest = self._emit(index, self.markers.pop(index).flush())
                if rest:
                    before += self._carrier(obj, index, rest, name)
        if not changed:
            return before + block
        return before + _block(name, obj)

    def _carrier(self, template: dict[str, Any], index: int, text: str, name: str) -> bytes:
        """An extra chunk carrying held-back text, shaped like the chunk it precedes."""
        chat = template.get("object") == "chat.completion.chunk"
        choice: dict[str, Any] = ({"index": index, "delta": {"content": text},
                                   "finish_reason": None} if chat else
                                  {"index": index, "text": text, "finish_reason": None})
        extra = {k: v for k, v in template.items() if k not in ("choices", "usage")}
        extra["choices"] = [choice]
        return _block(name, extra)

    def _flush_all(self, name: str) -> bytes:
        out = b""
        for index in list(self.markers):
            rest = self._emit(index, self.markers.pop(index).flush())
            if rest:
                template = {"object": "chat.completion.chunk"}
                out += self._carrier(template, index, rest, name)
        return out
