"""The filter, dedup and decontaminate stages: by hand-built contexts, and through the runner on a data set
with known defects (no generation stage: cleaning an existing file)."""

import json
import logging
import random
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from pipeline.records import Instance, Rejection, Task, read_jsonl, write_jsonl
from pipeline.stages import decontaminate, dedup
from pipeline.stages import filter as filter_stage
from pipeline.stages.context import RECORDS_FILE, REJECTED_FILE, StageContext, StageInput

ROOT = Path(__file__).resolve().parent.parent
DEFECTS = ROOT / "data" / "defects_sample.jsonl"
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def stage_dir(tmp_path: Path, name: str, tasks: list[Task]) -> StageInput:
    folder = tmp_path / name
    write_jsonl(folder / RECORDS_FILE, tasks)
    return StageInput(name=name, kind=name, dir=folder)


def run_stage(tmp_path: Path, module, options, inputs: list[StageInput], name: str | None = None):
    name = name or module.__name__.rsplit(".", 1)[-1]
    out = tmp_path / f"out_{name}"
    out.mkdir()
    ctx = StageContext(name=name, kind=name, options=options, seed=0, run_dir=tmp_path, out_dir=out,
                       scratch_dir=tmp_path / "scratch", inputs=inputs, get_model=lambda n: None,
                       log=logging.getLogger("test"), show_progress=False)
    module.run(ctx)
    ctx.close()
    kept = list(read_jsonl(out / RECORDS_FILE, Task))
    rejected = list(read_jsonl(out / REJECTED_FILE, Rejection)) if (out / REJECTED_FILE).exists() else []
    return kept, rejected, ctx.stats


def task(tid: str, instruction: str, *instances: tuple[str, str], **kw) -> Task:
    return Task(id=tid, instruction=instruction, instances=[Instance(input=i, output=o) for i, o in instances], **kw)


def defect_records() -> list[dict]:
    return [json.loads(line) for line in DEFECTS.read_text(encoding="utf-8").splitlines() if line.strip()]


def expected_drops(recs: list[dict], profile: str) -> dict[str, str]:
    """id -> the rule written to drop it under ``profile`` (``expected_general`` where the general profile
    judges it otherwise: "valid" when it keeps the record)."""
    out = {}
    for r in recs:
        rule = r.get("expected_general", r.get("expected_rule")) if profile == "general" else r.get("expected_rule")
        if rule and rule != "valid":
            out[r["id"]] = rule
    return out


def as_task(r: dict) -> Task:
    return Task.model_validate({k: v for k, v in r.items() if not k.startswith("expected_")})


def record_id(rej: Rejection) -> str:
    return rej.record.get("id") or rej.record["task_id"]


# ---- filter ---------------------------------------------------------------------------------------------
def test_a_rejection_line_is_the_rejection_record_serialised(tmp_path):
    """reject() writes each line by hand (the record serialised once): the bytes dumps(Rejection(...)) writes,
    for a model and a dict, several rules and reasons that need escaping."""
    from pipeline.records import dumps

    ctx = StageContext(name="dedup", kind="dedup", options=None, seed=0, run_dir=tmp_path, out_dir=tmp_path,
                       scratch_dir=tmp_path, inputs=[], get_model=lambda n: None, log=logging.getLogger("test"))
    t = task("t1", 'Say "hi"\n', ("in", "out"), meta={"rouge_score": 0.812345, "rouge_nearest": "s3"})
    calls = [(t, "rouge_near_duplicate", 'ROUGE-L 0.812 > 0.7 with "s3"'), ({"id": "d", "x": [1, 2.5]}, "other", "ü\t"),
             (t, "rouge_near_duplicate", "again")]
    for record, rule, reason in calls:
        ctx.reject(record, rule, reason)
    ctx.close()
    want = [dumps(Rejection(stage="dedup", rule=rule, reason=reason,
                            record=r.model_dump() if isinstance(r, Task) else r)) for r, rule, reason in calls]
    assert (tmp_path / REJECTED_FILE).read_text(encoding="utf-8").splitlines() == want
    assert ctx.stats.rejected == {"rouge_near_duplicate": 2, "other": 1}


