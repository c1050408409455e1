"""``canary:`` — keyed, invisible-to-readers marks in responses, and an output ledger.

    - name: marks
      when: {tier: free}
      canary:
        secret: ${GUARDPROXY_CANARY_SECRET}   # at least 16 characters; never logged
        marks: [lexical, typography, markdown] # the default: every meaning-free channel
        tripwire: false                       # zero-width account code (verbatim copies only)
        rate: 1.0                             # share of sites marked
        ledger: true                          # or {store: state | file, path: F, max_entries: N}
      mode: shadow                            # record to the ledger, change nothing

Responses that must stay exact are never marked: JSON / structured output
(``response_format``), requests for logprobs, non-text endpoints, error answers. Code,
URLs, numbers and tool-call arguments inside marked responses are never changed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardproxy.canary.index import fingerprint
from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.ledger import Ledger, fingerprint_entry, open_ledger, parse_max_age
from guardproxy.canary.marker import Marker
from guardproxy.canary.slots import CHANNELS, RECOMMENDED
from guardproxy.canary.stage import CanaryStage
from guardproxy.exchange import Exchange
from guardproxy.explain.verdict import RuleExplanation, allowed, skipped, when_mismatch
from guardproxy.guards.base import Outcome, Phase, RuleKind, Runtime
from guardproxy.policy.model import Rule
from guardproxy.policy.reader import Reader
from guardproxy.trace import CANARY_KEY, LEDGER_ENTRY

log = logging.getLogger("guardproxy.canary")
MARKS = CHANNELS


@dataclass(frozen=True)
class LedgerSettings:
    store: str              # "state" | "file"
    path: Path | None
    max_entries: int
    max_age: float | None = None    # seconds; None: bounded by max_entries only


# default retention: a 500-word response costs ~2.5 KB in Redis, ~4 KB in memory, ~1.3 KB on disk
STATE_ENTRIES = 100_000
FILE_ENTRIES = 1_000_000


@dataclass(frozen=True)
class CanarySettings:
    secret: str = ""
    marks: frozenset[str] = RECOMMENDED
    tripwire: bool = False
    rate: float = 1.0
    ledger: LedgerSettings | None = None

    def __repr__(self) -> str:  # the secret must never reach a log line
        return (f"CanarySettings(marks={sorted(self.marks)}, tripwire={self.tripwire}, "
                f"rate={self.rate}, ledger={self.ledger})")


def _ledger(reader: Reader) -> LedgerSettings | None:
    value = reader.raw("ledger", True)
    if value is False:
        return None
    if value is True:
        return LedgerSettings("state", None, STATE_ENTRIES)
    sub = reader.child("ledger")
    if sub is None:
        return None
    sub.allow(("store", "path", "max_entries", "max_age"))
    store = sub.choice("store", ("state", "file"), "state")
    path = sub.string("path")
    if store == "file" and not path:
        sub.problem("a file ledger needs 'path'")
    base = Path(reader.file).parent
    entries = sub.positive_int("max_entries", FILE_ENTRIES if store == "file" else STATE_ENTRIES)
    max_age = sub.parsed("max_age", parse_max_age, 0.0) or None
    return LedgerSettings(store, base / path if path else None, entries, max_age)


def parse(rule: Reader) -> CanarySettings:
    reader = rule.child("canary")
    if reader is None:
        return CanarySettings()
    reader.allow(("secret", "marks", "tripwire", "rate", "ledger"), required=("secret",))
    secret = reader.string("secret") or ""
    if reader.has("secret") and len(secret) < 16:
        reader.problem("must be at least 16 characters (use a random secret)", "secret")
    marks = reader.string_list("marks", nonempty=True) if reader.has("marks") \
        else tuple(sorted(RECOMMENDED))
    for mark in marks:
        if mark not in MARKS:
            reader.problem(f"unknown mark {mark!r} (expected one of {', '.join(MARKS)}; "
                           "zero-width marks are 'tripwire: true')", "marks")
    rate = reader.typed("rate", float, 1.0)
    if rate is None or not 0.0 < rate <= 1.0:
        reader.problem("must be a number in (0, 1]", "rate")
        rate = 1.0
    return CanarySettings(secret=secret, marks=frozenset(m for m in marks if m in MARKS),
                          tripwire=bool(reader.typed("tripwire", bool, False)), rate=rate,
                          ledger=_ledger(reader))


def markable(exchange: Exchange) -> bool:
    """Only prose answers: a generation endpoint, and neither structured output nor
    log-probabilities (read once, with checked types, in the request plan)."""
    return exchange.plan.generates and not exchange.plan.exact


def stops_of(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop", body.get("stop_sequences"))
    if isinstance(value, str):
        return (value,)
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def build_ledger(settings: CanarySettings, runtime: Runtime) -> Ledger | None:
    """The rule's ledger, kept in the state: a reload gets the same one back."""
    if settings.ledger is None:
        return None
    state, ledger = runtime.state, settings.ledger
    return state.extra(("ledger", ledger), lambda: open_ledger(
        ledger.store, state_uri=state.uri, key_prefix=state.key_prefix,
        redis_client=state.redis, max_entries=ledger.max_entries, path=ledger.path,
        max_age=ledger.max_age))


