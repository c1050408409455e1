"""Hot reload in one process: under load, in flight, counters kept, the file watcher and
``POST /admin/reload``."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guardproxy.app import ProxyApp, create_app
from guardproxy.fake_model import create_fake_app
from guardproxy.reload import policy_version, signature, watched_files
from tests.conftest import sha, write_policy
from tests.servers import running_server

TOKEN = "adm1n-t0ken"
CHAT = "/v1/chat/completions"


def rules(requests: int, tokens: int, free: int) -> str:
    return f"""admin: {{token: {TOKEN}}}
rules:
  - name: requests
    when: {{tier: pro}}
    quota: {requests}/minute
  - name: free
    when: {{tier: free}}
    quota: {free}/day
  - name: tokens
    budget: {tokens}/day
    per: account
"""


POLICY_A, POLICY_B = rules(100_000, 10_000_000, 1), rules(200_000, 20_000_000, 2)
# (x-ratelimit-limit-requests, x-ratelimit-limit-tokens) of a pro account's answer
PAIRS = {("100000", "10000000"): "A", ("200000", "20000000"): "B"}


def replace_file(path: Path, text: str) -> None:
    """As an operator should: write aside, then rename over (never half a file)."""
    aside = path.with_suffix(".tmp")
    aside.write_text(text)
    os.replace(aside, path)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def admin(url: str, method: str, path: str, token: str | None = TOKEN) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, url + path, headers=headers, timeout=20)


def ask(client: httpx.Client, key: str, stream: bool = False) -> httpx.Response:
    body = {"model": "m", "max_tokens": 3, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]}
    return client.post(CHAT, json=body, headers={"authorization": f"Bearer {key}"})


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with running_server(create_fake_app()) as url:
        yield url


def test_reload_under_load_twenty_times(tmp_path: Path, fake: str) -> None:
    """Three clients (allowed, quota-denied, unknown key) hammer the proxy while the
    policy is reloaded 20 times, alternating valid files (A, B) and broken ones: no
    5xx, no connection error, every answer wholly A's or wholly B's, 10 failures."""
    policy = write_policy(tmp_path, POLICY_A, upstream=fake)
    good = policy.read_text()
    base = good.replace(POLICY_A, "")
    broken = [good + "  - name: [unclosed\n",                          # YAML syntax
              good.replace("quota: 100000/minute", "quota: lots"),     # a bad value
              good.replace("state: 'memory://'", "state: 'redis://127.0.0.1:1/0'")]
    app = create_app(policy, watch=None)   # POST /admin/reload alone: an exact count
    seen: list[tuple[str, int, dict[str, str]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(key: str) -> None:
        with httpx.Client(base_url=url, timeout=20) as c:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = ask(c, key, stream=n % 3 == 0)
                    seen.append((key, r.status_code, dict(r.headers)))
                except Exception as exc:  # a connection error is a failed request
                    errors.append(exc)

    with running_server(app) as url:
        threads = [threading.Thread(target=client, args=(k,))
                   for k in ("key-bob", "key-alice", "key-nobody")]
        for t in threads:
            t.start()
        try:
            answers = []
            for i in range(20):
                text = (base + (POLICY_B if i % 4 == 0 else POLICY_A)) if i % 2 == 0 \
                    else broken[i % 3]
                replace_file(policy, text)
                answers.append(admin(url, "POST", "/admin/reload"))
                wait_until(partial(_grown, seen, len(seen) + 6), "requests after a reload")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
    assert not errors, errors[:3]
    assert [a.status_code for a in answers] == [200, 422] * 10
    assert app.reloader.reloads_failed == 10 and app.reloader.reloads_ok == 10
    refused_state = answers[5].json()["errors"]   # i = 5: broken[2], the changed state
    assert any("cannot change 'state'" in e for e in refused_state), refused_state
    assert all(": " in e and e.count("\n") == 0 for a in answers[1::2]
               for e in a.json()["errors"])
    statuses = {status for _, status, _ in seen}
    assert statuses <= {200, 401, 429} and {200, 401, 429} <= statuses, statuses
    whose = []
    for key, status, headers in seen:
        if key == "key-bob" and status == 200:
            pair = (headers.get("x-ratelimit-limit-requests", ""),
                    headers.get("x-ratelimit-limit-tokens", ""))
            assert pair in PAIRS, pair     # never one rule from A and one from B
            whose.append(PAIRS[pair])
        elif key == "key-alice":
            limits = (headers.get("x-ratelimit-limit-requests", ""),
                      headers.get("x-ratelimit-limit-tokens"))
            assert limits in (("1", None), ("2", None), ("1", "10000000"),
                              ("2", "20000000")), limits
    assert {"A", "B"} <= set(whose)       # both were really served
    # the last file is broken: the version served is the last good one's
    assert app.reloader.version == answers[18].json()["version"] == answers[19].json()[
        "version"] != answers[17].json()["version"]


def _grown(items: list[Any], size: int) -> bool:
    return len(items) >= size


def _slow_body(started: threading.Event, release: threading.Event) -> Iterator[bytes]:
    yield b'{"model": "m", "messages": [], '
    started.set()
    release.wait(timeout=20)
    yield b'"max_tokens": 2}'


def _named(name: str) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        body = f'{{"who": "{name}"}}'.encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


def test_in_flight_request_finishes_under_its_policy(tmp_path: Path) -> None:
    """A request whose body is still arriving when the policy (rules and upstream)
    changes is decided and forwarded by the policy it started under."""
    quota = "admin: {token: %s}\nrules:\n  - name: requests\n    quota: %d/minute\n"
    with running_server(_named("one")) as one, running_server(_named("two")) as two:
        policy = write_policy(tmp_path, quota % (TOKEN, 1000), upstream=one)
        app = create_app(policy, watch=None)
        started, release = threading.Event(), threading.Event()
        result: list[httpx.Response] = []
        with running_server(app) as url:
            def slow() -> None:
                result.append(httpx.post(url + CHAT, content=_slow_body(started, release),
                                         headers={"authorization": "Bearer key-bob",
                                                  "content-type": "application/json"},
                                         timeout=20))

            thread = threading.Thread(target=slow)
            thread.start()
            assert started.wait(timeout=20)
            old_upstream = app.upstream
            replace_file(policy, policy.read_text().replace(one, two).replace("1000/", "2000/"))
            assert admin(url, "POST", "/admin/reload").status_code == 200
            after = httpx.post(url + CHAT, json={"model": "m", "messages": []}, timeout=20,
                               headers={"authorization": "Bearer key-bob"})
            release.set()
            thread.join(timeout=20)
            # the replaced upstream closes its connections once its last request is over
            wait_until(lambda: old_upstream._transport is None, "the old upstream closed")
    (during,) = result
    assert (during.json(), during.headers["x-ratelimit-limit-requests"]) == (
        {"who": "one"}, "1000")
    assert (after.json(), after.headers["x-ratelimit-limit-requests"]) == (
        {"who": "two"}, "2000")


def test_counters_and_budgets_survive_a_reload(tmp_path: Path, fake: str) -> None:
    """Same rule name and window: the counts go on (the state is shared by every
    pipeline); a budget's new limit applies to what was already used; a renamed rule
    starts afresh."""
    text = ("admin: {token: %s}\nrules:\n  - name: per-minute\n    quota: 3/day\n"
            "    per: account\n  - name: tokens\n    budget: %d/day\n    per: account\n")
    policy = write_policy(tmp_path, text % (TOKEN, 1000), upstream=fake)
    app = create_app(policy, watch=None)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=20) as c:
        assert [ask(c, "key-bob").status_code for _ in range(2)] == [200, 200]
        used = admin(url, "GET", "/admin/usage/bob").json()["budgets"][0]["windows"][0]["used"]
        assert used > 0
        replace_file(policy, policy.read_text().replace("1000/day", "5000/day"))
        assert admin(url, "POST", "/admin/reload").status_code == 200
        window = admin(url, "GET", "/admin/usage/bob").json()["budgets"][0]["windows"][0]
        assert (window["used"], window["remaining"]) == (used, 5000 - used)
        assert [ask(c, "key-bob").status_code for _ in range(2)] == [200, 429]
        replace_file(policy, policy.read_text().replace("per-minute", "renamed"))
        assert admin(url, "POST", "/admin/reload").status_code == 200
        assert ask(c, "key-bob").status_code == 200


def test_file_watch_reloads_policy_and_accounts(tmp_path: Path, fake: str) -> None:
    policy = write_policy(tmp_path, POLICY_A, upstream=fake)
    good = policy.read_text()
    app = create_app(policy, watch=0.05)
    reloader = app.reloader
    with running_server(app) as url, httpx.Client(base_url=url, timeout=20) as c:
        first = reloader.version
        replace_file(policy, good.replace(POLICY_A, POLICY_B))
        wait_until(lambda: reloader.version != first, "the watcher's reload")
        assert ask(c, "key-bob").headers["x-ratelimit-limit-requests"] == "200000"
        # a broken file: reported once, however often it is touched
        replace_file(policy, good + "rules: [\n")
        wait_until(lambda: reloader.reloads_failed == 1, "the failed reload")
        os.utime(policy)
        wait_until(lambda: reloader._seen == signature(watched_files(app.policy)),
                   "the watcher to see the touch")
        assert ask(c, "key-bob").headers["x-ratelimit-limit-requests"] == "200000"
        # an accounts file change is a reload too: a new key works
        assert ask(c, "key-dave").status_code == 401
        replace_file(policy, good)
        wait_until(lambda: reloader.reloads_ok == 2, "the fixed file's reload")
        accounts = tmp_path / "accounts.yaml"
        replace_file(accounts, accounts.read_text() + "  - id: dave\n    org: o\n    tier: pro\n"
                     f"    key_sha256: {sha('key-dave')}\n")
        wait_until(lambda: reloader.reloads_ok == 3, "the accounts file's reload")
        assert ask(c, "key-dave").status_code == 200
    assert reloader.reloads_failed == 1
    assert reloader.version == policy_version(app.policy).version


def test_admin_reload_and_policy_endpoints(tmp_path: Path, fake: str) -> None:
    policy = write_policy(tmp_path, POLICY_A, upstream=fake)
    app: ProxyApp = create_app(policy, watch=None)
    with running_server(app) as url:
        assert admin(url, "POST", "/admin/reload", token=None).status_code == 401
        assert admin(url, "POST", "/admin/reload", token="wrong").status_code == 401
        assert app.reloader.reloads_ok == 0
        assert admin(url, "GET", "/admin/reload").status_code == 405
        before = admin(url, "GET", "/admin/policy").json()
        replace_file(policy, policy.read_text().replace(POLICY_A, POLICY_B))
        done = admin(url, "POST", "/admin/reload")
        after = admin(url, "GET", "/admin/policy").json()
    assert done.status_code == 200 and done.json()["reloaded"] is True
    assert before["version"] != after["version"] == done.json()["version"]
    assert len(after["version"]) == 12 and len(after["source_sha256"]) == 64
    assert after["source_sha256"] != before["source_sha256"]
    assert after["accounts_sha256"] == before["accounts_sha256"]
    assert after["reloads"] == {"ok": 1, "failed": 0}
    assert after["rules"] == ["requests", "free", "tokens"]


def test_reload_refuses_what_needs_a_restart(tmp_path: Path, fake: str) -> None:
    policy = write_policy(tmp_path, POLICY_A, upstream=fake)
    good = policy.read_text()
    app = create_app(policy, watch=None)
    with running_server(app) as url:
        for text, why in [
            (good.replace("key_prefix: guardproxy", "key_prefix: other"), "key_prefix"),
            (good.replace(f"{{token: {TOKEN}}}", f"{{token: {TOKEN}, listen: 127.0.0.1:1}}"),
             "admin.listen"),
            (good.replace(f"url: '{fake}'", "url: ''"), "upstream.url")]:
            replace_file(policy, text)
            answer = admin(url, "POST", "/admin/reload")
            assert answer.status_code == 422 and why in answer.json()["errors"][0], answer.text
        # a new token takes over at once
        replace_file(policy, good.replace(TOKEN, "n3w-t0ken"))
        assert admin(url, "POST", "/admin/reload").status_code == 200
        assert admin(url, "GET", "/admin/policy").status_code == 401
        assert admin(url, "GET", "/admin/policy", token="n3w-t0ken").status_code == 200
