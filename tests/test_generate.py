"""The generation stage: through the real runner (deterministic test backend, a local OpenAI-compatible server)
and by itself against a scripted client."""

import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.models.base import Completion, Failure, ModelRequest
from pipeline.records import Instance, Rejection, Task, read_jsonl, write_jsonl
from pipeline.stages import generate
from pipeline.stages.context import StageContext, StageInput
from pipeline.stages.generate import Options, check
from pipeline.text.templates import render

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"


def run_config(tmp_path, body, name="g"):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"name: {name}\nrun_dir: {tmp_path / name}\nseed: 3\n" + body)
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    return tmp_path / name


BODY = f"""models:
  m: {{backend: test, count_file: COUNT}}
stages:
  seeds: {{path: {ROOT / 'data/seed_tasks.jsonl'}}}
  generate: {{model: m, target: 25, batch_size: 4}}
"""


def requests(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "generate" / "raw_completions.jsonl").read_text().splitlines()]


def test_self_instruct_prompts_and_instances(tmp_path):
    run_dir = run_config(tmp_path, BODY.replace("COUNT", str(tmp_path / "count")))
    journal = __import__("sqlite3").connect(str(run_dir / "journal.sqlite"))
    prompts = [json.loads(r)["prompt"] for (r,) in journal.execute("SELECT request FROM results")]
    seeds = {json.loads(line)["instruction"] for line in (ROOT / "data/seed_tasks.jsonl").read_text().splitlines()}
    boots = [p for p in prompts if p.rstrip().endswith(".") and re.search(r"\n9\.$", p)]
    assert boots, "bootstrap prompts end on the next list number"
    kept = [json.loads(line) for line in (run_dir / "generate" / "records.jsonl").read_text().splitlines()]
    machine = {t["instruction"] for t in kept}
    mixed = 0
    for p in boots:
        items = re.findall(r"^\d+\. (.*)$", p, re.M)
        assert len(items) == 8
        n_seed = sum(i in seeds for i in items)
        assert n_seed in (6, 8)
        mixed += n_seed == 6
    assert mixed > 0  # once the pool has two machine instructions: 6 seeds + 2 machine instructions
    # Classification tasks get output-first instance prompts, others input-first.
    for t in kept:
        tpl = t["provenance"]["extra"]["instances_template"]
        assert tpl.endswith("output_first.j2" if t["is_classification"] else "input_first.j2")
        assert t["instances"] and t["provenance"]["request_key"]
        assert t["meta"]["rouge_score"] <= 0.7
    assert len(kept) <= 25 and any(t["is_classification"] for t in kept)


def test_same_seed_same_dataset(tmp_path):
    a = run_config(tmp_path, BODY.replace("COUNT", str(tmp_path / "c1")), "a")
    b = run_config(tmp_path, BODY.replace("COUNT", str(tmp_path / "c2")), "b")
    assert (a / "generate" / "records.jsonl").read_bytes() == (b / "generate" / "records.jsonl").read_bytes()


def test_alpaca_mode_end_to_end(tmp_path):
    body = BODY.replace("COUNT", str(tmp_path / "c")).replace("target: 25, batch_size: 4",
                                                               "target: 6, batch_size: 2, mode: alpaca, max_requests: 6")
    run_dir = run_config(tmp_path, body)
    prompts = [json.loads(r)["prompt"] for (r,) in __import__("sqlite3").connect(str(run_dir / "journal.sqlite"))
               .execute("SELECT request FROM results")]
    assert all(p.endswith("###\n4. Instruction:") for p in prompts)
    assert all(p.count("Instruction:") == 4 for p in prompts)  # three seed examples, then the next number


@pytest.mark.parametrize("template", sorted(p.name for p in (ROOT / "prompts/self_instruct").glob("*.j2")) +
                         ["alpaca/" + p.name for p in sorted((ROOT / "prompts/alpaca").glob("*.j2"))])
