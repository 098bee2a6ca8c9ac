"""ROUGE-L exactly as ``rouge_score`` computes it, and a fast greedy near-duplicate index.

``tokenize`` and ``rouge_l_f1`` reproduce ``RougeScorer(["rougeL"], use_stemmer=False)``: lowercase, every
character outside [a-z0-9] becomes a space, split; precision = LCS/|prediction|, recall = LCS/|target|,
F1 = 2·p·r/(p+r), evaluated with the same floating-point operations so that a threshold decision is the
same bit for bit (F1 is symmetric in its arguments, also in floating point: 2·p is exact). As in
Self-Instruct/Alpaca, the candidate is the target and the kept instruction the prediction.

:class:`NearDuplicateIndex` makes the originals' greedy decisions (reject a candidate whose F1 with any kept
instruction exceeds the threshold; a kept candidate joins the pool at once) with rapidfuzz's C++ LCS,
scoring only the pairs whose token overlap could exceed the threshold (see the class).
"""

from __future__ import annotations

import functools
import math
import re
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Indel, LCSseq

SMALL = 48  # probed postings up to this total size are counted in plain Python
FEW = 6  # up to this many items are scored one by one (cheaper than a batched call)
SLACK = 1e-6  # every bound is loosened by this much, far above floating-point error
LONGEST = 1024  # item lengths beyond this share one count-filter entry
_UNSEEN = " "  # the LCS code of a token no kept item has (it matches nothing in the pool)
_MAX_CODE = 0x10FFFF


# ASCII text: one byte translation lowercases A-Z and turns every byte outside [a-z0-9] into a space, the same
# tokens as the regular expression (five times faster).
_ASCII_TOKENS = bytes(c + 32 if 65 <= c <= 90 else c if 48 <= c <= 57 or 97 <= c <= 122 else 32 for c in range(256))


def _ranges(codepoints: list[int]) -> str:
    """A regular-expression class body for the code points, as ranges."""
    out, start, prev = [], None, None
    for c in codepoints:
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            out.append((start, prev))
            start = prev = c
    if start is not None:
        out.append((start, prev))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in out)


# Scripts written without spaces between words: each character is a token (character-level ROUGE-L, the
# usual practice for Chinese and Japanese): CJK radicals to Yi, compatibility ideographs, halfwidth kana, CJK
# extension B and later (not the CJK punctuation), Thai, Lao, Myanmar and Khmer.
_PER_CHARACTER = ("\u2e80-\u2fdf\u3005-\u3007\u3021-\u3029\u3031-\u3035\u3038-\u303c\u3040-\ua4cf"
                  "\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff")


@functools.cache
def _unicode_token_re() -> re.Pattern:
    """Words of letters, digits and combining marks in any script (marks belong to their word: Devanagari's
    vowel signs are not word characters to ``re``), or one character of a script without spaces."""
    import unicodedata

    marks = _ranges([c for c in range(0x300, 0x10000) if unicodedata.category(chr(c)).startswith("M")])
    return re.compile(f"[{_PER_CHARACTER}]|(?:[^\\W_{_PER_CHARACTER}]|[{marks}])+")


def tokenize(text: str) -> list[str]:
    """rouge_score's default tokenizer without stemming, extended to every script.

    rouge_score lowercases, replaces runs of characters outside [a-z0-9] by a space, splits on whitespace and
    keeps the tokens matching ``^[a-z0-9]+$``; after the substitution only [a-z0-9] and spaces remain, so a
    plain ``split()`` yields exactly those tokens. For ASCII text these are the tokens. rouge_score drops every
    other letter, so Chinese or Russian text would have no tokens and score 0 against anything; here a word in
    any script is a token (lowercased), and each character of a script written without spaces is one.
    """
    if text.isascii():
        return text.encode().translate(_ASCII_TOKENS).decode().split()
    return _unicode_token_re().findall(text.lower())  # the pattern is built on the first non-ASCII text


def lcs_length(a: list[str], b: list[str]) -> int:
    return int(LCSseq.similarity(a, b)) if a and b else 0


def f1_from_lcs(lcs: int, target_len: int, prediction_len: int) -> float:
    """rouge_score's F1 (``_score_lcs`` + ``scoring.fmeasure``) with the same floating-point operations."""
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l_f1(a: list[str], b: list[str]) -> float:
    """``RougeScorer(["rougeL"]).score(target, prediction)["rougeL"].fmeasure`` on token lists (a = target)."""
    return f1_from_lcs(lcs_length(a, b), len(a), len(b))


def rouge_l(a: str, b: str) -> float:
    return rouge_l_f1(tokenize(a), tokenize(b))


