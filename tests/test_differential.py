"""Differential: what the proxy charges must equal what the upstream executed.

A real proxy (one per dialect) in front of the fake model; hypothesis draws requests
mixing paths, content types, field types (int, numeric string, float, bool), streaming,
``n``/``best_of`` and the fake model's real-server behaviours. For each request, joined
by ``x-request-id`` with the fake model's executed ledger (``/_fake/executed``), and the
budget read from ``/admin/usage/alice`` before and after:

- never forwarded (no ledger record): the charge is 0;
- forwarded and refused by the upstream (nothing generated): the charge is 0;
- generated: never charged less than the completion tokens generated; when the upstream
  sent usage covering all of it, never less than that usage, and exactly that usage when
  the client got a complete 2xx answer.

The run starts with a baseline (an explicit example: every behaviour alone on each
path, streamed and not, then each content type), then 40 drawn mixes of 2 to 4
requests, one request at a time. Every request is checked and every violation collected,
then reported together, grouped by kind, each failing request in full. Hypothesis draws
deterministically (``derandomize=True``) and does not shrink: each request is a round
trip through two servers, and the report already shows every failing request.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tests.conftest import write_policy
from tests.procs import fake_model, proxy

ADMIN = "differential-admin"
RULES = f"""
admin: {{token: {ADMIN}}}
rules:
  - name: tokens
    budget: 100000000/day
    count: total
    per: account
    mode: enforce
