"""The trust promise, item by item, through the CLI: nothing deleted that seedtune does not own, no stale answer,
no answer paid twice, failures said in the exit code and never stored as results, no secret on disk."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from openai_server import FakeOpenAI  # noqa: E402
from test_runner_resume import committed, config, interrupted_runs, outputs, run, sent  # noqa: E402

SEEDS = ROOT / "data" / "seed_tasks.jsonl"


def cli(*args, cwd=ROOT, env=None, timeout=300):
    return subprocess.run([sys.executable, str(TESTS / "run_pipeline.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=env)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def generate_config(tmp_path, run_dir, count, extra_model="", target=24, name="c", mode="self_instruct",
                    max_requests=40):
    return write(tmp_path / f"{name}.yaml", f"""name: g
run_dir: {run_dir}
seed: 5
models:
  m:
    backend: test
    count_file: {count}
{extra_model}
stages:
  seeds: {{path: {SEEDS}, limit: 40}}
  generate: {{model: m, target: {target}, max_requests: {max_requests}, batch_size: 4, num_prompt_instructions: 4,
             num_machine_examples: 1, instances_style: answer, mode: {mode}, evol_rounds: 3, evol_min_words: 1}}
""")


# ---- 1. --fresh deletes only a seedtune run's own files ----------------------------------------------------

def test_fresh_refuses_a_folder_that_is_not_a_seedtune_run(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    cfg = write(tmp_path / "c.yaml", f"name: f\nrun_dir: {project}\nstages:\n  seeds: {{path: {SEEDS}}}\n")
    r = cli("run", cfg, "--fresh", "--no-progress")
    assert r.returncode == 2 and "not a seedtune run" in r.stderr and "nothing was deleted" in r.stderr
    assert (project / "notes.txt").read_text() == "mine" and sorted(os.listdir(project)) == ["notes.txt"]


def test_fresh_refuses_the_working_folder_and_a_folder_above_the_config(tmp_path):
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    seeds = work / "seeds.jsonl"
    seeds.write_text(SEEDS.read_text())
    for run_dir, cwd in ((".", work), (str(work), tmp_path)):
        cfg = write(work / "configs" / "c.yaml", f"name: f\nrun_dir: {run_dir}\nstages:\n  seeds: {{path: {seeds}}}\n")
        assert cli("run", cfg, "--no-progress", cwd=cwd).returncode == 0  # a real run lives there now
        r = cli("run", cfg, "--fresh", "--no-progress", cwd=cwd)
        assert r.returncode == 2 and "refusing to delete" in r.stderr, r.stderr
        assert seeds.exists() and (work / "configs" / "c.yaml").exists() and (work / "manifest.json").exists()


def test_fresh_deletes_the_run_but_not_a_users_file_inside_it(tmp_path):
    run_dir = tmp_path / "run"
    cfg = write(tmp_path / "c.yaml", f"name: f\nrun_dir: {run_dir}\nstages:\n  seeds: {{path: {SEEDS}}}\n")
    assert cli("run", cfg, "--no-progress").returncode == 0
    (run_dir / "my-notes.txt").write_text("keep me")
    (run_dir / "mydata").mkdir()
    r = cli("run", cfg, "--fresh", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (run_dir / "my-notes.txt").read_text() == "keep me" and (run_dir / "mydata").is_dir()
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["seeds"]["state"] == "complete"


def test_a_users_folder_named_like_a_stage_is_never_moved(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "seeds").mkdir(parents=True)
    (run_dir / "seeds" / "keep.txt").write_text("mine")
    cfg = write(tmp_path / "c.yaml", f"name: f\nrun_dir: {run_dir}\nstages:\n  seeds: {{path: {SEEDS}}}\n")
    r = cli("run", cfg, "--no-progress")
    assert r.returncode == 2 and "was not written by seedtune" in r.stderr
    assert (run_dir / "seeds" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ".."])
def test_stage_names_are_plain_names(tmp_path, name):
    cfg = write(tmp_path / "c.yaml", f"name: f\nrun_dir: {tmp_path / 'run'}\nstages:\n  '{name}': {{kind: seeds, path: {SEEDS}}}\n")
    r = cli("run", cfg, "--no-progress")
    assert r.returncode == 2 and "plain folder name" in r.stderr and "c.yaml:4" in r.stderr
    assert not (tmp_path / "escape").exists()


# ---- 3. permanent failures are terminal; 4. exit codes ---------------------------------------------------

def test_permanent_failures_are_terminal_and_the_stage_is_cached(tmp_path):
    count, run_dir = tmp_path / "count.txt", tmp_path / "run"
    cfg = generate_config(tmp_path, run_dir, count, "    fail_permanent_every: 3")
    r = cli("run", cfg, "--no-progress")
    assert r.returncode == 4 and "permanent: re-sent only with --retry-failed" in r.stderr, r.stderr
    st = json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]
    assert st["state"] == "complete" and st["failures"] == st["failures_permanent"] > 0
    n = len(sent(count))
    r = cli("run", cfg, "--no-progress")  # cached: nothing is sent, the earlier failures are mentioned
    assert r.returncode == 0 and "failed permanently in earlier runs" in r.stderr, r.stderr
    assert len(sent(count)) == n and " cached" in r.stdout
    r = cli("run", cfg, "--no-progress", "--from", "generate")  # recomputed: still not re-sent
    assert r.returncode == 4 and len(sent(count)) == n
    r = cli("run", cfg, "--no-progress", "--from", "generate", "--retry-failed")
    assert r.returncode == 4 and len(sent(count)) > n  # re-sent on request (and refused again)


def test_a_stage_whose_every_request_failed_stops_the_run(tmp_path):
    count, run_dir = tmp_path / "count.txt", tmp_path / "run"
    cfg = write(tmp_path / "c.yaml", generate_config(tmp_path, run_dir, count, "    fail_every: 1").read_text()
                + "  filter: {}\n")
    r = cli("run", cfg, "--no-progress")
    assert r.returncode == 4 and "all" in r.stderr and "requests failed" in r.stderr and "the run stops here" in r.stderr
    assert not (run_dir / "filter").exists()
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]["state"] == "complete_with_failures"


def test_an_unreachable_server_stops_before_the_first_request_with_exit_2(tmp_path):
    cfg = write(tmp_path / "c.yaml", f"""name: u