@pytest.mark.parametrize("profile", ["self_instruct", "general", "auto"])
def test_filter_drops_exactly_the_defective_records(tmp_path, profile):
    """Each profile drops exactly the records written as its defects (auto: general, as no generation stage
    lies before the filter)."""
    recs = defect_records()
    tasks = [as_task(r) for r in recs]
    inputs = [stage_dir(tmp_path, "seeds", tasks)]
    kept, rejected, stats = run_stage(tmp_path, filter_stage, filter_stage.Options(rules=profile), inputs)
    bad = expected_drops(recs, "general" if profile == "auto" else profile)
    good = {r["id"] for r in recs} - set(bad)
    assert {t.id for t in kept} == good and len(bad) >= 20
    assert {record_id(r) for r in rejected} == set(bad)
    for tid, rule in bad.items():  # each defective record is dropped by the rule it was written for
        assert rule in {r.rule for r in rejected if record_id(r) == tid}, tid
    d = stats.as_dict()
    assert sum(d["rejected"].values()) == d["rejected_total"] == len(rejected)
    assert d["rows_in"] == len(recs) and d["rows_out"] == len(good)
    assert d["metrics"]["instances_out"] == sum(len(t.instances) for t in kept) == len(good)
    assert d["metrics"]["instances_in"] == sum(len(r["instances"]) for r in recs)
    assert d["metrics"]["rules"] == ("general" if profile == "auto" else profile)
    assert all(t.instances[0].input == "" for t in kept if t.id.startswith("ok_noinput"))


def test_filter_drops_single_instances_and_reports_each(tmp_path):
    tasks = [
        task("mixed", "Translate the word into French.", ("cat", "chat"), ("dog", "N/A"), ("cat", "chat"),
             ("house", "maison")),
        task("many", "Give the square of the number.", *[(str(i), str(i * i)) for i in range(2, 9)]),
        task("instruction_only", "Suggest a name for a new bakery."),
        task("instruction_only_bad", "Draw a cat."),
        task("conflict", "Give the capital of the country.", ("France", "Paris"), ("France", "Lyon")),
    ]
    inputs = [stage_dir(tmp_path, "in", tasks)]
    kept, rejected, stats = run_stage(tmp_path, filter_stage, filter_stage.Options(), inputs)
    by_id = {t.id: t for t in kept}
    assert [(i.input, i.output) for i in by_id["mixed"].instances] == [("cat", "chat"), ("house", "maison")]
    assert len(by_id["many"].instances) == 5
    assert "instruction_only" in by_id and "instruction_only_bad" not in by_id and "conflict" not in by_id
    rules = [(record_id(r), r.rule) for r in rejected]
    assert ("mixed", "placeholder_output") in rules and ("mixed", "duplicate_instance") in rules
    assert rules.count(("many", "max_instances")) == 2
    assert ("conflict", "conflicting_instances") in rules
    inst = next(r for r in rejected if r.rule == "placeholder_output")
    assert inst.record["instance"] == 1 and inst.record["input"] == "dog"
    assert sum(stats.rejected.values()) == len(rejected)
    assert stats.metrics == {"rules": "general", "languages": ["en"], "instances_in": 13, "instances_out": 7}


def test_filter_options_turn_rules_off(tmp_path):
    tasks = [task("t", "Draw a cat.", ("", "N/A"))]
    opts = filter_stage.Options.model_validate({"rules": "self_instruct",
                                                "instruction_rules": {"min_words": 1, "blacklist": []},
                                                "instance_rules": {"placeholder_output": False}})
    kept, rejected, _ = run_stage(tmp_path, filter_stage, opts, [stage_dir(tmp_path, "in", tasks)])
    assert [t.id for t in kept] == ["t"] and not rejected
    # a setting changes that one rule of the profile: the general profile's own rules stay on
    opts = filter_stage.Options.model_validate({"rules": "general", "instance_rules": {"placeholder_output": False}})
    kept, rejected, _ = run_stage(tmp_path, filter_stage, opts, [stage_dir(tmp_path, "in2", tasks)], name="f2")
    assert not kept and [r.rule for r in rejected] == ["artifact_request"]
    opts = filter_stage.Options.model_validate({"rules": "general", "instruction_rules": {"artifact_request": False},
                                                "instance_rules": {"placeholder_output": False}})
    kept, rejected, _ = run_stage(tmp_path, filter_stage, opts, [stage_dir(tmp_path, "in3", tasks)], name="f3")
    assert [t.id for t in kept] == ["t"] and not rejected
    with pytest.raises(ValueError):
        filter_stage.Options.model_validate({"instruction_rules": {"no_such_rule": True}})


