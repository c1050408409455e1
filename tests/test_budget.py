"""Budget rules through the middleware, with an inner app that reports usage."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from starlette.types import Receive, Scope, Send

from guardproxy import GuardMiddleware, UpstreamError
from tests.conftest import write_policy

BUDGET = """
rules:
  - name: tokens
    budget: 1000/day
    per: account
    default_max_tokens: 100
{extra}
"""


async def usage_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with completion tokens = the forwarded max_tokens, prompt = 10."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = json.loads(body)
    if request.get("fail"):
        raise UpstreamError("boom")
    cap = request.get("max_completion_tokens", request.get("max_tokens"))
    out = json.dumps({"seen": request, "usage": {"prompt_tokens": 10,
                                                 "completion_tokens": cap // 2}}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


def app_for(tmp: Path, extra: str = "", dialect: str = "openai") -> GuardMiddleware:
    return GuardMiddleware(usage_app, write_policy(tmp, BUDGET.format(extra=extra),
                                                   dialect=dialect))


async def remaining(app: GuardMiddleware, account: str = "alice") -> int:
    (guard,) = app.pipeline.guards
    (day,) = await app.pipeline.state.budgets.usage(f"tokens|account={account}",
                                                    guard.rule.settings.windows)
    assert day.reserved == 0, "no reservation may be left behind"
    return day.remaining


def post(c: httpx.AsyncClient, body: dict[str, object],
         key: str = "key-alice") -> httpx.Response:
    return c.post("/v1/chat/completions", json=body,  # type: ignore[return-value]
                  headers={"authorization": f"Bearer {key}"})


async def test_settles_actual_usage_and_writes_default_cap(tmp_path: Path) -> None:
    app = app_for(tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://p") as c:
        r = await post(c, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert r.json()["seen"]["max_tokens"] == 100  # default written upstream
    assert r.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(r.headers["x-ratelimit-remaining-tokens"]) < 1000 - 100
    assert await remaining(app) == 1000 - (10 + 50)


async def test_rejects_when_reservation_does_not_fit(tmp_path: Path) -> None:
    app = app_for(tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://p") as c:
        big = await post(c, {"model": "m", "messages": [], "max_tokens": 5000})
        ok = await post(c, {"model": "m", "messages": [], "max_tokens": 900})
    assert big.status_code == 429
    err = big.json()["error"]
    assert err["code"] == "insufficient_quota" and err["type"] == "tokens"
    assert int(big.headers["retry-after"]) > 0
    assert big.headers["x-ratelimit-limit-tokens"] == "1000"
    assert ok.status_code == 200
    assert await remaining(app) == 1000 - (10 + 450)


async def test_clamp_shrinks_max_tokens(tmp_path: Path) -> None:
    app = app_for(tmp_path, "    on_exhausted: clamp\n    min_tokens: 50\n")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://p") as c:
        r = await post(c, {"model": "m", "messages": [], "max_tokens": 5000})
        assert r.status_code == 200
        clamped = r.json()["seen"]["max_tokens"]
        assert 50 <= clamped < 1000
        # left: 1000 - (10 + clamped // 2); below the floor the request is refused
        for _ in range(10):
            last = await post(c, {"model": "m", "messages": [], "max_tokens": 5000})
            if last.status_code == 429:
                break
    assert last.status_code == 429


async def test_upstream_failure_releases_the_reservation(tmp_path: Path) -> None:
    app = app_for(tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://p") as c:
        r = await post(c, {"model": "m", "messages": [], "fail": True})
    assert r.status_code == 502
    assert await remaining(app) == 1000


async def test_denial_by_later_rule_releases_budget(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, BUDGET.format(extra="") + """
  - name: org-tokens
    budget: 100/day
    per: org
