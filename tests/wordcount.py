"""A stand-in "real tokenizer" for tests: one token per word."""


def count(text: str) -> int:
    return len(text.split())


def broken(text: str) -> str:
    return text
