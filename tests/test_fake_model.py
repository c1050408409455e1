"""The fake model's behaviours, each against a real uvicorn fake model (``fake-model``
CLI in a subprocess), and its executed ledger."""

from __future__ import annotations

import gzip
import json
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.fake_model.knobs import Refusal, as_bool, as_int, fastapi_reads_json
from guardproxy.fake_model.ledger import Ledger
from tests.procs import fake_model

CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "tell me a story"}]  # 4 words + 3 = 7 prompt tokens


@pytest.fixture(scope="module")
def fake() -> Iterator[httpx.Client]:
    with fake_model() as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


def post(c: httpx.Client, body: dict[str, Any], behave: str = "", path: str = CHAT,
         **headers: str) -> httpx.Response:
    extra = {"x-fake-behave": behave} if behave else {}
    return c.post(path, json=body, headers={**extra, **headers})


def raw_post(c: httpx.Client, body: dict[str, Any], behave: str = "", path: str = CHAT,
             content_type: str | None = "application/json",
             **headers: str) -> tuple[httpx.Response, bytes]:
    """The body exactly as sent: still compressed, cut streams kept up to the cut."""
    sent = {**headers, **({"x-fake-behave": behave} if behave else {}),
            **({"content-type": content_type} if content_type else {})}
    with c.stream("POST", path, content=json.dumps(body).encode(), headers=sent) as r:
        return r, b"".join(r.iter_raw())


def events(data: bytes) -> list[tuple[str | None, Any]]:
    """SSE blocks split on blank lines (the bytes, so U+2028 cannot split anything):
    (event name, parsed data); ``[DONE]`` stays a string."""
    out: list[tuple[str | None, Any]] = []
    for block in data.split(b"\n\n"):
        if not block.strip():
            continue
        name, payload = None, None
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                text = line[6:].decode()
                payload = text if text == "[DONE]" else json.loads(text)
        out.append((name, payload))
    return out


def executed(c: httpx.Client, request_id: str) -> dict[str, Any]:
    """The ledger record of one request, once finished (a stream's record settles when
    the server notices the end; bounded wait)."""
    for _ in range(500):
        found = [e for e in c.get("/_fake/executed").json() if e["request_id"] == request_id]
        if found and found[-1]["finished"]:
            return dict(found[-1])
        time.sleep(0.01)
    raise AssertionError(f"no finished ledger record for {request_id}: {found}")


def rid() -> str:
    return uuid.uuid4().hex


def deltas(evs: list[tuple[str | None, Any]]) -> list[dict[str, Any]]:
    return [e for _, e in evs if isinstance(e, dict) and e.get("choices")]


# --- today's behaviour, unchanged -------------------------------------------------------

