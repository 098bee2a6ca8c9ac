"""Seed loading and config validation: every user error is one line naming the file, line or key."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.stages.seeds import Options, load_tasks

ROOT = Path(__file__).resolve().parent.parent


def seedtune(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=120)


def write_config(tmp_path, seeds_path, extra=""):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: t\nrun_dir: {tmp_path / 'run'}\nstages:\n  seeds:\n    path: {seeds_path}\n{extra}")
    return cfg


def test_original_seed_file_counts(tmp_path, shared_seeds):
    cfg = write_config(tmp_path, shared_seeds)
    r = seedtune("run", cfg, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "175 tasks, 26 classification" in r.stdout
    s = seedtune("status", tmp_path / "run")
    assert s.returncode == 0
    assert "175 tasks, 26 classification" in s.stdout
    line = next(ln for ln in s.stdout.splitlines() if ln.startswith("seeds "))
    assert "complete" in line and "175" in line


BAD_FILES = {
    "invalid_json.jsonl": ('{"instruction": "a", "instances": []}\n{"instruction": "b", "instances": [\n', ":2: invalid JSON"),
    "no_instruction.jsonl": ('{"instruction": "a", "instances": []}\n{"instances": []}\n', ":2: record has no 'instruction'"),
    "instances_not_list.jsonl": ('{"instruction": "a", "instances": {"input": ""}}\n', ":1: 'instances' must be a list"),
    "empty.jsonl": ("\n\n", "empty file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_seed_files_one_line(tmp_path, name):
    content, expected = BAD_FILES[name]
    path = tmp_path / name
    path.write_text(content)
    r = seedtune("run", write_config(tmp_path, path), "--no-progress")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(path) in lines[-1] and expected in lines[-1], r.stderr
    assert "Traceback" not in r.stderr


def test_non_utf8_and_missing_file(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"instruction": "caf\xe9", "instances": []}\n'.encode("latin-1"))
    r = seedtune("run", write_config(tmp_path, bad), "--no-progress")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{bad}:1: not UTF-8" in r.stderr
    missing = tmp_path / "nope.jsonl"
    r = seedtune("run", write_config(tmp_path, missing), "--no-progress")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{missing}: seed file not found" in r.stderr


def test_alpaca_json_and_hf_formats(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Add two numbers.", "input": "2, 3", "output": "5"},
                                  {"instruction": "Name a colour.", "input": "", "output": "Blue"}]))
    tasks = load_tasks(Options(path=str(alpaca)))
    assert [t.instruction for t in tasks] == ["Add two numbers.", "Name a colour."]
    assert tasks[0].instances[0].input == "2, 3"
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,context,answer\nSay hi,,hi\nDouble it,4,8\n")
    tasks = load_tasks(Options(path=str(csv), columns={"instruction": "prompt", "input": "context", "output": "answer"}))
    assert tasks[1].instances[0].output == "8" and tasks[1].instances[0].input == "4"
    ni = tmp_path / "task001_example.json"
    ni.write_text(json.dumps({"Definition": ["Answer yes or no."], "Positive Examples": [],
                              "Instances": [{"id": str(i), "input": f"q{i}", "output": ["yes" if i % 2 else "no"]}
                                            for i in range(20)]}))
    [task] = load_tasks(Options(path=str(ni)))
    assert task.instruction == "Answer yes or no." and len(task.instances) == 20 and task.is_classification


def test_duplicate_and_empty_instructions_reported(tmp_path):
    path = tmp_path / "s.jsonl"
    recs = [{"instruction": "Say hi.", "instances": []}, {"instruction": "say  HI.", "instances": []},
            {"instruction": "  ", "instances": []}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = seedtune("run", write_config(tmp_path, path), "--no-progress")
    assert r.returncode == 0, r.stderr
    rejected = [json.loads(ln) for ln in (tmp_path / "run" / "seeds" / "rejected.jsonl").read_text().splitlines()]
    assert sorted(x["rule"] for x in rejected) == ["duplicate_record", "empty_instruction"]


def test_misspelled_key_names_path_and_line(tmp_path, shared_seeds):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: t\nstages:\n  seeds:\n    path: {shared_seeds}\n    limt: 3\n")
    with pytest.raises(UserError) as e:
        load_config(cfg)
    assert f"{cfg}:5: stages.seeds.limt: unknown key (did you mean 'limit'?)" in str(e.value)
    cfg.write_text("name: t\nseeed: 1\nstages:\n  seeds: {path: x}\n")
    with pytest.raises(UserError, match=r"c.yaml:2: seeed: unknown key \(did you mean 'seed'\?\)"):
        load_config(cfg)
    r = seedtune("validate", cfg)
    assert r.returncode == 2 and "Traceback" not in r.stderr and ":2: seeed: unknown key" in r.stderr


def test_a_training_setting_outside_train_says_where_it_goes(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\nstages:\n  seeds: {path: x}\n  model:\n    kind: sft\n    base_model: b\n"
                   "    max_steps: 3\n")
    with pytest.raises(UserError, match=r"c.yaml:4: stages.model: max_steps: a training setting, it goes under "
                                        r"'train:' \(train: \{max_steps: ...\}\)$"):
        load_config(cfg)
    cfg.write_text(cfg.read_text().replace("max_steps: 3", "train: {max_steps: 3}"))
    assert load_config(cfg).stages[1].options.train.max_steps == 3


def test_env_interpolation_and_set_overrides(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\nseed: ${SEED_X:-3}\nmodels:\n  m:\n    backend: test\n    model: ${MODEL_X}\n"
                   "stages:\n  seeds: {path: data.jsonl}\n")
    monkeypatch.setenv("MODEL_X", "secret-model-name")
    c = load_config(cfg, ["stages.seeds.limit=5"])
    assert c.seed == 3 and c.models["m"].options.model == "secret-model-name"
    assert c.stages[0].options.limit == 5
    assert "secret-model-name" not in json.dumps(c.as_given)  # the config is kept as given
    with pytest.raises(UserError, match=r"--set stages.seeds.limit\): stages.seeds.limit"):
        load_config(cfg, ["stages.seeds.limit=many"])
    monkeypatch.delenv("MODEL_X")
    with pytest.raises(UserError, match=r"c.yaml:6: models.m.model: environment variable MODEL_X is not set"):
        load_config(cfg)


def test_unknown_stage_kind_and_model(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\nstages:\n  seeds: {path: x}\n  flter: {}\n")
    with pytest.raises(UserError, match=r"c.yaml:4: stages.flter: unknown stage kind 'flter' \(did you mean 'filter'\?\)"):
        load_config(cfg)
    cfg.write_text("name: t\nmodels:\n  m: {backend: opena}\nstages:\n  seeds: {path: x}\n")
    with pytest.raises(UserError, match=r"c.yaml:3: models.m.backend: unknown backend 'opena'"):
        load_config(cfg)
