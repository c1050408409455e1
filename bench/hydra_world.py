"""The simulated world of ``bench/hydra.py``: who the accounts are and what they send.

Every knob is a field of ``World`` (one place, documented there); ``build(world)``
is deterministic per ``world.seed`` and returns the accounts with their ground truth
(which actor each belongs to) and every request, in time order.

Benign actors:
  * individuals at home: a residential /24 (a few strangers share some of them), an
    address that sometimes changes, one or two devices, a popular client;
  * individuals behind carrier-grade NAT: each session leaves through one of the
    carrier's public addresses, shared by many strangers;
  * offices: a declared ``org``, one corporate card and one office address for all;
  * universities: students on dynamic addresses in the university's /24s, classes that
    paste the same assignment text into their prompts during the same lab hour.
Hydras (one actor, many accounts), at four levels of care:
  * naive: one card, one data-centre address, one device id, one client, a fixed
    prompt template;
  * reusing: a few cards, devices and e-mail bases (dots and +tags on gmail) shared by
    small groups, one data-centre /24;
  * careful: a virtual card, random e-mail and own device per account, every request
    through a residential-proxy pool rented by every careful hydra (and whose exits
    are also strangers' homes), one client, a template with varied fillers;
  * very careful: as careful, plus a client fingerprint per account, a fresh device id
    per request and paraphrased templates.
Every hydra fires synchronised bursts around the clock (each account joins a burst at
random, so that it sends ``hydra_requests_per_day``) and each account spends its whole
per-account budget a day. Prompts are the last user message, as the proxy reads it:
a hydra's instruction template, then a new question each time.

The hydras are the same ~20 whatever ``accounts`` is: below a few thousand accounts
the world is mostly hydras and its benign crowd too thin to be realistic.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

DAY = 86_400.0
LEVELS = ("naive", "reusing", "careful", "very_careful")


@dataclass(frozen=True)
class World:
    """Every parameter of the simulated world. Shares are of the benign accounts;
    ranges are (low, high) inclusive; times are seconds."""

    accounts: int = 10_000          # all accounts, hydra members included
    seed: int = 1
    start: float = 1_764_547_200.0  # 2025-12-01T00:00Z: budgets count per UTC day
    days: int = 2                   # day 1: every hydra account is new; day 2: history
    # -- benign actors ------------------------------------------------------------
    office_share: float = 0.10      # accounts in offices (declared org, one card, one IP)
    office_size: tuple[int, int] = (3, 40)
    student_share: float = 0.15     # accounts of university students
    universities: int = 6
    course_size: tuple[int, int] = (20, 150)   # students per course (one per student)
    students_per_24: int = 60       # students per /24 of a university (dynamic addresses)
    lab_attendance: float = 0.5     # share of a course working in its daily lab hour
    cgnat_share: float = 0.25       # of individuals: behind carrier-grade NAT
    cgnat_carriers: int = 4
    cgnat_users_per_ip: int = 40    # subscribers behind one public address
    home_nets_per_user: float = 3.0  # residential /24s per home user (strangers meet)
    home_ip_change: float = 0.1     # daily chance a home address changes
    sessions_per_day: float = 2.0   # benign sessions a day (Poisson mean)
    requests_per_session: float = 4.0  # geometric mean
    session_gap: tuple[float, float] = (20.0, 240.0)  # between a session's requests
    benign_tokens: tuple[int, int] = (500, 8_000)     # per request
    clients: int = 40               # distinct (JA4, User-Agent) values, Zipf-popular
    client_zipf: float = 1.1
    phone_share: float = 0.7        # benign accounts that give a phone number
    # -- hydras -------------------------------------------------------------------
    hydras: int = 20                # levels in turn: naive, reusing, careful, very careful
    hydra_size: tuple[int, int] = (5, 200)   # accounts, log-uniform
    hydra_requests_per_day: int = 40         # per account: its budget in this many requests
    burst_every: float = 1_200.0    # a hydra's controller fires a burst this often (±20%)
    burst_spread: float = 20.0      # a burst's requests leave within this many seconds
    reusing_group: int = 4          # reusing: accounts per card, device, e-mail base
    proxy_exits: int = 3_000        # residential-proxy pool shared by careful hydras
    proxy_home_share: float = 0.05  # pool exits that are also a benign user's home
    template_words: tuple[int, int] = (30, 200)   # a hydra's instruction template
    question_words: tuple[int, int] = (8, 40)     # the varied question after it
    filler_slots: int = 6           # careful: template slots filled anew per request
    paraphrase_rate: float = 0.5    # very careful: template words rewritten per request
    budget: int = 4_000_000         # tokens a day per account (or per cluster)


@dataclass(frozen=True)
class Member:
    """An account and its ground truth."""

    id: str
    actor: str                    # accounts of one actor share this (org, hydra or own id)
    kind: str                     # individual | cgnat | office | student | hydra
    level: str | None = None      # a hydra's level of care
    org: str | None = None        # declared org (offices)
    attributes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Request:
    time: float
    account: str
    ip: str
    headers: dict[str, str]
    prompt: str
    tokens: int


@dataclass
class Population:
    world: World
    members: list[Member] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def by_id(self) -> dict[str, Member]:
        return {m.id: m for m in self.members}


def _poisson(rng: random.Random, mean: float) -> int:
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _geometric(rng: random.Random, mean: float) -> int:
    return 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - 1.0 / mean)) \
        if mean > 1 else 1


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))


class Words:
    """English-like text: a Zipf vocabulary (the common words first) and prompt openers."""

    OPENERS = ("can you explain", "write a python function that", "summarize the following",
               "what is the difference between", "how do i", "translate this into french:",
               "give me a list of", "fix the bug in this code:", "why does", "help me write",
               "rewrite this paragraph:", "what are the best", "explain like i am five:")

    def __init__(self, rng: random.Random) -> None:
        from bench.corpus import COMMON

        self.rng = rng
        vocab = list(dict.fromkeys(COMMON))
        vocab += [f"{a}{b}" for a in ("re", "in", "ex", "pro", "con", "de")
                  for b in vocab[150:260]]   # rarer derived words: a long tail
        self.vocab = vocab
        self.cum = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(vocab))))

    def words(self, n: int) -> list[str]:
        return self.rng.choices(self.vocab, cum_weights=self.cum, k=n)

    def text(self, n: int) -> str:
        return " ".join(self.words(n))

    def prompt(self) -> str:
        return f"{self.rng.choice(self.OPENERS)} {self.text(_log_uniform(self.rng, 4, 80))}"


class _Nets:
    """Distinct /24 prefixes by purpose (documentation-free but never loopback)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def net(self, first: tuple[int, int] = (11, 99)) -> str:
        while True:
            prefix = f"{self.rng.randint(*first)}.{self.rng.randrange(256)}." \
                     f"{self.rng.randrange(256)}"
            if prefix not in self.used:
                self.used.add(prefix)
                return prefix

    def host(self, prefix: str) -> str:
        return f"{prefix}.{self.rng.randint(1, 254)}"


