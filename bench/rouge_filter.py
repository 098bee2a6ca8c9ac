"""ROUGE-L near-duplicate filter: seedtune's index against the originals' greedy loop with rouge_score.

One run, one seeded candidate list (50,000 instructions from a template grammar, ~30% near-duplicates):
prints the reference's and seedtune's times at 2,000 and 5,000 candidates, the speed ratio, whether every
keep/reject decision is identical, seedtune's time at 20,000 and 50,000 with the growth exponent, and
MinHash-LSH's agreement with the exact mode, and the dedup *stage* end to end as a user runs it (its
``run(ctx)`` reading the seeds' and the generation stage's ``records.jsonl`` and writing ``records.jsonl`` and
``rejected.jsonl``) at 5,000 and 20,000 candidates, beside the index alone. The seed pool is ../shared/data/self_instruct_seed_tasks.jsonl
when present (else data/seed_tasks.jsonl).

The reference is stricter than the originals' own loop (which scores every pool item, Alpaca through a
process pool, Self-Instruct re-tokenising both sides each time): it tokenises the pool once and stops at the
first score > 0.7, so it is *faster* than the originals and the speed-up shown is a lower bound. The reference
takes about 1 minute at 2,000 and 5 minutes at 5,000 candidates on one core.

    python bench/rouge_filter.py [--quick] [--stage-only]
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

from pipeline.records import Instance, Task, write_jsonl  # noqa: E402
from pipeline.stages import dedup  # noqa: E402
from pipeline.stages.context import StageContext, StageInput  # noqa: E402
from pipeline.text.minhash import MinHashIndex  # noqa: E402
from pipeline.text.rouge import NearDuplicateIndex  # noqa: E402

# A template grammar for machine-generated instructions: several sentence shapes, slots with a few dozen to a
# few hundred fillers (composite topics: adjective + noun), and ~30% near-duplicates made by 1-3 word edits
# (substitution, deletion, insertion) of an earlier instruction, as a model repeating itself would produce.
VERBS = ("write summarize explain list describe classify translate rewrite generate suggest compare identify "
         "create outline plan convert find give tell name predict recommend estimate draft edit design compose "
         "analyze evaluate propose brainstorm paraphrase simplify critique rank sort extract correct improve "
         "prepare imagine invent argue justify define illustrate").split()
OBJECTS = ("poem|email|story|recipe|product review|news headline|tweet|job posting|cover letter|joke|riddle|"
           "short essay|travel plan|workout routine|shopping list|study schedule|speech|letter of complaint|"
           "dialogue|movie plot|song chorus|business plan|lesson plan|customer reply|bedtime story|"
           "math word problem|quiz question|slogan|menu|limerick|haiku|press release|blog post|product description|"
           "book summary|marketing plan|interview question|survey|set of instructions|checklist|timeline|"
           "character description|mission statement|thank-you note|apology letter|debate argument|FAQ|"
           "birthday message|podcast outline|newsletter|tagline|fable|sonnet|user manual|grocery budget|"
           "meal plan|packing list|resume summary|team agenda|safety guideline").split("|")
ADJS = ("haunted|tiny|ancient|modern|busy|quiet|floating|forgotten|electric|rural|crowded|frozen|hidden|"
        "abandoned|colorful|noisy|peaceful|futuristic|medieval|underwater|digital|local|famous|secret|"
        "sustainable|broken|friendly|mysterious|small|giant|online|seasonal|vintage|remote|urban|tropical").split("|")
NOUNS = ("ocean|forest|library|bakery|robot|garden|city|village|school|hospital|museum|train station|"
         "lighthouse|market|castle|island|river|mountain|desert|farm|factory|zoo|airport|restaurant|"
         "smartphone|bicycle|volcano|spaceship|bookstore|coffee shop|theater|stadium|park|bridge|kitchen|"
         "classroom|laboratory|newspaper|festival|election|startup|orchestra|chess club|soccer team|"
         "recycling program|vegetable garden|savings account|electric car|solar panel|water filter|"
         "weather app|video game|board game|language course|job interview|wedding|road trip|hiking trail|"
         "birthday party|science fair|charity run|food truck|art gallery|podcast|social network|"
         "operating system|database|neural network|spreadsheet|password manager|vaccine|rainforest|glacier|"
         "coral reef|honeybee|wolf pack|black hole|comet|tax return|mortgage|pension plan|dentist visit").split("|")
MODS = ("in one sentence|for a child|in a formal tone|with three examples|in under 50 words|as a list|"
        "using simple words|with a twist ending|for a busy manager|step by step|in the style of a pirate|"
        "with a catchy title|for beginners|in a friendly tone|without using the letter e|in five bullet points|"
        "for a teenager|in the second person|with a happy ending|using only questions|in the present tense|"
        "for a scientific audience|with a rhyming scheme|in exactly three paragraphs|with a surprising fact|"
        "in a sarcastic voice|for a radio ad|as a table|with pros and cons|in plain English").split("|")
AUDIENCES = ("students|parents|nurses|engineers|retirees|tourists|farmers|new employees|investors|gamers|"
             "teachers|doctors|artists|athletes|shop owners|volunteers|musicians|programmers|chefs|pilots").split("|")
ACTIONS = ("save money on|learn more about|get better at using|stop worrying about|teach kids about|"
           "write about|prepare for|talk to friends about|start a career in|reduce waste at").split("|")
THINGS = ("animals|sentences|movies|foods|countries|sports|emails|tweets|numbers|words|cities|products|songs|"
          "companies|plants|chemicals|books|reviews|jobs|diseases").split("|")
LABELS = ("positive or negative|true or false|formal or informal|fact or opinion|spam or not spam|"
          "mammal or reptile|urgent or not urgent|fiction or nonfiction|easy or hard|safe or unsafe").split("|")
FILLERS = ["please", "briefly", "now", "carefully", "the", "some", "quickly", "also", "really", "each"]


def _topic(rng: random.Random) -> str:
    return f"{rng.choice(['a', 'the'])} {rng.choice(ADJS)} {rng.choice(NOUNS)}"


def _fresh(rng: random.Random) -> str:
    shape = rng.randrange(8)
    verb, obj, mod = rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(MODS)
    if shape == 0:
        s = f"{verb.capitalize()} a {obj} about {_topic(rng)}"
    elif shape == 1:
        s = f"{verb.capitalize()} a {obj} for {rng.choice(AUDIENCES)} about {_topic(rng)}"
    elif shape == 2:
        s = f"Given a {obj} about {_topic(rng)}, {verb} it for {rng.choice(AUDIENCES)}"
    elif shape == 3:
        s = f"What are {rng.randint(2, 12)} ways {rng.choice(AUDIENCES)} can {rng.choice(ACTIONS)} {_topic(rng)}?"
        return s
    elif shape == 4:
        return f"Classify the following {rng.choice(THINGS)} as {rng.choice(LABELS)}."
    elif shape == 5:
        s = f"Explain the difference between {_topic(rng)} and {_topic(rng)}"
    elif shape == 6:
        s = f"How would you {verb} a {obj} that {rng.choice(AUDIENCES)} will enjoy about {_topic(rng)}"
    else:
        s = f"{verb.capitalize()} {rng.randint(2, 9)} {rng.choice(THINGS)} related to {_topic(rng)}"
    if rng.random() < 0.6:
        s += f" {mod}"
    return s + rng.choice([".", "?", "", "!"])


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
                    words[i] = rng.choice(VERBS + FILLERS)
                elif op < 0.7 and len(words) > 4:
                    del words[i]
                else:
                    words.insert(i, rng.choice(FILLERS))
            out.append(" ".join(words))
        else:
            out.append(_fresh(rng))
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


def timed(fn, *args, repeat: int = 1):
    """Result and the best wall time of ``repeat`` runs (the machine may be shared)."""
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return out, best


def minhash_agreement(cands: list[str], pool: list[str], exact: list[bool]) -> tuple[int, int, int]:
    """Per-candidate agreement against the same pool: MinHash queried against the pool the exact filter kept
    (so one miss does not change later pools). Returns (exact rejections, of them found by MinHash, wrong)."""
    mh = MinHashIndex(0.7)
    for i, s in enumerate(pool):
        mh.add(s, f"seed{i}")
    rejected = found = wrong = 0
    for i, (c, kept) in enumerate(zip(cands, exact)):
        hit = mh.query(c)[0] > 0.7
        if kept:
            wrong += hit
            mh.add(c, str(i))
        else:
            rejected += 1
            found += hit
    return rejected, found, wrong


def stage_files(folder: Path, cands: list[str], pool: list[str]) -> list[StageInput]:
    """A seeds stage and a generation stage on disk, as the runner leaves them for dedup."""
    write_jsonl(folder / "seeds" / "records.jsonl",
                [Task(id=f"seed{i}", instruction=s, instances=[Instance(output="An answer.")], source="seed")
                 for i, s in enumerate(pool)])
    write_jsonl(folder / "generate" / "records.jsonl",
                [Task(id=str(i), instruction=c, instances=[Instance(output="A generated answer of a few words.")],
                      source="generated") for i, c in enumerate(cands)])
    return [StageInput("seeds", "seeds", folder / "seeds"), StageInput("generate", "generate", folder / "generate")]


def stage(inputs: list[StageInput], folder: Path, n: int, options: dedup.Options) -> tuple[list[bool], float]:
    """The dedup stage's run(ctx) on files, and its time (from the context's creation to its close, as the runner
    calls it); the keep/drop decision of each candidate is read back from its output after the clock stops."""
    import logging
    import shutil

    out = folder / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    t = time.perf_counter()
    ctx = StageContext(name="dedup", kind="dedup", options=options, seed=0, run_dir=folder, out_dir=out,
                       scratch_dir=folder / "scratch", inputs=inputs, get_model=lambda name: None,
                       log=logging.getLogger("bench"), show_progress=False)
    dedup.run(ctx)
    ctx.close()
    elapsed = time.perf_counter() - t
    kept = {json.loads(line)["id"] for line in (out / "records.jsonl").read_text().splitlines()}
    return [str(i) in kept for i in range(n)], elapsed


def timed_stage(inputs: list[StageInput], folder: Path, n: int, options: dedup.Options, repeat: int = 1
                ) -> tuple[list[bool], float]:
    """The stage's decisions and its best time over ``repeat`` runs."""
    runs = [stage(inputs, folder, n, options) for _ in range(repeat)]
    return runs[0][0], min(t for _, t in runs)