# ---- dedup ----------------------------------------------------------------------------------------------
SEEDS = [task("seed_0", "Write a poem about the sea.", ("", "Waves.")),
         task("seed_1", "List three fruits that are red.", ("", "Apple, cherry, strawberry."))]
GENERATED = [
    task("g0", "Write a short poem about the sea.", ("", "x")),  # near-duplicate of seed_0
    task("g1", "Explain how a rainbow forms.", ("", "x")),
    task("g2", "explain  how a RAINBOW forms.", ("", "y")),  # exact duplicate of g1 once normalised
    task("g3", "Explain how a rainbow forms in the sky.", ("", "x")),  # near-duplicate of g1
    task("g4", "Give two tips for better sleep.", ("", "x")),
    task("g5", "Classify the sentence as positive or negative.", ("I loved it", "positive")),
    task("g6", "Classify the sentence as positive or negative.", ("I hated it", "negative")),
]


def brute_best(text: str, pool: list[Task]) -> tuple[float, str | None]:
    best, key = 0.0, None
    for t in pool:
        f = SCORER.score(text, t.instruction)["rougeL"].fmeasure
        if f > best:
            best, key = f, t.id
    return best, key


@pytest.mark.parametrize("mode,exact_nearest", [("exact", True), ("exact", False), ("minhash", False)])
def test_dedup_exact_and_near_duplicates_against_seeds(tmp_path, mode, exact_nearest):
    inputs = [stage_dir(tmp_path, "seeds", SEEDS), stage_dir(tmp_path, "generate", GENERATED)]
    kept, rejected, stats = run_stage(tmp_path, dedup, dedup.Options(mode=mode, exact_nearest=exact_nearest), inputs)
    assert [t.id for t in kept] == ["g1", "g4", "g5"]
    rules = {record_id(r): r.rule for r in rejected}
    assert rules == {"g0": "rouge_near_duplicate", "g2": "exact_duplicate", "g3": "rouge_near_duplicate",
                     "g6": "rouge_near_duplicate"}
    near = {record_id(r): r for r in rejected if r.rule == "rouge_near_duplicate"}
    assert near["g0"].record["meta"]["rouge_nearest"] == "seed_0" and "seed_0" in near["g0"].reason
    assert near["g3"].record["meta"]["rouge_nearest"] == "g1"
    # every rejection carries its exact nearest kept instruction and score; a kept one the exact nearest with
    # exact_nearest, else a lower bound (the best among the items that could have come close)
    pool = list(SEEDS)
    for t in kept:
        score, key = brute_best(t.instruction, pool)
        if exact_nearest:
            assert t.meta["rouge_score"] == round(score, 6) and t.meta["rouge_nearest"] == key
        else:
            assert t.meta["rouge_score"] <= round(score, 6)
        pool.append(t)
    assert stats.rows_in == len(GENERATED) and sum(stats.rejected.values()) == len(rejected)
    assert stats.metrics["pool_seeds"] == 2


