"""Where OpenAI's Responses API (``/v1/responses``) keeps its answer text.

A response holds ``output[i].content[j]`` parts of type ``output_text``. A stream sends
that text in ``response.output_text.delta`` events and then repeats it whole in the
``*.done`` events and in ``response.completed``; every copy must carry the same marks,
or a client reading the final event would get the unmarked text. Parts are keyed
``i * 1000 + j``, the index the canary stage tracks markers and texts by.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# text -> replacement for the part at this key (may return the text unchanged)
Rewrite = Callable[[int, str], str]
DELTA = "response.output_text.delta"
TEXT_DONE = "response.output_text.done"
_FINAL = ("response.completed", "response.incomplete", "response.failed")


def part_key(output_index: Any, content_index: Any) -> int:
    i = output_index if isinstance(output_index, int) else 0
    j = content_index if isinstance(content_index, int) else 0
    return i * 1000 + j


def is_response_object(obj: dict[str, Any]) -> bool:
    return obj.get("object") == "response" and isinstance(obj.get("output"), list)


def _rewrite_field(holder: dict[str, Any], field: str, key: int, rewrite: Rewrite) -> bool:
    text = holder.get(field)
    if not isinstance(text, str):
        return False
    holder[field] = rewrite(key, text)
    return bool(holder[field] != text)


def rewrite_item(item: Any, output_index: int, rewrite: Rewrite) -> bool:
    """Rewrite each output_text part of one output item; True when any changed."""
    if not isinstance(item, dict) or not isinstance(item.get("content"), list):
        return False
    changed = False
    for j, part in enumerate(item["content"]):
        if isinstance(part, dict) and part.get("type") == "output_text":
            changed |= _rewrite_field(part, "text", part_key(output_index, j), rewrite)
    return changed


def rewrite_response(response: dict[str, Any], rewrite: Rewrite) -> bool:
    changed = False
    for i, item in enumerate(response.get("output") or ()):
        changed |= rewrite_item(item, i, rewrite)
    return changed


def rewrite_final_event(obj: dict[str, Any], rewrite: Rewrite) -> bool:
    """The events that repeat finished text whole: rewrite it; True when any changed."""
    kind = obj.get("type")
    key = part_key(obj.get("output_index"), obj.get("content_index"))
    if kind == TEXT_DONE:
        return _rewrite_field(obj, "text", key, rewrite)
    if kind == "response.content_part.done":
        part = obj.get("part")
        if isinstance(part, dict) and part.get("type") == "output_text":
            return _rewrite_field(part, "text", key, rewrite)
        return False
    if kind == "response.output_item.done":
        index = obj.get("output_index")
        return rewrite_item(obj.get("item"), index if isinstance(index, int) else 0, rewrite)
    if kind in _FINAL and isinstance(obj.get("response"), dict):
        return rewrite_response(obj["response"], rewrite)
    return False
