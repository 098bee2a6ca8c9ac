"""Cleaning data sets no one here wrote, through the CLI: columns named otherwise, shared boilerplate, valid
records that mention the originals' blacklist words, Alpaca records that share an instruction, Chinese text;
a stage that removes everything stops the run; a stage that drops more than half says so. The small files
under tests/data/ were written for these tests; the real public sets in ../shared/data/real/ are used where
present."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.records import Task, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
REAL = ROOT.parent / "shared" / "data" / "real"
CLEAN = "  filter: {{}}\n  dedup: {{}}\n  template: {{format: alpaca}}\n  export: {{}}\n"


def seedtune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def clean(tmp_path: Path, path: Path, seeds_extra: str = "", stages: str = CLEAN, name: str = "clean") -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"name: {name}\nrun_dir: {tmp_path / name}\nstages:\n"
                   f"  seeds: {{path: {path}{seeds_extra}}}\n" + stages.format(), encoding="utf-8")
    return cfg


def kept(run: Path, stage: str) -> list[Task]:
    return list(read_jsonl(run / stage / "records.jsonl", Task))


def stage_info(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "_stage.json").read_text())


# ---- 1. a column that is not there ---------------------------------------------------------------------
def test_an_answer_column_named_response_is_read(tmp_path):
    r = seedtune("run", str(clean(tmp_path, DATA / "response_column.json")), "--no-progress")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "clean"
    tasks = kept(run, "seeds")
    assert all(t.instances[0].output for t in tasks) and len(kept(run, "filter")) == len(tasks) == 6
    assert stage_info(run, "seeds")["stats"]["metrics"]["columns"] == {"instruction": "instruction", "input": "input",
                                                                        "output": "response"}
    assert len(json.loads((run / "export" / "alpaca_data.json").read_text())) == 6
    assert "output='response'" in (run / "seedtune.log").read_text()


def test_a_configured_column_missing_from_the_file_is_one_line_naming_the_columns(tmp_path):
    path = DATA / "response_column.json"
    r = seedtune("run", str(clean(tmp_path, path, ", columns: {output: answer}")), "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: {path}: no column 'answer' for the output (columns: instruction, input, response)" in r.stderr


def test_a_file_whose_outputs_are_all_empty_is_an_error_unless_allowed(tmp_path):
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps([{"instruction": "Name a river in Europe.", "reply": "The Danube."},
                                {"instruction": "Name a desert in Africa.", "reply": "The Sahara."}]))
    r = seedtune("run", str(clean(tmp_path, path)), "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no output column (recognised: output, response, completion, answer, target)" in r.stderr
    r = seedtune("run", str(clean(tmp_path, path, ", allow_empty_outputs: true", stages="", name="allowed")),
                 "--no-progress")
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not (REAL / "gpteacher_codegen.json").exists(), reason="../shared/data/real is not present")
def test_gpteacher_codegen_is_cleaned_not_emptied(tmp_path):
    r = seedtune("run", str(clean(tmp_path, REAL / "gpteacher_codegen.json")), "--no-progress")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "clean"
    assert stage_info(run, "filter")["stats"]["rows_in"] == 4535
    filtered = stage_info(run, "filter")["stats"]
    assert filtered["rows_out"] >= 0.995 * filtered["rows_in"], filtered["rejected"]
    assert len(json.loads((run / "export" / "alpaca_data.json").read_text())) > 3000


# ---- 2. a stage that removes everything; one that drops more than half ---------------------------------
def test_a_stage_that_removes_everything_stops_the_run_naming_the_rule(tmp_path):
    path = tmp_path / "copies.json"
    path.write_text(json.dumps([{"instruction": f"Repeat the phrase number {i} back to me.", "input": f"phrase {i}",
                                 "output": f"phrase {i}"} for i in range(6)]))
    cfg = clean(tmp_path, path)
    for _ in range(2):  # also when the stage is cached
        r = seedtune("run", str(cfg), "--no-progress")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        error = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert error == [f"error: stage 'filter' removed all 6 records (most by input_equals_output 6, "
                         f"no_instances_left 6); the run stops here. The drops and their reasons: "
                         f"{tmp_path / 'clean' / 'filter' / 'rejected.jsonl'}"]
        assert not (tmp_path / "clean" / "export").exists()


def test_a_stage_that_drops_more_than_half_says_so_with_two_examples(tmp_path):
    recs = [{"instruction": f"Give the answer to question {i}.", "input": "", "output": "N/A"} for i in range(6)]
    recs += [{"instruction": "Name a planet with rings.", "input": "", "output": "Saturn."},
             {"instruction": "Name an ocean on Earth.", "input": "", "output": "The Pacific."}]
    path = tmp_path / "mostly_empty.json"
    path.write_text(json.dumps(recs))
    r = seedtune("run", str(clean(tmp_path, path)), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "+ filter: complete" in r.stderr and "dropped 75%, most by placeholder_output (6)" in r.stderr
    assert "e.g. record_0: Give the answer to question 0. -> the output is a placeholder ('N/A')" in r.stderr
    card = (tmp_path / "clean" / "export" / "README.md").read_text()
    assert "**Stage `filter` dropped 75% of the records it read**, most by `placeholder_output` (6)" in card
    assert "- record_1: Give the answer to question 1. — the output is a placeholder ('N/A')" in card


# ---- 3. rules judge the defect, not the word -----------------------------------------------------------
def test_valid_records_that_mention_blacklist_words_are_kept(tmp_path):
    """Word problems that mention pictures, videos, music, files, maps, "go to" and drawing cards, a problem of
    over 150 words, and programming tasks that read files, parse URLs or plot with matplotlib."""
    path = DATA / "valid_mentions.json"
    r = seedtune("run", str(clean(tmp_path, path)), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert len(kept(tmp_path / "clean", "filter")) == len(json.loads(path.read_text())) == 18
    assert stage_info(tmp_path / "clean", "filter")["stats"]["metrics"]["rules"] == "general"
    # the originals' rules, kept word for word as a profile, drop most of them
    r = seedtune("run", str(clean(tmp_path, path, stages="  filter: {{rules: self_instruct}}\n", name="si")),
                 "--no-progress")
    assert r.returncode == 0, r.stderr
    rejected = stage_info(tmp_path / "si", "filter")["stats"]["rejected"]
    assert rejected["blacklist"] >= 10 and rejected["too_long"] == 1


# ---- 4. Alpaca identity; Chinese text --------------------------------------------------------------------
def test_records_sharing_an_instruction_with_other_inputs_are_different_tasks(tmp_path):
    r = seedtune("run", str(clean(tmp_path, DATA / "same_instruction.json")), "--no-progress")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "clean"
    assert [t.id for t in kept(run, "dedup")] == [f"record_{i}" for i in range(8)]
    [dup] = [json.loads(ln) for ln in (run / "seeds" / "rejected.jsonl").read_text().splitlines()]
    assert dup["rule"] == "duplicate_record" and dup["record"]["id"] == "record_8"
    assert "record_3" in dup["reason"]
    assert stage_info(run, "dedup")["stats"]["metrics"]["compared"] == "instruction_input"


def test_chinese_records_are_kept_and_deduplicated(tmp_path):
    r = seedtune("run", str(clean(tmp_path, DATA / "chinese.json")), "--no-progress")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "clean"
    assert stage_info(run, "filter")["stats"]["metrics"]["languages"] == ["zh"]
    assert len(kept(run, "filter")) == 6
    [near] = [json.loads(ln) for ln in (run / "dedup" / "rejected.jsonl").read_text().splitlines()]
    assert near["record"]["id"] == "record_2" and "record_0" in near["reason"]
    assert "language:\n- zh\n" in (run / "export" / "README.md").read_text()


def test_a_shared_preamble_does_not_make_records_near_duplicates(tmp_path):
    """42 tool-use tasks behind one 60-word tool description: the stage compares the task lines (40 distinct,
    2 near-duplicates), and says how much text it left out."""
    r = seedtune("run", str(clean(tmp_path, DATA / "shared_preamble.json")), "--no-progress")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "clean"
    assert len(kept(run, "dedup")) == 40
    dropped = sorted(json.loads(ln)["record"]["id"] for ln in (run / "dedup" / "rejected.jsonl").read_text().splitlines())
    assert dropped == ["record_40", "record_41"]
    shared = stage_info(run, "dedup")["stats"]["metrics"]["shared_text"]
    assert shared["records"] == 42 and shared["tokens_left_out"] >= 42 * 50
    # without leaving it out, the preamble makes almost every record a near-duplicate of the first
    r = seedtune("run", str(clean(tmp_path, DATA / "shared_preamble.json",
                                  stages="  dedup: {{shared_text: false}}\n", name="whole")), "--no-progress")
    assert r.returncode == 0 and len(kept(tmp_path / "whole", "dedup")) < 5


# ---- 5. the card's similarity numbers come from dedup, not a new all-pairs search -----------------------
def test_the_card_of_a_cleaned_file_reads_similarity_from_dedup(tmp_path):
    r = seedtune("run", str(clean(tmp_path, DATA / "shared_preamble.json")), "--no-progress")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "clean"
    card = (run / "export" / "README.md").read_text()
    assert "ROUGE-L to the nearest earlier record, as the dedup stage compared them" in card
    scores = [t.meta["rouge_score"] for t in kept(run, "dedup")]
    assert f"max {round(max(scores), 3)}" in card
