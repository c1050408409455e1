"""Output-canary benchmark: ``python -m bench.canary [--quick]``.

(a) words of verbatim leaked text needed to name the right account among 10^6 at
    p < 1e-6 (Bonferroni over the 10^6 accounts)
(b) the same after an attacker re-randomises 30% of the substitutable words
(c) distillation: a trigram student trained on >= 1M words of one account's marked
    outputs; p-values of the global key and of the account vs words sampled from it
(d) false positives: unmarked text under our key, marked text under 1,000 wrong keys,
    and accounts named for unmarked text or for text marked for an unknown account
(e) decode time for 10,000 words with 10^6 known accounts (index built once + detect)
(f) streaming cost: CPU per SSE event with and without marks, and the share of words
    changed

The corpus is synthetic prose (bench/corpus.py) whose density of lexicon words is set
to what the lexicon covers in tests/data/prose.txt, real assistant-style prose.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

from bench.corpus import prose
from guardproxy.canary.detect import AccountIndex, Verdict, detect
from guardproxy.canary.keys import CanaryKeys, random_keys
from guardproxy.canary.lexicon import INDEX, PAIRS
from guardproxy.canary.marker import Marker
from guardproxy.canary.stage import CanaryStage

REPO = Path(__file__).resolve().parent.parent
KEYS = CanaryKeys("bench-canary-secret-0123456789")
TARGET = "acct-424242"


def site_density() -> float:
    marker = Marker(KEYS, KEYS.code(TARGET))
    marker.mark((REPO / "tests" / "data" / "prose.txt").read_text())
    return marker.stats.sites / max(1, marker.stats.words)


def accounts(n: int) -> list[str]:
    """n known accounts, the leaking one among them."""
    return sorted({f"acct-{i}" for i in range(n - 1)} | {TARGET})


def mark(text: str, account: str = TARGET, tripwire: bool = False) -> str:
    return Marker(KEYS, KEYS.code(account), tripwire=tripwire).mark(text)


def rerandomise(text: str, share: float, rng: random.Random) -> str:
    def swap(word: str) -> str:
        entry = INDEX.get(word.lower())
        if entry is None or rng.random() >= share:
            return word
        new = PAIRS[entry[0]][rng.randrange(2)]
        return new.capitalize() if word[0].isupper() else new
    return " ".join(swap(w) for w in text.split(" "))


def words_needed(known: AccountIndex, density: float, attack: float, trials: int,
                 sizes: list[int], tripwire: bool = False) -> dict[str, object]:
    rng = random.Random(7)
    rows = []
    for n in sizes:
        ok = 0
        for t in range(trials):
            text = mark(prose(n, seed=1000 * n + t, site_rate=density), tripwire=tripwire)
            if attack:
                text = rerandomise(text, attack, rng)
            v = detect(KEYS, [text], known, null_keys=0)
            top = v.accounts[0] if v.accounts else None
            ok += bool(top and top.account == TARGET and top.log10_p_bonferroni < -6)
        rows.append({"words": n, "named": ok, "trials": trials})
        if ok == trials:
            return {"words": n, "rows": rows}
    return {"words": None, "rows": rows}


def distillation(density: float, train_words: int, samples: list[int],
                 known: AccountIndex) -> list[dict[str, object]]:
    corpus = " ".join(mark(prose(5000, seed=90000 + i, site_rate=density))
                      for i in range(train_words // 5000))
    tokens = corpus.split()
    tri: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False):
        tri[(a, b)][c] += 1
    rng = random.Random(3)
    out = []
    for n in samples:
        a, b = tokens[0], tokens[1]
        sample = [a, b]
        while len(sample) < n:
            nxt = tri.get((a, b))
            if not nxt:
                a, b = tokens[(i := rng.randrange(len(tokens) - 2))], tokens[i + 1]
                continue
            words, weights = zip(*nxt.items(), strict=True)
            c = rng.choices(words, weights)[0]
            sample.append(c)
            a, b = b, c
        v = detect(KEYS, [" ".join(sample)], known, null_keys=0)
        top = v.accounts[0] if v.accounts else None
        out.append({"sampled_words": n, "global_log10_p": round(v.global_score.log10_p, 1),
                    "top_account": top.account if top else None,
                    "account_log10_p_bonferroni":
                        round(top.log10_p_bonferroni, 1) if top else None})
    return out


def false_positives(density: float, docs: int, wrong_keys: int,
                    index: AccountIndex) -> dict[str, object]:
    def named(verdict: Verdict, log10_alpha: float) -> bool:
        return any(a.log10_p_bonferroni < log10_alpha for a in verdict.accounts)

    unmarked = [detect(KEYS, [prose(1000, seed=50000 + i, site_rate=density)], index,
                       null_keys=0) for i in range(docs)]
    # text marked for accounts that are not among the known ones: the null "another
    # account received it", which a per-site count would fail
    outsiders = [detect(KEYS, [mark(prose(1000, seed=60000 + i, site_rate=density),
                                    f"outsider-{i}")], index, null_keys=0)
                 for i in range(docs)]
    marked = mark(prose(2000, seed=7, site_rate=density))
    scanned = [detect(k, [marked], [], null_keys=0).global_score.log10_p
               for k in random_keys(wrong_keys, b"wrong")]
    global_unmarked = [v.global_score.log10_p for v in unmarked]

    def share(values: list[float], log10_alpha: float) -> float:
        return sum(v < log10_alpha for v in values) / len(values)
    return {"unmarked_docs": docs, "unmarked_p<0.01": share(global_unmarked, -2),
            "unmarked_p<0.05": share(global_unmarked, -1.301), "wrong_keys": wrong_keys,
            "wrong_key_p<0.01": share(scanned, -2), "wrong_key_p<0.05": share(scanned, -1.301),
            "any_global_p<1e-6": share(global_unmarked + scanned, -6),
            "unmarked_account_named_p<0.01": sum(named(v, -2) for v in unmarked) / docs,
            "outsider_account_named_p<0.01": sum(named(v, -2) for v in outsiders) / docs,
            "outsider_account_named_p<1e-6": sum(named(v, -6) for v in outsiders) / docs}


def decode_time(known: list[str], density: float) -> dict[str, float]:
    text = mark(prose(10_000, seed=11, site_rate=density))
    t0 = time.perf_counter()
    index = AccountIndex(KEYS, known)
    t1 = time.perf_counter()
    detect(KEYS, [text], index, null_keys=0)
    t2 = time.perf_counter()
    return {"account_index_s": round(t1 - t0, 2), "detect_s": round(t2 - t1, 2),
            "total_s": round(t2 - t0, 2)}


def stream_cost(density: float, events: int) -> dict[str, float]:
    words = prose(events, seed=5, site_rate=density).split(" ")
    blocks = []
    for i, w in enumerate(words[:events]):
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": (" " if i else "") + w},
                              "finish_reason": None}]}
        blocks.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    blocks.append(b"data: [DONE]\n\n")
    headers = [(b"content-type", b"text/event-stream")]

    def run(with_canary: bool) -> float:
        stage = CanaryStage("openai", lambda: Marker(KEYS, KEYS.code(TARGET)))
        stage.start(200, headers)
        sink = []
        t0 = time.process_time()
        for i, block in enumerate(blocks):
            final = i == len(blocks) - 1
            sink.append(stage.chunk(block, final) if with_canary else block)
        return (time.process_time() - t0) / len(blocks) * 1e6

    run(True)
    plain, marked = min(run(False) for _ in range(3)), min(run(True) for _ in range(3))
    marker = Marker(KEYS, KEYS.code(TARGET))
    marker.mark((REPO / "tests" / "data" / "prose.txt").read_text())
    return {"us_per_event_without_canary": round(plain, 2),
            "us_per_event_with_canary": round(marked, 2),
            "us_added_per_event": round(marked - plain, 2),
            "words_changed_share_sample_prose": round(marker.stats.changed_share, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (minutes -> s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--parts", default="a,t,b,c,d,e,f",
                        help="which parts to run (t: verbatim with the tripwire on)")
    parser.add_argument("--density", type=float, default=None,
                        help="share of words that are lexicon sites (default: as measured "
                             "on tests/data/prose.txt)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    quick = args.quick
    known = accounts(10_000 if quick else 1_000_000)
    density = args.density if args.density is not None else site_density()
    print(f"lexicon: {len(PAIRS)} pairs; site density {density:.1%}; "
          f"known accounts {len(known):,}")
    results: dict[str, object] = {"pairs": len(PAIRS), "site_density": density,
                                  "known_accounts": len(known)}
    index = AccountIndex(KEYS, known)
    sizes = [250, 500, 750, 1000, 1500, 2000, 2500, 3000, 5000, 7500, 10000, 15000, 20000,
             30000, 40000]
    trials = 3 if quick else 5
    if "a" in parts:
        results["a_verbatim"] = words_needed(index, density, 0.0, trials, sizes)
        print("(a) verbatim:", results["a_verbatim"])
    if "t" in parts:
        results["a_verbatim_tripwire"] = words_needed(index, density, 0.0, trials, sizes,
                                                      tripwire=True)
        print("(a) verbatim, tripwire on:", results["a_verbatim_tripwire"])
    if "b" in parts:
        results["b_rerandomised_30"] = words_needed(index, density, 0.3, trials, sizes)
        print("(b) 30% re-randomised:", results["b_rerandomised_30"])
    if "c" in parts:
        results["c_distillation"] = distillation(density, 200_000 if quick else 1_000_000,
                                                 [1000, 2000, 5000, 10000], index)
        print("(c) distilled student:", results["c_distillation"])
    if "d" in parts:
        results["d_false_positives"] = false_positives(density, 200 if quick else 1000,
                                                       200 if quick else 1000, index)
        print("(d) false positives:", results["d_false_positives"])
    if "e" in parts:
        results["e_decode"] = decode_time(known, density)
        print("(e) decode 10,000 words:", results["e_decode"])
    if "f" in parts:
        results["f_stream"] = stream_cost(density, 5000)
        print("(f) streaming:", results["f_stream"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