run_dir: {tmp_path / 'run'}
models:
  t: {{backend: openai, model: x, base_url: "http://127.0.0.1:9/v1", timeout: 2}}
stages:
  seeds: {{path: {SEEDS}, limit: 5}}
  generate: {{model: t, target: 2, max_requests: 2}}
""")
    r = cli("run", cfg, "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage 'generate': model 't'") and "127.0.0.1:9" in last


# ---- 5. rounds never re-key ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,step", [("self_instruct", "bootstrap"), ("evol", "evol")])
def test_a_late_success_pays_for_nothing_twice_and_leaves_no_answer_unused(tmp_path, mode, step):
    """A request that failed answers on the next run; the answers of later rounds, whose prompts it would
    have changed (the machine examples of Self-Instruct, the lineage of Evol-Instruct), all stay in use."""
    count, run_dir = tmp_path / "count.txt", tmp_path / "run"
    sizes = {"target": 60} if mode == "self_instruct" else {"target": 200, "max_requests": 120}  # 3 evol rounds
    failing = f"    fail_every: 3\n    fail_steps: [{step}]"
    r = cli("run", generate_config(tmp_path, run_dir, count, failing, mode=mode, **sizes), "--no-progress")
    assert r.returncode == 4, r.stderr
    first, paid = sent(count), committed(run_dir)
    assert len(first) == len(set(first))
    # The server "recovers": the failed bootstrap requests are sent once more; no answered one is.
    r = cli("run", generate_config(tmp_path, run_dir, count, mode=mode, **sizes), "--no-progress")
    assert r.returncode == 0, r.stderr
    again = sent(count)[len(first):]
    assert not set(again) & paid, "an answered request was paid for twice"
    assert set(again) & set(first), "the failed requests were not retried"
    con = sqlite3.connect(str(run_dir / "journal.sqlite"))
    answered = {k for (k, req) in con.execute("SELECT key, request FROM results")
                if json.loads(req)["tag"].startswith(step)}
    con.close()
    # Every bootstrap answer in the journal is used: it shows up in provenance in records or rejections.
    used = set()
    for f in ("records.jsonl", "rejected.jsonl"):
        for ln in (run_dir / "generate" / f).read_text().splitlines():
            rec = json.loads(ln)
            body = rec.get("record", rec)
            prov = body.get("provenance") or {}
            used.add(prov.get("request_key"))
    assert answered and answered <= used, f"{len(answered - used)} answered {step} requests left unused"
    # A third run replays the same order: cached, and from scratch (--from) the same records, nothing sent.
    out = (run_dir / "generate" / "records.jsonl").read_bytes()
    n = len(sent(count))
    assert cli("run", generate_config(tmp_path, run_dir, count, mode=mode, **sizes), "--no-progress", "--from",
               "generate").returncode == 0
    assert len(sent(count)) == n and (run_dir / "generate" / "records.jsonl").read_bytes() == out


# ---- 6. one run at a time ----------------------------------------------------------------------------------

def test_a_second_run_on_the_same_folder_exits_at_once(tmp_path):
    count, run_dir = tmp_path / "count.txt", tmp_path / "run"
    cfg = config(tmp_path, run_dir, count, delay=0.2)
    p = subprocess.Popen([sys.executable, str(TESTS / "run_pipeline.py"), "run", str(cfg), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not sent(count) and time.time() < deadline:
            time.sleep(0.05)
        n = len(sent(count))
        r = run(cfg)
        assert r.returncode == 2 and "another seedtune run is using this folder (pid" in r.stderr, r.stderr
        assert str(p.pid) in r.stderr
        assert len(r.stderr.strip().splitlines()) <= 2
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)
    assert len(sent(count)) - n <= 20  # only the first run sent anything meanwhile
    assert len(sent(count)) == len(set(sent(count)))


# ---- 8. wrong JSON types ---------------------------------------------------------------------------------

@pytest.mark.parametrize("record,expected", [
    ('{"instruction": 42, "instances": []}', "'instruction' must be a string, got int"),
    ('{"instruction": "a", "instances": [{"input": "", "output": 3.5}]}', "'output' must be a string, got float"),
    ('{"instruction": ["a"], "instances": []}', "'instruction' must be a string, got list"),
])
def test_seed_fields_of_the_wrong_type_are_errors_with_their_line(tmp_path, record, expected):
    seeds = write(tmp_path / "s.jsonl", '{"instruction": "fine", "instances": []}\n' + record + "\n")
    cfg = write(tmp_path / "c.yaml", f"name: s\nrun_dir: {tmp_path / 'run'}\nstages:\n  seeds: {{path: {seeds}}}\n")
    r = cli("run", cfg, "--no-progress")
    assert r.returncode == 2 and f"{seeds}:2:" in r.stderr and expected in r.stderr, r.stderr


def test_alpaca_numbers_are_not_turned_into_text(tmp_path):
    seeds = write(tmp_path / "a.json", json.dumps([{"instruction": "Add.", "input": "2+2", "output": 4}]))
    cfg = write(tmp_path / "c.yaml", f"name: s\nrun_dir: {tmp_path / 'run'}\nstages:\n  seeds: {{path: {seeds}}}\n")
    r = cli("run", cfg, "--no-progress")
    assert r.returncode == 2 and "record 0" in r.stderr and "'output' must be a string, got int" in r.stderr


# ---- 9. secrets ------------------------------------------------------------------------------------------

def secrets_blob(run_dir: Path, r) -> str:
    blob = r.stdout + r.stderr
    for f in run_dir.rglob("*"):
        if f.is_file() and f.suffix != ".sqlite":
            blob += f.read_text(errors="replace")
    return blob


def test_no_secret_reaches_the_manifest_records_or_log(tmp_path):
    with FakeOpenAI() as srv:
        cfg = write(tmp_path / "c.yaml", f"""name: s
