"""Text that many records share — a preamble, a tool description, a prompt template — found by the document
frequency of token n-grams, so that near-duplicate detection compares the part of each record that differs.

Two tool-use tasks that open with the same 60-word tool description and differ in their one-line task are
different tasks, yet ROUGE-L over the whole text scores them above 0.9. Shared text is either

* an n-gram (``N`` tokens) in at least ``SHARE`` of the records (a template most of the set uses), or
* a run of at least ``LONG`` tokens covered by n-grams that are each in at least ``LONG_SHARE`` of the records
  (a tool description behind 1,000 records of a 52K mix),

and in at least ``MIN_RECORDS`` records either way. Every token it covers is left out of the comparison. A short
phrase that a minority of records share ("a C++ function that calculates the factorial of") stays in: leaving
it out would hide the near-duplicates that share it. A set of diverse instructions has no shared text, so its
decisions are unchanged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

N = 8  # tokens per n-gram: longer than any phrase diverse instructions share ("write a short story about a")
SHARE = 0.05
LONG_SHARE = 0.005
LONG = 20  # tokens: a description or preamble, never a phrase
MIN_RECORDS = 20
SAMPLE = 5000  # n-grams are counted on an evenly spaced sample of this many records


def _ngrams(tokens: list[str]) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + N]) for i in range(len(tokens) - N + 1)}


@dataclass
class SharedText:
    """The frequent n-grams of a set of token lists, and how to leave them out."""

    ngrams: set[tuple[str, ...]] = field(default_factory=set)  # shared wherever they occur
    long_ngrams: set[tuple[str, ...]] = field(default_factory=set)  # shared inside a run of LONG tokens or more
    records: int = 0  # records with some shared text left out
    tokens: int = 0  # tokens left out, in all

    @classmethod
    def find(cls, token_lists: list[list[str]], share: float = SHARE, min_records: int = MIN_RECORDS,
             long_share: float = LONG_SHARE) -> SharedText:
        n = len(token_lists)
        if n < min_records:
            return cls()
        step = max(1, n // SAMPLE)
        sample = token_lists[::step]
        counts: Counter = Counter()
        for tokens in sample:
            if len(tokens) >= N:
                counts.update(_ngrams(tokens))
        floor = min_records * len(sample) / n
        need, need_long = max(share * len(sample), floor), max(long_share * len(sample), floor)
        return cls({g for g, c in counts.items() if c >= need},
                   {g for g, c in counts.items() if need_long <= c < need})

    def _covered(self, tokens: list[str]) -> bytearray:
        covered = bytearray(len(tokens))
        run_start = -1  # the first start of the current run of long n-grams
        for i in range(len(tokens) - N + 2):
            gram = tuple(tokens[i:i + N]) if i <= len(tokens) - N else None
            if gram in self.ngrams:
                covered[i:i + N] = b"\x01" * N
            if gram is not None and gram in self.long_ngrams:
                if run_start < 0:
                    run_start = i
            elif run_start >= 0:
                if i - 1 + N - run_start >= LONG:
                    covered[run_start:i - 1 + N] = b"\x01" * (i - 1 + N - run_start)
                run_start = -1
        return covered

    def strip(self, tokens: list[str]) -> list[str]:
        """``tokens`` without those shared text covers; all of them when nothing else would be left (a
        record that is only shared text is compared whole)."""
        if not (self.ngrams or self.long_ngrams) or len(tokens) < N:
            return tokens
        covered = self._covered(tokens)
        if not any(covered):
            return tokens
        rest = [t for t, c in zip(tokens, covered) if not c]
        if not rest:
            return tokens
        self.records += 1
        self.tokens += len(tokens) - len(rest)
        return rest

    def examples(self, k: int = 2) -> list[str]:
        """A few of the shared n-grams, as text (for the stage's numbers)."""
        return [" ".join(g) for g in (sorted(self.ngrams) + sorted(self.long_ngrams))[:k]]
