"""Varied synthetic prose for canary tests and benchmarks (deterministic per seed)."""

from __future__ import annotations

import random

from guardproxy.canary.lexicon import PAIRS

COMMON = [
    "the", "a", "an", "of", "to", "in", "and", "or", "for", "with", "on", "at", "by", "from",
    "as", "is", "are", "was", "were", "be", "been", "it", "this", "that", "these", "those",
    "we", "you", "they", "he", "she", "i", "our", "your", "their", "its", "can", "will",
    "would", "should", "could", "may", "might", "must", "do", "does", "did", "have", "has",
    "had", "not", "no", "more", "most", "less", "many", "much", "some", "any", "each", "every",
    "other", "such", "only", "very", "so", "then", "than", "when", "where", "which", "who",
    "what", "how", "why", "if", "because", "about", "into", "over", "under", "after", "before",
    "between", "through", "during", "without", "within", "across", "against", "along",
    "around", "system", "data", "model", "user", "team", "code", "test", "project", "result",
    "value", "process", "time", "way", "work", "part", "case", "point", "fact", "group",
    "problem", "question", "answer", "idea", "change", "plan", "step", "level", "order",
    "number", "line", "word", "example", "service", "request", "response", "error", "file",
    "function", "class", "method", "design", "feature", "issue", "release", "version",
    "source", "people", "world", "company", "market", "price", "report", "study", "research",
    "policy", "rule", "account", "access", "network", "server", "client", "cache", "query",
    "record", "table", "field", "key", "token", "budget", "limit", "window", "quota", "stream",
    "event", "make", "take", "give", "find", "know", "think", "see", "look", "come", "want",
    "use", "tell", "ask", "work", "seem", "feel", "try", "leave", "call", "keep", "let",
    "begin", "show", "hear", "play", "run", "move", "live", "believe", "hold", "bring",
    "happen", "write", "provide", "sit", "stand", "lose", "pay", "meet", "include", "continue",
    "set", "learn", "lead", "understand", "watch", "follow", "stop", "create", "speak", "read",
    "spend", "grow", "open", "walk", "win", "offer", "remember", "love", "consider", "appear",
    "wait", "serve", "die", "send", "expect", "build", "stay", "fall", "cut", "reach", "kill",
    "remain", "suggest", "raise", "pass", "sell", "require", "report", "decide", "pull",
]
LEXICON = [w for pair in PAIRS for w in pair]


def prose(words: int, seed: int = 0, site_rate: float = 0.1) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    sentence: list[str] = []
    for _ in range(words):
        word = rng.choice(LEXICON) if rng.random() < site_rate else rng.choice(COMMON)
        sentence.append(word)
        if len(sentence) >= rng.randint(8, 20):
            sentence[0] = sentence[0].capitalize()
            out.append(" ".join(sentence) + rng.choice([".", ".", ".", "?", "!"]))
            sentence = []
    if sentence:
        out.append(" ".join(sentence) + ".")
    paragraphs, current = [], []
    for s in out:
        current.append(s)
        if len(current) >= rng.randint(3, 6):
            paragraphs.append(" ".join(current))
            current = []
    paragraphs.append(" ".join(current))
    return "\n\n".join(p for p in paragraphs if p.strip())