run_dir: {tmp_path / 'run'}
models:
  t: {{backend: openai, model: teacher, base_url: "{srv.url}"}}
stages:
  seeds: {{path: {SEEDS}, limit: 10}}
  generate: {{model: t, target: 3, max_requests: 2, batch_size: 2, instances_style: answer}}
""")
        r = cli("run", cfg, "--no-progress", "--set", "models.t.extra_body.api_key=sk-verysecret",
                "--set", "models.t.extra_body.top_k=5", env={**os.environ, "OPENAI_API_KEY": "sk-envsecret"})
        assert r.returncode == 0, r.stderr
        assert srv.log and all(b.get("top_k") == 5 for b in srv.log)
    blob = secrets_blob(tmp_path / "run", r)
    assert "sk-verysecret" not in blob and "sk-envsecret" not in blob
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "models.t.extra_body.api_key=<redacted>" in manifest["overrides"]
    assert "models.t.extra_body.top_k=5" in manifest["overrides"]


def test_credentials_in_a_url_are_written_nowhere(tmp_path):
    from pipeline.models import model_identity
    from pipeline.models.openai_backend import Options

    url = "http://alice:hunter2@127.0.0.1:9/v1"
    assert model_identity("openai", Options(model="m", base_url=url))["base_url"] == "http://127.0.0.1:9/v1"
    cfg = write(tmp_path / "c.yaml", f"""name: s
