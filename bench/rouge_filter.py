"""ROUGE-L near-duplicate filter: seedtune's index against the originals' greedy loop with rouge_score.

One run, one seeded candidate list (>= 50,000 instructions with near-duplicates): prints the reference's and
seedtune's times at 2,000 and 5,000 candidates, the speed ratio, whether every keep/reject decision is
identical, seedtune's time at 20,000 and 50,000 with the growth exponent, and MinHash-LSH's agreement with
the exact mode.   python bench/rouge_filter.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rouge_score import rouge_scorer  # noqa: E402

from pipeline.text.minhash import MinHashIndex  # noqa: E402
from pipeline.text.rouge import NearDuplicateIndex  # noqa: E402

VERBS = ("write summarize explain list describe classify translate rewrite generate suggest compare identify "
         "create outline plan convert find give tell name predict recommend estimate draft edit").split()
OBJECTS = ("a poem|an email|a story|a recipe|a product review|a news headline|a tweet|a job posting|a cover letter|"
           "a joke|a riddle|a short essay|a travel plan|a workout routine|a shopping list|a study schedule|"
           "a speech|a letter of complaint|a dialogue|a movie plot|a song chorus|a business plan|a lesson plan|"
           "a customer reply|a bedtime story|a math word problem|a quiz question|a slogan|a menu|a limerick").split("|")
TOPICS = ("the ocean|climate change|a rainy day|friendship|a new phone|healthy eating|space travel|a lost dog|"
          "coffee|remote work|the first day of school|a haunted house|electric cars|gardening|a birthday party|"
          "ancient Rome|machine learning|a mountain hike|saving money|city traffic|a chess game|summer holidays|"
          "volcanoes|a job interview|learning French|a small bakery|the night sky|recycling|a soccer match").split("|")
MODS = ("in one sentence|for a child|in a formal tone|with three examples|in under 50 words|as a list|"
        "using simple words|with a twist ending|for a busy manager|step by step|in the style of a pirate|"
        "with a catchy title|for beginners|in a friendly tone|without using the letter e").split("|")


def candidates(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < 0.3:  # a near-duplicate of an earlier instruction
            words = rng.choice(out).split()
            for _ in range(rng.randint(1, 3)):
                op = rng.random()
                i = rng.randrange(len(words))
                if op < 0.4:
                    words[i] = rng.choice(VERBS + MODS[0].split())
                elif op < 0.7 and len(words) > 4:
                    del words[i]
                else:
                    words.insert(i, rng.choice(["please", "briefly", "now", "carefully", "the"]))
            out.append(" ".join(words))
        else:
            s = f"{rng.choice(VERBS).capitalize()} {rng.choice(OBJECTS)} about {rng.choice(TOPICS)}"
            if rng.random() < 0.7:
                s += f" {rng.choice(MODS)}"
            out.append(s + rng.choice([".", "?", "", "!"]))
    return out


def seeds() -> list[str]:
    path = ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"
    if not path.exists():
        path = ROOT / "data" / "seed_tasks.jsonl"
    return [json.loads(line)["instruction"] for line in path.read_text().splitlines() if line.strip()]


def reference(cands: list[str], pool: list[str], threshold: float = 0.7) -> list[bool]:
    """The originals' greedy filter, scored with rouge_score itself, in a plain loop."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept_tokens = [scorer._tokenizer.tokenize(s) for s in pool]
    out = []
    for c in cands:
        ct = scorer._tokenizer.tokenize(c)
        ok = all(rouge_scorer._score_lcs(ct, k).fmeasure <= threshold for k in kept_tokens)
        out.append(ok)
        if ok:
            kept_tokens.append(ct)
    return out


def seedtune(cands: list[str], pool: list[str], index_cls=NearDuplicateIndex) -> list[bool]:
    index = index_cls(0.7)
    for i, s in enumerate(pool):
        index.add(s, f"seed{i}")
    return [index.check_and_add(c, str(i)).kept for i, c in enumerate(cands)]


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="500/1,000 candidates for the reference, 5,000 at most")
    args = ap.parse_args()
    pool = seeds()
    cands = candidates(50_000, seed=1)
    print(f"candidates: {len(cands):,} (seeded, ~30% near-duplicates), seed pool: {len(pool)}")
    sizes = (500, 1000) if args.quick else (2000, 5000)
    for n in sizes:
        ref, t_ref = timed(reference, cands[:n], pool)
        got, t_st = timed(seedtune, cands[:n], pool)
        same = ref == got
        print(f"n={n:>6,}: reference {t_ref:8.2f} s | seedtune {t_st:7.4f} s | speed-up {t_ref / t_st:8.0f}x | "
              f"identical decisions: {same} ({sum(got):,} kept)")
        if not same:
            diff = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
            print(f"  first differing candidates: {diff[:10]}")
    times = {}
    for n in ((5000, 10000) if args.quick else (20_000, 50_000)):
        got, t = timed(seedtune, cands[:n], pool)
        times[n] = t
        print(f"n={n:>6,}: seedtune {t:7.2f} s ({sum(got):,} kept)")
    (a, ta), (b, tb) = sorted(times.items())
    print(f"growth exponent between {a:,} and {b:,}: {math.log(tb / ta) / math.log(b / a):.2f}")
    n = 5000 if args.quick else 20_000
    exact, t_e = timed(seedtune, cands[:n], pool)
    mh, t_m = timed(seedtune, cands[:n], pool, MinHashIndex)
    agree = sum(x == y for x, y in zip(exact, mh)) / n
    missed = sum(1 for x, y in zip(exact, mh) if not x and y)
    print(f"minhash vs exact at n={n:,}: agreement {agree:.4f}, near-duplicates missed {missed}, "
          f"wrongly rejected {sum(1 for x, y in zip(exact, mh) if x and not y)}; time {t_m:.2f} s vs {t_e:.2f} s")


if __name__ == "__main__":
    main()