class CanaryGuard:
    def __init__(self, rule: Rule, runtime: Runtime) -> None:
        self.rule = rule
        self.settings: CanarySettings = rule.settings
        self.keys = CanaryKeys(self.settings.secret, self.settings.rate, self.settings.marks,
                               self.settings.tripwire)
        self.dialect = runtime.dialect.name
        self.ledger = build_ledger(self.settings, runtime)
        # names the key (not the account) in the request's record: which secret marked it
        self.key_id = fingerprint(self.keys).hex()[:16]
        self.when = None if rule.when.always else rule.when

    async def check(self, exchange: Exchange) -> Outcome | None:
        if (self.when is not None and not self.when(exchange.attrs(), exchange.headers)) \
                or exchange.account is None or not markable(exchange):
            return None
        assert exchange.json is not None
        account = exchange.account.id
        code = self.keys.code(account)
        stops = stops_of(exchange.json)
        s = self.settings
        enforce = not self.rule.shadow

        def new_marker() -> Marker:
            return Marker(self.keys, code, channels=s.marks if enforce else (),
                          tripwire=s.tripwire and enforce, stops=stops)

        async def record(text: str) -> None:
            if self.ledger is not None and text.strip():
                await self.ledger.record(await fingerprint_entry(
                    text, account, exchange.request_id, time.time()))
                exchange.notes[LEDGER_ENTRY] = exchange.request_id   # entries are by request

        if enforce:
            exchange.notes[CANARY_KEY] = self.key_id

        stage = CanaryStage(self.dialect, new_marker, record, rewrite=enforce)
        return Outcome(allowed=True, rule=self.rule.name, shadow=self.rule.shadow, stage=stage)

    async def explain(self, exchange: Exchange) -> RuleExplanation:
        """Whether the response would be marked (enforce) or only recorded (shadow)."""
        miss = when_mismatch(self.when, exchange)
        if miss is None and exchange.account is None:
            miss = "no account: only an account's responses are marked"
        if miss is None and not markable(exchange):
            miss = ("the answer must stay exact (structured output or logprobs)"
                    if exchange.plan.generates else "not a generation endpoint")
        if miss is not None:
            return skipped(self.rule, miss)
        s, ledger = self.settings, self.ledger is not None
        kept = ", and recorded in the ledger" if ledger else ""
        if self.rule.shadow:
            return allowed(self.rule, f"shadow: the response would pass unchanged{kept}",
                           key_id=self.key_id, ledger=ledger)
        marks = ", ".join(sorted(s.marks)) + (", tripwire" if s.tripwire else "")
        return allowed(self.rule, f"the response would be marked ({marks}; {s.rate:.0%} of "
                       f"sites; never an error answer) with key {self.key_id}{kept}",
                       marks=True, key_id=self.key_id, ledger=ledger)


def build(rule: Rule, runtime: Runtime) -> CanaryGuard:
    return CanaryGuard(rule, runtime)


KIND = RuleKind(key="canary", phase=Phase.RESPONSE, parse=parse, build=build, uses_per=False)
