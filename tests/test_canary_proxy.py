"""Canaries through the real proxy (uvicorn), with the official SDKs parsing the result."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from click.testing import CliRunner

from guardproxy.app import ProxyApp, create_app
from guardproxy.canary.lexicon import INDEX
from guardproxy.cli import main
from guardproxy.fake_model import create_fake_app
from tests.conftest import write_policy
from tests.servers import running_server

SECRET = "canary-secret-for-tests-0123456789"
RULES = f"""
rules:
  - name: marks
    canary:
      secret: {SECRET}
      ledger: {{store: file, path: ledger.sqlite}}
"""
PROMPT = [{"role": "user", "content": "tell me often and usually what works"}]


def canonical(text: str) -> str:
    return re.sub(r"[A-Za-z]+", lambda m: f"<{INDEX[m.group().lower()][0]}>"
                  if m.group().lower() in INDEX else m.group(), text)


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with running_server(create_fake_app()) as url:
        yield url


def proxy_app(tmp: Path, upstream: str, dialect: str = "openai") -> ProxyApp:
    return create_app(write_policy(tmp, RULES, upstream=upstream, dialect=dialect))


def test_openai_stream_and_json_carry_the_same_marks(tmp_path: Path, fake: str) -> None:
    direct = openai.OpenAI(base_url=fake + "/v1", api_key="x", max_retries=0)
    original = direct.chat.completions.create(model="m", max_tokens=120, messages=PROMPT)
    with running_server(proxy_app(tmp_path, fake)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="key-alice", max_retries=0)
        whole = client.chat.completions.create(model="m", max_tokens=120, messages=PROMPT)
        chunks = list(client.chat.completions.create(
            model="m", max_tokens=120, messages=PROMPT, stream=True,
            stream_options={"include_usage": True}))
        other = client.chat.completions.create(model="m", max_tokens=120, messages=PROMPT,
                                               extra_headers={"authorization": "Bearer key-bob"})
    text = whole.choices[0].message.content or ""
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    upstream_text = original.choices[0].message.content or ""
    assert streamed == text, "a stream and the same response unstreamed get the same marks"
    assert text != upstream_text and canonical(text) == canonical(upstream_text)
    assert (other.choices[0].message.content or "") != text, "marks carry the account"
    assert whole.usage == original.usage, "usage stays as upstream reported"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 120


def test_anthropic_stream_and_json_carry_the_same_marks(tmp_path: Path, fake: str) -> None:
    with running_server(proxy_app(tmp_path, fake, "anthropic")) as url:
        client = anthropic.Anthropic(base_url=url, api_key="key-alice", max_retries=0)
        whole = client.messages.create(model="c", max_tokens=90, messages=PROMPT)
        with client.messages.stream(model="c", max_tokens=90, messages=PROMPT) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
    direct = httpx.post(fake + "/v1/messages", timeout=10,
                        json={"model": "c", "max_tokens": 90, "messages": PROMPT}).json()
    text = whole.content[0].text  # type: ignore[union-attr]
    assert streamed == text == final.content[0].text  # type: ignore[union-attr]
    assert text != direct["content"][0]["text"]
    assert canonical(text) == canonical(direct["content"][0]["text"])


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_object"}},
    {"logprobs": True, "top_logprobs": 2},
])
def test_structured_output_and_logprobs_are_never_marked(tmp_path: Path, fake: str,
                                                         extra: dict[str, object]) -> None:
    body = {"model": "m", "max_tokens": 60, "messages": PROMPT, **extra}
    direct = httpx.post(fake + "/v1/chat/completions", json=body, timeout=10).json()
    with running_server(proxy_app(tmp_path, fake)) as url:
        via = httpx.post(url + "/v1/chat/completions", json=body, timeout=10,
                         headers={"authorization": "Bearer key-alice"}).json()
    assert via["choices"] == direct["choices"]


def test_ledger_and_detect_attribute_leaked_outputs(tmp_path: Path, fake: str) -> None:
    app = proxy_app(tmp_path, fake)
    leaked = []
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="key-bob", max_retries=0)
        for i in range(40):
            prompt = [{"role": "user", "content": f"question {i} often usually perhaps {i * 7}"}]
            r = client.chat.completions.create(model="m", max_tokens=300, messages=prompt)
            leaked.append(r.choices[0].message.content or "")
    ledger = sqlite3.connect(tmp_path / "ledger.sqlite")
    assert ledger.execute("SELECT count(*) FROM entries").fetchone() == (40,)
    leak = tmp_path / "leak.txt"
    leak.write_text(leaked[3])
    policy = str(tmp_path / "policy.yaml")
    found = CliRunner().invoke(main, ["ledger", "match", str(leak), "--policy", policy])
    assert found.exit_code == 0, found.output
    assert "account=bob" in found.output
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(leaked))
    verdict = CliRunner().invoke(main, ["canary", "detect", str(corpus), "--policy", policy,
                                        "--null-keys", "100", "--json"])
    assert verdict.exit_code == 0, verdict.output
    report = json.loads(verdict.stdout)
    assert report["marked"] and report["accounts"][0]["account"] == "bob"


def test_canary_secret_is_required_and_never_printed(tmp_path: Path) -> None:
    bad = write_policy(tmp_path, "rules:\n  - name: m\n    canary: {secret: short}\n")
    result = CliRunner().invoke(main, ["check", str(bad)])
    assert result.exit_code == 1 and "canary.secret: must be at least 16" in result.output
    assert "short" not in result.output.replace("at least", "")
    policy = write_policy(tmp_path, RULES)
    assert SECRET not in repr(asyncio.run(_rules(policy)))


async def _rules(policy: Path) -> object:
    from guardproxy.policy.load import load_policy

    return load_policy(policy, {}).rules


def test_admin_detect_and_match_read_the_in_process_memory_ledger(tmp_path: Path,
                                                                   fake: str) -> None:
    rules = f"admin: {{token: adm1n}}\nrules:\n  - name: marks\n    canary: {{secret: {SECRET}}}\n"
    app = create_app(write_policy(tmp_path, rules, upstream=fake))
    admin = {"authorization": "Bearer adm1n"}
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="key-carol", max_retries=0)
        leaked = [client.chat.completions.create(
            model="m", max_tokens=300,
            messages=[{"role": "user", "content": f"question {i} often perhaps"}],
        ).choices[0].message.content or "" for i in range(30)]
        corpus = "\n\n".join(leaked)
        verdict = httpx.post(url + "/admin/canary/detect?null_keys=50", content=corpus,
                             headers=admin, timeout=60)
        matched = httpx.post(url + "/admin/ledger/match", content=leaked[5], headers=admin,
                             timeout=10)
        unauthorised = httpx.post(url + "/admin/ledger/match", content="x", timeout=10)
        bad_param = httpx.post(url + "/admin/canary/detect?null_keys=lots", content="x",
                               headers=admin, timeout=10)
        wrong_method = httpx.get(url + "/admin/canary/detect", headers=admin, timeout=10)
        too_big = httpx.post(url + "/admin/ledger/match", content=b"a " * (3 << 20),
                             headers=admin, timeout=10)
    report = verdict.json()
    assert verdict.status_code == 200 and report["marked"] and report["null_keys"] == 50
    assert report["accounts"][0]["account"] == "carol"
    assert report["accounts"][0]["log10_p_bonferroni"] < -6
    rows = matched.json()["matches"]
    assert rows and {r["account"] for r in rows} == {"carol"} and rows[0]["shared"] > 0
    assert unauthorised.status_code == 401
    assert bad_param.status_code == 400 and "null_keys" in bad_param.json()["error"]
    assert (wrong_method.status_code, too_big.status_code) == (405, 413)


def test_redis_ledger_is_shared_bounded_and_read_by_the_cli(
        tmp_path: Path, fake: str, redis_prefix: tuple[str, str]) -> None:
    import redis

    redis_url, prefix = redis_prefix
    rules = (f"rules:\n  - name: marks\n    canary: {{secret: {SECRET}, "
             f"ledger: {{store: state, max_entries: 5}}}}\n")
    policy = write_policy(tmp_path, rules, upstream=fake, state=redis_url, key_prefix=prefix)
    answers = []
    for _ in range(2):  # two proxy instances, one ledger
        with running_server(create_app(policy)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="key-alice", max_retries=0)
            answers += [client.chat.completions.create(
                model="m", max_tokens=200,
                messages=[{"role": "user", "content": f"question {len(answers)} {i}"}],
            ).choices[0].message.content or "" for i in range(4)]
    stored = redis.Redis.from_url(redis_url).hlen(f"{prefix}:ledger:{{{prefix}}}:e")
    assert stored == 5, "the ledger is trimmed to max_entries"
    leak = tmp_path / "leak.txt"
    leak.write_text(answers[-1])
    found = CliRunner().invoke(main, ["ledger", "match", str(leak), "--policy", str(policy),
                                      "--json"])
    assert found.exit_code == 0, found.output
    rows = json.loads(found.stdout)
    assert rows and rows[0]["account"] == "alice" and rows[0]["shared"] > 0


def test_probe_scores_a_suspect_api(tmp_path: Path, fake: str) -> None:
    policy = write_policy(tmp_path, RULES, upstream=fake)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"explain topic {i} often and simply" for i in range(12)))
    args = ["canary", "probe", "--prompts", str(prompts), "--policy", str(policy),
            "--model", "m", "--null-keys", "50", "--json"]
    with running_server(create_app(policy)) as url:  # a "student" serving our marked text
        marked = CliRunner().invoke(main, [*args, "--target", url, "--api-key", "key-carol"])
    clean = CliRunner().invoke(main, [*args, "--target", fake])
    down = CliRunner().invoke(main, [*args, "--target", "http://127.0.0.1:9"])
    assert marked.exit_code == 0, marked.output
    report = json.loads(marked.stdout)
    assert report["marked"] and report["accounts"][0]["account"] == "carol"
    assert clean.exit_code == 0 and not json.loads(clean.stdout)["marked"]
    assert down.exit_code == 1 and "http://127.0.0.1:9" in down.output


def test_forensics_cli_names_what_the_policy_lacks(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "rules: []\n")
    text = tmp_path / "t.txt"
    text.write_text("some text")
    detect = CliRunner().invoke(main, ["canary", "detect", str(text), "--policy", str(policy)])
    ledger = CliRunner().invoke(main, ["ledger", "match", str(text), "--policy", str(policy)])
    missing = CliRunner().invoke(main, ["canary", "detect", str(tmp_path / "nope.txt"),
                                        "--policy", str(policy)])
    assert detect.exit_code == 1 and "has no canary rule" in detect.output
    assert ledger.exit_code == 1 and "no canary rule keeps a ledger" in ledger.output
    assert missing.exit_code == 2 and "nope.txt" in missing.output
    assert "Traceback" not in detect.output + ledger.output + missing.output


def test_responses_api_is_marked_alike_in_json_stream_and_final_events(
        tmp_path: Path, fake: str) -> None:
    direct = openai.OpenAI(base_url=fake + "/v1", api_key="x", max_retries=0)
    original = direct.responses.create(model="m", input="often usually", max_output_tokens=150)
    with running_server(proxy_app(tmp_path, fake)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="key-alice", max_retries=0)
        whole = client.responses.create(model="m", input="often usually",
                                        max_output_tokens=150)
        events = list(client.responses.create(model="m", input="often usually",
                                              max_output_tokens=150, stream=True))
        structured = httpx.post(url + "/v1/responses", timeout=10,
                                headers={"authorization": "Bearer key-alice"},
                                json={"model": "m", "input": "often", "max_output_tokens": 60,
                                      "text": {"format": {"type": "json_object"}}}).json()
    text = whole.output_text
    assert text != original.output_text and canonical(text) == canonical(original.output_text)
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == text, "a stream and the same response unstreamed get the same marks"
    finals = [e.text for e in events if e.type == "response.output_text.done"]
    completed = [e.response.output_text for e in events if e.type == "response.completed"]
    parts = [e.part.text for e in events if e.type == "response.content_part.done"]
    assert finals == completed == parts == [text], "every copy of the text carries the marks"
    assert whole.usage == original.usage
    plain = httpx.post(fake + "/v1/responses", timeout=10,
                       json={"model": "m", "input": "often", "max_output_tokens": 60}).json()
    assert structured["output"] == plain["output"], "structured output is never marked"


def test_a_failing_response_stage_does_not_cut_the_response(
        tmp_path: Path, fake: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from guardproxy.canary.stage import CanaryStage

    def broken(self: CanaryStage, body: object) -> None:
        raise RuntimeError("a bug in a stage")

    monkeypatch.setattr(CanaryStage, "whole", broken)
    body = {"model": "m", "max_tokens": 40, "messages": PROMPT}
    direct = httpx.post(fake + "/v1/chat/completions", json=body, timeout=10).json()
    with running_server(proxy_app(tmp_path, fake)) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=10,
                       headers={"authorization": "Bearer key-alice"})
    assert r.status_code == 200
    assert r.json()["choices"] == direct["choices"], "passed through unmarked, not cut off"
    assert "response stage CanaryStage failed" in caplog.text