def no_exact_duplicates(cands: list[str]) -> list[str]:
    """The stage drops exact duplicates (normalised) before ROUGE; keep the first of each for a like-for-like
    comparison with the reference, which has no such step."""
    seen: set[str] = set()
    out = []
    for c in cands:
        key = " ".join(c.lower().split())
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def bench_stage(cands: list[str], pool: list[str], sizes: tuple[int, ...], ref_at: int | None) -> None:
    import tempfile

    print("stage: dedup's run(ctx) on records.jsonl files (read, exact duplicates, ROUGE-L, write records and "
          "rejections), default options (kept records' nearest approximate), best of 5; index: the same "
          "candidates through NearDuplicateIndex alone")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            sub = no_exact_duplicates(cands)[:n]
            folder = Path(tmp) / str(n)
            inputs = stage_files(folder, sub, pool)
            got, t_stage = timed_stage(inputs, folder, n, dedup.Options(), repeat=5)
            idx, t_idx = timed(seedtune, sub, pool, repeat=5)
            _, t_exact = timed_stage(inputs, folder, n, dedup.Options(exact_nearest=True))
            line = (f"n={n:>6,}: stage {t_stage:7.3f} s | index alone {t_idx:7.3f} s | stage/index "
                    f"{t_stage / t_idx:5.2f} | exact_nearest: true {t_exact:6.2f} s | same decisions as the index: "
                    f"{got == idx}")
            if n == ref_at:
                ref, t_ref = timed(reference, sub, pool)
                line += f" | reference {t_ref:7.1f} s -> stage {t_ref / t_stage:6.0f}x, same decisions: {got == ref}"
            print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="500/1,000 candidates for the reference, 10,000 at most")
    ap.add_argument("--stage-only", action="store_true", help="only the stage beside the index (and the reference "
                    "at 5,000)")
    args = ap.parse_args()
    pool = seeds()
    cands = candidates(50_000, seed=1)
    if args.stage_only:
        bench_stage(cands, pool, (1000, 2000) if args.quick else (5000, 20_000), 1000 if args.quick else 5000)
        return
    vocab = {t for c in cands for t in c.lower().split()}
    print(f"candidates: {len(cands):,} (seeded template grammar, ~30% near-duplicates, {len(vocab):,} distinct "
          f"words), seed pool: {len(pool)} instructions; threshold 0.7")
    print("reference: the originals' greedy filter, rouge_score's tokenizer and _score_lcs in a plain loop "
          "(pool pre-tokenised, stops at the first score > 0.7); seedtune: NearDuplicateIndex.check_and_add "
          "(best of 3 runs)")
    sizes = (500, 1000) if args.quick else (2000, 5000)
    for n in sizes:
        ref, t_ref = timed(reference, cands[:n], pool)
        got, t_st = timed(seedtune, cands[:n], pool, repeat=3)
        same = ref == got
        print(f"n={n:>6,}: reference {t_ref:8.2f} s | seedtune {t_st:7.4f} s | speed-up {t_ref / t_st:8.0f}x | "
              f"identical decisions: {same} ({sum(got):,} kept)")
        if not same:
            diff = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
            print(f"  first differing candidates: {diff[:10]}")
    times = {}
    results = {}
    for n in ((5000, 10000) if args.quick else (20_000, 50_000)):
        results[n], times[n] = timed(seedtune, cands[:n], pool)
        print(f"n={n:>6,}: seedtune {times[n]:7.2f} s ({sum(results[n]):,} kept)")
    (a, ta), (b, tb) = sorted(times.items())
    print(f"growth exponent between {a:,} and {b:,}: {math.log(tb / ta) / math.log(b / a):.2f}")
    n = b
    exact = results[n]
    mh, t_m = timed(seedtune, cands[:n], pool, MinHashIndex)
    agree = sum(x == y for x, y in zip(exact, mh)) / n
    print(f"minhash (256 permutations, 64 bands) at n={n:,}: {t_m:.2f} s vs exact {times[n]:.2f} s; "
          f"end-to-end decisions agree on {agree:.2%} ({sum(mh):,} kept vs {sum(exact):,}; after a missed "
          f"near-duplicate the two pools differ)")
    rejected, found, wrong = minhash_agreement(cands[:n], pool, exact)
    print(f"minhash against the exact mode's pool: finds {found:,} of {rejected:,} near-duplicates "
          f"({found / max(rejected, 1):.2%} recall), {wrong} wrongly rejected (it cannot: every hit is verified)")
    bench_stage(cands, pool, (1000, 2000) if args.quick else (5000, 20_000), None)


if __name__ == "__main__":
    main()