""")
    app = GuardMiddleware(usage_app, policy)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://p") as c:
        first = await post(c, {"model": "m", "messages": [], "max_tokens": 60})
        second = await post(c, {"model": "m", "messages": [], "max_tokens": 60})
    assert (first.status_code, second.status_code) == (200, 429)
    assert "org-tokens" in second.json()["error"]["message"]
    # the account budget reserved for the second request, then gave it back
    account = next(g for g in app.pipeline.guards if g.rule.name == "tokens")
    (day,) = await app.pipeline.state.budgets.usage("tokens|account=alice",
                                                    account.rule.settings.windows)
    assert (day.used, day.reserved) == (40, 0)


async def test_shadow_budget_never_denies_or_rewrites(tmp_path: Path) -> None:
    app = app_for(tmp_path, "    mode: shadow\n")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://p") as c:
        r = await post(c, {"model": "m", "messages": [], "max_tokens": 5000})
    assert r.status_code == 200 and r.json()["seen"]["max_tokens"] == 5000


async def test_policy_tokenizer_replaces_the_byte_estimator(tmp_path: Path) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 1900}]}
    plain = app_for(tmp_path)
    (tmp_path / "tok").mkdir()
    policy = write_policy(tmp_path / "tok", "tokenizer: tests.wordcount:count\n"
                          + BUDGET.format(extra=""))
    counted = GuardMiddleware(usage_app, policy)
    statuses = []
    for app in (plain, counted):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://proxy") as c:
            r = await c.post("/v1/chat/completions", json=body,
                             headers={"authorization": "Bearer key-alice"})
            statuses.append(r.status_code)
    # 1,900 bytes estimate to 950 tokens (+100 max_tokens > 1,000); one word is 1 token
    assert statuses == [429, 200]


def test_tokenizer_errors_name_file_line_and_field(tmp_path: Path) -> None:
    from guardproxy.errors import PolicyError
    from guardproxy.policy.load import load_policy

    for spec, message in [("nosuchmodule:count", "cannot import"),
                          ("tests.wordcount:nope", "has no function"),
                          ("tests.wordcount:broken", "must return a token count"),
                          ("justaname", "module:function")]:
        policy = write_policy(tmp_path, f"tokenizer: {spec}\nrules: []\n")
        try:
            load_policy(policy, {})
        except PolicyError as exc:
            (problem,) = exc.problems
            assert problem.line == 7 and "tokenizer" in str(problem) and message in str(problem)
        else:
            raise AssertionError(f"{spec} was accepted")


async def test_n_and_best_of_reserve_every_completion(tmp_path: Path) -> None:
    app = app_for(tmp_path)  # 1,000 tokens a day, max_tokens 100 by default
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://proxy") as c:
        async def ask(**extra: object) -> httpx.Response:
            return await c.post("/v1/chat/completions", json={
                "model": "m", "messages": [], "max_tokens": 100, **extra},
                headers={"authorization": "Bearer key-alice"})
        twelve = await ask(n=12)          # 12 x 100 completion tokens cannot fit in 1,000
        eight = await ask(n=8)            # 8 x 100 + the prompt estimate can
        best_of = await ask(best_of=12, n=1)
    assert (twelve.status_code, eight.status_code, best_of.status_code) == (429, 200, 429)
    assert "up to 1208 tokens" in twelve.json()["error"]["message"]


async def test_budget_store_down_denies_or_allows_as_the_rule_says(tmp_path: Path) -> None:
    statuses = {}
    for mode in ("deny", "allow"):
        folder = tmp_path / mode
        folder.mkdir()
        policy = write_policy(folder, BUDGET.format(extra=f"    on_store_error: {mode}"),
                              state="redis://127.0.0.1:1/0")
        app = GuardMiddleware(usage_app, policy)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://proxy") as c:
            r = await c.post("/v1/chat/completions", json={"model": "m", "messages": []},
                             headers={"authorization": "Bearer key-alice"})
        statuses[mode] = r.status_code
        if mode == "deny":
            assert r.json()["error"]["type"] == "server_error"
        await app.state.aclose()
    assert statuses == {"deny": 503, "allow": 200}
