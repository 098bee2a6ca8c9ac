"""MinHash-LSH near-duplicate index for pools far beyond a million records.

Each instruction's set of ROUGE tokens gets a MinHash signature (``num_perm`` hash functions: a token's
64-bit hash XOR a per-function seed, through MurmurHash3's finaliser, in numpy); the
signature is cut into ``bands`` bands of ``num_perm/bands`` rows and every band is a key into a hash table.
Items sharing a band with the candidate are then verified with the exact ROUGE-L F1, so the index never
rejects a candidate that the exact mode would keep *against the same pool*; it can only miss a near-duplicate
whose token set did not collide. Why token sets: ROUGE-L F1 > t needs a multiset overlap of at least
t/(2-t) of the combined length, so a near-duplicate at t = 0.7 has a token-set Jaccard of about 0.54 or more;
with the defaults (256 permutations, 64 bands of 4 rows) such a pair collides with probability
1-(1-0.54^4)^64 ≈ 0.997, while pairs with Jaccard 0.2 collide with probability 0.10.
Time and memory per record are constant in the pool size (plus the verified candidates):
``bands`` table entries per kept record. ``bench/rouge_filter.py`` measures the agreement with the exact mode.
"""

from __future__ import annotations

import hashlib

import numpy as np

from rapidfuzz import process
from rapidfuzz.distance import Indel, LCSseq

from pipeline.text.rouge import SLACK, Code, Decision, TokenCodes, f1_from_lcs, tokenize

_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_S = np.uint64(33)


def _mix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (wrapping arithmetic): a well-mixed hash of each value."""
    h = h ^ (h >> _S)
    h = h * _M1
    h = h ^ (h >> _S)
    h = h * _M2
    return h ^ (h >> _S)


class MinHashIndex:
    """Same ``add`` / ``query`` / ``check_and_add`` shape as :class:`pipeline.text.rouge.NearDuplicateIndex`."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 256, bands: int = 64, seed: int = 1):
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.threshold = threshold
        self.bands, self.rows = bands, num_perm // bands
        rng = np.random.default_rng(seed)
        self._seeds = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)
        # Folds each band's rows into one 64-bit key (wrapping arithmetic), salted by the band number.
        self._fold = rng.integers(1, 1 << 63, (self.rows,), dtype=np.uint64) | np.uint64(1)
        self._salt = rng.integers(0, 1 << 63, (bands,), dtype=np.uint64)
        self._tables: list[dict[int, list[int]]] = [{} for _ in range(bands)]
        self._token_hash: dict[str, int] = {}
        self._coder = TokenCodes()
        self._codes: list[Code] = []
        self._lens: list[int] = []
        self._keys: list[str] = []

    def __len__(self) -> int:
        return len(self._keys)

    def _hash(self, token: str) -> int:
        h = self._token_hash.get(token)
        if h is None:
            h = self._token_hash[token] = int.from_bytes(
                hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
        return h

    def _band_keys(self, tokens: list[str]) -> list[int]:
        hv = np.fromiter((self._hash(t) for t in set(tokens)), dtype=np.uint64)
        with np.errstate(over="ignore"):
            sig = _mix(hv[:, None] ^ self._seeds).min(axis=0)  # one hash function per seed
            keys = (sig.reshape(self.bands, self.rows) * self._fold).sum(axis=1) ^ self._salt
        return keys.tolist()

    def _add(self, tokens: list[str], key: str, bands: list[int] | None = None) -> None:
        idx = len(self._keys)
        self._keys.append(key)
        self._codes.append(self._coder.encode(tokens, assign=True)[0])
        self._lens.append(len(tokens))
        if tokens:
            for table, band in zip(self._tables, bands or self._band_keys(tokens)):
                table.setdefault(band, []).append(idx)

    def add(self, text: str, key: str) -> None:
        self._add(tokenize(text), key)

    def _best(self, tokens: list[str], bands: list[int]) -> tuple[float, str | None]:
        """Best F1 among the items sharing a band with ``tokens`` (the first reaching it): exact whenever it
        exceeds the threshold."""
        cands: set[int] = set()
        for table, band in zip(self._tables, bands):
            hit = table.get(band)
            if hit:
                cands.update(hit)
        if not cands:
            return 0.0, None
        ids = sorted(cands)
        code = self._coder.encode(tokens, assign=False)[0]
        if len(ids) > 6:  # C++ pre-screen with a cut-off a little below the best possible match of interest
            hits = process.extract(code, [self._codes[i] for i in ids], scorer=Indel.normalized_similarity,
                                   processor=None, score_cutoff=max(0.0, self.threshold - SLACK), limit=None)
            ids = sorted(ids[h[2]] for h in hits)  # nothing near the threshold: 0.0 / None
        best, best_i, la = 0.0, -1, len(tokens)
        for i in ids:
            f = f1_from_lcs(int(LCSseq.similarity(code, self._codes[i])), la, self._lens[i])
            if f > best:
                best, best_i = f, i
        return best, (self._keys[best_i] if best_i >= 0 else None)

    def query(self, text: str) -> tuple[float, str | None]:
        """Best ROUGE-L F1 among the items sharing a band — exact when it exceeds the threshold (with few
        candidates, also below it); 0.0 when no candidate comes near the threshold."""
        tokens = tokenize(text)
        return self._best(tokens, self._band_keys(tokens)) if tokens else (0.0, None)

    def check_and_add(self, text: str, key: str) -> Decision:
        tokens = tokenize(text)
        if not tokens:
            self._add(tokens, key)
            return Decision(True, 0.0, None)
        bands = self._band_keys(tokens)
        best, nearest = self._best(tokens, bands)
        if best > self.threshold:
            return Decision(False, best, nearest)
        self._add(tokens, key, bands)
        return Decision(True, best, nearest)
