"""MinHash-LSH near-duplicate index for pools far beyond a million records.

Candidates come from LSH buckets over MinHash signatures of word unigrams and bigrams; each candidate pair is
then verified with the exact ROUGE-L F1, so the index never rejects a record the exact mode would keep — it
can only miss near-duplicates whose word sets differ too much to collide. Memory and time per record are
constant in the pool size (plus the verified candidates).
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.text.rouge import Decision, rouge_l_f1, tokenize

_PRIME = (1 << 61) - 1


class MinHashIndex:
    def __init__(self, threshold: float = 0.7, num_perm: int = 128, bands: int = 32, seed: int = 1):
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.threshold = threshold
        self.bands, self.rows = bands, num_perm // bands
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, _PRIME, num_perm, dtype=np.uint64)
        self._b = rng.integers(0, _PRIME, num_perm, dtype=np.uint64)
        self._tables: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self._tokens: list[list[str]] = []
        self._keys: list[str] = []

    def __len__(self) -> int:
        return len(self._keys)

    def _signature(self, tokens: list[str]) -> np.ndarray:
        shingles = set(tokens) | {a + " " + b for a, b in zip(tokens, tokens[1:])}
        hv = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 3
                       for s in shingles], dtype=np.uint64)
        # (a*x + b) mod p on 64-bit wraps; good enough as a family of hash permutations.
        return ((np.outer(hv, self._a) + self._b) % np.uint64(_PRIME)).min(axis=0)

    def _bands(self, sig: np.ndarray) -> list[bytes]:
        return [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]

    def _add(self, tokens: list[str], key: str, bands: list[bytes] | None) -> None:
        idx = len(self._keys)
        self._keys.append(key)
        self._tokens.append(tokens)
        if tokens:
            for table, band in zip(self._tables, bands or self._bands(self._signature(tokens))):
                table.setdefault(band, []).append(idx)

    def add(self, text: str, key: str) -> None:
        self._add(tokenize(text), key, None)

    def check_and_add(self, text: str, key: str) -> Decision:
        tokens = tokenize(text)
        if not tokens:
            self._add(tokens, key, None)
            return Decision(True, 0.0, None)
        bands = self._bands(self._signature(tokens))
        cands: set[int] = set()
        for table, band in zip(self._tables, bands):
            cands.update(table.get(band, ()))
        best, nearest = 0.0, None
        for i in sorted(cands):
            f = rouge_l_f1(tokens, self._tokens[i])
            if f > best:
                best, nearest = f, self._keys[i]
        if best > self.threshold:
            return Decision(False, best, nearest)
        self._add(tokens, key, bands)
        return Decision(True, best, nearest)
