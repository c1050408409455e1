"""What the fake model "generates": deterministic words, one token each, and the work
(``Job``) one request asks for."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guardproxy.fake_model.knobs import Behaviour, Params

# Prose with words an output canary can mark, so the demo and tests show marks.
_FILLER = [
    "the", "main", "idea", "is", "often", "simple", "and", "usually", "works", "nearly",
    "every", "time", "while", "a", "big", "change", "can", "perhaps", "help", "quickly",
    "toward", "the", "goal", "so", "we", "mostly", "choose", "the", "useful", "path", "and",
    "avoid", "the", "difficult", "one",
]
# JSON allows these raw in strings; JavaScript and Python's str.splitlines() break on them.
_SEPARATORS = ("\u2028", "\u2029", "\u0085")


def text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(text_of(v) for v in value)
    if isinstance(value, dict):
        return text_of(value.get("text", value.get("content", "")))
    return ""


def prompt_tokens(body: dict[str, Any]) -> int:
    """Whitespace-separated words of every message (plus ``system``, ``prompt``,
    ``input``) + 3 per message."""
    found = body.get("messages")
    messages: list[Any] = found if isinstance(found, list) else []
    words = sum(len(text_of(m.get("content")).split()) for m in messages if isinstance(m, dict))
    words += sum(len(text_of(body.get(k)).split()) for k in ("system", "prompt", "input"))
    return words + 3 * len(messages)


def prompts_of(kind: str, body: dict[str, Any], behave: Behaviour) -> list[str]:
    """The prompts answered: one, or with ``batch-prompts`` each string of a legacy
    completions ``prompt`` list (as OpenAI and vLLM batch them)."""
    prompt = body.get("prompt")
    if behave.batch_prompts and kind == "completions" and isinstance(prompt, list) and prompt \
            and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    messages = body.get("messages") or []
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return [text_of(messages[-1].get("content"))]
    return [text_of(prompt or body.get("input"))]


def words_for(last: str, count: int, choice: int = 0, separators: bool = False) -> list[str]:
    """``count`` words answering ``last``: a seed echoing it, then filler reshuffled per
    prompt and choice (varied, but deterministic)."""
    seed = ["Fake", "answer", "to:", *last.split()[:5]]
    key = last.encode() if choice == 0 else f"{choice}\x00{last}".encode()
    rng = random.Random(hashlib.sha256(key).digest())
    filler: list[str] = []
    while len(seed) + len(filler) < count:
        rng.shuffle(shuffled := list(_FILLER))
        filler += shuffled
    words = (seed + filler)[:count]
    if separators:  # glued to a word, so it stays one word (and one token)
        words = [w + _SEPARATORS[i // 2 % 3] if i % 2 else w for i, w in enumerate(words)]
    return words


def piece(words: Sequence[str], i: int) -> str:
    """The text of word ``i`` as streamed: a leading space after the first."""
    return words[i] if i == 0 else " " + words[i]


@dataclass(frozen=True)
class Job:
    """One request's generation. ``choices`` are the returned sequences (prompt-major:
    index = prompt * n + k); ``hidden`` more were generated and not returned (best_of)."""

    kind: str
    model: str
    params: Params
    behave: Behaviour
    prompt: int
    choices: tuple[tuple[str, ...], ...]
    hidden: int
    usage_on: bool
    created: int

    @property
    def length(self) -> int:
        return self.params.words

    @property
    def sequences(self) -> int:
        return len(self.choices) + self.hidden

    @property
    def completion_tokens(self) -> int:
        return self.length * self.sequences

    @property
    def finish(self) -> str:
        return "length" if self.params.truncated else "stop"

    def usage(self, completion: int | None = None) -> dict[str, int]:
        done = self.completion_tokens if completion is None else completion
        return {"prompt_tokens": self.prompt, "completion_tokens": done,
                "total_tokens": self.prompt + done}


def plan_job(kind: str, body: dict[str, Any], params: Params, behave: Behaviour,
             usage_on: bool) -> Job:
    prompts = prompts_of(kind, body, behave)
    choices = tuple(tuple(words_for(last, params.words, k, behave.line_separators))
                    for last in prompts for k in range(params.n))
    return Job(kind=kind, model=str(body.get("model", "fake-model")), params=params,
               behave=behave, prompt=prompt_tokens(body), choices=choices,
               hidden=(params.best_of - params.n) * len(prompts), usage_on=usage_on,
               created=int(time.time()))