def test_dedup_without_seeds_and_on_instruction_input(tmp_path):
    inputs = [stage_dir(tmp_path, "seeds", SEEDS), stage_dir(tmp_path, "generate", GENERATED)]
    kept, _, _ = run_stage(tmp_path, dedup, dedup.Options(against_seeds=False), inputs)
    assert [t.id for t in kept] == ["g0", "g1", "g4", "g5"]  # g0 is new without seeds
    same_instruction = [task("a", "Summarize the article in one sentence.", ("The city council voted on a new park "
                                                                            "budget after a long debate.", "x")),
                        task("b", "Summarize the article in one sentence.", ("Scientists found water ice in a "
                                                                            "crater near the lunar south pole.", "y"))]
    only = [stage_dir(tmp_path, "generate2", same_instruction)]
    kept, _, _ = run_stage(tmp_path, dedup, dedup.Options(rouge_on="instruction"), only, name="d1")
    assert [t.id for t in kept] == ["a"]
    kept, _, _ = run_stage(tmp_path, dedup, dedup.Options(rouge_on="instruction_input"), only, name="d2")
    assert [t.id for t in kept] == ["a", "b"]
    kept, _, stats = run_stage(tmp_path, dedup, dedup.Options(), only, name="d3")  # auto: a file, no generation
    assert [t.id for t in kept] == ["a", "b"] and stats.metrics["compared"] == "instruction_input"
    gen = StageInput(name="gen", kind="generate", dir=only[0].dir)
    kept, _, stats = run_stage(tmp_path, dedup, dedup.Options(), [gen], name="d4")  # auto after generation
    assert [t.id for t in kept] == ["a"] and stats.metrics["compared"] == "instruction"


def test_dedup_cleans_a_seed_file_without_comparing_it_to_itself(tmp_path):
    """g6 shares g5's instruction with another input: a different task in a file of Alpaca records."""
    kept, rejected, _ = run_stage(tmp_path, dedup, dedup.Options(), [stage_dir(tmp_path, "seeds", GENERATED)])
    assert [t.id for t in kept] == ["g0", "g1", "g4", "g5", "g6"]
    assert {record_id(r) for r in rejected} == {"g2", "g3"}


# ---- decontaminate --------------------------------------------------------------------------------------
def write_eval_sets(tmp_path: Path) -> tuple[Path, Path]:
    user = tmp_path / "user_oriented_instructions.jsonl"
    user.write_text("\n".join(json.dumps(r) for r in [
        {"id": "user_oriented_task_0", "motivation_app": "Grammarly",
         "instruction": "The sentence you are given might be too wordy, complicated, or unclear. Rewrite the sentence "
                        "and make your writing clearer by keeping it concise.",
         "instances": [{"input": "If you have any questions about my rate or if you find it necessary to increase "
                                 "or decrease the scope for this project, please let me know.", "output": "..."}]},
        {"id": "user_oriented_task_1", "motivation_app": "Netflix",
         "instruction": "Recommend three movies for a rainy weekend.", "instances": [{"input": "", "output": "..."}]},
    ]) + "\n", encoding="utf-8")
    alpaca = tmp_path / "eval_alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Name the chemical symbol for gold.", "input": "", "output": "Au"}]),
                      encoding="utf-8")
    return user, alpaca


def test_decontaminate_ngram_and_rouge(tmp_path):
    user, alpaca = write_eval_sets(tmp_path)
    tasks = [
        task("ngram_hit", "Please fix this text.", ("If you have any questions about my rate or if you find it "
                                                     "necessary to change things, call me.", "x")),
        task("ngram_miss", "Please fix this text.", ("If you have any questions about my rate or if you find "
                                                     "the price too high, call me.", "x")),
        task("rouge_hit", "Recommend three movies for a rainy weekend evening.", ("", "x")),
        task("rouge_hit_alpaca", "Name the chemical symbol of gold.", ("", "x")),
        task("rouge_miss", "Recommend three books for a long train journey.", ("", "x")),
    ]
    opts = decontaminate.Options(eval_sets=[str(user), str(alpaca)])
    kept, rejected, stats = run_stage(tmp_path, decontaminate, opts, [stage_dir(tmp_path, "dedup", tasks)])
    assert [t.id for t in kept] == ["ngram_miss", "rouge_miss"]
    rules = {record_id(r): r for r in rejected}
    assert rules["ngram_hit"].rule == "decontam_ngram" and "user_oriented_task_0" in rules["ngram_hit"].reason
    assert rules["rouge_hit"].rule == "decontam_rouge" and "user_oriented_task_1" in rules["rouge_hit"].reason
    assert rules["rouge_hit_alpaca"].rule == "decontam_rouge" and "eval_alpaca.json" in rules["rouge_hit_alpaca"].reason
    assert stats.metrics["eval_records"] == 3 and sum(stats.rejected.values()) == 3
    # each check can be switched off
    only_ngram = decontaminate.Options(eval_sets=[str(user), str(alpaca)], rouge_threshold=None)
    kept, _, _ = run_stage(tmp_path, decontaminate, only_ngram, [stage_dir(tmp_path, "dedup", tasks)], name="d2")
    assert [t.id for t in kept] == ["ngram_miss", "rouge_hit", "rouge_hit_alpaca", "rouge_miss"]