def test_golden_renders(template):
    name = template if "/" in template else f"self_instruct/{template}"
    sample = dict(instructions=["Name the capital of the given country.", "Is the review positive or negative?"],
                  num_new=5, num_tasks=5, instruction="Sort the numbers.", input="3, 1, 2",
                  examples=[{"instruction": "Add the numbers.", "is_classification": False, "input": "2, 3",
                             "output": "5", "instances": [{"input": "2, 3", "output": "5"}]},
                            {"instruction": "Is the review positive or negative?", "is_classification": True,
                             "input": "Great.", "output": "Positive", "instances": [{"input": "Great.", "output": "Positive"}]}])
    text = render(name, **sample)
    golden = GOLDEN / (name.replace("/", "__") + ".txt")
    if os.environ.get("SEEDTUNE_UPDATE_GOLDEN"):  # after a deliberate template change: rewrite, then review the diff
        golden.write_text(text)
    assert golden.exists(), f"no golden render for {name}: run with SEEDTUNE_UPDATE_GOLDEN=1 and review it"
    assert text == golden.read_text()


def test_check_renders_all_templates():
    check(Options(model="m"))
    check(Options(model="m", mode="alpaca", alpaca_style="chat"))
    check(Options(model="m", bootstrap_style="chat", instances_style="answer"))


def test_generate_killed_five_times_resumes_exactly(tmp_path):
    import signal
    import sqlite3
    import time

    def cfg(name, count):
        body = BODY.replace("COUNT", str(count)).replace("{backend: test,", "{backend: test, delay_s: 0.1,")
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\nrun_dir: {tmp_path / name}\nseed: 3\n" + body)
        return path

    def sent(count):
        return count.read_text().split() if count.exists() else []

    ref = run_config(tmp_path, BODY.replace("COUNT", str(tmp_path / "ref-count")), "ref")
    count = tmp_path / "count"
    path = cfg("killed", count)
    rng = random.Random(11)
    resent = []
    for _ in range(5):
        db = tmp_path / "killed" / "journal.sqlite"
        committed = {k for (k,) in sqlite3.connect(str(db)).execute("SELECT key FROM results")} if db.exists() else set()
        start, target = len(sent(count)), len(sent(count)) + rng.randint(2, 8)
        p = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path), "--no-progress"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(sent(count)) < target and p.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.12))
        assert p.poll() is None, "the stage finished before it could be killed"
        p.send_signal(signal.SIGKILL)
        p.wait()
        resent += [k for k in sent(count)[start:] if k in committed]
    db = tmp_path / "killed" / "journal.sqlite"
    committed = {k for (k,) in sqlite3.connect(str(db)).execute("SELECT key FROM results")}
    start = len(sent(count))
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--no-progress"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    resent += [k for k in sent(count)[start:] if k in committed]
    assert resent == []
    for f in ("records.jsonl", "rejected.jsonl", "raw_completions.jsonl"):
        assert (tmp_path / "killed" / "generate" / f).read_bytes() == (ref / "generate" / f).read_bytes()


