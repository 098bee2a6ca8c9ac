"""MinHash dedup at scale: seedtune in one process, seedtune on Ray (2 workers), and the MinHash libraries users
pick (datasketch's MinHashLSH, rensa's RMinHashLSH, datatrove's four MinHash steps), on one seeded synthetic
corpus with planted pairs. The libraries are for the benchmark only (``pip install datasketch rensa datatrove
orjson``); a method whose library is missing prints "failed".

The corpus: instructions of 10-20 words drawn from a 100,000-word vocabulary; 10% are near-duplicates of an
earlier instruction (one or two words changed, added or dropped: ROUGE-L F1 > 0.7 with it) and 5% hard negatives
that MinHash cannot tell from one (the same words shuffled, or 40% of them replaced: ROUGE-L F1 <= 0.7, yet a
token-set Jaccard of 1 or about 0.4). A planted pair is counted by its truth, the exact ROUGE-L F1 with its source.

Every method hashes the same shingles (the set of each instruction's ROUGE tokens, pipeline.text.rouge.tokenize,
computed beforehand), with 256 permutations in 64 bands of 4 rows, and decides greedily in input order: a record
is a duplicate when it collides with a record kept before it. seedtune then verifies each candidate with the
exact ROUGE-L F1 (> 0.7); the libraries are used as their documentation shows, a collision being a duplicate
(datatrove: its clusters of colliding records, one kept from each; SHA-1 shingle hashes, as its xxhash path
fails with the current xxhash package).
Rows: ``stage`` is the dedup stage as a user runs it (read records.jsonl, decide, write records.jsonl and
rejected.jsonl; on Ray including starting Ray); ``index`` is the decisions alone on pre-tokenised text;
``exact`` rows run the stage's default mode instead (ROUGE-L for every pair that could exceed the threshold, no
MinHash), in one process and on Ray.
Records/s, peak RSS of the process (on Ray: of the seedtune process; its workers are other processes),
recall and precision on the planted duplicates. Each method runs in its own process.

    python bench/dedup_scale.py [--sizes 100000 1000000] [--skip seedtune-ray-stage,datasketch,...]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NUM_PERM, BANDS, THRESHOLD = 256, 64, 0.7
METHODS = ["seedtune-stage", "seedtune-ray-stage", "seedtune-index", "datasketch", "rensa", "datatrove",
           "seedtune-exact-stage", "seedtune-exact-ray-stage"]


def corpus(n: int, seed: int = 0) -> tuple[list[dict], dict[int, int]]:
    """Records, and planted record -> its source."""
    rng = random.Random(seed)
    vocab = [f"w{k}" for k in range(100_000)]
    recs, planted, bases = [], {}, []
    for i in range(n):
        r = rng.random()
        if bases and r < 0.15:
            src = rng.choice(bases)
            words = recs[src]["instruction"].split()
            if r < 0.10:  # near-duplicate: one or two edits
                for _ in range(rng.randint(1, 2)):
                    op = rng.random()
                    if op < 0.5:
                        words[rng.randrange(len(words))] = rng.choice(vocab)
                    elif op < 0.75:
                        words.insert(rng.randrange(len(words) + 1), rng.choice(vocab))
                    else:
                        del words[rng.randrange(len(words))]
            elif r < 0.125:  # hard negative: the same words in another order
                rng.shuffle(words)
            else:  # hard negative: 40% of the words replaced
                for k in rng.sample(range(len(words)), round(0.4 * len(words))):
                    words[k] = rng.choice(vocab)
            planted[i] = src
            text = " ".join(words)
        else:
            bases.append(i)
            text = " ".join(rng.choice(vocab) for _ in range(rng.randint(10, 20)))
        recs.append({"id": f"r{i}", "instruction": text, "instances": [{"input": "", "output": "ok"}]})
    return recs, planted


def truth(recs: list[dict], planted: dict[int, int]) -> set[int]:
    """The planted records that are near-duplicates of their source (ROUGE-L F1 > 0.7)."""
    from rapidfuzz.distance import LCSseq

    from pipeline.text.rouge import TokenCodes, f1_from_lcs, tokenize

    out = set()
    for i, src in planted.items():
        a, b = tokenize(recs[i]["instruction"]), tokenize(recs[src]["instruction"])
        coder = TokenCodes()
        ca, cb = coder.encode(a, assign=True)[0], coder.encode(b, assign=True)[0]
        if f1_from_lcs(int(LCSseq.similarity(ca, cb)), len(a), len(b)) > THRESHOLD:
            out.add(i)
    return out


def tokens(path: Path) -> list[list[str]]:
    from pipeline.text.rouge import tokenize

    with open(path, "rb") as f:
        return [tokenize(json.loads(line)["instruction"]) for line in f]


def run_stage(folder: Path, executor: str, mode: str = "minhash") -> set[int]:
    from pipeline.stages import dedup
    from pipeline.stages.context import StageContext, StageInput

    out = Path(tempfile.mkdtemp(dir=folder))
    ctx = StageContext(name="dedup", kind="dedup", seed=0, run_dir=folder, out_dir=out, scratch_dir=out,
                       options=dedup.Options(mode=mode, num_perm=NUM_PERM, bands=BANDS, executor=executor,
                                             ray={"workers": 2, "chunk_records": 20_000}),
                       inputs=[StageInput("generate", "generate", folder)], get_model=lambda n: None,
                       log=logging.getLogger("bench"), show_progress=False)
    dedup.run(ctx)
    ctx.close()
    with open(out / "rejected.jsonl", "rb") as f:
        return {int(json.loads(line)["record"]["id"][1:]) for line in f}


def run_index(token_lists: list[list[str]]) -> set[int]:
    from pipeline.text.minhash import decide

    # hashes each token set, verifies ROUGE-L on the token lists
    return {n for n, d in decide(token_lists, THRESHOLD, NUM_PERM, BANDS).items() if not d.kept}


def run_datasketch(token_lists: list[list[str]]) -> set[int]:
    from datasketch import MinHash, MinHashLSH

    lsh, dups = MinHashLSH(num_perm=NUM_PERM, params=(BANDS, NUM_PERM // BANDS)), set()
    hashes = MinHash.bulk([[t.encode() for t in set(s)] for s in token_lists], num_perm=NUM_PERM)
    for i, m in enumerate(hashes):
        if lsh.query(m):
            dups.add(i)
        else:
            lsh.insert(i, m)
    return dups


def run_rensa(token_lists: list[list[str]]) -> set[int]:
    from rensa import RMinHash, RMinHashLSH

    lsh, dups = RMinHashLSH(THRESHOLD, NUM_PERM, BANDS), set()
    for i, m in enumerate(RMinHash.from_token_sets([set(s) for s in token_lists], NUM_PERM, 42)):
        if lsh.query(m):
            dups.add(i)
        else:
            lsh.insert(i, m)
    return dups


def run_datatrove(folder: Path) -> set[int]:
    """datatrove's four MinHash steps (signatures, buckets, clusters, filter) in one local task each, on
    records.jsonl; words split on spaces, numbers kept (so its shingles are the ROUGE token sets)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Spaces(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    cfg = MinhashConfig(n_grams=1, num_buckets=BANDS, hashes_per_bucket=NUM_PERM // BANDS,
                        norm_config=TextNormConfig(norm_numbers=False), hash_config=HashConfig(hash_fc="sha1"))
    work = Path(tempfile.mkdtemp(dir=folder))

    def read():
        return JsonlReader(str(folder), glob_pattern="records.jsonl", text_key="instruction", id_key="id")

    steps = [[read(), MinhashDedupSignature(str(work / "sigs"), config=cfg, language=Spaces())],
             [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)],
             [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg)],
             [read(), MinhashDedupFilter(str(work / "remove")), JsonlWriter(str(work / "kept"), compression=None)]]
    for k, pipeline in enumerate(steps):
        tasks = BANDS if k == 1 else 1
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(work / f"logs{k}")).run()
    kept = set()
    for f in (work / "kept").glob("*.jsonl"):
        with open(f, "rb") as fh:
            kept.update(int(json.loads(line)["id"][1:]) for line in fh)
    n = sum(1 for _ in open(folder / "records.jsonl", "rb"))
    return set(range(n)) - kept


