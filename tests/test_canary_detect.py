"""Account attribution: exhaustive likelihood ranking, the persistent account index, the
population the Bonferroni correction covers, and honest p-values against both nulls."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from bench.corpus import prose
from guardproxy.app import create_app
from guardproxy.canary.detect import (
    AccountIndex,
    Evidence,
    account_bits,
    attribute,
    detect,
    group_documents,
    observe,
    position_votes,
    score_code,
)
from guardproxy.canary.index import IndexFileError, population_of, write_index
from guardproxy.canary.keys import TAG_BITS, CanaryKeys
from guardproxy.canary.marker import Marker
from guardproxy.cli import main
from tests.conftest import write_policy
from tests.servers import running_server

SECRET = "detect-test-secret-0123456789"
KEYS = CanaryKeys(SECRET)
SIX = ["alice", "bob", "carol", "dave", "erin", "frank"]


def mark(text: str, account: str) -> str:
    return Marker(KEYS, KEYS.code(account)).mark(text)


def test_low_tag_coverage_still_decodes() -> None:
    """20 of 20 covered positions agree and not one is a tag bit: the account is found
    (a tag-bit threshold found nothing here), with the exact binomial p."""
    code = KEYS.code("carol")
    rng = random.Random(1)
    positions = rng.sample(range(TAG_BITS, 256), 20)
    bits = [(j, code >> j & 1) for j in positions for _ in range(rng.randint(1, 3))]
    index = AccountIndex(KEYS, SIX)
    scores, views = attribute(index, Evidence.of(bits), [], len(SIX))
    top = scores[0]
    assert (top.account, top.hits, top.positions, views) == ("carol", 20, 20, 1)
    assert math.isclose(top.log10_p, -20 * math.log10(2))
    assert math.isclose(top.log10_p_bonferroni, top.log10_p + math.log10(6))
    assert all(s.hits < 20 for s in scores[1:])


def test_low_tag_coverage_decodes_real_text() -> None:
    """A short marked text covering at most 8 of the 32 tag bits (where a lookup of tag
    completions found nothing) still names its account first among six."""
    for seed in range(2000):
        text = mark(prose(500, seed=seed, site_rate=0.1), "dave")
        majority = position_votes(account_bits(KEYS, observe([text])[0]))
        tag_covered = sum(j < TAG_BITS for j in majority)
        if tag_covered <= 8 and len(majority) >= 20:
            break
    else:
        pytest.fail("no text with low tag coverage found")
    verdict = detect(KEYS, [text], SIX, null_keys=0)
    top = verdict.accounts[0]
    assert top.account == "dave" and top.hits == top.positions == len(majority)
    assert top.log10_p_bonferroni < -4


def reference_best(bits: list[tuple[int, int]], codes: dict[str, int]) -> tuple[int, int]:
    """(hits, vote margin) of the best account, by brute force over positions."""
    votes: dict[int, int] = {}
    for j, b in bits:
        votes[j] = votes.get(j, 0) + (1 if b else -1)
    majority = position_votes(bits)

    def margin(code: int) -> int:
        return sum(abs(v) if bool(code >> j & 1) == (v > 0) else -abs(v)
                   for j, v in votes.items() if v)
    return max((score_code(majority, c), margin(c)) for c in codes.values())


def test_exhaustive_scan_equals_the_best_possible() -> None:
    ids = [f"acct-{i}" for i in range(300)]
    index = AccountIndex(KEYS, ids)
    codes = dict(zip(ids, index.codes(), strict=True))
    rng = random.Random(7)
    for _ in range(200):
        truth = codes[rng.choice(ids)]
        noise = rng.random() * 0.5
        bits = [(j, (truth >> j & 1) ^ (rng.random() < noise))
                for j in rng.choices(range(256), k=rng.randint(1, 90))]
        ev = Evidence.of(bits)
        if not ev.positions:
            continue
        top = attribute(index, ev, [], len(ids))[0][0]
        assert (top.hits, top.margin) == reference_best(bits, codes)
        assert top.hits == score_code(position_votes(bits), codes[top.account])
        # nearest(): the k nearest and every tie with the k-th, nothing else
        dist = sorted(ev.positions - ev.hits(c) for c in codes.values())
        picked = index.nearest(ev.observed, ev.covered, 5)
        assert sorted(d for _, d in picked) == [d for d in dist if d <= dist[4]]


def test_index_file_round_trip(tmp_path: Path) -> None:
    ids = [f"acct-{i}" for i in range(500)] + ["zoë", "李", "acct-3"]   # one duplicate
    path = tmp_path / "accounts.idx"
    assert write_index(path, KEYS, ids, policy_accounts=["zoë"]) == 502
    mapped = AccountIndex.open(path, KEYS)
    memory = AccountIndex(KEYS, ids)
    assert mapped.count == memory.count == len(mapped) == 502
    assert list(mapped.ids) == list(memory.ids) and mapped.ids[-1] == "李"
    assert mapped.codes() == memory.codes()
    text = [mark(prose(2500, seed=3), "acct-123")]
    from_file = detect(KEYS, text, mapped, null_keys=0).as_dict()
    assert from_file == detect(KEYS, text, memory, null_keys=0).as_dict()
    assert from_file["accounts"][0]["account"] == "acct-123"
    mapped.close()


def test_index_built_with_another_secret_or_damaged_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "accounts.idx"
    write_index(path, KEYS, ["alice", "bob"])
    with pytest.raises(IndexFileError, match="another canary secret"):
        AccountIndex.open(path, CanaryKeys("some-other-secret-0123456789"))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(IndexFileError, match="truncated"):
        AccountIndex.open(path, KEYS)
    (tmp_path / "other").write_text("accounts: []\n")
    with pytest.raises(IndexFileError, match="not a canary account index"):
        AccountIndex.open(tmp_path / "other", KEYS)


def canary_policy(tmp_path: Path) -> Path:
    policy = write_policy(tmp_path, "admin: {token: adm1n}\nrules:\n  - name: marks\n"
                          f"    canary: {{secret: {SECRET}}}\n")
    # an account without a key hash: a trusted gateway can still name it
    accounts = tmp_path / "accounts.yaml"
    accounts.write_text(accounts.read_text() + "  - id: dave\n    tier: free\n")
    return policy


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["canary", *args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_index_build_and_detect(tmp_path: Path) -> None:
    policy = canary_policy(tmp_path)
    extra = tmp_path / "more.txt"
    extra.write_text("".join(f"user-{i}\n" for i in range(200)) + "\n  alice \n")
    leak = tmp_path / "leak.txt"
    leak.write_text(mark(prose(2500, seed=4), "user-77"))
    index = tmp_path / "accounts.idx"
    code, out, err = cli("index", "build", "--policy", str(policy), "--out", str(index),
                         "--accounts", str(extra))
    assert code == 0, err
    assert "204 accounts (4 from the policy)" in out
    code, out, err = cli("detect", str(leak), "--policy", str(policy), "--index", str(index),
                         "--json", "--null-keys", "0")
    assert code == 0, err
    report = json.loads(out)
    assert report["population"] == 204 and report["marked"]
    assert report["accounts"][0]["account"] == "user-77"
    assert report["accounts"][0]["log10_p_bonferroni"] < -6
    assert not err  # the index is current: no warning
    # the policy's accounts changed since: still usable, with a warning
    accounts = tmp_path / "accounts.yaml"
    accounts.write_text(accounts.read_text() + "  - id: erin\n")
    code, out, err = cli("detect", str(leak), "--policy", str(policy), "--index", str(index),
                         "--null-keys", "0")
    assert code == 0 and "user-77" in out and "warning" in err and "rebuild" in err
    # the default name, next to the policy
    code, out, err = cli("index", "build", "--policy", str(policy))
    assert code == 0 and (tmp_path / "policy.canary-index").is_file(), err


def test_cli_refuses_an_index_of_another_secret(tmp_path: Path) -> None:
    policy = canary_policy(tmp_path)
    index = tmp_path / "accounts.idx"
    write_index(index, CanaryKeys("some-other-secret-0123456789"), ["alice"])
    leak = tmp_path / "leak.txt"
    leak.write_text("some text")
    code, out, err = cli("detect", str(leak), "--policy", str(policy), "--index", str(index))
    assert code == 1 and not out
    assert err.count("\n") == 1 and "another canary secret" in err
    assert SECRET not in err


def test_population_is_honoured_identically_by_cli_and_admin(tmp_path: Path) -> None:
    policy = canary_policy(tmp_path)
    text = mark(prose(1500, seed=9), "dave")
    leak = tmp_path / "leak.txt"
    leak.write_text(text, encoding="utf-8")
    admin = {"authorization": "Bearer adm1n"}
    cli_reports, admin_reports = [], []
    with running_server(create_app(policy)) as url:
        for extra in ([], ["--population", "1000000"]):
            code, out, err = cli("detect", str(leak), "--policy", str(policy), "--json",
                                 "--null-keys", "0", *extra)
            assert code == 0, err
            cli_reports.append(json.loads(out))
            query = "&population=1000000" if extra else ""
            r = httpx.post(f"{url}/admin/canary/detect?null_keys=0{query}",
                           content=text.encode(), headers=admin, timeout=60)
            assert r.status_code == 200, r.text
            admin_reports.append(r.json())
        too_small = httpx.post(f"{url}/admin/canary/detect?population=3", content=b"x",
                               headers=admin, timeout=10)
    assert cli_reports == admin_reports
    default, given = cli_reports
    assert default["population"] == 4, "alice, bob, carol and dave (no key hash)"
    assert given["population"] == 1_000_000
    for report, population in ((default, 4), (given, 1_000_000)):
        top = report["accounts"][0]
        assert top["account"] == "dave"
        assert top["bonferroni_tests"] == population
        assert math.isclose(top["log10_p_bonferroni"],
                            min(0.0, top["log10_p"] + math.log10(population)))
    assert too_small.status_code == 400 and "population" in too_small.json()["error"]
    code, _, err = cli("detect", str(leak), "--policy", str(policy), "--population", "3")
    assert code == 1 and "population" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="at least"):
        population_of(4, 3)


def test_a_mixed_corpus_names_each_contributor() -> None:
    known = [f"acct-{i}" for i in range(2000)]
    sources = ["acct-5", "acct-900", "acct-1500"]
    docs = [mark(prose(2000, seed=40 + i), sources[i % 3]) for i in range(6)]
    verdict = detect(KEYS, docs, known, null_keys=0)
    named = [a for a in verdict.accounts if a.log10_p_bonferroni < -6]
    assert {a.account for a in named} == set(sources)
    assert verdict.mixed and verdict.views > 1
    for a in named:  # each found in its own documents, not in another's
        assert a.documents and {sources[d % 3] for d in a.documents} == {a.account}


def test_many_short_answers_from_several_accounts_are_told_apart() -> None:
    """60 answers of 200 words from three accounts: no answer names its account alone,
    and the whole corpus names at most one; grouping the answers by source names all
    three, each from a group of (almost only) its own answers."""
    known = [f"acct-{i}" for i in range(2000)]
    sources = ["acct-5", "acct-900", "acct-1500"]
    docs = [mark(prose(200, seed=400 + i), sources[i % 3]) for i in range(60)]
    verdict = detect(KEYS, docs, known, null_keys=0)
    named = [a for a in verdict.accounts if a.log10_p_bonferroni < -6]
    assert {a.account for a in named} == set(sources)
    for a in named:
        assert a.documents, "found in a group, not in the whole corpus"
        own = sum(sources[d % 3] == a.account for d in a.documents)
        assert own >= 0.9 * len(a.documents) and own >= 15
    whole, _ = attribute(AccountIndex(KEYS, known),
                         Evidence.of(b for o in observe(docs) for b in account_bits(KEYS, o)),
                         [], len(known))
    assert sum(a.log10_p_bonferroni < -6 for a in whole) <= 1


ALPHA = 0.05
TRIALS = 400


def false_namings(make_corpus: object, trials: int, known: list[str]) -> int:
    index = AccountIndex(KEYS, known)
    rng = random.Random(11)
    named = 0
    for t in range(trials):
        # one to six documents: corpora of several are also split into groups
        sizes = [rng.randint(80, 500) for _ in range(rng.randint(1, 6))]
        corpus = make_corpus(t, sizes)  # type: ignore[operator]
        verdict = detect(KEYS, corpus, index, null_keys=0)
        named += any(a.log10_p_bonferroni < math.log10(ALPHA) for a in verdict.accounts)
    return named


def test_no_account_is_named_for_unmarked_text_beyond_alpha() -> None:
    """Without the Bonferroni count over 50 accounts, almost every trial would name one."""
    named = false_namings(
        lambda t, sizes: [prose(n, seed=70_000 + 10 * t + i, site_rate=0.1)
                          for i, n in enumerate(sizes)], TRIALS, [f"k-{i}" for i in range(50)])
    assert named <= ALPHA * TRIALS


def test_no_account_is_named_for_an_outsiders_text_beyond_alpha() -> None:
    """Text marked for an account outside the known ones: the null 'another account
    received it', under which counting sites instead of positions would fail."""
    named = false_namings(
        lambda t, sizes: [mark(prose(n, seed=80_000 + 10 * t + i, site_rate=0.1),
                               f"outsider-{t}-{i % 2}") for i, n in enumerate(sizes)],
        TRIALS, [f"k-{i}" for i in range(50)])
    assert named <= ALPHA * TRIALS


def test_views_and_population_are_both_corrected_for() -> None:
    """Simulated corpora of one to six documents, unmarked or from two outsiders, many
    trials (no scanner): naming stays within alpha. Leaving out either the population or
    the views from the correction takes it well past alpha."""
    index = AccountIndex(KEYS, [f"k-{i}" for i in range(50)])
    rng = random.Random(5)
    trials, named = 1000, 0
    for t in range(trials):
        outsiders = [KEYS.code(f"out-{t}-{j}") for j in range(2)]
        docs = []
        for i in range(rng.randint(1, 6)):
            positions = rng.choices(range(256), k=rng.randint(5, 60))
            docs.append([(j, outsiders[i % 2] >> j & 1 if t % 2 else rng.randrange(2))
                         for j in positions])
        whole = Evidence.of(b for d in docs for b in d)
        groups = group_documents(docs) if len(docs) > 1 else []
        scores, views = attribute(index, whole, groups, 50)
        assert all(a.tests == 50 * a.views for a in scores)
        assert views == 1 or {a.views for a in scores if a.documents is None} <= {2}
        named += any(a.log10_p_bonferroni < math.log10(ALPHA) for a in scores)
    assert named <= ALPHA * trials
