"""ROUGE-L equals rouge_score's, and the index makes the reference filter's decisions item for item."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer, scoring

from pipeline.text.minhash import MinHashIndex
from pipeline.text import rouge as rouge_mod
from pipeline.text.rouge import NearDuplicateIndex, f1_from_lcs, rouge_l, rouge_l_f1, tokenize

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
ALPHABET = st.sampled_from(list("abcxyz ABC 0123 .,!?-'\"éüßİK日本\t\n_") + ["foo", "bar", "the ", "N/A", "ǅ"])
TEXT = st.lists(ALPHABET, max_size=30).map("".join)
TOKENS = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "1"]), max_size=25)


@settings(max_examples=400, deadline=None)
@given(TEXT, TEXT)
def test_f1_equals_rouge_score(a, b):
    if a.isascii() and b.isascii():
        assert tokenize(a) == SCORER._tokenizer.tokenize(a)
        ref = SCORER.score(a, b)["rougeL"].fmeasure
    else:  # rouge_score drops non-ASCII letters; the F1 of the same token lists is still its arithmetic
        ref = rouge_scorer._score_lcs(tokenize(a), tokenize(b)).fmeasure
    assert abs(rouge_l(a, b) - ref) <= 1e-9
    # The same float, not just close: threshold decisions must agree.
    assert rouge_l(a, b) == ref == rouge_l(b, a)


@pytest.mark.parametrize("text,tokens", [
    ("东京是日本的首都。", ["东", "京", "是", "日", "本", "的", "首", "都"]),
    ("「テスト」を書く", ["テ", "ス", "ト", "を", "書", "く"]),
    ("Привет, МИР!", ["привет", "мир"]),
    ("café naïve_x 42", ["café", "naïve", "x", "42"]),
    ("हिन्दी भाषा", ["हिन्दी", "भाषा"]),  # vowel signs stay in their word
    ("Translate 你好 into English", ["translate", "你", "好", "into", "english"]),
])
def test_every_script_is_tokenized(text, tokens):
    assert tokenize(text) == tokens


def test_cjk_near_duplicates_score_and_different_tasks_do_not():
    """rouge_score gives every pair of Chinese texts 0.0, so no Chinese duplicate is ever caught."""
    assert SCORER.score("请把这句话翻译成英文。", "请把这句话翻译成英语。")["rougeL"].fmeasure == 0.0
    assert rouge_l("请把这句话翻译成英文。", "请把这句话翻译成英语。") > 0.8
    assert rouge_l("请把这句话翻译成英文。", "写一首关于秋天的诗") < 0.2


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=40))
def test_ascii_tokens_equal_rouge_scores(text):
    assert tokenize(text) == SCORER._tokenizer.tokenize(text)


def test_every_ascii_character_tokenizes_like_rouge_score():
    text = "".join(f"{chr(c)}x{chr(c)}" for c in range(128))
    assert tokenize(text) == SCORER._tokenizer.tokenize(text)


@settings(max_examples=300, deadline=None)
@given(TOKENS, TOKENS)
def test_f1_on_token_lists_including_empty(a, b):
    assert rouge_l_f1(a, b) == rouge_scorer._score_lcs(a, b).fmeasure


def test_empty_token_lists_score_zero():
    assert rouge_l_f1([], ["a"]) == 0.0 == rouge_l_f1(["a"], []) == rouge_l_f1([], []) == rouge_l("!!!", "a b")
    assert SCORER.score("!!!", "a b")["rougeL"].fmeasure == 0.0


def test_threshold_boundaries_match_rouge_scores_float():
    """Where 2·LCS/(la+lb) is exactly 0.7 the float can land on either side of 0.7: decide on the float."""
    for la in range(1, 80):
        for lb in range(1, 80):
            for lcs in range(1, min(la, lb) + 1):  # rouge_score: fmeasure(lcs/len(prediction), lcs/len(target))
                assert f1_from_lcs(lcs, la, lb) == scoring.fmeasure(lcs / lb, lcs / la)
    # an exact 0.7 that rouge_score's float puts above 0.7: such a pair is a duplicate for the originals
    over = [(lcs, la, lb) for la in range(1, 40) for lb in range(1, 40) for lcs in range(1, min(la, lb) + 1)
            if 20 * lcs == 7 * (la + lb) and f1_from_lcs(lcs, la, lb) > 0.7]
    assert over, "expected some exact-0.7 pairs whose float F1 exceeds 0.7"
    for lcs, la, lb in over[:5]:
        a = [f"t{i}" for i in range(la)]
        b = a[:lcs] + [f"u{i}" for i in range(lb - lcs)]
        assert rouge_scorer._score_lcs(a, b).fmeasure > 0.7
        idx = NearDuplicateIndex(0.7)
        idx.add(" ".join(b), "kept")
        assert not idx.check_and_add(" ".join(a), "cand").kept


def reference_filter(cands, seeds, threshold=0.7):
    """The originals' greedy filter with rouge_score (pool tokenised once, as Alpaca does)."""
    tok = SCORER._tokenizer.tokenize
    kept, out = [tok(s) for s in seeds], []
    for c in cands:
        ct = tok(c)
        ok = all(rouge_scorer._score_lcs(ct, k).fmeasure <= threshold for k in kept)
        out.append(ok)
        if ok:
            kept.append(ct)
    return out