def test_self_instruct_175_config_against_server_from_env(tmp_path, shared_seeds):
    """configs/self-instruct-175.yaml runs against an OpenAI-compatible server named by the environment."""
    import os

    from openai_server import FakeOpenAI

    from pipeline.models import testing
    from pipeline.models.base import GenParams, ModelRequest

    def answer(body):  # the deterministic test model's answers, served over HTTP
        req = ModelRequest(prompt=body["prompt"], params=GenParams(seed=body.get("seed")))
        return testing.answer(req, testing.Options())

    with FakeOpenAI(answer=answer) as srv:
        env = {**os.environ, "OPENAI_BASE_URL": srv.url, "OPENAI_API_KEY": "test-key", "SEEDTUNE_MODEL": "base"}
        r = subprocess.run([sys.executable, "-m", "pipeline", "run", "configs/self-instruct-175.yaml", "--no-progress",
                            "--set", f"run_dir={tmp_path / 'run'}", "--set", f"stages.seeds.path={shared_seeds}",
                            "--set", "stages.generate.target=12", "--set", "stages.generate.batch_size=4",
                            "--set", "stages.generate.max_requests=40"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        assert all(b["model"] == "base" and "prompt" in b for b in srv.log)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["seeds"]["metrics"]["tasks"] == 175
    assert manifest["stages"]["export"]["rows_out"] > 0
    assert "test-key" not in (tmp_path / "run" / "manifest.json").read_text()


# ---- the stage by itself, against a scripted client -----------------------------------------------------------

VOCAB = [f"{a}{b}" for a in ("bal", "cor", "dun", "fel", "gar", "hol", "jam", "kel", "lom", "mar", "nor", "pel")
         for b in ("ax", "en", "ip", "or", "um", "et", "id", "oz", "uk", "ys")]
SEEDS = [Task(id=f"seed_{i}", instruction=f"{'Classify' if i % 3 == 0 else 'Describe'} the {w} item with care {i}.",
              instances=[Instance(input=f"in {i}", output="Yes" if i % 3 == 0 else f"out {i}")],
              is_classification=i % 3 == 0) for i, w in enumerate(["apple", "river", "stone", "cloud", "lamp", "road",
                                                                  "bread", "coin", "fern", "glass", "honey", "iron"])]


def fresh_instruction(key: str) -> str:
    rng = random.Random(key)
    return ("Classify " if rng.random() < 0.3 else "Explain ") + " ".join(rng.sample(VOCAB, 6)) + "."


class Scripted:
    """A fake journaled client: answers come from ``answer(request)``; every request is kept."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def identity(self):
        return {"backend": "scripted"}

    def key(self, req):
        return req.key(self.identity())

    def lookup(self, reqs):
        return ["new"] * len(reqs)

    def generate(self, reqs, desc=None):
        self.calls.append((desc, list(reqs)))
        return [self.answer(r) for r in reqs]


def ok(text: str, finish: str = "stop") -> Completion:
    return Completion(texts=[text], finish_reasons=[finish])


def base_model_answer(r: ModelRequest):
    """A base model: list continuations with a stray header and a cut last item, labels, instances."""
    p = r.prompt or r.messages[-1].content
    if r.tag.startswith("bootstrap"):
        a, b, c = (fresh_instruction(f"{r.tag}:{k}") for k in range(3))
        return ok(f" {a}\n10. {b}\n11. Output: a stray header\n12. {c}\n13. Cut in the mid", "length")
    if p.endswith("Classification task:"):
        task = re.findall(r"Task: (.*)\n", p)[-1]
        return ok(" Yes" if task.startswith("Classify") else " No")
    if p.endswith("Class label:"):
        return ok(" Positive\nInput: A fine day.\nClass label: Negative\nInput: A bad day.\n")
    return ok("Input: 1, 2\nOutput: 3\n\nExample 2\nInput: <noinput>\nOutput: Nothing to add.\n")


def run_stage(tmp_path, answer, seed=1, **options):
    seeds_dir = tmp_path / "seeds"
    write_jsonl(seeds_dir / "records.jsonl", SEEDS)
    out = tmp_path / "generate"
    out.mkdir()
    client = Scripted(answer)
    ctx = StageContext(name="generate", kind="generate", options=generate.Options(model="m", **options), seed=seed,
                       run_dir=tmp_path, out_dir=out, scratch_dir=tmp_path / "scratch",
                       inputs=[StageInput("seeds", "seeds", seeds_dir)], get_model=lambda name: client,
                       log=logging.getLogger("test"), show_progress=False)
    generate.run(ctx)
    ctx.close()
    rejected = list(read_jsonl(out / "rejected.jsonl", Rejection)) if (out / "rejected.jsonl").exists() else []
    return ctx, client, list(read_jsonl(out / "records.jsonl", Task)), rejected


def task_level(rejected):
    return [r for r in rejected if "task_id" not in r.record]


def test_funnel_adds_up_and_every_drop_has_a_rule(tmp_path):
    ctx, client, kept, rejected = run_stage(tmp_path, base_model_answer, target=12, batch_size=3, max_requests=9)
    m = ctx.stats.metrics
    assert m["requests"] == sum(len(reqs) for _, reqs in client.calls)
    assert m["items_parsed"] - len(task_level(rejected)) == len(kept) == ctx.stats.rows_out > 0
    rules = {r.rule for r in rejected}
    assert {"truncated", "malformed_item"} <= rules  # the cut last item and the stray header, each alone
    assert m["instances_generated"] == sum(len(t.instances) for t in kept)
    for t in kept:
        assert t.source == "generated" and t.provenance.request_key and t.provenance.template
        assert t.provenance.model == {"backend": "scripted"} and len(t.provenance.examples) == 8
    assert (tmp_path / "generate" / "raw_completions.jsonl").read_text().count("\n") == m["requests"]


def test_bootstrap_prompts_hold_six_seeds_and_two_machine_instructions(tmp_path):
    _, client, kept, rejected = run_stage(tmp_path, base_model_answer, target=18, batch_size=2, max_requests=6)
    seeds = {s.instruction for s in SEEDS}
    generated = {t.instruction for t in kept} | {r.record.get("instruction") for r in rejected}
    rounds = [reqs for desc, reqs in client.calls if desc == "bootstrap"]
    assert len(rounds) == 3
    for n, reqs in enumerate(rounds):
        for r in reqs:
            listed = re.findall(r"^\d+\. (.*)$", r.prompt, re.M)
            assert len(listed) == 8 and r.prompt.endswith("\n9.")
            n_seed = sum(i in seeds for i in listed)
            assert n_seed == (8 if n == 0 else 6)  # round 1 kept at least two: every later prompt mixes
            assert all(i in seeds or i in generated for i in listed)


def test_classification_tasks_get_output_first_instances(tmp_path):
    _, client, kept, _ = run_stage(tmp_path, base_model_answer, target=10, batch_size=3, max_requests=6)
    inst_reqs = {r.tag: r for desc, reqs in client.calls if desc == "instances" for r in reqs}
    assert any(t.is_classification for t in kept) and any(not t.is_classification for t in kept)
    for t in kept:
        prompt = inst_reqs[f"instances:{t.id}"].prompt
        if t.is_classification:
            assert prompt.endswith("Class label:")
            pairs = [(i.input, i.output) for i in t.instances]
            assert pairs == [("A fine day.", "Positive"), ("A bad day.", "Negative")]
        else:
            assert prompt.endswith("Example 1\n")
            assert [(i.input, i.output) for i in t.instances] == [("1, 2", "3"), ("", "Nothing to add.")]


def test_failures_are_skipped_and_never_text(tmp_path):
    def answer(r):
        if r.tag in ("bootstrap:1", "bootstrap:4") or (r.prompt.endswith("Classification task:") and
                                                       "bal" in r.prompt.rsplit("Task:", 1)[1]):
            return Failure(error="HTTP 500 from the server", kind="http_500")
        return base_model_answer(r)

    ctx, _, kept, rejected = run_stage(tmp_path, answer, target=30, batch_size=3, max_requests=6)
    assert ctx.stats.metrics["failed_requests"] >= 2
    blob = "".join((tmp_path / "generate" / f).read_text() for f in ("records.jsonl", "rejected.jsonl"))
    assert "HTTP 500" not in blob
    assert any(r.rule == "classify_request_failed" for r in rejected)
    assert ctx.stats.metrics["items_parsed"] - len(task_level(rejected)) == len(kept)


def test_same_seed_same_answers_same_dataset_and_other_seed_differs(tmp_path):
    outs = []
    for n, seed in enumerate((5, 5, 6)):
        d = tmp_path / str(n)
        d.mkdir()
        run_stage(d, base_model_answer, seed=seed, target=8, batch_size=3, max_requests=6)
        outs.append([(d / "generate" / f).read_bytes() for f in ("records.jsonl", "rejected.jsonl")])
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_chat_bootstrap_json_with_text_fallback(tmp_path):
    def answer(r):
        if r.tag.startswith("bootstrap"):
            i = int(r.tag.split(":")[1])
            a, b, c = (fresh_instruction(f"{r.tag}:{k}") for k in range(3))
            return [ok(f"```json\n{json.dumps([a, b])}\n```"),
                    ok(f"Sure! Here are new tasks:\n\n1. **{a}**\n2. {b}\n\nHope this helps."),
                    ok(f'[{json.dumps(a)}, {json.dumps(b)}, "{c[:12]}', "length")][i % 3]
        return base_model_answer(r)

    ctx, client, kept, rejected = run_stage(tmp_path, answer, target=50, batch_size=3, max_requests=3,
                                            bootstrap_style="chat", json_mode=True)
    boot = [r for desc, reqs in client.calls if desc == "bootstrap" for r in reqs]
    assert all(r.messages and r.params.json_schema for r in boot)
    assert len(kept) == 6  # two from each answer, whatever its shape; the cut third item is dropped alone
    assert not any(t.instruction.startswith(("Sure", "Hope", "*")) for t in kept)
    assert [r.rule for r in rejected if r.rule == "truncated"] == ["truncated"]


def test_alpaca_completion_mode_with_a_scripted_client(tmp_path):
    def answer(r):
        a, b = fresh_instruction(f"{r.tag}:a"), fresh_instruction(f"{r.tag}:b")
        return ok(f" {a}\n4. Input:\n<noinput>\n4. Output:\nFine.\n###\n5. Instruction: {b}\n5. Input:\nsome text\n"
                  f"5. Output:\nDone.\n6. Instruction: merged into the output\n###\n7. Instruction: cut", "length")

    ctx, client, kept, rejected = run_stage(tmp_path, answer, mode="alpaca", target=5, batch_size=2, max_requests=4)
    prompts = [r.prompt for _, reqs in client.calls for r in reqs]
    assert len(prompts) == 4 and all(p.endswith("###\n4. Instruction:") for p in prompts)
    assert len(kept) == 4 and all(t.instances[0].input == "" and t.instances[0].output == "Fine." for t in kept)
    assert sorted({r.rule for r in rejected}) == ["merged_item", "truncated"]
    assert ctx.stats.metrics["items_parsed"] - len(task_level(rejected)) == len(kept)


def test_alpaca_chat_end_to_end_through_an_openai_compatible_server(tmp_path):
    """Alpaca mode, chat prompts asking for JSON, through the real OpenAI backend and the local HTTP server."""
    import os

    from openai_server import FakeOpenAI

    def answer(body):
        assert body["response_format"]["type"] == "json_schema"
        key = json.dumps(body["messages"], sort_keys=True) + str(body.get("seed"))
        items = [{"instruction": fresh_instruction(f"{key}:{k}"), "input": "<noinput>" if k else "some text",
                  "output": f"Answer {k}."} for k in range(3)]
        items.append({"instruction": fresh_instruction(f"{key}:x")})  # no output: dropped alone
        return "```json\n" + json.dumps({"items": items}) + "\n```\nThese tasks vary in topic."

    body = f"""models:
  t: {{backend: openai, api: chat, model: teacher}}
stages:
  seeds: {{path: {ROOT / 'data/seed_tasks.jsonl'}}}
  generate: {{model: t, mode: alpaca, alpaca_style: chat, json_mode: true, target: 7, batch_size: 2, max_requests: 6}}
"""
    with FakeOpenAI(answer=answer) as srv:
        env = {**os.environ, "OPENAI_BASE_URL": srv.url, "OPENAI_API_KEY": "k"}
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"name: c\nrun_dir: {tmp_path / 'run'}\nseed: 3\n" + body)
        r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress"], capture_output=True,
                           text=True, cwd=ROOT, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        assert len(srv.log) == 4  # three items per answer: two rounds of two requests reach the target
    out = tmp_path / "run" / "generate"
    kept = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(kept) == 7
    assert [t["instances"][0]["input"] for t in kept[:3]] == ["some text", "", ""]
    stage = json.loads((out / "_stage.json").read_text())
    assert stage["stats"]["rejected"]["malformed_item"] == 4
