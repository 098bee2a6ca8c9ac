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

A whole set at once (:func:`decide`) takes the same decisions faster: every record's band keys in bulk
(:meth:`MinHashIndex.band_matrix`), the records that share a band key with another found by sorting each band
(:func:`shared_rows`), and only those through the index (:func:`replay`): a record that shares no key can
neither be nor have a candidate. ``bench/dedup_scale.py`` measures it.
"""

from __future__ import annotations

import hashlib

import numpy as np

from collections.abc import Sequence

from rapidfuzz import process
from rapidfuzz.distance import Indel, LCSseq

from pipeline.text.rouge import SLACK, Code, Decision, TokenCodes, f1_from_lcs, tokenize

BULK = 16  # records hashed together: small enough for the CPU cache (a tenth of the time of 2,048)

_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_S = np.uint64(33)


def _mix_inplace(h: np.ndarray) -> np.ndarray:
    """:func:`_mix` overwriting ``h`` (no temporaries but one)."""
    t = h >> _S
    h ^= t
    h *= _M1
    np.right_shift(h, _S, out=t)
    h ^= t
    h *= _M2
    np.right_shift(h, _S, out=t)
    h ^= t
    return h


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

    def band_matrix(self, token_lists: Sequence[list[str]]) -> np.ndarray:
        """The band keys of many token lists at once (row k: ``token_lists[k]``; the row of an empty list is
        zeros and means nothing), equal to :meth:`_band_keys` of each."""
        out = np.zeros((len(token_lists), self.bands), dtype=np.uint64)
        for a in range(0, len(token_lists), BULK):
            hashes = [np.fromiter((self._hash(t) for t in set(toks)), dtype=np.uint64)
                      for toks in token_lists[a:a + BULK]]
            lens = np.array([len(h) for h in hashes])
            full = np.flatnonzero(lens)
            if not len(full):
                continue
            with np.errstate(over="ignore"):
                mixed = _mix_inplace(np.concatenate(hashes)[:, None] ^ self._seeds)
                sig = np.minimum.reduceat(mixed, np.r_[0, np.cumsum(lens[full])[:-1]], axis=0)
                keys = (sig.reshape(len(full), self.bands, self.rows) * self._fold).sum(axis=2) ^ self._salt
            out[a + full] = keys
        return out

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

    def check_and_add(self, text: str, key: str, tokens: list[str] | None = None,
                      bands: list[int] | None = None) -> Decision:
        """``tokens``, ``bands``: ``text``'s tokens and band keys where the caller has them."""
        tokens = tokenize(text) if tokens is None else tokens
        if not tokens:
            self._add(tokens, key)
            return Decision(True, 0.0, None)
        bands = self._band_keys(tokens) if bands is None else bands
        best, nearest = self._best(tokens, bands)
        if best > self.threshold:
            return Decision(False, best, nearest)
        self._add(tokens, key, bands)
        return Decision(True, best, nearest)



def shared_rows(key: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The records (``idx``, one ``key`` each) whose key another record has too."""
    order = np.argsort(key, kind="stable")
    k = key[order]
    dup = np.r_[k[1:] == k[:-1], False] | np.r_[False, k[1:] == k[:-1]]
    return idx[order][dup]


def first_of_key(key: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Pairs (later, first) of records with equal ``key``: each record paired with the first of its key."""
    order = np.lexsort((idx, key))
    k, i = key[order], idx[order]
    new = np.r_[True, k[1:] != k[:-1]]
    first = i[new][np.cumsum(new) - 1]
    return np.stack([i[~new], first[~new]], axis=1).astype(np.int64)


def replay(rows: Sequence[int], tokens, keys, threshold: float, num_perm: int, bands: int,
           fixed: int = 0) -> dict[int, Decision]:
    """:class:`MinHashIndex`'s decisions for ``rows`` (ascending record numbers), given each row's tokens and
    band keys (``tokens[n]``, ``keys[n]``): rows below ``fixed`` are a pool added as they are, the others checked
    and added in order. ``Decision.nearest`` is the nearest record's number, as text. Rows left out must share
    no band key with any row (they can neither be nor have a candidate)."""
    index, out = MinHashIndex(threshold, num_perm, bands), {}
    for n in rows:
        toks, band_keys = tokens[n], [int(k) for k in keys[n]]
        if n < fixed:
            index._add(toks, str(n), band_keys)
        else:
            out[n] = index.check_and_add("", str(n), tokens=toks, bands=band_keys)
    return out


def decide(token_lists: Sequence[list[str]], threshold: float = 0.7, num_perm: int = 256, bands: int = 64,
           fixed: int = 0) -> dict[int, Decision]:
    """:class:`MinHashIndex`'s decisions for a whole set, the first ``fixed`` lists a pool (see :func:`replay`);
    a record not in the result is kept with (0.0, None). Only the records that share a band key with another
    go through the index."""
    keys = MinHashIndex(threshold, num_perm, bands).band_matrix(token_lists)
    rows = np.flatnonzero(keys.any(axis=1))
    involved = np.unique(np.concatenate([shared_rows(keys[rows, b], rows) for b in range(bands)] or [rows[:0]]))
    return replay(involved.tolist(), token_lists, keys, threshold, num_perm, bands, fixed)
