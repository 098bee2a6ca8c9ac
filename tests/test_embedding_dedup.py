"""Meaning-level dedup: the encoder (all-MiniLM-L6-v2 from its PyPI package, loaded by path), the greedy cosine
search against a brute-force greedy loop, the default threshold on the pairs it was chosen on, and the stage on
records written for the test."""

import json
import random
from pathlib import Path

import pytest
import torch

from pipeline.models.encoder import DEFAULT_ENCODER, Encoder, greedy_cosine
from pipeline.stages import dedup
from test_filter_dedup_stages import record_id, run_stage, stage_dir, task

PAIRS = Path(__file__).resolve().parent / "data" / "paraphrase_pairs.jsonl"


@pytest.fixture(scope="module")
def encoder():
    return Encoder(DEFAULT_ENCODER)


def brute_greedy(cands, pool, threshold):
    rows = list(pool)
    out = []
    for j, c in enumerate(cands):
        sims = [float(c @ r) for r in rows]
        best = max(sims) if sims else -1.0
        nearest = sims.index(best) if sims else -1
        out.append((best <= threshold, nearest))
        if best <= threshold:
            rows.append(c)
    return out


def normalised(n, d, rng):
    x = torch.randn(n, d, generator=rng)
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.mark.parametrize("block", [1, 7, 512])
def test_greedy_cosine_matches_a_plain_greedy_loop(block):
    rng = torch.Generator().manual_seed(0)
    base = normalised(40, 16, rng)
    # near copies of earlier rows, so that both pool and in-block duplicates occur
    idx = torch.tensor([random.Random(i).randrange(40) for i in range(60)])
    noisy = torch.nn.functional.normalize(base[idx] + 0.3 * torch.randn(60, 16, generator=rng), dim=-1)
    cands = torch.cat([base[10:], noisy])[torch.randperm(90, generator=rng)]
    pool = base[:10]
    got = greedy_cosine(cands, pool, 0.8, block=block)
    expected = brute_greedy(cands, pool, 0.8)
    assert [d.kept for d in got] == [k for k, _ in expected]
    assert 10 < sum(d.kept for d in got) < 90
    # nearest: pool rows first, then candidates by their index (mapped from the kept-row order)
    kept_rows = list(range(10)) + [10 + j for j, d in enumerate(got) if d.kept]
    for d, (_, n) in zip(got, expected):
        assert d.nearest == kept_rows[n]


def test_greedy_cosine_through_faiss_beyond_the_exact_limit():
    pytest.importorskip("faiss")
    rng = torch.Generator().manual_seed(1)
    base = normalised(200, 32, rng)
    cands = torch.cat([base[50:], base[:50] + 0.01 * torch.randn(50, 32, generator=rng)])
    cands = torch.nn.functional.normalize(cands, dim=-1)
    exact = greedy_cosine(cands, base[:20], 0.9)
    approx = greedy_cosine(cands, base[:20], 0.9, exact_limit=0)  # HNSW is exact on a set this small
    assert [d.kept for d in approx] == [d.kept for d in exact] and sum(not d.kept for d in exact) == 20


def test_encoder_embeddings_are_normalised_and_order_independent(encoder):
    texts = ["A short one.", "A much longer sentence about the weather in the mountains in spring.", ""]
    a = encoder.encode(texts)
    b = encoder.encode(texts[::-1]).flip(0)
    assert a.shape == (3, 384)
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(a, b, atol=1e-5)  # batching sorted by length, rows back in input order


def test_default_threshold_on_the_pairs_it_was_chosen_on(encoder):
    """The counts quoted beside EMBEDDING_THRESHOLD in pipeline/stages/dedup.py."""
    from pipeline.text.rouge import rouge_l

    pairs = [json.loads(x) for x in PAIRS.read_text().splitlines() if x.strip()]
    a, b = encoder.encode([p["a"] for p in pairs]), encoder.encode([p["b"] for p in pairs])
    sims = (a * b).sum(1).tolist()
    t = dedup.EMBEDDING_THRESHOLD
    same = [s for s, p in zip(sims, pairs) if p["label"] == "same"]
    diff = [s for s, p in zip(sims, pairs) if p["label"] == "different"]
    assert len(same) == len(diff) == 36
    assert sum(s > t for s in same) == 32 and sum(s > t for s in diff) == 3
    rouge_same = [rouge_l(p["a"], p["b"]) for p in pairs if p["label"] == "same"]
    assert sum(r > 0.7 for r in rouge_same) == 0  # what ROUGE-L misses


SEEDS = [task("seed_0", "Write a short poem about the ocean.", ("", "Waves.")),
         task("seed_1", "Explain how photosynthesis works.", ("", "Light."))]
GENERATED = [
    task("g0", "Compose a brief poem on the sea.", ("", "x")),  # paraphrase of seed_0
    task("g1", "Give me five tips for better sleep.", ("", "x")),
    task("g2", "What are five ways to sleep better?", ("", "x")),  # paraphrase of g1
    task("g3", "Convert the distance from miles to kilometers.", ("", "x")),
    task("g4", "Recommend a board game for a family with young children.", ("", "x")),
    task("g5", "Describe the process by which plants perform photosynthesis.", ("", "x")),  # seed_1
]


def test_embedding_dedup_stage_drops_paraphrases_with_their_nearest(tmp_path):
    inputs = [stage_dir(tmp_path, "seeds", SEEDS), stage_dir(tmp_path, "generate", GENERATED)]
    kept, rejected, stats = run_stage(tmp_path, dedup, dedup.Options(mode="embedding"), inputs)
    assert [t.id for t in kept] == ["g1", "g3", "g4"]
    near = {record_id(r): r for r in rejected}
    assert {k: r.rule for k, r in near.items()} == {k: "embedding_near_duplicate" for k in ("g0", "g2", "g5")}
    assert {k: r.record["meta"]["embedding_nearest"] for k, r in near.items()} == {
        "g0": "seed_0", "g2": "g1", "g5": "seed_1"}
    for r in rejected:
        sim = r.record["meta"]["embedding_similarity"]
        assert sim > 0.7 and f"cosine similarity {sim:.3f} > 0.7 with" in r.reason
    assert all(t.meta["embedding_similarity"] <= 0.7 for t in kept)
    assert stats.metrics["pool_seeds"] == 2
    # the ROUGE mode keeps every one of these paraphrases
    kept_rouge, _, _ = run_stage(tmp_path, dedup, dedup.Options(), inputs, name="rouge")
    assert len(kept_rouge) == len(GENERATED)


def test_identity_names_the_encoder_weights_only_in_embedding_mode(tmp_path):
    assert dedup.identity(dedup.Options()) == {}
    ident = dedup.identity(dedup.Options(mode="embedding"))
    assert set(ident) == {"encoder"} and len(ident["encoder"]) == 24
    folder = tmp_path / "enc"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"one")
    first = dedup.identity(dedup.Options(mode="embedding", encoder=str(folder)))
    (folder / "model.safetensors").write_bytes(b"two")
    assert dedup.identity(dedup.Options(mode="embedding", encoder=str(folder))) != first
