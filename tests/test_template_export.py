"""Template and export: the formats, the splits, the card's funnel and models, and the token-boundary
property (docs/sft-pitfalls.md: token-boundary)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from pipeline.records import Instance, Task
from pipeline.stages.template import Options, render_example
from tinymodel import tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = tmp / "c.yaml"
    cfg.write_text(f"""name: exp
run_dir: {tmp / 'run'}
seed: 5
models:
  m: {{backend: test, model: "${{SEEDTUNE_TEST_WRITER:-unset-writer}}"}}
stages:
  seeds: {{path: {ROOT / 'data/seed_tasks.jsonl'}}}
  generate: {{model: m, target: 30, batch_size: 4}}
  filter: {{}}
  dedup: {{}}
  decontaminate: {{eval_sets: [{ROOT / 'data/defects_sample.jsonl'}]}}
  template: {{format: chat, system_prompt: You are helpful.}}
  export: {{validation_fraction: 0.2}}
""")
    env = {**os.environ, "SEEDTUNE_TEST_WRITER": "writer-from-env"}
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    return tmp / "run"


def test_dataset_splits_add_up_to_card(run_dir):
    dd = datasets.load_from_disk(str(run_dir / "export" / "dataset"))
    assert set(dd) == {"train", "validation"} and len(dd["validation"]) > 0
    card = (run_dir / "export" / "README.md").read_text()
    final = int(re.search(r"dataset of (\d+) examples", card).group(1))
    assert len(dd["train"]) + len(dd["validation"]) == final
    assert not {r["task_id"] for r in dd["train"]} & {r["task_id"] for r in dd["validation"]}


def test_alpaca_json_and_messages(run_dir):
    data = json.loads((run_dir / "export" / "alpaca_data.json").read_text())
    assert data and all(set(r) == {"instruction", "input", "output"} for r in data)
    assert all(isinstance(r["input"], str) for r in data)
    tok = tiny_tokenizer()
    rows = [json.loads(line) for line in (run_dir / "export" / "messages.jsonl").read_text().splitlines()]
    assert len(rows) == len(data)
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        ids = tok.apply_chat_template(row["messages"], tokenize=True)
        assert len(ids) > 0


def test_funnel_adds_up_and_matches_status(run_dir):
    funnel = json.loads((run_dir / "export" / "funnel.json").read_text())["funnel"]
    remaining = None
    for row in funnel:
        if row["removed"] is not None and remaining is not None:
            assert row["remaining"] == remaining - row["removed"], row
        if not row["step"].endswith("requests") and not row["step"].startswith("final: examples"):
            remaining = row["remaining"]
    assert not any("unaccounted" in r["step"] for r in funnel)
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    final_tasks = next(r for r in funnel if r["step"] == "final: tasks")["remaining"]
    assert final_tasks == manifest["decontaminate"]["rows_out"]
    removed = {r["step"]: r["removed"] for r in funnel if r["removed"]}
    for stage in ("filter", "dedup", "decontaminate"):
        for rule, n in manifest[stage]["rejected"].items():
            rec = [json.loads(x) for x in (run_dir / stage / "rejected.jsonl").read_text().splitlines()]
            task_level = sum(1 for x in rec if x["rule"] == rule and "task_id" not in x["record"])
            if task_level:
                assert removed[f"{stage}: {rule}"] == task_level
    s = subprocess.run([sys.executable, "-m", "pipeline", "status", str(run_dir)], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    line = next(x for x in s.stdout.splitlines() if x.startswith("export "))
    assert str(funnel[-1]["remaining"]) in line.split()


def test_plots_exist_and_are_referenced(run_dir):
    card = (run_dir / "export" / "README.md").read_text()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", card)
    assert len(pngs) >= 2
    for p in pngs:
        assert (run_dir / "export" / p).stat().st_size > 1000
    assert card.startswith("---\nlicense:") and "size_categories" in card


def test_dataset_card_names_the_model_the_run_used(run_dir):
    card = (run_dir / "export" / "README.md").read_text()
    assert "stage `generate`: test `writer-from-env`" in card  # resolved, as the generate stage called it
    assert "${" not in card and "unset-writer" not in card
    assert "pypi.org" not in card and str(run_dir) not in card


def test_plots_have_axis_labels(run_dir, monkeypatch):
    import matplotlib.pyplot as plt

    from pipeline.records import TrainingExample
    from pipeline.stages import card

    examples = [TrainingExample.model_validate_json(x)
                for x in (run_dir / "template" / "records.jsonl").read_text().splitlines()]
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    card.plots(run_dir / "export", examples, [0.1, 0.5], card.leading_verbs(examples))
    axes = [ax for fig in figures for ax in fig.axes]
    assert len(axes) == 5 and all(ax.get_xlabel() and ax.get_ylabel() for ax in axes)


def sentencepiece_like_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tinymodel import CORPUS

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("make_tok", [tiny_tokenizer, sentencepiece_like_tokenizer])
def test_alpaca_prompt_is_token_prefix(make_tok):
    tok = make_tok()
    tasks = [Task(id=f"t{i}", instruction=ins, instances=[Instance(input=inp, output=out)])
             for i, (ins, inp, out) in enumerate([
                 ("Classify the review.", "Great food!", "C"), ("Name a color.", "", "Blue"),
                 ("Add the numbers.", "2, 3", "5"), ("Translate to French.", "Hello", " Bonjour"),
                 ("Give a tip.", "", "\nDrink water."), ("Copy the input.", "abc def", "abc def")])]
    for t in tasks:
        ex = render_example(t, 0, Options(format="alpaca"))
        assert ex.prompt.endswith("### Response:\n")
        p = tok(ex.prompt)["input_ids"]
        full = tok(ex.prompt + ex.response)["input_ids"]
        assert full[: len(p)] == p, (t.instruction, tok.convert_ids_to_tokens(p[-3:]), tok.convert_ids_to_tokens(full[len(p) - 3:len(p) + 2]))


def test_push_to_hub_uploads_the_card_and_its_plots_with_the_hubs_data_metadata(run_dir, monkeypatch):
    """The Hub is replaced by recorders (no network here): the splits go up, then the plots, then our card as the
    repo's README.md, carrying the data files' metadata that push_to_hub wrote into the repo's own card."""
    import huggingface_hub

    from pipeline.stages import export

    calls = []
    hub_card = huggingface_hub.DatasetCard(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "dataset_info:\n  splits:\n  - name: train\n    num_examples: 7\n---\nwritten by datasets\n")
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub",
                        lambda self, repo_id, **kw: calls.append(("data", repo_id, kw["private"], kw["token"])))
    monkeypatch.setattr(huggingface_hub.DatasetCard, "load",
                        classmethod(lambda cls, repo_id, repo_type=None, token=None: hub_card))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("folder", kw["repo_id"], kw["repo_type"],
                                                         sorted(p.name for p in Path(kw["folder_path"]).glob("*.png")),
                                                         kw["allow_patterns"])))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file",
                        lambda self, **kw: calls.append(("file", kw["repo_id"], kw["path_in_repo"],
                                                         kw["path_or_fileobj"].decode())))
    out = run_dir / "export"
    dd = datasets.load_from_disk(str(out / "dataset"))
    export.push(dd, out, export.PushToHub(repo_id="org/data"), "hf_secret")
    assert [c[0] for c in calls] == ["data", "folder", "file"]
    assert calls[0] == ("data", "org/data", True, "hf_secret")
    assert calls[1][3] and calls[1][4] == ["*.png"]
    _, repo, path, readme = calls[2]
    assert (repo, path) == ("org/data", "README.md")
    card = huggingface_hub.DatasetCard(readme)
    assert card.data["configs"][0]["data_files"][0]["path"] == "data/train-*"  # the Hub's, not the local files'
    assert card.data["dataset_info"]["splits"][0]["num_examples"] == 7
    local = (out / "README.md").read_text()
    assert card.text.strip() == local.split("---", 2)[2].strip()  # the funnel, the statistics, the plots
    assert "hf_secret" not in readme