class _Builder:
    def __init__(self, world: World) -> None:
        self.w = world
        self.rng = random.Random(world.seed)
        self.words = Words(self.rng)
        self.nets = _Nets(self.rng)
        self.pop = Population(world)
        ids = [f"acct-{i:05d}" for i in range(world.accounts)]
        self.rng.shuffle(ids)      # cluster ids (smallest member) say nothing of the truth
        self.ids: Iterator[str] = iter(ids)
        self.client_cum = list(itertools.accumulate(
            1.0 / (r + 1) ** world.client_zipf for r in range(world.clients)))
        self.client_list = [(hashlib.sha256(f"ja4-{c}".encode()).hexdigest()[:36],
                             f"client/{c}.{c % 7}") for c in range(world.clients)]
        self.home_nets = [self.nets.net() for _ in range(max(
            1, int(world.accounts * world.home_nets_per_user)))]
        self.homes: list[str] = []
        # strangers never share a phone number: drawn without replacement
        self.phones = iter(self.rng.sample(range(10**7), world.accounts))

    # -- helpers ---------------------------------------------------------------------
    def client(self) -> tuple[str, str]:
        return self.rng.choices(self.client_list, cum_weights=self.client_cum)[0]

    def token(self, tag: str) -> str:
        return hashlib.sha256(f"{tag}-{self.rng.random()}".encode()).hexdigest()[:16]

    def phone(self) -> list[tuple[str, str]]:
        return [("phone", f"+1555{next(self.phones):07d}")] \
            if self.rng.random() < self.w.phone_share else []

    def add(self, kind: str, actor: str | None = None, level: str | None = None,
            org: str | None = None, **attrs: str) -> Member:
        account = next(self.ids)
        extra = [] if kind == "hydra" else self.phone()
        member = Member(account, actor or account, kind, level, org,
                        tuple(sorted([*attrs.items(), *extra])))
        self.pop.members.append(member)
        return member

    def emit(self, t: float, account: str, ip: str, device: str | None,
             client: tuple[str, str], prompt: str, tokens: int) -> None:
        if not self.w.start <= t < self.w.start + self.w.days * DAY:
            return
        headers = {"user-agent": client[1], "x-ja4": client[0]}
        if device is not None:
            headers["x-device-id"] = device
        self.pop.requests.append(Request(round(t, 3), account, ip, headers, prompt, tokens))

    def sessions(self, day: int, hours: tuple[float, float]) -> list[float]:
        """Session start times of one benign user on ``day``, inside local ``hours``."""
        day0 = self.w.start + day * DAY
        return [day0 + self.rng.uniform(*hours) * 3600 % DAY
                for _ in range(_poisson(self.rng, self.w.sessions_per_day))]

    def session(self, t: float, account: str, ip: str, device: str,
                client: tuple[str, str], prompt: str | None = None) -> None:
        for i in range(_geometric(self.rng, self.w.requests_per_session)):
            text = prompt if prompt is not None and i == 0 else self.words.prompt()
            self.emit(t, account, ip, device, client, text,
                      self.rng.randint(*self.w.benign_tokens))
            t += self.rng.uniform(*self.w.session_gap)

    # -- benign ----------------------------------------------------------------------
    def individuals(self, n: int) -> None:
        behind_nat = int(n * self.w.cgnat_share)
        per_carrier = max(1, behind_nat // self.w.cgnat_carriers // self.w.cgnat_users_per_ip)
        carriers = []
        for _ in range(self.w.cgnat_carriers):
            nets = [self.nets.net() for _ in range(per_carrier // 32 + 1)]
            carriers.append([self.nets.host(self.rng.choice(nets)) for _ in range(per_carrier)])
        for i in range(n):
            nat = carriers[i % len(carriers)] if i < behind_nat else None
            m = self.add("cgnat" if nat else "individual", payment=self.token("card"),
                         email=f"{self.token('mail')}@mail{self.rng.randrange(9)}.example")
            devices = [(self.token("dev"), self.client())
                       for _ in range(self.rng.choice((1, 1, 2)))]
            home = self.nets.host(self.rng.choice(self.home_nets))
            if nat is None:
                self.homes.append(home)
            tz = self.rng.uniform(-8, 10)
            for day in range(self.w.days):
                if nat is None and self.rng.random() < self.w.home_ip_change:
                    home = self.nets.host(self.rng.choice(self.home_nets))
                for t in self.sessions(day, (8 - tz, 24 - tz)):
                    device, client = self.rng.choice(devices)
                    ip = self.rng.choice(nat) if nat else home
                    self.session(t, m.id, ip, device, client)

    def offices(self, n: int) -> None:
        while n > 0:
            size = min(n, _log_uniform(self.rng, *self.w.office_size))
            n -= size
            org, card, client = f"org-{self.token('org')[:8]}", self.token("card"), \
                self.client()
            ip, tz = self.nets.host(self.nets.net()), self.rng.uniform(-8, 10)
            for _ in range(size):
                m = self.add("office", actor=org, org=org, payment=card,
                             email=f"{self.token('mail')[:8]}@{org}.example")
                device = self.token("dev")
                for day in range(self.w.days):
                    for t in self.sessions(day, (9 - tz, 17 - tz)):
                        self.session(t, m.id, ip, device, client)

    def universities(self, n: int) -> None:
        per_uni = max(1, n // self.w.universities)
        while n > 0:
            size, n = min(n, per_uni), n - min(n, per_uni)
            nets = [self.nets.net() for _ in range(max(1, size // self.w.students_per_24))]
            tz, domain = self.rng.uniform(-8, 10), f"uni-{self.token('uni')[:6]}.edu"
            students = [(self.add("student", payment=self.token("card"),
                                  email=f"{self.token('s')[:8]}@{domain}"),
                         self.token("dev"), self.client()) for _ in range(size)]
            self.rng.shuffle(students)
            courses, i = [], 0
            while i < len(students):
                k = _log_uniform(self.rng, *self.w.course_size)
                courses.append(students[i:i + k])
                i += k
            for day in range(self.w.days):
                for m, device, client in students:
                    for t in self.sessions(day, (9 - tz, 23 - tz)):
                        self.session(t, m.id, self.nets.host(self.rng.choice(nets)),
                                     device, client)
                for course in courses:
                    lab = self.w.start + day * DAY + (self.rng.uniform(9, 17) - tz) * 3600 % DAY
                    assignment = self.words.text(self.rng.randint(40, 120))
                    for m, device, client in course:
                        if self.rng.random() < self.w.lab_attendance:
                            own = self.words.text(self.rng.randint(3, 10))
                            self.session(lab + self.rng.uniform(0, 3600), m.id,
                                         self.nets.host(self.rng.choice(nets)), device,
                                         client, f"{own} {assignment}")


    # -- hydras ----------------------------------------------------------------------
    def proxy_pool(self) -> list[str]:
        """Residential exits: strangers' /24s, some of them strangers' very homes."""
        exits = [self.nets.host(self.rng.choice(self.home_nets))
                 for _ in range(self.w.proxy_exits)]
        for i in range(min(len(self.homes), int(len(exits) * self.w.proxy_home_share))):
            exits[i] = self.rng.choice(self.homes)
        return exits

    def hydra(self, index: int, size: int, level: str, pool: list[str]) -> None:
        w, rng = self.w, self.rng
        actor = f"hydra-{index:02d}-{level}"
        groups = max(1, math.ceil(size / w.reusing_group))
        cards = [self.token("card") for _ in range(groups)]
        devices = [self.token("dev") for _ in range(groups)]
        bases = [self.token("gm")[:10] for _ in range(groups)]
        dc_net, tool = self.nets.net((140, 199)), self.client()
        dc_ip = self.nets.host(dc_net)
        template = self.words.words(rng.randint(*w.template_words))
        slots = set(rng.sample(range(len(template)), min(w.filler_slots, len(template))))
        members: list[tuple[str, str | None, tuple[str, str]]] = []
        # reusing: balanced groups, drawn independently for cards, devices and e-mails
        group = [rng.sample(range(size), size) for _ in range(3)]
        for i in range(size):
            if level == "naive":
                card, email, device = cards[0], f"{self.token('m')}@mail.example", devices[0]
            elif level == "reusing":
                base = bases[group[2][i] // w.reusing_group]
                dotted = "".join(c + ("." if rng.random() < 0.2 else "") for c in base[:-1])
                card = cards[group[0][i] // w.reusing_group]
                device = devices[group[1][i] // w.reusing_group]
                email = f"{dotted}{base[-1]}+{i}@gmail.com"
            else:
                card, email, device = self.token("vcard"), f"{self.token('m')}@mail.example", \
                    self.token("dev")
            m = self.add("hydra", actor=actor, level=level, payment=card, email=email)
            members.append((m.id, None if level == "very_careful" else device,
                            self.client() if level == "very_careful" else tool))
        share = min(1.0, w.hydra_requests_per_day * w.burst_every / DAY)
        cost = w.budget // w.hydra_requests_per_day
        t, end = w.start + rng.uniform(0, w.burst_every), w.start + w.days * DAY
        while t < end:
            for account, device, client in members:
                if rng.random() >= share:
                    continue
                ip = dc_ip if level == "naive" else self.nets.host(dc_net) \
                    if level == "reusing" else rng.choice(pool)
                words = list(template)
                if level == "careful":
                    words = [self.words.text(rng.randint(1, 3)) if j in slots else x
                             for j, x in enumerate(words)]
                elif level == "very_careful":
                    words = self.paraphrase(words)
                question = self.words.text(rng.randint(*w.question_words))
                self.emit(t + rng.uniform(0, w.burst_spread), account, ip,
                          device or self.token("dev"), client,
                          f"{' '.join(words)} {question}", cost)
            t += w.burst_every * rng.uniform(0.8, 1.2)

    def paraphrase(self, words: list[str]) -> list[str]:
        """Words rewritten at ``paraphrase_rate``, then its sentences (12-word runs)
        in a new order: what an LLM rewrite does to shingles."""
        rate = self.w.paraphrase_rate
        new = [self.words.words(1)[0] if self.rng.random() < rate else x for x in words]
        runs = [new[i:i + 12] for i in range(0, len(new), 12)]
        self.rng.shuffle(runs)
        return [x for run in runs for x in run]


def hydra_sizes(world: World) -> list[tuple[int, str]]:
    """(size, level) of each hydra: levels in turn, sizes log-uniform."""
    rng = random.Random(world.seed ^ 0x5EED)
    return [(_log_uniform(rng, *world.hydra_size), LEVELS[i % len(LEVELS)])
            for i in range(world.hydras)]


def build(world: World) -> Population:
    """The world's accounts and requests (sorted by time); deterministic per seed."""
    b = _Builder(world)
    sizes = hydra_sizes(world)
    benign = world.accounts - sum(size for size, _ in sizes)
    if benign < 0:
        raise ValueError(f"{world.accounts} accounts cannot hold the hydras' "
                         f"{world.accounts - benign}")
    offices, students = int(benign * world.office_share), int(benign * world.student_share)
    b.offices(offices)
    b.universities(students)
    b.individuals(benign - offices - students)
    pool = b.proxy_pool()
    for index, (size, level) in enumerate(sizes):
        b.hydra(index, size, level, pool)
    b.pop.requests.sort(key=lambda r: (r.time, r.account))
    return b.pop
