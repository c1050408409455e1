"""The request path of account linkage: record the request's evidence, read its cluster.

    enricher = linkage_enricher(policy, state)     # None when the policy has no linkage:
    await enricher.start()                          # app lifespan: background work begins
    await enricher.enrich(exchange)                 # per request, after identity
    exchange.notes["cluster"]                       # -> api.Cluster
    await enricher.aclose()                         # app lifespan: background work ends

Per request: the evidence of the account (its attributes), the client IP and the
headers is digested (``evidence.observe``) and recorded in ONE store call, which also
returns the cluster (one Redis round trip). Co-held hot values (``cohort``) are judged
before that call, in process (microseconds; a Jaccard product only when the account is
new on a hot value), and their pair evidence rides in the same store call: a naive
hydra's new account is in its cluster from its first request. The prompt (the last
user message, at most ``MAX_PROMPT_CHARS``) and the time go to the ``PairFinder``
through a bounded queue drained by a background task: prompt similarity and
co-activity never run on the request path. When the queue is full the item is dropped
and counted (``counters.dropped``; logged once), and the request goes on.

A store error never fails the request here: it is noted in
``exchange.notes["cluster_error"]`` and every rule that reads the cluster (``per:
cluster``, ``linkage:``) raises it inside the pipeline, where the rule's own
``on_store_error`` decides (deny: 503, allow: the rule passes), as for budgets.

The background task also rebuilds the clusters from live evidence every
``settings.rebuild_every`` seconds (0: never), so clusters split when evidence expires.

Merges (on ``record``, ``record_pairs`` and ids changed by ``rebuild``) go to
``merges``, a ``carry.MergeFeed`` whose own background task hands them to
``merges.on_merge`` (the app wires ``carry.usage_carry``: ``per: cluster`` usage
follows the cluster across merges), never on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guardproxy.errors import StoreError
from guardproxy.exchange import Exchange
from guardproxy.guards.per import CLUSTER, CLUSTER_ERROR
from guardproxy.linkage.api import Cluster, LinkageStore
from guardproxy.linkage.carry import MergeFeed
from guardproxy.linkage.cohort import CoHeld
from guardproxy.linkage.events import Event, log_event
from guardproxy.linkage.evidence import observe
from guardproxy.linkage.settings import LinkageSettings
from guardproxy.linkage.similarity import PairFinder
from guardproxy.policy.model import Policy
from guardproxy.state import State
from guardproxy.state.admission import RecordAsk

log = logging.getLogger("guardproxy.linkage")

MAX_PROMPT_CHARS = 4096   # what the pair finder sees of a prompt: its head
QUEUE_SIZE = 10_000       # prompts waiting for the pair finder
Item = tuple[str, str | None, float]   # account, prompt, time


@dataclass(slots=True)
class LinkageCounters:
    """For metrics (issue 11): monotonic counts since start."""

    recorded: int = 0       # requests whose evidence was recorded
    store_errors: int = 0   # requests whose record failed (the rules' on_store_error decides)
    queued: int = 0         # prompts handed to the pair finder
    dropped: int = 0        # prompts dropped because the queue was full
    pairs: int = 0          # pair evidence found off the request path
    pair_errors: int = 0    # record_pairs / rebuild calls the store refused
    rebuilds: int = 0


class LinkageEnricher:
    """``flow.Enricher`` for account linkage; see the module docstring.

    ``store`` is any ``api.LinkageStore``; ``pair_finder`` has ``add(account, prompt,
    now) -> list[PairEvidence]``; ``clock`` gives unix seconds (injectable for tests);
    ``merges`` is the feed the store's ``on_event`` reports to (``linkage_enricher``
    connects the two; a new, unconnected feed by default)."""

    def __init__(self, settings: LinkageSettings, store: LinkageStore,
                 pair_finder: PairFinder, *, queue_size: int = QUEUE_SIZE,
                 clock: Callable[[], float] = time.time,
                 merges: MergeFeed | None = None) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.settings = settings
        self.store = store
        self.pair_finder = pair_finder
        self.clock = clock
        self.counters = LinkageCounters()
        self.merges = merges if merges is not None else MergeFeed()
        cohort = CoHeld(settings)
        self.cohort = cohort if cohort.enabled else None
        self.queue: asyncio.Queue[Item] = asyncio.Queue(queue_size)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._warned_full = False
        self._failing = False   # the store is failing now: log the first error and recovery

    # -- the request path -------------------------------------------------
    async def enrich(self, exchange: Exchange) -> None:
        """Record the request's evidence and put its cluster in ``exchange.notes`` (one
        store call; the flow instead sends ``prepare``'s record in its admission batch)."""
        ask = self.prepare(exchange)
        if ask is None:
            return
        try:
            cluster = await self.store.record(ask.account, list(ask.evidence), ask.now,
                                              ask.pairs)
        except StoreError as exc:
            self.recorded(exchange, None, exc)
        else:
            self.recorded(exchange, cluster, None)

    def prepare(self, exchange: Exchange) -> RecordAsk | None:
        """What to record for this request (None: no account), read off the request
        without awaiting; the pair finder is offered its prompt here."""
        account = exchange.account
        if account is None:
            return None
        now = self.clock()
        evidence = observe(self.settings, account, exchange.client_ip, exchange.headers,
                           peer_trusted=exchange.peer_trusted)
        pairs = self.cohort.add(account.id, evidence, now) if self.cohort else []
        self._offer((account.id, prompt_text(exchange.json), now))
        return RecordAsk(self.store, account.id, tuple(evidence), now, tuple(pairs))

    def recorded(self, exchange: Exchange, cluster: Cluster | None,
                 error: StoreError | None) -> None:
        """The record's outcome: the cluster into ``exchange.notes``, or the error
        (rules on the cluster then follow their ``on_store_error``)."""
        if error is not None or cluster is None:
            self.counters.store_errors += 1
            exchange.notes.pop(CLUSTER, None)
            exchange.notes[CLUSTER_ERROR] = error or StoreError("linkage not recorded")
            if not self._failing:
                self._failing = True
                log.warning("linkage store unavailable, rules on the cluster follow their "
                            "on_store_error: %s", error)
            return
        self.counters.recorded += 1
        exchange.notes[CLUSTER] = cluster
        if self._failing:
            self._failing = False
            log.warning("linkage store available again")

    def _offer(self, item: Item) -> None:
        if self._closed:
            return
        self._ensure_started()
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.counters.dropped += 1
            if not self._warned_full:  # once: a full queue would otherwise flood the log
                self._warned_full = True
                log.warning("linkage queue full (%d): prompt evidence is being dropped "
                            "(counted in linkage dropped)", self.queue.maxsize)
            return
        self.counters.queued += 1

    # -- the background task ----------------------------------------------
    async def start(self) -> None:
        """Start the background work on the running loop (idempotent)."""
        self._ensure_started()

    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        # a task of another (closed) loop never runs again: start anew on this loop
        if self._tasks and all(not t.done() and t.get_loop() is loop for t in self._tasks):
            return
        for task in self._tasks:
            task.cancel()
        if any(t.get_loop() is not loop for t in self._tasks):
            # a queue waited on under another loop is bound to it: start with a new one
            self.queue = asyncio.Queue(self.queue.maxsize)
        self._tasks = [loop.create_task(self._drain()), loop.create_task(self.merges.run())]
        if self.settings.rebuild_every > 0:
            self._tasks.append(loop.create_task(self._rebuild_every()))

    async def _drain(self) -> None:
        while True:
            account, prompt, now = await self.queue.get()
            try:
                await self.process(account, prompt, now)
            except Exception:  # a bug must not stop the task: the next item is tried
                log.exception("linkage pair finder failed")
            finally:
                self.queue.task_done()
            # the finder runs on the loop: let requests in between items
            await asyncio.sleep(0)

    async def process(self, account: str, prompt: str | None, now: float) -> None:
        """One queued item: the pairs it completes go to the store."""
        pairs = self.pair_finder.add(account, prompt, now)
        if not pairs:
            return
        self.counters.pairs += len(pairs)
        try:
            await self.store.record_pairs(pairs, now)
        except StoreError as exc:
            self.counters.pair_errors += 1
            log.warning("linkage pair evidence lost (%d pairs): %s", len(pairs), exc)

    async def _rebuild_every(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rebuild_every)
            try:
                await self.rebuild(scheduled=True)
            except Exception:  # a bug must not stop the schedule
                log.exception("linkage rebuild failed")

    async def rebuild(self, *, scheduled: bool = False) -> None:
        """Recompute clusters from live evidence now. ``scheduled``: a store shared by
        replicas (Redis) skips it when another replica rebuilt less than half a period
        ago. The ids it changes go to ``merges`` (their usage follows)."""
        due = getattr(self.store, "rebuild_if_due", None) if scheduled else None
        before = await self.merges.before_rebuild(self.store)
        try:
            if due is not None:
                if not await due(self.clock()):
                    return
            else:
                await self.store.rebuild(self.clock())
        except StoreError as exc:
            self.counters.pair_errors += 1
            log.warning("linkage rebuild failed: %s", exc)
            return
        self.counters.rebuilds += 1
        await self.merges.after_rebuild(self.store, before)

    async def drained(self) -> None:
        """Wait until every queued prompt has been processed (tests, ``ingest``)."""
        if self.running:
            await self.queue.join()

    async def aclose(self) -> None:
        """Stop the background work; prompts still queued are dropped (not counted:
        nothing is lost that a live request needed). The store is the state's to close."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        loop = asyncio.get_running_loop()
        for task in tasks:
            task.cancel()
        for task in tasks:
            if task.get_loop() is loop:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)


# -- the prompt ------------------------------------------------------------
def prompt_text(body: dict[str, Any] | None, limit: int = MAX_PROMPT_CHARS) -> str | None:
    """The last user message's text (OpenAI chat and Responses, Anthropic messages,
    legacy completions), at most ``limit`` characters; None when there is none."""
    if body is None:
        return None
    text: str | None = None
    messages = body.get("messages")
    if isinstance(messages, list):
        text = _last_user(messages)
    if text is None and "input" in body:
        value = body["input"]
        text = _last_user(value) if isinstance(value, list) else _joined(value)
    if text is None and "prompt" in body:
        value = body["prompt"]
        text = _joined(value[-1] if isinstance(value, list) and value else value)
    return text[:limit] if text else None


def _last_user(items: list[Any]) -> str | None:
    for item in reversed(items):
        if isinstance(item, dict) and item.get("role", "user") == "user":
            found = _joined(item.get("content"))
            if found:
                return found
        elif isinstance(item, str) and item:
            return item
    return None


def _joined(value: Any, budget: int = MAX_PROMPT_CHARS) -> str | None:
    """The text parts of a content value (str, parts list, or {text: …}); never walks
    more than ``budget`` characters' worth or deeper than a content part."""
    if isinstance(value, str):
        return value
    parts: list[str] = []
    if isinstance(value, list):
        size = 0
        for part in value:
            if isinstance(part, str):
                piece = part
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                piece = part["text"]
            else:
                continue
            parts.append(piece)
            size += len(piece)
            if size >= budget:
                break
    elif isinstance(value, dict) and isinstance(value.get("text"), str):
        parts.append(value["text"])
    return "\n".join(parts) if parts else None


# -- wiring ----------------------------------------------------------------
def open_linkage_store(settings: LinkageSettings, state: State,
                       on_event: Event | None = log_event) -> LinkageStore:
    """``memory://``: the in-process graph; Redis: the graph shared by every replica.
    ``on_event(kind, fields)`` hears of links, merges and hot values."""
    if state.redis is None:
        from guardproxy.linkage.memory import MemoryLinkageStore

        return MemoryLinkageStore(settings, on_event=on_event)
    from guardproxy.linkage.redis import RedisLinkageStore

    return RedisLinkageStore(state.redis, state.key_prefix, settings, on_event=on_event)


def linkage_enricher(policy: Policy, state: State) -> LinkageEnricher | None:
    """The policy's enricher, kept in the state: a reload that leaves ``linkage:`` as
    it was gets the same one back (the same graph, queue and pair finder)."""
    settings = policy.linkage
    if settings is None:
        return None
    def open_() -> LinkageEnricher:
        merges = MergeFeed()   # hears the store's events: merges are carried
        return LinkageEnricher(settings, open_linkage_store(settings, state, merges),
                               PairFinder(settings), merges=merges)

    return state.extra(("linkage", settings), open_)
