"""ROUGE-L exactly as ``rouge_score`` computes it, and a fast greedy near-duplicate index.

``tokenize`` and ``rouge_l_f1`` reproduce ``RougeScorer(["rougeL"], use_stemmer=False)``: lowercase, every
character outside [a-z0-9] becomes a space, split; precision = LCS/|prediction|, recall = LCS/|target|,
F1 = 2·p·r/(p+r), evaluated in the same floating-point order so that a threshold decision is identical.
As in Self-Instruct/Alpaca, the candidate is the target and the kept instruction the prediction.

:class:`NearDuplicateIndex` makes the originals' greedy decisions (reject a candidate whose F1 with any kept
instruction exceeds the threshold; a kept candidate joins the pool at once) with rapidfuzz's C++ LCS,
scoring only the pairs whose token overlap could reach the best score (see the class).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID = re.compile(r"^[a-z0-9]+$")
SMALL = 32  # probed postings up to this size are counted in plain Python


def tokenize(text: str) -> list[str]:
    text = _NON_ALNUM.sub(" ", text.lower())
    return [t for t in _SPACES.split(text) if _VALID.match(t)]


def lcs_length(a: list[str], b: list[str]) -> int:
    return int(LCSseq.similarity(a, b)) if a and b else 0


def f1_from_lcs(lcs: int, target_len: int, prediction_len: int) -> float:
    """rouge_score's F1 with the same floating-point operations."""
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l_f1(target: list[str], prediction: list[str]) -> float:
    return f1_from_lcs(lcs_length(target, prediction), len(target), len(prediction))


def rouge_l(a: str, b: str) -> float:
    return rouge_l_f1(tokenize(a), tokenize(b))


@dataclass
class Decision:
    kept: bool
    score: float  # best ROUGE-L F1 against the kept pool (0.0 when empty)
    nearest: str | None  # key of that kept item


class _Growing:
    """An int32 array that grows by doubling (amortised O(1) append, zero-copy view)."""

    __slots__ = ("data", "size")

    def __init__(self) -> None:
        self.data = np.empty(4, dtype=np.int32)
        self.size = 0

    def append(self, value: int) -> None:
        if self.size == len(self.data):
            self.data = np.concatenate([self.data, np.empty(len(self.data), dtype=np.int32)])
        self.data[self.size] = value
        self.size += 1

    def view(self) -> np.ndarray:
        return self.data[: self.size]


def _f1_array(lcs: np.ndarray, la: int, lb: np.ndarray) -> np.ndarray:
    """f1_from_lcs over arrays, with the same floating-point operations (lcs >= 1 here)."""
    p = lcs / lb
    r = lcs / la
    return 2 * p * r / (p + r)


