"""ROUGE-L equals rouge_score's, and the index makes the reference filter's decisions item for item."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from pipeline.text.minhash import MinHashIndex
from pipeline.text.rouge import NearDuplicateIndex, rouge_l, rouge_l_f1, tokenize

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
ALPHABET = st.sampled_from(list("abcxyz ABC 0123 .,!?-'\"éüß日本\t\n") + ["foo", "bar", "the ", "N/A"])
TEXT = st.lists(ALPHABET, max_size=30).map("".join)


@settings(max_examples=400, deadline=None)
@given(TEXT, TEXT)
def test_f1_equals_rouge_score(a, b):
    assert tokenize(a) == SCORER._tokenizer.tokenize(a)
    assert abs(rouge_l(a, b) - SCORER.score(a, b)["rougeL"].fmeasure) <= 1e-9
    # The same float, not just close: threshold decisions must agree.
    assert rouge_l(a, b) == SCORER.score(a, b)["rougeL"].fmeasure


def test_empty_token_lists_score_zero():
    assert rouge_l_f1([], ["a"]) == 0.0 == rouge_l("!!!", "a b")
    assert SCORER.score("!!!", "a b")["rougeL"].fmeasure == 0.0


def reference_filter(cands, seeds, threshold=0.7):
    kept, out = list(seeds), []
    for c in cands:
        ok = all(SCORER.score(c, k)["rougeL"].fmeasure <= threshold for k in kept)
        out.append(ok)
        if ok:
            kept.append(c)
    return out


def candidates(n, seed):
    rng = random.Random(seed)
    words = "write a short poem about the sea give three tips for sleep list five fruits explain why sky blue".split()
    base = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(n // 2)]
    out = []
    for _ in range(n):
        s = rng.choice(base).split()
        if rng.random() < 0.5 and len(s) > 3:
            s[rng.randrange(len(s))] = rng.choice(words)
        out.append(" ".join(s).capitalize() + rng.choice([".", "?", "!", ""]))
    return out


def test_greedy_decisions_identical_to_reference():
    for seed in range(3):
        cands = candidates(300, seed)
        seeds = candidates(20, seed + 100)
        idx = NearDuplicateIndex(0.7)
        for i, s in enumerate(seeds):
            idx.add(s, f"s{i}")
        got = [idx.check_and_add(c, str(i)).kept for i, c in enumerate(cands)]
        assert got == reference_filter(cands, seeds)
        assert 0 < sum(got) < len(got)


def test_nearest_is_recorded():
    idx = NearDuplicateIndex(0.7)
    idx.add("Write a poem about the sea.", "a")
    idx.add("List three fruits.", "b")
    d = idx.check_and_add("Write a poem about the ocean.", "c")
    assert not d.kept and d.nearest == "a" and abs(d.score - SCORER.score("Write a poem about the ocean.",
                                                                         "Write a poem about the sea.")["rougeL"].fmeasure) < 1e-12


def test_minhash_agrees_with_exact_mostly():
    cands = candidates(400, 7)
    exact, mh = NearDuplicateIndex(0.7), MinHashIndex(0.7)
    e = [exact.check_and_add(c, str(i)).kept for i, c in enumerate(cands)]
    m = [mh.check_and_add(c, str(i)).kept for i, c in enumerate(cands)]
    agree = sum(a == b for a, b in zip(e, m)) / len(e)
    assert agree > 0.8