@dataclass
class Decision:
    kept: bool
    score: float  # best ROUGE-L F1 against the kept pool (0.0 when nothing is shared)
    nearest: str | None  # key of that kept item


def _concat(lists: list[array]) -> np.ndarray:
    """The int32 arrays one after another, as one read-only numpy array (one copy, no buffer left exported)."""
    return np.frombuffer(b"".join(lists), dtype=np.int32)


Code = str | list[int]  # a token list as rapidfuzz compares it: one character (or int) per token


class TokenCodes:
    """Maps tokens to single characters so that rapidfuzz's bit-parallel C++ LCS compares token lists.

    Codes start at U+0100 and skip the surrogates; past U+10FFFF (a million distinct tokens) a token's code is a
    plain int and a text holding one is encoded as a list of ints — rapidfuzz compares a character and an int
    by value, so both forms mix.
    """

    def __init__(self) -> None:
        self.vocab: dict[str, str | int] = {}

    def _new(self, token: str) -> str | int:
        code = len(self.vocab) + 0x100
        if code >= 0xD800:  # skip the surrogate range
            code += 0x800
        c = self.vocab[token] = chr(code) if code <= _MAX_CODE else code
        return c

    def encode(self, tokens: list[str], assign: bool) -> tuple[Code, list[str | int]]:
        """The code of a token list and one code per token. Without ``assign``, a token never assigned gets
        ``_UNSEEN`` (which matches no assigned code)."""
        vocab = self.vocab
        if assign:
            chars = [vocab.get(t) or self._new(t) for t in tokens]
        else:
            chars = [vocab.get(t, _UNSEEN) for t in tokens]
        try:
            return "".join(chars), chars  # type: ignore[arg-type]
        except TypeError:  # an int code: encode as a list of ints
            return [c if isinstance(c, int) else ord(c) for c in chars], chars