def test_decontaminate_accepts_the_seed_format(tmp_path, shared_seeds):
    seeds = [json.loads(line) for line in shared_seeds.read_text().splitlines() if line.strip()]
    tasks = [task("copy", seeds[3]["instruction"], ("", "x")), task("new", "Summarize the plot of a novel you like.",
                                                                     ("", "x"))]
    opts = decontaminate.Options(eval_sets=[str(shared_seeds)])
    kept, rejected, _ = run_stage(tmp_path, decontaminate, opts, [stage_dir(tmp_path, "in", tasks)])
    assert [t.id for t in kept] == ["new"] and rejected[0].rule in ("decontam_ngram", "decontam_rouge")


# ---- through the runner: cleaning an existing file, no generation stage --------------------------------
def test_clean_a_file_through_the_runner(tmp_path):
    from pipeline.cli import main

    user, _ = write_eval_sets(tmp_path)
    run = tmp_path / "run"
    cfg = tmp_path / "clean.yaml"
    cfg.write_text(f"name: clean\nrun_dir: {run}\nstages:\n  seeds: {{path: {DEFECTS}}}\n  filter: {{}}\n"
                   f"  dedup: {{}}\n  decontaminate: {{eval_sets: [{user}]}}\n", encoding="utf-8")
    assert main(["run", str(cfg), "--no-progress"]) == 0
    recs = defect_records()
    good = sorted(set(r["id"] for r in recs) - set(expected_drops(recs, "general")))  # auto: a file, no generation
    assert sorted(json.loads(x)["id"] for x in (run / "filter" / RECORDS_FILE).read_text().splitlines()) == good
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    for name in ("filter", "dedup", "decontaminate"):
        st = manifest[name]
        lines = (run / name / REJECTED_FILE).read_text().splitlines() if (run / name / REJECTED_FILE).exists() else []
        assert sum(st["rejected"].values()) == st["rejected_total"] == len(lines), name
    assert manifest["filter"]["rejected_total"] > len(recs) - len(good)  # instance drops + the tasks they empty
    assert manifest["dedup"]["rows_in"] == len(good)