def candidates(n, seed, vocab=None):
    rng = random.Random(seed)
    words = vocab or ("write a short poem about the sea give three tips for sleep list five fruits explain why sky "
                      "blue").split()
    base = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(max(1, n // 2))]
    out = []
    for _ in range(n):
        s = rng.choice(base).split()
        for _ in range(rng.randint(0, 3)):
            if s and rng.random() < 0.5:
                s[rng.randrange(len(s))] = rng.choice(words)
            elif s and rng.random() < 0.5:
                del s[rng.randrange(len(s))]
            else:
                s.insert(rng.randrange(len(s) + 1), rng.choice(words))
        out.append(" ".join(s).capitalize() + rng.choice([".", "?", "!", "", " ..."]))
    return out


@pytest.mark.parametrize("threshold", [0.7, 0.5, 0.9, 1.0, 0.0])
def test_greedy_decisions_identical_to_reference(threshold):
    for seed in range(2):
        cands = candidates(200, seed)
        seeds = candidates(20, seed + 100)
        idx = NearDuplicateIndex(threshold)
        for i, s in enumerate(seeds):
            idx.add(s, f"s{i}")
        decisions = [idx.check_and_add(c, str(i)) for i, c in enumerate(cands)]
        assert [d.kept for d in decisions] == reference_filter(cands, seeds, threshold)
        assert len(idx) == len(seeds) + sum(d.kept for d in decisions)
        if threshold == 0.7:
            assert 0 < sum(d.kept for d in decisions) < len(cands)


@pytest.mark.parametrize("threshold", [0.7, 0.5, 0.9, 0.05, 0.0, -0.5])
def test_the_count_filter_never_drops_an_item_that_could_exceed(threshold):
    """The least-count table against the bound it encodes, for item lengths far past its end: an item whose
    count could let it exceed the threshold is never below the table's entry, and below the end the table is
    that bound exactly."""
    import numpy as np

    idx = NearDuplicateIndex(threshold)
    t = threshold - rouge_mod.SLACK
    lb = np.arange(3 * rouge_mod.LONGEST)
    for la in range(1, 41):
        for read in range(1, la + 1):
            least = idx._least_counts(la, read)
            looked_up = least[np.minimum(lb, len(least) - 1)]
            for count in range(read + 1):
                could = 2 * np.minimum(count + la - read, lb) > t * (la + lb)
                assert (count >= looked_up[could]).all(), (la, read, count)
            exact = np.array([next((c for c in range(read + 1) if 2 * min(c + la - read, n) > t * (la + n)), read + 1)
                              for n in range(len(least) - 1)])
            assert (least[:-1] == exact).all(), (la, read)


@pytest.mark.parametrize("small,max_code", [(0, 0x10FFFF), (10_000, 0x10FFFF), (0, 0x110)])
def test_decisions_identical_on_a_large_pool(small, max_code, monkeypatch):
    """Both counting paths (numpy / plain Python), and codes past the character range (lists of ints);
    scores and nearest exact for every rejection."""
    monkeypatch.setattr(rouge_mod, "SMALL", small)
    monkeypatch.setattr(rouge_mod, "_MAX_CODE", max_code)
    vocab = [f"w{i}" for i in range(30)]
    cands = candidates(500, 5, vocab)
    idx = NearDuplicateIndex(0.7)
    got = [idx.check_and_add(c, str(i)) for i, c in enumerate(cands)]
    kept_tokens, texts = [], {}
    for i, (c, d) in enumerate(zip(cands, got)):
        ct = SCORER._tokenizer.tokenize(c)
        scores = [rouge_scorer._score_lcs(ct, k).fmeasure for _, k in kept_tokens]
        best = max(scores, default=0.0)
        assert d.kept == (best <= 0.7), i
        if not d.kept:
            assert d.score == best and d.nearest == kept_tokens[scores.index(best)][0]
        else:
            kept_tokens.append((str(i), ct))
            texts[str(i)] = c
    assert 50 < len(kept_tokens) < 450


def test_query_and_check_are_exact():
    rng = random.Random(3)
    pool = candidates(300, 9)
    idx = NearDuplicateIndex(0.7)
    for i, s in enumerate(pool):
        idx.add(s, str(i))
    for q in rng.sample(candidates(200, 11), 60) + ["", "!!!", "zzz qqq"]:
        scores = [SCORER.score(q, s)["rougeL"].fmeasure for s in pool]
        best = max(scores)
        score, key = idx.query(q)
        assert score == best and (key == str(scores.index(best)) if best > 0 else key is None)
        d = idx.check(q)
        assert d.kept == (best <= 0.7) and (d.kept or d.score == best)
    assert len(idx) == len(pool)


def test_exact_nearest_for_kept_records():
    pool = ["Write a poem about the sea.", "List three fruits that are red."]
    idx = NearDuplicateIndex(0.7)
    for i, s in enumerate(pool):
        idx.add(s, f"s{i}")
    d = idx.check_and_add("Write a story about a dragon.", "c", exact_nearest=True)
    assert d.kept and d.nearest == "s0" and d.score == SCORER.score("Write a story about a dragon.", pool[0])[
        "rougeL"].fmeasure


def test_nearest_is_recorded():
    idx = NearDuplicateIndex(0.7)
    idx.add("Write a poem about the sea.", "a")
    idx.add("List three fruits.", "b")
    d = idx.check_and_add("Write a poem about the ocean.", "c")
    ref = SCORER.score("Write a poem about the ocean.", "Write a poem about the sea.")["rougeL"].fmeasure
    assert not d.kept and d.nearest == "a" and d.score == ref


def test_minhash_never_rejects_what_exact_keeps_against_the_same_pool():
    cands = candidates(400, 7)
    exact, mh = NearDuplicateIndex(0.7), MinHashIndex(0.7)
    found = rejected = 0
    for i, c in enumerate(cands):
        d = exact.check_and_add(c, str(i))
        m = mh.query(c)[0] > 0.7
        if d.kept:
            assert not m
            mh.add(c, str(i))
        else:
            rejected += 1
            found += m
    assert rejected > 50 and found / rejected > 0.95
    assert len(mh) == len(exact)
    m = MinHashIndex(0.7)
    assert m.check_and_add("", "e").kept and m.check_and_add("Write a poem.", "a").kept
    assert not m.check_and_add("write a poem!", "b").kept