class NearDuplicateIndex:
    """Greedy ROUGE-L near-duplicate index with the originals' decisions, item for item.

    Tokens are mapped to single characters (:class:`TokenCodes`) so that rapidfuzz's C++ LCS compares them.
    An inverted index maps each token *occurrence* ("the" #1, "the" #2, ...) to the kept items holding it, so
    the number of lists an item appears in is its multiset overlap with the candidate — an upper bound of the
    LCS. F1 > t needs LCS >= k = ⌊t·|a|/(2−t)⌋ + 1 (F1 ≤ 2·LCS/(|a|+LCS)), so such an item appears in at least
    one of the candidate's |a|−k+1 rarest occurrence lists (prefix filtering), and, reading m more lists, in at
    least m+1 of them (count filter). Only those items are scored, with a cut-off; every bound is loosened by
    ``SLACK`` and the survivors are scored with rouge_score's own float arithmetic, so the decision is the one
    rouge_score's ``fmeasure > threshold`` makes.
    """

    count_extra = 2  # lists read beyond the prefix (count filter)

    def __init__(self, threshold: float = 0.7, chunk: int = 64):
        self.threshold = threshold
        self.chunk = chunk
        self._coder = TokenCodes()
        # Postings and lengths are int32 arrays: appending is one C call, and numpy reads them in place.
        self._postings: dict[object, array] = {}
        self._codes: list[Code] = []
        self._keys: list[str] = []
        self._lens = array("i")
        self._needs: dict[tuple[int, int], np.ndarray] = {}  # (la, lists read) -> least count by item length

    def __len__(self) -> int:
        return len(self._keys)

    # ---- encoding -------------------------------------------------------------------------------------
    def _encode(self, tokens: list[str], assign: bool) -> tuple[Code, list[object]]:
        """The LCS code and the occurrence keys (a token's n-th occurrence: its code, or (code, n)); a token
        no kept item holds gets no key."""
        code, chars = self._coder.encode(tokens, assign)
        if len(set(chars)) == len(chars):  # the common case: no repeated token
            occ: list[object] = list(chars) if assign else [c for c in chars if c != _UNSEEN]
        else:
            occ = []
            seen: dict[object, int] = {}
            for c in chars:
                if c == _UNSEEN:
                    continue
                n = seen.get(c, 0)
                seen[c] = n + 1
                occ.append((c, n) if n else c)
        return code, occ

    # ---- adding -------------------------------------------------------------------------------------
    def add(self, text: str, key: str, tokens: list[str] | None = None) -> None:
        """Add unconditionally (e.g. a seed); ``tokens``: what to compare, where not the whole text."""
        self._add_tokens(tokenize(text) if tokens is None else tokens, key)

    def _add_tokens(self, tokens: list[str], key: str) -> None:
        self._add_encoded(len(tokens), self._encode(tokens, assign=True), key)

    def _add_encoded(self, length: int, encoded: tuple[Code, list[object]], key: str) -> None:
        idx = len(self._keys)
        code, occ = encoded
        self._keys.append(key)
        self._codes.append(code)
        self._lens.append(length)
        postings = self._postings
        for o in occ:
            p = postings.get(o)
            if p is None:
                p = postings[o] = array("i")
            p.append(idx)

    # ---- scoring ------------------------------------------------------------------------------------
    def _min_overlap(self, la: int) -> int:
        """The least multiset overlap (>= LCS) a kept item needs for F1 > threshold (slightly inclusive)."""
        t = self.threshold
        if t >= 2:
            return la + 1
        return max(1, math.floor(t * la / (2 - t) - SLACK) + 1)

    def _least_counts(self, la: int, read: int) -> np.ndarray:
        """By item length lb: the least count (lists read holding the item) with which the item can still exceed
        the threshold, ``read + 1`` where none can; the last entry serves every longer item too.

        LCS ≤ min(count + unread occurrences, lb) and F1 = 2·LCS/(la + lb), so F1 > t needs
        2·min(count + la − read, lb) > (t − SLACK)·(la + lb). The least count never falls as lb grows past it,
        so the last entry is a safe bound for longer items; with count + la − read ≤ la no item longer than
        (2 − t)·la/t passes, which ends the table early."""
        key = (la, read)
        least = self._needs.get(key)
        if least is None:
            t = self.threshold - SLACK
            last = min(LONGEST, math.ceil((2 - t) * la / t) + 1) if t > 0 else LONGEST
            lb = np.arange(last + 1)[:, None]
            count = np.arange(read + 2)[None, :]  # read + 1: unreachable
            ok = 2 * np.minimum(count + (la - read), lb) > t * (la + lb)
            ok[:, -1] = True
            least = self._needs[key] = ok.argmax(axis=1)
        return least

    def _score_ids(self, code: Code, la: int, ids: list[int], cutoff: float) -> tuple[float, int]:
        """Best exact F1 among ``ids`` (ascending) and its item (the first reaching it; -1 when none scores),
        skipping items whose 2·LCS/(la+lb) is below ``cutoff``."""
        codes, lens = self._codes, self._lens
        if len(ids) > FEW:
            hits = process.extract(code, [codes[i] for i in ids], scorer=Indel.normalized_similarity,
                                   processor=None, score_cutoff=max(0.0, cutoff), limit=None)
            ids = sorted(ids[h[2]] for h in hits)
        best, best_i = 0.0, -1
        for i in ids:
            f = f1_from_lcs(int(LCSseq.similarity(code, codes[i])), la, lens[i])
            if f > best:
                best, best_i = f, i
        return best, best_i

    def _best_above_threshold(self, tokens: list[str], encoded: tuple[Code, list[object]] | None = None
                              ) -> tuple[float, str | None]:
        """The exact best score and item whenever some kept item exceeds the threshold; otherwise a score
        at most the threshold (the best among the items that could have come close, or 0.0). ``encoded``: the
        tokens' encoding when the caller has it (codes given to tokens no kept item holds match nothing, and
        their occurrences have no list, so it scores the same as an encoding without them)."""
        la = len(tokens)
        if la == 0 or not self._keys:
            return 0.0, None
        code, occ = encoded or self._encode(tokens, assign=False)
        ids = self._candidate_ids(la, occ)
        if not ids:
            return 0.0, None
        best, i = self._score_ids(code, la, ids, self.threshold - SLACK)
        return best, (self._keys[i] if i >= 0 else None)

    def _candidate_ids(self, la: int, occ: list[object]) -> list[int]:
        """Ascending ids of the kept items that can exceed the threshold with a candidate of ``la`` tokens
        whose occurrence keys are ``occ`` (a superset of those that do)."""
        k = self._min_overlap(la)
        postings = self._postings
        lists = [p for p in map(postings.get, occ) if p is not None]
        if len(lists) < k:  # fewer shared occurrences than the least overlap: nothing can exceed
            return []
        probe = la - k + 1
        lists.sort(key=len)
        # Reading ``extra`` more lists than the prefix needs, an item that can exceed the threshold appears in
        # at least extra + 1 of them (a missing occurrence only helps): most items sharing a word or two drop.
        extra = max(0, min(self.count_extra, len(lists) - probe))
        lists = lists[: probe + extra]
        if sum(map(len, lists)) <= SMALL:  # the common case on a diverse pool: plain Python wins
            counts: dict[int, int] = {}
            for p in lists:
                for i in p:
                    counts[i] = counts.get(i, 0) + 1
            ids = [i for i, c in counts.items() if c > extra]
            ids.sort()
        else:
            counts_arr = np.bincount(_concat(lists))
            ids_arr = (counts_arr > extra).nonzero()[0]
            if len(ids_arr) > 4 * FEW:
                # Count and length filter: the least count an item of each length needs (see _least_counts).
                least = self._least_counts(la, len(lists))
                lb = np.frombuffer(self._lens, dtype=np.int32)[ids_arr]
                ids_arr = ids_arr[counts_arr[ids_arr] >= least[np.minimum(lb, len(least) - 1)]]
            ids = ids_arr.tolist()
        return ids

    def _best_accepted(self, tokens: list[str], encoded: tuple[Code, list[object]],
                       accept: Callable[[str], bool]) -> tuple[float, str | None]:
        """The best item above the threshold that ``accept`` takes (ties: the earliest), else (0.0, None)."""
        la = len(tokens)
        if la == 0 or not self._keys:
            return 0.0, None
        code, occ = encoded
        scored = []
        for i in self._candidate_ids(la, occ):
            f = f1_from_lcs(int(LCSseq.similarity(code, self._codes[i])), la, self._lens[i])
            if f > self.threshold:
                scored.append((-f, i))
        for f, i in sorted(scored):
            if accept(self._keys[i]):
                return -f, self._keys[i]
        return 0.0, None

    def _best(self, tokens: list[str], encoded: tuple[Code, list[object]] | None = None) -> tuple[float, str | None]:
        """The exact best score against the whole pool and the first item reaching it."""
        la = len(tokens)
        if la == 0 or not self._keys:
            return 0.0, None
        code, occ = encoded or self._encode(tokens, assign=False)
        lists = [p for p in map(self._postings.get, occ) if p is not None]
        if not lists:
            return 0.0, None
        counts = np.bincount(_concat(lists))
        items = np.flatnonzero(counts)
        lb = np.frombuffer(self._lens, dtype=np.int32)[items]
        bound = 2 * np.minimum(counts[items], np.minimum(lb, la)) / (la + lb) + SLACK
        order = np.argsort(-bound, kind="stable")
        best, best_i = 0.0, -1
        pos = 0
        # Score items in decreasing order of their overlap bound until no remaining bound beats the best.
        while pos < len(order) and bound[order[pos]] > best:
            end = pos + self.chunk
            while end < len(order) and bound[order[end]] > best and end - pos < 16 * self.chunk:
                end += self.chunk
            batch = order[pos:end]
            batch = batch[bound[batch] >= best]
            f, i = self._score_ids(code, la, np.sort(items[batch]).tolist(), best - SLACK)
            if f > best or (f == best and 0 <= i < best_i):
                best, best_i = f, i
            pos = end
        return best, (self._keys[best_i] if best_i >= 0 else None)

    def query(self, text: str) -> tuple[float, str | None]:
        """Best ROUGE-L F1 of ``text`` against the whole kept pool, and that item's key (exact)."""
        return self._best(tokenize(text))

    def check(self, text: str) -> Decision:
        """The greedy decision without adding (``kept``: nothing exceeds the threshold); fast like
        ``check_and_add``: score and nearest are exact when ``kept`` is False."""
        score, nearest = self._best_above_threshold(tokenize(text))
        return Decision(score <= self.threshold, score, nearest)

    def check_and_add(self, text: str, key: str, exact_nearest: bool = False,
                      accept: Callable[[str], bool] | None = None, tokens: list[str] | None = None) -> Decision:
        """The originals' greedy decision: reject when the best F1 exceeds the threshold, else add.

        ``score``/``nearest`` are exact for every rejection; for a kept record they are the best among the
        items that could have come close (0.0/None when none could), unless ``exact_nearest`` asks for a
        search of the whole pool (slower: it reads every shared token's list). ``accept(key)``: whether a
        kept item that close makes the candidate a duplicate (an Evol rewrite is no duplicate of its parent;
        an input that differs makes another task); the best accepted one decides. ``tokens``: the text's
        tokens where the caller compares something other than the whole text."""
        tokens = tokenize(text) if tokens is None else tokens
        encoded = self._encode(tokens, assign=True)  # once, for the search and for adding
        if accept is None:
            score, nearest = self._best_above_threshold(tokens, encoded)
        else:
            score, nearest = self._best_accepted(tokens, encoded, accept)
        if score > self.threshold:
            return Decision(False, score, nearest)
        if exact_nearest:
            score, nearest = self._best(tokens, encoded)
        self._add_encoded(len(tokens), encoded, key)
        return Decision(True, score, nearest)