def test_default_json_and_stream_are_as_before(fake: httpx.Client) -> None:
    r = post(fake, {"model": "m", "max_tokens": 5, "messages": MSGS})
    assert r.status_code == 200
    assert r.json()["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert r.json()["choices"][0]["finish_reason"] == "length"
    _, data = raw_post(fake, {"model": "m", "max_tokens": 3, "stream": True, "messages": MSGS})
    evs = events(data)
    assert evs[-1] == (None, "[DONE]") and data.endswith(b"\n\n")
    chunks = deltas(evs)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert all("usage" not in c for c in chunks), "no usage unless include_usage"
    words = post(fake, {"model": "m", "max_tokens": 50, "messages": MSGS},
                 **{"x-fake-words": "2"}).json()
    assert words["usage"]["completion_tokens"] == 2
    assert words["choices"][0]["finish_reason"] == "stop"
    down = post(fake, {"model": "m", "messages": MSGS}, **{"x-fake-status": "503"})
    assert down.status_code == 503 and "error" in down.json()
    bare = post(fake, {"model": "m", "messages": MSGS}, **{"x-fake-no-usage": "1"})
    assert "usage" not in bare.json()
    assert "usage" not in post(fake, {"model": "m", "messages": MSGS}, "no-usage").json()


def test_unknown_knob_is_refused(fake: httpx.Client) -> None:
    r = post(fake, {"model": "m", "messages": MSGS}, "gzip, finish-with-contnet")
    assert r.status_code == 400 and "finish-with-contnet" in r.json()["error"]["message"]
    assert post(fake, {"model": "m"}, "reset-after=x").status_code == 400


# --- the executed ledger ---------------------------------------------------------------

def test_ledger_records_request_ids_and_clears(fake: httpx.Client) -> None:
    fake.delete("/_fake/executed")
    given_id = rid()
    post(fake, {"model": "m", "max_tokens": 4, "messages": MSGS}, **{"x-request-id": given_id})
    post(fake, {"model": "m", "messages": MSGS}, path="/v1/messages")
    post(fake, {"model": "m", "max_tokens": "4", "messages": MSGS})  # refused: strict types
    first, second, refused = fake.get("/_fake/executed").json()
    assert first == {"request_id": given_id, "path": CHAT, "status": 200, "stream": False,
                     "completions": 1, "prompt_tokens": 7, "completion_tokens": 4,
                     "usage_sent": True, "cancelled": None, "reset": False, "finished": True}
    assert second["request_id"].startswith("fake-") and second["completion_tokens"] == 16
    assert refused["status"] == 400 and refused["completion_tokens"] == 0
    assert refused["prompt_tokens"] == 0
    assert fake.delete("/_fake/executed").json() == {"cleared": 3}
    assert fake.get("/_fake/executed").json() == []


def test_ledger_is_bounded_newest_last() -> None:
    ledger = Ledger(size=3)
    for i in range(5):
        ledger.open(f"r{i}", "/p")
    assert [e["request_id"] for e in ledger.dump()] == ["r2", "r3", "r4"]


# --- n and best_of -------------------------------------------------------------------

def test_n_choices_and_best_of_are_all_generated_and_counted(fake: httpx.Client) -> None:
    body = {"model": "m", "max_tokens": 4, "n": 3, "messages": MSGS}
    whole = post(fake, body).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    assert whole["usage"]["completion_tokens"] == 12
    req = rid()
    _, data = raw_post(fake, {**body, "stream": True, "stream_options": {"include_usage": True}},
                       **{"x-request-id": req})
    chunks = deltas(events(data))
    content = [c for c in chunks if c["choices"][0]["delta"].get("content")]
    assert [c["choices"][0]["index"] for c in content] == [0, 1, 2] * 4, "interleaved"
    for index in range(3):
        text = "".join(c["choices"][0]["delta"]["content"] for c in content
                       if c["choices"][0]["index"] == index)
        assert text == whole["choices"][index]["message"]["content"]
    usage = [e for _, e in events(data) if isinstance(e, dict) and e.get("usage")]
    assert usage[-1]["usage"]["completion_tokens"] == 12
    assert executed(fake, req)["completion_tokens"] == 12
    best = post(fake, {"model": "m", "max_tokens": 4, "n": 2, "best_of": 5, "prompt": "x"},
                path="/v1/completions", **{"x-request-id": (req := rid())}).json()
    assert len(best["choices"]) == 2 and best["usage"]["completion_tokens"] == 20
    assert executed(fake, req)["completions"] == 5
    assert post(fake, {"model": "m", "n": 0, "messages": MSGS}).status_code == 400
    assert post(fake, {"model": "m", "n": 3, "best_of": 2, "prompt": "x"},
                path="/v1/completions").status_code == 400


def test_batch_prompts_answer_each_prompt_n_times(fake: httpx.Client) -> None:
    body = {"model": "m", "max_tokens": 2, "n": 2, "prompt": ["one", "two", "three"]}
    r = post(fake, body, "batch-prompts", path="/v1/completions").json()
    assert [c["index"] for c in r["choices"]] == list(range(6))
    assert r["choices"][4]["text"].startswith("Fake answer")
    assert r["usage"]["completion_tokens"] == 12
    assert len(post(fake, body, path="/v1/completions").json()["choices"]) == 2


# --- finish-with-content, partial-usage, unterminated, line-separators -------------------

@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
def test_finish_with_content(fake: httpx.Client, path: str) -> None:
    body = {"model": "m", "max_tokens": 3, "n": 2, "stream": True, "messages": MSGS,
            "prompt": "tell me"}
    _, data = raw_post(fake, body, "finish-with-content", path=path)
    chunks = deltas(events(data))
    finishing = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert [c["index"] for c in finishing] == [0, 1]
    for choice in finishing:  # the finish rides on the last word, never on its own
        assert (choice.get("delta") or {}).get("content", choice.get("text"))


def test_partial_usage_openai_every_chunk_is_cumulative(fake: httpx.Client) -> None:
    body = {"model": "m", "max_tokens": 3, "n": 2, "stream": True, "messages": MSGS}
    _, data = raw_post(fake, body, "partial-usage")
    usages = [e["usage"] for _, e in events(data) if isinstance(e, dict)]
    assert len(usages) == len([e for e in events(data) if isinstance(e[1], dict)])
    done = [u["completion_tokens"] for u in usages]
    assert done == sorted(done) and done[-1] == 6
    assert {u["prompt_tokens"] for u in usages} == {7}


def test_partial_usage_anthropic_says_zero_input_tokens(fake: httpx.Client) -> None:
    body = {"model": "m", "max_tokens": 3, "stream": True, "messages": MSGS}
    _, data = raw_post(fake, body, "partial-usage", path="/v1/messages")
    named = dict(events(data))
    assert named["message_start"]["message"]["usage"]["input_tokens"] == 7
    assert named["message_delta"]["usage"] == {"input_tokens": 0, "output_tokens": 3}
    _, plain = raw_post(fake, body, path="/v1/messages")
    assert dict(events(plain))["message_delta"]["usage"] == {"output_tokens": 3}


def test_unterminated_final_event(fake: httpx.Client) -> None:
    body = {"model": "m", "max_tokens": 3, "stream": True, "messages": MSGS,
            "stream_options": {"include_usage": True}}
    _, data = raw_post(fake, body, "unterminated")
    assert data.endswith(b"}\n") and not data.endswith(b"\n\n") and b"[DONE]" not in data
    last = events(data)[-1][1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    _, anth = raw_post(fake, body, "unterminated", path="/v1/messages")
    assert anth.endswith(b'data: {"type":"message_stop"}\n')


def test_line_separators_are_raw_in_json_and_streams(fake: httpx.Client) -> None:
    body = {"model": "m", "max_tokens": 8, "messages": MSGS}
    for stream in (False, True):
        for path in (CHAT, "/v1/messages"):
            _, data = raw_post(fake, {**body, "stream": stream}, "line-separators", path=path)
            for sep in ("\u2028", "\u2029", "\u0085"):
                assert sep.encode() in data, (path, stream, sep)
            assert b"\\u2028" not in data
    _, data = raw_post(fake, {**body, "stream": True}, "line-separators")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in deltas(events(data)))
    assert len(text.split(" ")) == 8, "each separator is glued to a word"


# --- gzip ---------------------------------------------------------------------------

def test_gzip_json_has_content_length(fake: httpx.Client) -> None:
    r, data = raw_post(fake, {"model": "m", "max_tokens": 5, "messages": MSGS}, "gzip",
                       **{"accept-encoding": "identity"})
    assert r.headers["content-encoding"] == "gzip"
    assert int(r.headers["content-length"]) == len(data)
    assert json.loads(gzip.decompress(data))["usage"]["completion_tokens"] == 5
    error = post(fake, {"model": "m", "messages": MSGS}, "gzip", **{"x-fake-status": "429"})
    assert error.status_code == 429 and "error" in error.json()  # httpx decodes it


def test_gzip_stream_is_flushed_event_by_event(fake: httpx.Client) -> None:
    body = {"model": "m", "max_tokens": 4, "stream": True, "messages": MSGS}
    with fake.stream("POST", CHAT, json=body, headers={
            "x-fake-behave": "gzip", "accept-encoding": "identity"}) as r:
        assert r.headers["content-encoding"] == "gzip"
        assert "content-length" not in r.headers
        decoder = zlib.decompressobj(wbits=31)
        plain = b""
        for chunk in r.iter_raw():
            plain += decoder.decompress(chunk)
            assert plain.endswith(b"\n\n") or not chunk, "each piece decodes whole events"
    assert events(plain)[-1] == (None, "[DONE]") and decoder.eof


# --- lenient and strict reading --------------------------------------------------------

@pytest.mark.parametrize(("field", "value", "words"), [
    ("max_tokens", "6", 6), ("max_tokens", 6.0, 6), ("max_tokens", " +6 ", 6),
    ("max_tokens", "6.00", 6), ("max_tokens", True, 1), ("n", "2", 2 * 16), ("n", 2.0, 32),
])
def test_lenient_coerces_like_pydantic(fake: httpx.Client, field: str, value: object,
                                       words: int) -> None:
    body = {"model": "m", "messages": MSGS, field: value}
    assert post(fake, body).status_code == 400, "strict by default"
    r = post(fake, body, "lenient")
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == words


@pytest.mark.parametrize("stream", ["true", "True", 1, 1.0, "yes", "on"])
def test_lenient_stream_flags(fake: httpx.Client, stream: object) -> None:
    body = {"model": "m", "max_tokens": 2, "stream": stream, "messages": MSGS}
    assert post(fake, body).status_code == 400
    r = post(fake, body, "lenient")
    assert r.headers["content-type"].startswith("text/event-stream")
    off = post(fake, {**body, "stream": "false"}, "lenient")
    assert off.headers["content-type"] == "application/json"


@pytest.mark.parametrize(("content_type", "strict", "lenient"), [
    (None, 200, 200), ("application/json", 200, 200), ("Application/JSON", 200, 200),
    ("application/json; charset=utf-8", 200, 200), ("application/vnd.api+json", 200, 200),
    ("text/plain", 422, 200), ("application/x-www-form-urlencoded", 422, 200),
])
def test_content_types_as_fastapi_reads_them(fake: httpx.Client, content_type: str | None,
                                             strict: int, lenient: int) -> None:
    body = {"model": "m", "max_tokens": 2, "messages": MSGS}
    r, _ = raw_post(fake, body, content_type=content_type)
    assert r.status_code == strict
    if strict == 422:
        assert json.loads(_)["detail"][0]["loc"] == ["body"]
    r, _ = raw_post(fake, body, "lenient", content_type=content_type)
    assert r.status_code == lenient


def test_lenient_still_refuses_what_pydantic_refuses(fake: httpx.Client) -> None:
    for value in ("4.5", "four", 4.5, "", [4]):
        r = post(fake, {"model": "m", "max_tokens": value, "messages": MSGS}, "lenient")
        assert r.status_code == 400, value


pydantic = pytest.importorskip("pydantic")
_INT = pydantic.TypeAdapter(int)
_BOOL = pydantic.TypeAdapter(bool)
_texts = st.text(alphabet="0123456789_.+- \tTtRrUuEeFfAaLlSsYyNnOo", max_size=8)
_values = _texts | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | st.booleans()


def _pydantic(adapter: Any, value: object) -> object:
    try:
        return adapter.validate_python(value)
    except pydantic.ValidationError:
        return "refused"


def _ours(fn: Any, value: object) -> object:
    try:
        return fn("f", value, True)
    except Refusal:
        return "refused"


@settings(max_examples=300, deadline=None)
@given(value=_values)
def test_lenient_coercion_matches_pydantic_lax_mode(value: object) -> None:
    assert _ours(as_int, value) == _pydantic(_INT, value)
    assert _ours(as_bool, value) == _pydantic(_BOOL, value)


def test_fastapi_content_type_rule() -> None:
    assert fastapi_reads_json(None) and fastapi_reads_json("APPLICATION/Problem+JSON")
    assert not fastapi_reads_json("text/json") and not fastapi_reads_json("json")


# --- cap-field, strict-fields, own-ratelimit, audio ------------------------------------

def test_cap_field_reads_only_that_field(fake: httpx.Client) -> None:
    body = {"model": "m", "max_completion_tokens": 5, "messages": MSGS}
    assert post(fake, body).json()["usage"]["completion_tokens"] == 5
    ignored = post(fake, body, "cap-field=max_tokens").json()
    assert ignored["usage"]["completion_tokens"] == 4096
    both = post(fake, {**body, "max_tokens": 7}, "cap-field=max_tokens").json()
    assert both["usage"]["completion_tokens"] == 7


def test_strict_fields_refuse_stream_options(fake: httpx.Client) -> None:
    body = {"model": "m", "max_tokens": 2, "stream": True, "messages": MSGS}
    assert post(fake, body, "strict-fields").status_code == 200
    r = post(fake, {**body, "stream_options": {"include_usage": True}}, "strict-fields")
    assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"]
    anth = post(fake, {**body, "n": 1}, "strict-fields", path="/v1/messages")
    assert anth.status_code == 400 and anth.json()["type"] == "error"


def test_own_ratelimit_headers(fake: httpx.Client) -> None:
    r = post(fake, {"model": "m", "max_tokens": 2, "messages": MSGS}, "own-ratelimit")
    assert (r.headers["x-ratelimit-limit-requests"],
            r.headers["x-ratelimit-remaining-requests"]) == ("9999", "9998")
    assert "x-ratelimit-reset-tokens" in r.headers
    a = post(fake, {"model": "m", "max_tokens": 2, "messages": MSGS}, "own-ratelimit",
             path="/v1/messages")
    assert a.headers["anthropic-ratelimit-requests-remaining"] == "9998"
    assert "x-ratelimit-limit-requests" not in a.headers
    assert "x-ratelimit-limit-requests" not in post(fake, {"model": "m"}).headers


def test_audio_answer(fake: httpx.Client) -> None:
    req = rid()
    r = post(fake, {"model": "m", "max_tokens": 3, "messages": MSGS}, "audio",
             **{"x-request-id": req})
    assert r.headers["content-type"] == "audio/mpeg" and len(r.content) == 600_000
    assert r.content.startswith(b"ID3") and b"usage" not in r.content
    record = executed(fake, req)
    assert record["usage_sent"] is False and record["completion_tokens"] == 3


# --- slow headers, resets, disconnects ------------------------------------------------

def test_slow_headers_records_a_client_that_left(fake: httpx.Client) -> None:
    req = rid()
    with pytest.raises(httpx.ReadTimeout):
        fake.post(CHAT, json={"model": "m", "messages": MSGS}, timeout=0.3,
                  headers={"x-fake-behave": "slow-headers=5", "x-request-id": req})
    record = executed(fake, req)
    assert (record["cancelled"], record["completion_tokens"]) == ("before", 0)
    waited = rid()
    r = post(fake, {"model": "m", "max_tokens": 2, "messages": MSGS}, "slow-headers=0.1",
             **{"x-request-id": waited})
    assert r.status_code == 200 and executed(fake, waited)["cancelled"] is None


@pytest.mark.parametrize("behave", ["reset-after=3", "reset-after=3, gzip"])
def test_reset_after_cuts_the_stream(fake: httpx.Client, behave: str) -> None:
    req = rid()
    body = {"model": "m", "max_tokens": 50, "stream": True, "messages": MSGS,
            "stream_options": {"include_usage": True}}
    received = b""
    with pytest.raises(httpx.RemoteProtocolError), fake.stream(
            "POST", CHAT, json=body, headers={"x-fake-behave": behave,
                                              "x-request-id": req}) as r:
        for chunk in r.iter_bytes():  # decoded, when gzip
            received += chunk
    evs = events(received)
    assert len(evs) == 3 and "usage" not in received.decode()
    record = executed(fake, req)
    words = len(evs) - 1  # the role chunk carries none
    assert record["reset"] and not record["usage_sent"]
    assert words <= record["completion_tokens"] <= words + 1


def test_client_disconnect_mid_stream_is_recorded(fake: httpx.Client) -> None:
    req = rid()
    body = {"model": "m", "max_tokens": 400, "stream": True, "messages": MSGS}
    with fake.stream("POST", CHAT, json=body, headers={
            "x-request-id": req, "x-fake-chunk-delay": "0.01"}) as r:
        next(r.iter_raw())
    record = executed(fake, req)
    assert record["cancelled"] == "during"
    assert 0 < record["completion_tokens"] < 400
    assert not record["usage_sent"]