def child(method: str, folder: Path) -> None:
    """One method in this process: prints its seconds, decisions and peak RSS as JSON."""
    logging.basicConfig(level=logging.WARNING)
    gc.disable()  # as the dedup stage does: millions of live objects make each collector pass slow, for all
    if method.startswith("seedtune") and method.endswith("stage"):
        t = time.perf_counter()
        dups = run_stage(folder, "ray" if "ray" in method else "local", "exact" if "exact" in method else "minhash")
    elif method == "datatrove":
        t = time.perf_counter()
        dups = run_datatrove(folder)
    else:
        toks = tokens(folder / "records.jsonl")  # made beforehand, outside the timing
        fn = {"seedtune-index": run_index, "datasketch": run_datasketch, "rensa": run_rensa}[method]
        t = time.perf_counter()
        dups = fn(toks)
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "dups": sorted(dups), "rss_mb": rss}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--skip", default="", help="comma-separated methods to leave out")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], Path(a.child[1]))
    from pipeline.records import write_jsonl

    methods = [m for m in METHODS if m not in a.skip.split(",")]
    for n in a.sizes:
        recs, planted = corpus(n)
        dup_truth = truth(recs, planted)
        with tempfile.TemporaryDirectory() as tmp:
            write_jsonl(Path(tmp) / "records.jsonl", recs)
            del recs
            print(f"\n{n:,} records: {len(dup_truth):,} planted near-duplicates, "
                  f"{len(planted) - len(dup_truth):,} hard negatives")
            print(f"{'method':<26}{'seconds':>9}{'records/s':>11}{'peak RSS MB':>13}{'recall':>8}{'precision':>11}"
                  f"{'x datasketch':>14}")
            rows = {}
            for m in methods:
                r = subprocess.run([sys.executable, __file__, "--child", m, tmp], capture_output=True, text=True)
                if r.returncode:
                    print(f"{m:<26} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
                    continue
                res = json.loads(r.stdout.strip().splitlines()[-1])
                dups = set(res["dups"])
                hit = len(dups & dup_truth)
                rows[m] = (res["seconds"], res["rss_mb"], hit / max(1, len(dup_truth)), hit / max(1, len(dups)))
            base = rows.get("datasketch", (None,))[0]
            for m, (s, rss, rec, prec) in rows.items():
                ratio = f"{base / s:>13.2f}x" if base else ""
                print(f"{m:<26}{s:>9.1f}{n / s:>11,.0f}{rss:>13,.0f}{rec:>8.4f}{prec:>11.4f}{ratio}", flush=True)


if __name__ == "__main__":
    main()