"""
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/messages")
# application/json weighs more, so the other behaviours are not all hidden behind the
# content types the proxy does not read as JSON
CONTENT_TYPES = ("application/json", "application/json", "Application/JSON", None,
                 "text/plain", "application/json; charset=utf-8")
TYPED = ("stream", "max_tokens", "max_completion_tokens", "n", "best_of")
BEHAVIOURS = ("finish-with-content", "gzip", "partial-usage", "unterminated",
              "line-separators", "lenient", "cap-field=max_tokens", "no-usage",
              "batch-prompts", "reset-after", "strict-fields", "audio")
VOCAB = ("alpha", "beta", "gamma", "delta", "why", "is", "the", "sky", "blue", "über")
SETTLE_POLLS = 1000  # x 5 ms: how long a settlement or a ledger record may lag the answer


@dataclass(frozen=True)
class Call:
    """One request, as sent to the proxy."""

    path: str
    content_type: str | None
    body: dict[str, Any]
    behave: tuple[str, ...] = ()

    def describe(self) -> str:
        return (f"POST {self.path} content-type={self.content_type!r} "
                f"x-fake-behave={', '.join(self.behave) or '-'}\n      body="
                f"{json.dumps(self.body, ensure_ascii=False)}")

    def features(self) -> list[str]:
        """Labels for the report: path, content type, behaviours, each typed field's
        JSON type."""
        body = self.body
        out = [self.path, f"content-type={self.content_type}", *self.behave]
        out += [f"{k}:{type(body[k]).__name__}" for k in TYPED if k in body]
        out += [f"stream={body.get('stream') in (True, 'true', 1)}"]
        out += ["prompt:list"] if isinstance(body.get("prompt"), list) else []
        out += ["client-include_usage"] if "stream_options" in body else []
        out += ["no-cap"] if not {"max_tokens", "max_completion_tokens"} & set(body) else []
        return out


@dataclass
class Rig:
    fake: httpx.Client
    proxies: dict[str, httpx.Client]  # dialect -> client of that proxy
    failures: list[tuple[str, str]] = field(default_factory=list)  # (kind, details)
    kinds: Counter[str] = field(default_factory=Counter)
    features: Counter[str] = field(default_factory=Counter)
    failing_features: Counter[str] = field(default_factory=Counter)
    checked: int = 0
    seen: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with fake_model() as upstream:
        policies = {}
        for dialect in ("openai", "anthropic"):
            folder = tmp_path_factory.mktemp(dialect)
            policies[dialect] = write_policy(folder, RULES, upstream=upstream, dialect=dialect)
        with proxy(policies["openai"], upstream) as openai_url, \
                proxy(policies["anthropic"], upstream) as anthropic_url, \
                httpx.Client(base_url=upstream, timeout=30) as fake, \
                httpx.Client(base_url=openai_url, timeout=30) as via_openai, \
                httpx.Client(base_url=anthropic_url, timeout=30) as via_anthropic:
            yield Rig(fake, {"openai": via_openai, "anthropic": via_anthropic})


# --- drawing requests ----------------------------------------------------------------

def _body(path: str, text: str, stream: bool, cap: int | None, n: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "stream": stream}
    if path == "/v1/completions":
        body["prompt"] = text
    else:
        body["messages"] = [{"role": "user", "content": text}]
    if cap is not None:
        body["max_tokens"] = cap
    if n is not None and path != "/v1/messages":
        body["n"] = n
    return body


def baseline() -> list[Call]:
    """Every behaviour alone, on each path, streamed and not, with well-typed JSON; then
    each content type alone. Run first, so no fault hides behind a rare draw."""
    out = []
    for path in PATHS:
        for behave in ["", *BEHAVIOURS]:
            for stream in (True, False):
                knob = "reset-after=3" if behave == "reset-after" else behave
                body = _body(path, "why is the sky blue", stream,
                             None if knob == "cap-field=max_tokens" else 5, 2)
                if knob == "batch-prompts" and path == "/v1/completions":
                    body["prompt"] = ["why is the sky blue", "and why is grass green"]
                out.append(Call(path, "application/json", body, (knob,) if knob else ()))
        for content_type in CONTENT_TYPES[2:]:
            body = _body(path, "why is the sky blue", True, 5, 2)
            out.append(Call(path, content_type, body))
            out.append(Call(path, content_type, body, ("lenient",)))
    return out


def _typed(draw: st.DrawFn, value: int) -> object:
    """``value`` as an int (half the time), a numeric string, a float, or a bool."""
    forms: list[object] = [value, value, str(value), float(value)] + [True] * (value == 1)
    return draw(st.sampled_from(forms))


@st.composite
def calls(draw: st.DrawFn) -> Call:
    path = draw(st.sampled_from(PATHS))
    behave = [b for b in BEHAVIOURS if draw(st.integers(0, 3)) == 0]  # each one in four
    if "reset-after" in behave:
        behave[behave.index("reset-after")] = f"reset-after={draw(st.integers(1, 6))}"
    text = " ".join(draw(st.lists(st.sampled_from(VOCAB), min_size=1, max_size=6)))
    body = _body(path, text, False, None, None)
    if path == "/v1/completions" and draw(st.booleans()):
        body["prompt"] = [text, text[::-1]]
    stream = draw(st.booleans())
    body["stream"] = draw(st.sampled_from([stream, stream, str(stream).lower(), int(stream),
                                           float(stream)]))
    if not stream and draw(st.booleans()):
        del body["stream"]
    if stream and path != "/v1/messages" and draw(st.booleans()):
        body["stream_options"] = {"include_usage": True}
    cap_field = draw(st.sampled_from(["max_tokens", None] + (
        ["max_completion_tokens"] if path == "/v1/chat/completions" else [])))
    if cap_field:
        body[cap_field] = _typed(draw, draw(st.integers(1, 40)))
    if path != "/v1/messages":
        n = draw(st.sampled_from([None, 1, 2, 3]))
        if n is not None:
            body["n"] = _typed(draw, n)
        if path == "/v1/completions" and draw(st.booleans()):
            body["best_of"] = _typed(draw, draw(st.integers(n or 1, 4)))
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    return Call(path, content_type, body, tuple(behave))


# --- one request, checked ------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    status: int
    complete: bool   # the whole body arrived
    error: str = ""


def _send(rig: Rig, call: Call, request_id: str) -> Outcome:
    dialect = "anthropic" if call.path == "/v1/messages" else "openai"
    headers = {"x-request-id": request_id}
    headers.update({"x-api-key": "key-alice"} if dialect == "anthropic"
                   else {"authorization": "Bearer key-alice"})
    if call.behave:
        headers["x-fake-behave"] = ", ".join(call.behave)
    if call.content_type:
        headers["content-type"] = call.content_type
    content = json.dumps(call.body, ensure_ascii=False).encode()
    status = 0
    try:
        with rig.proxies[dialect].stream("POST", call.path, content=content,
                                         headers=headers) as r:
            status = r.status_code
            for _ in r.iter_raw():
                pass
    except httpx.HTTPError as exc:
        return Outcome(status, False, f"{type(exc).__name__}: {exc}")
    return Outcome(status, True)


def _used(rig: Rig, dialect: str) -> int | None:
    """Tokens used in the budget's day window, once no reservation is outstanding
    (None: one still is after the wait)."""
    for _ in range(SETTLE_POLLS):
        report = rig.proxies[dialect].get("/admin/usage/alice",
                                          headers={"authorization": f"Bearer {ADMIN}"})
        assert report.status_code == 200, report.text
        (window,) = report.json()["budgets"][0]["windows"]
        if window["reserved"] == 0:
            return int(window["used"])
        time.sleep(0.005)
    return None


def _executed(rig: Rig, request_id: str) -> dict[str, Any] | None:
    """What the fake model executed for the request, all its attempts summed (None: it
    never got there), once every attempt is finished."""
    for _ in range(SETTLE_POLLS):
        ledger = rig.fake.get("/_fake/executed").json()
        # the ledger was cleared before this request alone: should the proxy not forward
        # x-request-id, whatever the ledger holds is still this request's
        found = [e for e in ledger if e["request_id"] == request_id] or ledger
        if all(e["finished"] for e in found):
            break
        time.sleep(0.005)
    else:
        raise AssertionError(f"the fake model never finished {request_id}: {found}")
    if not found:
        return None
    merged = dict(found[-1])
    merged["joined"] = "" if found[0]["request_id"] == request_id else \
        " (x-request-id was not forwarded: joined as the only request in the ledger)"
    for key in ("prompt_tokens", "completion_tokens", "completions"):
        merged[key] = sum(e[key] for e in found)
    merged["usage_sent"] = all(e["usage_sent"] for e in found)
    merged["attempts"] = len(found)
    return merged


def verdict(record: dict[str, Any] | None, outcome: Outcome, charge: int) -> str | None:
    """The violated rule, as a short kind, or None."""
    if record is None:
        return None if charge == 0 else "charged, but never forwarded"
    generated = record["completion_tokens"]
    if record["status"] >= 400 and generated == 0:
        return None if charge == 0 else "charged, but the upstream refused it"
    if charge < generated:
        return ("FREE: generated, charged nothing" if charge == 0 else
                "charged less than the completion tokens generated")
    reported = record["prompt_tokens"] + generated
    if record["usage_sent"] and charge < reported:
        return "charged less than the usage the upstream reported"
    if record["usage_sent"] and 200 <= outcome.status < 300 and outcome.complete \
            and charge != reported:
        return "charged more than the usage the upstream reported"
    return None


def check(rig: Rig, call: Call) -> None:
    dialect = "anthropic" if call.path == "/v1/messages" else "openai"
    request_id = f"diff-{uuid.uuid4().hex}"
    rig.fake.delete("/_fake/executed")
    before = _used(rig, dialect)
    assert before is not None, "a reservation is outstanding before the request"
    outcome = _send(rig, call, request_id)
    record = _executed(rig, request_id)
    after = _used(rig, dialect)
    if after is None:  # every later reading would wait for it too: stop here
        raise AssertionError(f"the reservation of this request was never settled:\n"
                             f"    {call.describe()}\n    proxy: {outcome}\n"
                             f"    upstream: {record}\n\n{report(rig)}")
    charge = after - before
    rig.checked += 1
    rig.features.update(call.features())
    kind = verdict(record, outcome, charge)
    if kind is None:
        return
    rig.kinds[kind] += 1
    rig.failing_features.update(call.features())
    upstream = "never reached the upstream" if record is None else (
        f"upstream: status {record['status']}, prompt {record['prompt_tokens']} + "
        f"completion {record['completion_tokens']} tokens ({record['completions']} "
        f"sequences, {record['attempts']} attempt(s)), usage sent: {record['usage_sent']}, "
        f"reset: {record['reset']}{record['joined']}")
    rig.failures.append((kind, (
        f"    {call.describe()}\n    proxy: status {outcome.status}"
        f"{', body complete' if outcome.complete else ', body cut: ' + outcome.error}\n"
        f"    {upstream}\n    charged: {charge}")))


def report(rig: Rig, per_kind: int = 8) -> str:
    lines = [f"{len(rig.failures)} of {rig.checked} requests were not charged what the "
             f"upstream executed.", "", "By kind:"]
    lines += [f"  {count:3d}  {kind}" for kind, count in rig.kinds.most_common()]
    lines += ["", "Features of the failing requests (failing / drawn):"]
    lines += [f"  {rig.failing_features[f]:3d} / {rig.features[f]:3d}  {f}"
              for f in sorted(rig.failing_features,
                              key=lambda f: (-rig.failing_features[f] / rig.features[f], f))]
    for kind, count in rig.kinds.most_common():
        shown = [details for k, details in rig.failures if k == kind][:per_kind]
        lines += ["", f"[{kind}] ({count}{f', the first {per_kind}' if count > per_kind else ''})"]
        lines += shown
    return "\n".join(lines)


def test_charge_equals_what_the_upstream_executed(rig: Rig) -> None:
    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow])
    @example(baseline())
    @given(st.lists(calls(), min_size=2, max_size=4))
    def run(drawn: list[Call]) -> None:
        for call in drawn:
            if call.describe() not in rig.seen:  # hypothesis repeats itself at times
                rig.seen.add(call.describe())
                check(rig, call)

    run()
    assert rig.checked >= 150
    if rig.failures:
        pytest.fail(report(rig), pytrace=False)


def test_the_check_itself_can_fail() -> None:
    """The verdicts on hand-made outcomes: a free answer, an overcharge, a refusal."""
    done = Outcome(200, True)
    ran = {"status": 200, "prompt_tokens": 5, "completion_tokens": 10, "usage_sent": True}
    assert verdict(ran, done, 15) is None
    assert verdict(ran, done, 0) == "FREE: generated, charged nothing"
    assert verdict(ran, done, 12) == "charged less than the usage the upstream reported"
    assert verdict(ran, done, 16) == "charged more than the usage the upstream reported"
    assert verdict(ran, Outcome(200, False), 16) is None  # cut: more is the honest bound
    estimated = {**ran, "usage_sent": False}
    assert verdict(estimated, done, 11) is None
    assert verdict(estimated, done, 9) == "charged less than the completion tokens generated"
    refused = {"status": 400, "prompt_tokens": 0, "completion_tokens": 0, "usage_sent": False}
    assert verdict(refused, Outcome(400, True), 0) is None
    assert verdict(refused, Outcome(400, True), 3) == "charged, but the upstream refused it"
    assert verdict(None, Outcome(429, True), 0) is None
    assert verdict(None, Outcome(400, True), 1) == "charged, but never forwarded"
