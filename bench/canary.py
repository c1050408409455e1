"""Output-canary benchmark on real kinds of text: ``python -m bench.canary [--quick]``.

Text: the kinds of ``bench/texts.py`` (stdlib documentation, package READMEs, assistant
answers, dialogue), every channel the policy recommends, 10^6 known accounts.

(a) words of a verbatim leak (whole responses, marked for one account) needed to name
    that account among 10^6 at p < 1e-6 (Bonferroni), in 5 of 5 trials
(b) the same after an attacker re-randomises 30% of the sites of every channel
(c) a trigram student trained on the marked text of one account: global and account
    p-values for words sampled from it
(d) false positives: unmarked text, wrong keys, text marked for unknown accounts
(e) detection time with 10^6 accounts (index built once, then one detection)
(f) streaming cost per SSE event with and without a canary, and the words changed
(g) a blind sample of marked sentences beside their originals, for a person to judge
    (written to ``--sample``)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from bench.canary_attacks import leak, mark, rerandomise, student
from bench.canary_sample import stream_cost, write_sample
from bench.texts import kinds
from guardproxy.canary.detect import AccountIndex, Verdict, detect
from guardproxy.canary.keys import CanaryKeys, random_keys

KEYS = CanaryKeys("bench-canary-secret-0123456789")
TARGET = "acct-424242"
KINDS = ("technical_docs", "assistant", "dialogue", "readmes")
SIZES = [500, 1000, 2000, 3000, 5000, 7500, 10000, 15000, 20000, 30000, 50000]


def accounts(n: int) -> list[str]:
    return sorted({f"acct-{i}" for i in range(n - 1)} | {TARGET})


def named(verdict: Verdict, account: str = TARGET, log10_alpha: float = -6) -> bool:
    top = verdict.accounts[0] if verdict.accounts else None
    return bool(top and top.account == account and top.log10_p_bonferroni < log10_alpha)


def words_needed(docs: list[str], index: AccountIndex, attack: float,
                 trials: int) -> dict[str, object]:
    total = sum(len(d.split()) for d in docs)
    rows = []
    for n in [s for s in SIZES if s <= total]:
        rng = random.Random(n)
        ok = 0
        for _ in range(trials):
            texts = leak(KEYS, docs, TARGET, n, rng)
            if attack:
                texts = [rerandomise(t, attack, rng) for t in texts]
            ok += named(detect(KEYS, texts, index, null_keys=0))
        rows.append({"words": n, "named": ok, "trials": trials})
        if ok == trials:
            return {"words": n, "rows": rows}
    return {"words": None, "rows": rows, "corpus_words": total}


def distillation(corpus: dict[str, list[str]], train_words: int,
                 index: AccountIndex) -> list[dict[str, object]]:
    docs = [d for kind in KINDS for d in corpus[kind]]
    marked = [mark(KEYS, d, TARGET) for d in docs]
    distinct = sum(len(d.split()) for d in marked)
    training = marked * max(1, -(-train_words // distinct))   # repeated up to the size
    out = []
    for n, text in student(training, [1000, 2000, 5000, 10000, 20000]).items():
        v = detect(KEYS, [text], index, null_keys=0)
        top = v.accounts[0] if v.accounts else None
        out.append({"sampled_words": n, "distinct_training_words": distinct,
                    "global_log10_p": round(v.global_score.log10_p, 1),
                    "top_account": top.account if top else None,
                    "account_log10_p_bonferroni":
                        round(top.log10_p_bonferroni, 1) if top else None})
    return out


def false_positives(corpus: dict[str, list[str]], docs_n: int, wrong_keys: int,
                    index: AccountIndex) -> dict[str, object]:
    pool = [d for kind in KINDS for d in corpus[kind] if len(d.split()) >= 200]
    rng = random.Random(5)
    picked = [rng.choice(pool) for _ in range(docs_n)]
    unmarked = [detect(KEYS, [d], index, null_keys=0) for d in picked]
    outsiders = [detect(KEYS, [mark(KEYS, d, f"outsider-{i}")], index, null_keys=0)
                 for i, d in enumerate(picked)]
    sample = [mark(KEYS, d, TARGET) for d in picked[:20]]
    scanned = [detect(k, sample, [], null_keys=0).global_score.log10_p
               for k in random_keys(wrong_keys, b"wrong")]
    globals_ = [v.global_score.log10_p for v in unmarked]

    def share(values: list[float], log10_alpha: float) -> float:
        return round(sum(v < log10_alpha for v in values) / len(values), 4)

    def any_named(verdicts: list[Verdict], log10_alpha: float) -> float:
        return round(sum(any(a.log10_p_bonferroni < log10_alpha for a in v.accounts)
                         for v in verdicts) / len(verdicts), 4)
    return {"unmarked_docs": docs_n, "unmarked_p<0.01": share(globals_, -2),
            "unmarked_p<0.05": share(globals_, -1.301), "wrong_keys": wrong_keys,
            "wrong_key_p<0.01": share(scanned, -2), "wrong_key_p<0.05": share(scanned, -1.301),
            "any_global_p<1e-6": share(globals_ + scanned, -6),
            "unmarked_account_named_p<0.01": any_named(unmarked, -2),
            "outsider_account_named_p<0.01": any_named(outsiders, -2),
            "outsider_account_named_p<1e-6": any_named(outsiders, -6)}


def decode_time(known: list[str], docs: list[str]) -> dict[str, float]:
    texts = leak(KEYS, docs, TARGET, 10_000, random.Random(11))
    t0 = time.perf_counter()
    index = AccountIndex(KEYS, known)
    t1 = time.perf_counter()
    detect(KEYS, texts, index, null_keys=0)
    t2 = time.perf_counter()
    return {"account_index_s": round(t1 - t0, 2), "detect_s": round(t2 - t1, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^4 accounts, fewer trials")
    parser.add_argument("--parts", default="a,b,c,d,e,f,g")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--sample", type=Path, default=Path("bench/canary_sample.md"))
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    known = accounts(10_000 if args.quick else 1_000_000)
    trials = 3 if args.quick else 5
    corpus = kinds()
    index = AccountIndex(KEYS, known)
    results: dict[str, object] = {"known_accounts": len(known)}

    def report(name: str, value: object) -> None:
        results[name] = value
        print(f"{name}: {json.dumps(value)}", flush=True)

    for kind in KINDS:
        if "a" in parts:
            report(f"a_verbatim_{kind}", words_needed(corpus[kind], index, 0.0, trials))
        if "b" in parts:
            report(f"b_rerandomised_30_{kind}", words_needed(corpus[kind], index, 0.3, trials))
    if "c" in parts:
        report("c_distillation", distillation(corpus, 1_000_000, index))
    if "d" in parts:
        report("d_false_positives", false_positives(corpus, 200 if args.quick else 1000,
                                                    200 if args.quick else 1000, index))
    if "e" in parts:
        report("e_decode_10k_words", decode_time(known, corpus["technical_docs"]))
    if "f" in parts:
        report("f_stream", stream_cost(KEYS, corpus, 3000))
    if "g" in parts:
        report("g_blind_sample", write_sample(KEYS, corpus, args.sample, 200))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