def test_cleaning_an_alpaca_file_keeps_its_records_through_the_cli(tmp_path):
    """seeds -> filter -> dedup on an Alpaca file: the seeds are the data, never a pool it is compared with,
    so no record is dropped as a near-duplicate of itself."""
    import subprocess
    import sys

    run = tmp_path / "run"
    cfg = tmp_path / "clean.yaml"
    cfg.write_text(f"name: clean\nrun_dir: {run}\nstages:\n  seeds: {{path: {ROOT / 'data/alpaca_sample.json'}}}\n"
                   f"  filter: {{}}\n  dedup: {{}}\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    filtered = list(read_jsonl(run / "filter" / RECORDS_FILE, Task))
    kept = list(read_jsonl(run / "dedup" / RECORDS_FILE, Task))
    assert len(filtered) >= 15 and [t.id for t in kept] == [t.id for t in filtered]
    assert not (run / "dedup" / REJECTED_FILE).exists()
    stage = json.loads((run / "manifest.json").read_text())["stages"]["dedup"]
    assert stage["metrics"]["pool_seeds"] == 0 and stage["rejected_total"] == 0


def test_dedup_compares_with_the_seeds_only_after_a_generation_stage(tmp_path):
    seeds = stage_dir(tmp_path, "seeds", SEEDS)
    gen = StageInput(name="gen", kind="generate", dir=stage_dir(tmp_path, "gen", GENERATED).dir)
    filt = StageInput(name="clean", kind="filter", dir=stage_dir(tmp_path, "clean", GENERATED).dir)
    kept, _, stats = run_stage(tmp_path, dedup, dedup.Options(), [seeds, gen, filt], name="d1")
    assert stats.metrics["pool_seeds"] == 2 and "g0" not in {t.id for t in kept}  # g0 repeats seed_0
    kept, _, stats = run_stage(tmp_path, dedup, dedup.Options(), [seeds, filt], name="d2")
    assert stats.metrics["pool_seeds"] == 0 and "g0" in {t.id for t in kept}


def test_an_evol_rewrite_is_not_a_near_duplicate_of_its_parent(tmp_path):
    """An Evol rewrite adds a constraint to its parent's words: close to its parent by construction, which the
    rewrite is for; close to any other kept instruction, it is a duplicate as usual."""
    from pipeline.records import Provenance

    parent = SEEDS[0].instruction
    evolved = [
        task("e0", "Write a short poem about the sea in four lines.", ("", "x"),
             provenance=Provenance(extra={"evol_parent": parent})),
        task("e1", "Write a short poem about the sea in four lines and rhyme.", ("", "x"),
             provenance=Provenance(extra={"evol_parent": "List three fruits that are red."})),
    ]
    seeds = stage_dir(tmp_path, "seeds", SEEDS)
    gen = StageInput(name="gen", kind="generate", dir=stage_dir(tmp_path, "gen", evolved).dir)
    kept, rejected, _ = run_stage(tmp_path, dedup, dedup.Options(), [seeds, gen])
    assert [t.id for t in kept] == ["e0"]  # e1 is close to e0 (not its parent): a duplicate
    assert [(record_id(r), r.rule) for r in rejected] == [("e1", "rouge_near_duplicate")]
    plain = [t.model_copy(update={"provenance": None}) for t in evolved]
    gen2 = StageInput(name="gen2", kind="generate", dir=stage_dir(tmp_path, "gen2", plain).dir)
    kept, rejected, _ = run_stage(tmp_path, dedup, dedup.Options(), [seeds, gen2], name="d2")
    # without the lineage, e0 is a near-duplicate of the seed it came from (and e1, longer, is not)
    assert [t.id for t in kept] == ["e1"] and [(record_id(r), r.record["meta"]["rouge_nearest"]) for r in rejected] \
        == [("e0", "seed_0")]


@pytest.mark.parametrize("t", [0.6, 0.7])
def test_minhash_decisions_for_a_whole_set_are_the_index_decisions_record_by_record(t):
    from pipeline.text.minhash import MinHashIndex, decide
    from pipeline.text.rouge import Decision, tokenize

    rng = random.Random(11)
    words = "river planet budget violin harbor recipe garden ladder census poetry saddle tunnel magnet".split()
    texts = [f"Describe the {a} and the {b}." for a, b in zip(words, words[1:])] + [""]  # a pool of seeds
    for _ in range(1500):  # a crowded template (many candidates), variants, empty texts
        r = rng.random()
        if r < 0.02:
            texts.append("...")
        elif r < 0.5:
            texts.append(f"{rng.choice(['Describe', 'Explain', 'Compare'])} the {' and the '.join(rng.sample(words, 3))}.")
        else:
            texts.append(" ".join(rng.sample(words, rng.randint(3, 9))))
    seeds = 13
    index, expected = MinHashIndex(t), {}
    for n, text in enumerate(texts):
        if n < seeds:
            index.add(text, str(n))
        else:
            expected[n] = index.check_and_add(text, str(n))
    got = decide([tokenize(x) for x in texts], t, fixed=seeds)
    assert {n: got.get(n, Decision(True, 0.0, None)) for n in expected} == expected
    assert sum(not d.kept for d in expected.values()) > 300 and len(got) < len(expected)


def test_dedup_on_ray_runs_exact_and_minhash_mode_not_embedding():
    from pydantic import ValidationError

    for mode in ("exact", "minhash"):
        assert dedup.Options(mode=mode, executor="ray").executor == "ray"
    with pytest.raises(ValidationError, match="not mode: embedding"):
        dedup.Options(mode="embedding", executor="ray")
