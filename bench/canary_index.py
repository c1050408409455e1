"""Account index benchmark: ``python -m bench.canary_index [--accounts 1000000]``.

Runs the real commands, each in a child process whose peak RSS is its own (``wait4``):

1. ``guardproxy canary index build --policy P --accounts ids.txt --out F`` over N account
   ids (a small policy accounts file plus a text file of the rest);
2. ``guardproxy canary detect leak.txt --policy P --index F --json`` on a leaked text
   marked for one of them, with ``--null-keys 0`` and with the default 1,000 null keys;
3. in process, as the admin API does: the index built in memory from the ids, then detect
   (one text, then a corpus of 20 documents from 4 accounts: one exhaustive scan each).

Prints one JSON object: seconds, peak RSS (MB), and whether the right account was named
at corrected p < 1e-6. Targets (issue 9): detect over 10^6 accounts <= 10 s, <= 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.corpus import prose
from guardproxy.canary.detect import AccountIndex, detect
from guardproxy.canary.keys import CanaryKeys
from guardproxy.canary.marker import Marker

SECRET = "bench-canary-index-secret-0123456789"
TARGET = "acct-424242"

POLICY = """version: 1
upstream: {url: 'http://127.0.0.1:9', dialect: openai}
accounts: {keys: accounts.yaml}
rules:
  - name: marks
    canary: {secret: %s}
"""


def run_measured(args: list[str]) -> dict[str, object]:
    """Run a guardproxy command: its wall time, its own peak RSS (``wait4`` reaps it)
    and its stdout."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen([sys.executable, "-m", "guardproxy", *args],
                                 stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if child.returncode:
            raise SystemExit(f"{' '.join(args[:3])} failed: {err.read().decode()}")
        return {"s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                "stdout": out.read().decode()}


def named(report: dict[str, object]) -> bool:
    accounts = report["accounts"]
    assert isinstance(accounts, list)
    return bool(accounts) and accounts[0]["account"] == TARGET \
        and accounts[0]["log10_p_bonferroni"] < -6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--words", type=int, default=10_000, help="words of leaked text")
    parser.add_argument("--density", type=float, default=0.045,
                        help="share of words that are lexicon sites")
    parser.add_argument("--skip-in-process", action="store_true")
    args = parser.parse_args()
    keys = CanaryKeys(SECRET)
    ids = [f"acct-{i}" for i in range(args.accounts)]
    if args.accounts <= int(TARGET.split("-")[1]):
        ids[-1] = TARGET
    results: dict[str, object] = {"accounts": len(ids), "leaked_words": args.words,
                                  "density": args.density}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "policy.yaml").write_text(POLICY % SECRET)
        (d / "accounts.yaml").write_text("accounts:\n  - id: alice\n  - id: bob\n")
        (d / "ids.txt").write_text("".join(a + "\n" for a in ids))
        leak = d / "leak.txt"
        leak.write_text(Marker(keys, keys.code(TARGET)).mark(
            prose(args.words, seed=11, site_rate=args.density)))
        index = d / "accounts.idx"
        build = run_measured(["canary", "index", "build", "--policy", str(d / "policy.yaml"),
                              "--accounts", str(d / "ids.txt"), "--out", str(index)])
        results["index_build"] = {k: build[k] for k in ("s", "peak_rss_mb")}
        results["index_mb"] = round(index.stat().st_size / 1e6, 1)
        for null_keys in (0, 1000):
            found = run_measured(["canary", "detect", str(leak), "--policy",
                                  str(d / "policy.yaml"), "--index", str(index), "--json",
                                  "--null-keys", str(null_keys)])
            report = json.loads(str(found["stdout"]))
            results[f"cli_detect_null_keys_{null_keys}"] = {
                "s": found["s"], "peak_rss_mb": found["peak_rss_mb"], "named": named(report),
                "positions": report["accounts"][0]["positions"],
                "log10_p_bonferroni": round(report["accounts"][0]["log10_p_bonferroni"], 1)}
    if not args.skip_in_process:
        text = Marker(keys, keys.code(TARGET)).mark(
            prose(args.words, seed=11, site_rate=args.density))
        start = time.perf_counter()
        memory = AccountIndex(keys, ids)
        built = time.perf_counter()
        verdict = detect(keys, [text], memory, null_keys=0)
        done = time.perf_counter()
        # a corpus of 20 documents of 2,000 words from 4 accounts: one scan per document
        sources = [TARGET, *ids[:3]]
        docs = [Marker(keys, keys.code(sources[i % 4])).mark(
            prose(2000, seed=100 + i, site_rate=args.density)) for i in range(20)]
        mixed_start = time.perf_counter()
        mixed = detect(keys, docs, memory, null_keys=0)
        mixed_done = time.perf_counter()
        results["in_process"] = {
            "index_s": round(built - start, 2), "detect_s": round(done - built, 2),
            "named": named(verdict.as_dict()),
            "mixed_20_docs_s": round(mixed_done - mixed_start, 2), "mixed_views": mixed.views,
            "mixed_named": sorted(a.account for a in mixed.accounts
                                  if a.log10_p_bonferroni < -6) == sorted(sources),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