run_dir: {tmp_path / 'run'}
models:
  t: {{backend: openai, model: teacher, base_url: "{url}", timeout: 2}}
stages:
  seeds: {{path: {SEEDS}, limit: 10}}
  generate: {{model: t, target: 3, max_requests: 2}}
""")
    r = cli("run", cfg, "--no-progress", "--set", f"models.t.base_url={url}")
    assert r.returncode == 2 and "127.0.0.1:9" in r.stderr
    blob = secrets_blob(tmp_path / "run", r)
    assert "hunter2" not in blob and "alice" not in blob


# ---- 10. fingerprints: code, weights ---------------------------------------------------------------------

def test_a_fix_to_a_stages_code_recomputes_that_stage_only(tmp_path):
    pkg = tmp_path / "mystages"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    code = ("from pydantic import BaseModel, ConfigDict\nfrom pipeline.records import Task\n"
            "class Options(BaseModel):\n    model_config = ConfigDict(extra='forbid')\n"
            "def run(ctx):\n    ctx.write_records(t.model_copy(update={'instruction': t.instruction + SUFFIX})"
            " for t in ctx.read_records())\n")
    (pkg / "tag.py").write_text("SUFFIX = '!'\n" + code)
    runner = write(tmp_path / "runner.py", f"""import sys
sys.path.insert(0, {str(tmp_path)!r}); sys.path.insert(0, {str(TESTS)!r})
from run_pipeline import TABLE
from pipeline.cli import main
raise SystemExit(main(sys.argv[1:], {{**TABLE, "tag": "mystages.tag"}}))
""")
    cfg = write(tmp_path / "c.yaml", f"name: c\nrun_dir: {tmp_path / 'run'}\nstages:\n  seeds: {{path: {SEEDS}}}\n"
                                     "  tag: {}\n  upper: {}\n")

    def go():
        r = subprocess.run([sys.executable, str(runner), "run", str(cfg), "--no-progress"], capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        return {ln.split()[0]: ln.split()[1] for ln in r.stdout.splitlines()[2:5]}

    assert go() == {"seeds": "complete", "tag": "complete", "upper": "complete"}
    assert go() == {"seeds": "cached", "tag": "cached", "upper": "cached"}
    (pkg / "tag.py").write_text("SUFFIX = '?'\n" + code)  # a fix to the stage's code
    assert go() == {"seeds": "cached", "tag": "complete", "upper": "complete"}
    (pkg / "tag.py").write_text("SUFFIX = '?'  # a comment\n" + code)  # same outputs: downstream stays cached
    assert go() == {"seeds": "cached", "tag": "complete", "upper": "cached"}


def test_weights_identity_is_a_content_hash(tmp_path):
    from pipeline.models.loading import weights_identity

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"a" * (3 << 20))
    first = weights_identity(str(folder))
    assert weights_identity(str(folder)) == first
    with open(folder / "model.safetensors", "r+b") as f:  # retrained: same size, a byte in the middle differs
        f.seek(3 << 19)
        f.write(b"b")
    assert weights_identity(str(folder)) != first
    assert weights_identity("org/model", revision="main").startswith("hub:org/model")


# ---- 12. a cached stage never builds its backend --------------------------------------------------------

def test_cached_stages_need_no_server(tmp_path):
    with FakeOpenAI() as srv:
        cfg = write(tmp_path / "c.yaml", f"""name: s