class NearDuplicateIndex:
    """Greedy ROUGE-L near-duplicate index.

    An inverted index over token occurrences ("the#1", "the#2", ...) gives, for every kept item that shares a
    token with the candidate, the size of their multiset overlap — an upper bound of their LCS. Items are
    scored exactly (rapidfuzz's LCS, batched) in decreasing order of the F1 bound that overlap allows, and the
    search stops as soon as no remaining bound can beat the best score found: the best score and the nearest
    item are exact, and most pairs are never scored. Items sharing no token score 0.
    """

    def __init__(self, threshold: float = 0.7, chunk: int = 64):
        self.threshold = threshold
        self.chunk = chunk
        self._vocab: dict[str, int] = {}
        self._postings: dict[str, _Growing] = {}
        self._codes: list[str] = []
        self._keys: list[str] = []
        self._lens = _Growing()

    def __len__(self) -> int:
        return len(self._keys)

    def _encode(self, tokens: list[str]) -> str:
        vocab = self._vocab
        out = []
        for t in tokens:
            code = vocab.get(t)
            if code is None:
                code = len(vocab) + 0x100
                if code >= 0xD800:  # skip the surrogate range
                    code += 0x800
                vocab[t] = code
            out.append(chr(code))
        return "".join(out)

    @staticmethod
    def _occurrences(tokens: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        out = []
        for t in tokens:
            n = seen.get(t, 0) + 1
            seen[t] = n
            out.append(f"{t}#{n}")
        return out

    def add(self, text: str, key: str) -> None:
        self._add_tokens(tokenize(text), key)

    def _add_tokens(self, tokens: list[str], key: str) -> None:
        idx = len(self._keys)
        self._keys.append(key)
        self._codes.append(self._encode(tokens))
        self._lens.append(len(tokens))
        for occ in self._occurrences(tokens):
            posting = self._postings.get(occ)
            if posting is None:
                posting = self._postings[occ] = _Growing()
            posting.append(idx)

    def _best(self, tokens: list[str]) -> tuple[float, str | None]:
        la = len(tokens)
        if la == 0 or not self._keys:
            return 0.0, None
        lists = [p.view() for p in (self._postings.get(o) for o in self._occurrences(tokens)) if p is not None]
        if not lists:
            return 0.0, None
        counts = np.bincount(np.concatenate(lists), minlength=len(self._keys))
        items = np.flatnonzero(counts)
        lb = self._lens.view()[items]
        bound = _f1_array(np.minimum(counts[items], np.minimum(lb, la)), la, lb)
        code = self._encode(tokens)
        best, best_key = 0.0, None
        # Score the most promising items first, then only those whose bound still beats the best score.
        k = min(self.chunk, len(items))
        first = np.argpartition(-bound, k - 1)[:k] if k < len(items) else np.arange(len(items))
        rest = None
        while True:
            batch = first if rest is None else rest[: self.chunk]
            order = batch[np.argsort(-bound[batch], kind="stable")]
            ids = items[order]
            lcs = process.cdist([code], [self._codes[i] for i in ids], scorer=LCSseq.similarity,
                                dtype=np.int32, workers=1)[0]
            with np.errstate(invalid="ignore", divide="ignore"):
                f = np.where(lcs > 0, _f1_array(lcs, la, lb[order]), 0.0)
            j = int(np.argmax(f))
            if f[j] > best:
                best, best_key = float(f[j]), self._keys[int(ids[j])]
            if rest is None:
                mask = bound > best
                mask[first] = False
                rest = np.flatnonzero(mask)
                rest = rest[np.argsort(-bound[rest], kind="stable")]
            else:
                rest = rest[self.chunk:]
                rest = rest[bound[rest] > best]
            if not len(rest):
                return best, best_key

    def _min_overlap(self, la: int) -> int:
        """The least multiset overlap (>= LCS) a kept item needs for F1 > threshold (a little inclusive)."""
        t = self.threshold
        return max(1, math.floor(t * la / (2 - t) - 1e-6) + 1)

    def _best_above_threshold(self, tokens: list[str]) -> tuple[float, str | None]:
        """Exact best score among the items that could exceed the threshold (prefix filtering).

        An item with F1 > threshold shares at least k tokens with the candidate, so it appears in the posting
        list of at least one of the candidate's (la - k + 1) rarest token occurrences: only those lists are
        read, and only items of a feasible length are scored.
        """
        la = len(tokens)
        if la == 0 or not self._keys:
            return 0.0, None
        occ = [p for p in (self._postings.get(o) for o in self._occurrences(tokens)) if p is not None]
        probe = la - self._min_overlap(la) + 1
        if len(occ) < la - probe + 1:  # fewer shared occurrences than the least overlap: nothing can exceed
            return 0.0, None
        occ.sort(key=lambda p: p.size)
        # Reading m more lists than the prefix needs, an item that can exceed the threshold appears in at
        # least m + 1 of them: a count filter that drops most items sharing only a word or two.
        extra = min(2, len(occ) - probe)
        lists = occ[:probe + extra]
        if sum(p.size for p in lists) <= SMALL:  # the common case: plain Python beats numpy's call overhead
            counts: dict[int, int] = {}
            for p in lists:
                for i in p.data[: p.size].tolist():
                    counts[i] = counts.get(i, 0) + 1
            lens = self._lens.data
            floor = self.threshold - 1e-9
            ids = [i for i, c in counts.items() if c > extra and f1_from_lcs(min(int(lens[i]), la), la, int(lens[i])) > floor]
            if not ids:
                return 0.0, None
            code = self._encode(tokens)
            best, best_key = 0.0, None
            for i in ids:
                f = f1_from_lcs(int(LCSseq.similarity(code, self._codes[i])), la, int(lens[i]))
                if f > best:
                    best, best_key = f, self._keys[i]
            return best, best_key
        counts_arr = np.bincount(np.concatenate([p.view() for p in lists]))
        ids_arr = np.flatnonzero(counts_arr > extra)
        lb = self._lens.view()[ids_arr]
        feasible = _f1_array(np.minimum(lb, la), la, lb) > self.threshold - 1e-9
        ids_arr, lb = ids_arr[feasible], lb[feasible]
        if not len(ids_arr):
            return 0.0, None
        codes = [self._codes[i] for i in ids_arr.tolist()]
        lcs = process.cdist([self._encode(tokens)], codes, scorer=LCSseq.similarity, dtype=np.int32, workers=1)[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.where(lcs > 0, _f1_array(lcs, la, lb), 0.0)
        j = int(np.argmax(f))
        return (float(f[j]), self._keys[int(ids_arr[j])]) if f[j] > 0 else (0.0, None)

    def query(self, text: str) -> tuple[float, str | None]:
        """Best ROUGE-L F1 of ``text`` against the whole kept pool, and that item's key (exact)."""
        return self._best(tokenize(text))

    def check_and_add(self, text: str, key: str, exact_nearest: bool = False) -> Decision:
        """The originals' greedy decision. ``score``/``nearest`` are exact whenever the score exceeds the
        threshold (every rejection); for a kept record they are the best among the items that could have come
        close, unless ``exact_nearest`` asks for a search of the whole pool."""
        tokens = tokenize(text)
        score, nearest = self._best_above_threshold(tokens)
        if score > self.threshold:
            return Decision(False, score, nearest)
        if exact_nearest:
            score, nearest = self._best(tokens)
        self._add_tokens(tokens, key)
        return Decision(True, score, nearest)
