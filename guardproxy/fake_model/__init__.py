"""A fake OpenAI + Anthropic model API, for the demo, the tests and the benchmarks.

Endpoints: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/responses``,
``/v1/embeddings``, ``/v1/messages``; ``GET /v1/models``, ``/healthz``; and the executed
ledger, ``GET /_fake/executed`` (JSON list, newest last, the last 10,000 requests) and
``DELETE /_fake/executed`` (clears it, answers ``{"cleared": N}``).

Deterministic, so that tests can predict what it returns:

- each answer (each choice) has ``w`` words, one token each: ``w = min(max(cap, 1), 4096)``
  where ``cap`` is the request's ``max_completion_tokens`` / ``max_tokens`` /
  ``max_output_tokens`` (the first given; 16 when none is); ``finish_reason`` is
  ``length`` (Anthropic ``max_tokens``) when the cap was reached;
- prompt tokens = whitespace-separated words of every message's text (plus ``system``,
  ``prompt`` or ``input``) + 3 per message;
- chat and legacy completions generate ``best_of`` sequences (default ``n``) of ``w``
  words and return ``n`` choices; usage counts every generated sequence (as OpenAI
  bills best_of). Streams interleave the choices word by word (vLLM's order).
  ``n`` must be 1..128 and ``best_of`` n..128, else 400;
- a strict server by default: typed fields (``n``, ``best_of``, the caps, ``stream``) of
  the wrong JSON type are a 400, as the OpenAI API answers (no coercion). The body is
  read as FastAPI does by default (before 0.132): as JSON when the content type is
  absent, or ``application/json`` / ``application/*+json`` in any case and with any
  parameters; any other content type (``text/plain``…) is FastAPI's 422
  ``{"detail": [...]}``. Not a JSON object: 400.

Per-request knobs, as headers (so they pass through a proxy):

- ``x-fake-chunk-delay: S``: seconds between stream events (default: the server's
  ``--chunk-delay``);
- ``x-fake-status: N``: answer N with an error body in the dialect's shape;
- ``x-fake-no-usage: 1``: omit usage (Anthropic streams still carry usage objects, with
  input and output tokens 0, as before);
- ``x-fake-words: N``: force N words per choice;
- ``x-fake-behave: knob, knob=value, …``: a comma list of the behaviours below; an
  unknown or malformed knob is a 400, so a misspelt knob never silently tests nothing:

  ``finish-with-content``
      the last content chunk of each choice also carries ``finish_reason`` (vLLM,
      llama.cpp, TGI) instead of a separate finishing chunk.
  ``gzip``
      gzip every body whatever Accept-Encoding said: JSON with ``Content-Length``;
      SSE chunked, each event flushed (Z_SYNC_FLUSH) as it is sent.
  ``lenient``
      vLLM's pydantic lax mode: integers also from ``"4"``, ``" +4 "``, ``"1_000"``,
      ``"4.0"``, ``4.0``, ``true``; ``stream`` also from ``"true"``/``"off"``/… (any
      case) and 0/1. The body is read as JSON whatever the content type says.
  ``partial-usage``
      OpenAI streams: every chunk carries the cumulative usage (vLLM's
      continuous_usage_stats), whatever ``stream_options`` says. Anthropic streams:
      ``message_delta.usage`` also says ``input_tokens: 0`` (as SGLang sends).
  ``unterminated``
      the final SSE event (the usage chunk or last chunk, ``message_stop``,
      ``response.completed``) ends with one newline, not a blank line, and OpenAI
      streams send no ``[DONE]``.
  ``line-separators``
      every other word ends in U+2028, U+2029 or U+0085, written raw in the JSON
      (``ensure_ascii=False``), still one word each.
  ``slow-headers=S``
      hold the answer S seconds before anything is sent, polling for a client
      disconnect; a client that leaves is recorded as cancelled ``before`` and nothing
      is generated.
  ``reset-after=K``
      streams: after K events the body is never finished (uvicorn closes the
      connection without the terminating chunk). Tokens generated so far are recorded.
  ``own-ratelimit``
      send the upstream's own ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
      (9999 / 9998…), or ``anthropic-ratelimit-*`` on ``/v1/messages``.
  ``cap-field=F``
      read only field F (``max_tokens``, ``max_completion_tokens`` or
      ``max_output_tokens``) as the cap, ignore the others; 4096 words when F is absent.
  ``strict-fields``
      400 on any top-level field the endpoint does not know (pydantic extra=forbid),
      ``stream_options`` included.
  ``audio``
      answer ~600 kB of ``audio/mpeg`` bytes and no usage (the words are still
      "generated" and recorded).
  ``no-usage``
      as ``x-fake-no-usage: 1``.
  ``batch-prompts``
      legacy completions: a ``prompt`` list of strings is one prompt per item, each
      with its ``n`` choices (choice index = prompt * n + k), as OpenAI and vLLM do.

Every request to a model endpoint is recorded in the executed ledger (see
``ledger.Executed``): its ``x-request-id`` (or a generated id), path, status, sequences
and tokens actually generated (counted as generated, so a cut or abandoned stream shows
what was produced), prompt tokens, whether usage covering it all was sent, and whether
the client went away before or during the answer.

Every response echoes what the server saw in ``x-fake-saw-authorization`` (and its
SHA-256 in ``x-fake-saw-authorization-sha256``),
``x-fake-saw-api-key``, ``x-fake-saw-cookie``, ``x-fake-saw-content-type`` and
``x-fake-saw-body-sha256``, and sets a
cookie, so tests can prove what a proxy forwards.
"""

from guardproxy.fake_model.app import create_fake_app, run_fake_model
from guardproxy.fake_model.text import prompt_tokens

__all__ = ["create_fake_app", "prompt_tokens", "run_fake_model"]
