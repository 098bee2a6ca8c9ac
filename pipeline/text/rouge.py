"""ROUGE-L exactly as ``rouge_score`` computes it, and a fast greedy near-duplicate index.

``tokenize`` and ``rouge_l_f1`` reproduce ``RougeScorer(["rougeL"], use_stemmer=False)``: lowercase, every
character outside [a-z0-9] becomes a space, split; precision = LCS/|prediction|, recall = LCS/|target|,
F1 = 2·p·r/(p+r), evaluated in the same floating-point order so that a threshold decision is identical.
As in Self-Instruct/Alpaca, the candidate is the target and the kept instruction the prediction.

:class:`NearDuplicateIndex` makes the originals' greedy decisions (reject a candidate whose F1 with any kept
instruction exceeds the threshold; a kept candidate joins the pool at once) with rapidfuzz's C++ LCS,
batched over the pool by token length, skipping every length that cannot reach the threshold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID = re.compile(r"^[a-z0-9]+$")


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


class _Bucket:
    """Kept items of one token length, as strings of token codes (one character per token)."""

    __slots__ = ("codes", "keys")

    def __init__(self) -> None:
        self.codes: list[str] = []
        self.keys: list[str] = []


class NearDuplicateIndex:
    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self._vocab: dict[str, int] = {}
        self._buckets: dict[int, _Bucket] = {}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _encode(self, tokens: list[str]) -> str:
        vocab = self._vocab
        out = []
        for t in tokens:
            code = vocab.get(t)
            if code is None:
                code = len(vocab) + 0x100
                if code > 0x10FFFF or 0xD800 <= code < 0xE000:
                    code = 0xE000 + len(vocab) if code < 0xE000 else code
                vocab[t] = code
            out.append(chr(code))
        return "".join(out)

    def add(self, text: str, key: str) -> None:
        tokens = tokenize(text)
        self._add_tokens(tokens, key)

    def _add_tokens(self, tokens: list[str], key: str) -> None:
        bucket = self._buckets.setdefault(len(tokens), _Bucket())
        bucket.codes.append(self._encode(tokens))
        bucket.keys.append(key)
        self._n += 1

    def _best(self, tokens: list[str], stop_above: float | None) -> tuple[float, str | None]:
        la = len(tokens)
        if la == 0 or not self._n:
            return 0.0, None
        code = self._encode(tokens)
        # Upper bound of F1 for each pool length: LCS <= min(la, lb).
        bounds = sorted(((f1_from_lcs(min(la, lb), la, lb), lb) for lb in self._buckets if lb), reverse=True)
        best, best_key = 0.0, None
        for bound, lb in bounds:
            if bound <= best or (stop_above is not None and bound <= stop_above and best > stop_above):
                break
            bucket = self._buckets[lb]
            lcs = process.cdist([code], bucket.codes, scorer=LCSseq.similarity, dtype=np.int32, workers=1)[0]
            p = lcs / lb
            r = lcs / la
            s = p + r
            with np.errstate(invalid="ignore", divide="ignore"):
                f = np.where(s > 0, 2 * p * r / np.where(s > 0, s, 1), 0.0)
            i = int(np.argmax(f))
            if f[i] > best:
                best, best_key = float(f[i]), bucket.keys[i]
        return best, best_key

    def query(self, text: str) -> tuple[float, str | None]:
        """Best ROUGE-L F1 of ``text`` against the kept pool, and that item's key."""
        return self._best(tokenize(text), None)

    def check_and_add(self, text: str, key: str) -> Decision:
        tokens = tokenize(text)
        score, nearest = self._best(tokens, None)
        if score > self.threshold:
            return Decision(False, score, nearest)
        self._add_tokens(tokens, key)
        return Decision(True, score, nearest)
