"""A Hub model's identity is its commit: the same before and after the download, never a hash of the snapshot,
pinned in the manifest so later runs of the folder load that commit; offline without a commit nothing runs.

The Hub cache is a fake one in tmp_path, laid out as huggingface_hub writes it (``models--org--name/refs/<rev>``
holding a commit, ``snapshots/<commit>/`` holding the files), which is all it reads offline."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.models import loading
from tinymodel import save_tiny_causal

ROOT = Path(__file__).resolve().parent.parent
C1, C2 = "1" * 40, "2" * 40


def snapshot(hub: Path, commit: str, ref: str | None = "main", repo: str = "models--org--tiny", seed: int = 0) -> Path:
    folder = hub / repo / "snapshots" / commit
    save_tiny_causal(folder, seed=seed)
    if ref:
        (hub / repo / "refs").mkdir(parents=True, exist_ok=True)
        (hub / repo / "refs" / ref).write_text(commit)
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_the_identity_is_the_commit_before_and_after_the_download_and_hashes_nothing(hub, monkeypatch):
    import huggingface_hub

    asked = []

    class Info:
        sha = C1

    def model_info(self, repo, revision=None):
        asked.append(repo)
        return Info()

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = loading.weights_identity("org/tiny")  # not downloaded: the Hub names the commit
    assert before == f"hub:org/tiny@{C1}" and asked == ["org/tiny"]

    snapshot(hub, C1)  # the download

    def no_hashing(*a, **k):
        raise AssertionError("a Hub snapshot's files were hashed")

    monkeypatch.setattr(loading, "content_hash", no_hashing)
    assert loading.weights_identity("org/tiny") == before  # from the cache's ref, not the files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading.weights_identity("org/tiny") == before and asked == ["org/tiny"]  # the Hub was not asked again
    assert loading.weights_identity("org/tiny", revision=C2) == f"hub:org/tiny@{C2}"  # a commit is itself
    assert loading.weights_identity("org/other") == "hub:org/other@main:unresolved"
    assert loading.weights_identity("./no/such/folder").startswith("missing:")


def test_a_local_folder_is_hashed_once_per_file_version(tmp_path, monkeypatch):
    folder = save_tiny_causal(tmp_path / "tiny")
    monkeypatch.setenv("SEEDTUNE_CACHE", str(tmp_path / "cache"))
    first = loading.weights_identity(str(folder))
    reads = []
    real_open = open

    def counting_open(path, mode="r", *a, **k):
        if "b" in mode and Path(path).parent == folder:
            reads.append(path)
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", counting_open)
    assert loading.weights_identity(str(folder)) == first and reads == []  # no byte read a second time
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert loading.weights_identity(str(folder)) != first and len(reads) == 1  # only the changed file


def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(f"""name: hub
run_dir: {tmp_path / 'run'}
seed: 3
models:
  m: {{backend: transformers, model: org/tiny, batch_size: 4}}
stages:
  seeds: {{path: {ROOT / 'data/seed_tasks.jsonl'}, limit: 12}}
  generate:
    model: m
    target: 100
    max_requests: 8
    batch_size: 8
    classify: false
    instances_style: answer
    bootstrap_params: {{temperature: 1.0, max_tokens: 12}}
    instances_params: {{temperature: 1.0, max_tokens: 8}}
""")
    return cfg


def seedtune(cfg: Path, hub: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress", *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_the_commit_is_pinned_in_the_manifest_and_later_runs_keep_it(tmp_path, hub):
    cfg = config(tmp_path)
    snapshot(hub, C1)
    first = seedtune(cfg, hub)
    assert first.returncode in (0, 4), first.stderr[-2000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["revisions"] == {"org/tiny@main": C1}
    assert manifest["stages"]["generate"]["requests_sent"] > 0
    # The branch moves to another commit (a newer download): the run folder stays on the one it started with.
    snapshot(hub, C2, seed=1)
    second = seedtune(cfg, hub)
    assert second.returncode in (0, 4), second.stderr[-2000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["generate"]["state"] == "cached" and manifest["revisions"] == {"org/tiny@main": C1}
    # More requests: the answers paid for are found under the same keys, and the model loaded to send the new
    # ones is the pinned commit's (the branch's newer snapshot is unloadable).
    (hub / "models--org--tiny" / "snapshots" / C2 / "config.json").write_text("not json")
    third = seedtune(cfg, hub, "--set", "stages.generate.max_requests=12")
    assert third.returncode in (0, 4), third.stderr[-2000:]
    generate = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["generate"]
    assert generate["state"] == "complete" and generate["requests_cached"] >= 8 and generate["requests_sent"] > 0


def test_offline_without_a_commit_nothing_is_computed_or_journaled(tmp_path, hub):
    cfg = config(tmp_path)
    r = seedtune(cfg, hub)  # not in the cache, the Hub cannot be asked
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: stage 'generate': cannot resolve model 'm' (org/tiny@main) to a commit"), line
    db = tmp_path / "run" / "journal.sqlite"
    tables = [t for (t,) in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert all(sqlite3.connect(db).execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] == 0 for t in tables)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["seeds"]["state"] == "complete" and manifest["revisions"] == {}