run_dir: {tmp_path / 'run'}
models:
  t: {{backend: openai, model: teacher, base_url: "{srv.url}"}}
stages:
  seeds: {{path: {SEEDS}, limit: 10}}
  generate: {{model: t, target: 3, max_requests: 2, batch_size: 2, instances_style: answer}}
  filter: {{}}
""")
        assert cli("run", cfg, "--no-progress").returncode == 0
    # The server is gone: every answer is journaled, so a re-run and a recompute from `filter` both work.
    r = cli("run", cfg, "--no-progress")
    assert r.returncode == 0, r.stderr
    r = cli("run", cfg, "--no-progress", "--from", "generate")
    assert r.returncode == 0, r.stderr


# ---- 13. budgets per model; no usage from a priced model -------------------------------------------------

def pair_config(tmp_path, run_dir, count, a_extra="", b_extra=""):
    return write(tmp_path / "p.yaml", f"""name: p
run_dir: {run_dir}
models:
  a:
    backend: test
    count_file: {count}
    price: {{input_per_million: 1000000}}
{a_extra}
  b:
    backend: test
    model: other
    count_file: {count}
    price: {{input_per_million: 1000000}}
{b_extra}
stages:
  seeds: {{path: {SEEDS}, limit: 3}}
  pair: {{first: a, second: b, requests: 6}}
""")


def test_each_model_has_its_own_budget(tmp_path):
    count, run_dir = tmp_path / "count.txt", tmp_path / "run"
    # Each prompt costs $6 (6 words at $1 a token). a's budget of $20 is crossed by its 4th answer; b spends on
    # its own counter (with one shared counter the stage would stop after 2 answers each).
    r = cli("run", pair_config(tmp_path, run_dir, count, "    budget: {max_cost_usd: 20}"), "--no-progress")
    assert r.returncode == 3 and "model 'a' reached its budget" in r.stderr and "$24.0000" in r.stderr, r.stderr
    assert len(sent(count)) == 8  # a: 4, b: 4


def test_a_priced_model_without_usage_stops_with_one_line(tmp_path):
    count, run_dir = tmp_path / "count.txt", tmp_path / "run"
    r = cli("run", pair_config(tmp_path, run_dir, count, "    report_usage: false"), "--no-progress")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "model 'a' has a price but its server reported no token usage" in last
    assert len(sent(count)) == 1 and len(committed(run_dir)) == 1  # the answer it paid for is kept


# ---- resume with failures mixed in ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    r = run(mixed(tmp, tmp / "run", tmp / "count.txt"))
    assert r.returncode == 4, r.stderr
    return outputs(tmp / "run")


def mixed(tmp_path, run_dir, count, delay=0.0):
    cfg = config(tmp_path, run_dir, count, delay=delay, fail_every=5)  # 20% transient
    text = cfg.read_text().replace("    fail_every: 5\n", "    fail_every: 5\n    fail_permanent_every: 10\n")
    return write(cfg, text)  # and 10% permanent


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_kills_with_transient_and_permanent_failures_mixed_in(tmp_path, mixed_reference, sig):
    run_dir, count = tmp_path / f"run-{sig}", tmp_path / f"count-{sig}.txt"
    keys = interrupted_runs(tmp_path, sig, 3, mixed_reference, cfg=mixed(tmp_path, run_dir, count, delay=0.15),
                            final_code=4)
    assert keys
