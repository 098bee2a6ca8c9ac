"""``torchrun --nproc-per-node 2 -m pipeline run`` (gloo on CPU, a tiny model): a fresh run from seeds to sft,
killed (SIGKILL to every process) mid-training and run again under torchrun, resumes from its last checkpoint
with the global step continuing, and ends with exit 0, one manifest and one model folder that loads."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from tinymodel import save_tiny_causal

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # a free port
STEPS = 300


def descendants(root: int) -> list[int]:
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        kids = [pid for pid, ppid in parents.items() if ppid == todo[-1]]
        todo.pop()
        out += kids
        todo += kids
    return out


def config(tmp: Path) -> Path:
    model = save_tiny_causal(tmp / "tiny")
    cfg = tmp / "ddp.yaml"
    cfg.write_text(f"""name: ddp
run_dir: {tmp / 'run'}
seed: 5
models:
  m: {{backend: test}}
stages:
  seeds: {{path: {ROOT / 'data/seed_tasks.jsonl'}, limit: 30}}
  generate: {{model: m, target: 24, batch_size: 4}}
  filter: {{}}
  template: {{format: chat}}
  export: {{validation_fraction: 0.2}}
  model: {{kind: sft, base_model: {model}, max_length: 128,
           train: {{max_steps: {STEPS}, save_steps: 4, per_device_batch_size: 2, logging_steps: 1}}}}
""")
    return cfg


def test_two_processes_train_resume_after_kill_and_finish_once(tmp_path):
    cfg = config(tmp_path)
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = TORCHRUN + ["-m", "pipeline", "run", str(cfg), "--no-progress"]
    checkpoints = run / ".scratch" / "model" / "checkpoints"

    log = open(tmp_path / "killed.log", "w+")  # a file, not a pipe: nobody reads while it runs
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    while p.poll() is None and not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.05)
    assert p.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    tree = descendants(p.pid)  # the ranks (torchrun starts them in sessions of their own)
    for pid in [p.pid] + tree:
        os.kill(pid, signal.SIGKILL)
    p.wait()
    while any(Path(f"/proc/{pid}/status").exists() and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
              for pid in tree):
        time.sleep(0.05)
    # Complete checkpoints (one being written when the kill came has no trainer state and is skipped on resume).
    saved = sorted(int(c.parent.name.split("-")[1]) for c in checkpoints.glob("checkpoint-*/trainer_state.json"))
    assert saved and saved[-1] < STEPS
    # Only rank 0 kept the books: the earlier stages were computed once, into the run folder.
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["export"]["state"] == "complete"
    assert manifest["stages"]["model"]["state"] == "running"

    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    model = manifest["stages"]["model"]
    assert model["state"] == "complete"
    resumed = model["metrics"]["resumed_from"]
    assert resumed is not None and int(resumed.split("-")[1]) >= saved[-1]  # the last checkpoint on disk then
    assert model["metrics"]["steps"] == STEPS  # the global step continued from it to the end
    assert all(manifest["stages"][s]["state"] == "cached" for s in ("seeds", "generate", "filter", "export"))
    assert "training on 2 processes" in (run / "seedtune.log").read_text()
    assert [m.relative_to(tmp_path) for m in tmp_path.rglob("manifest.json")] == [Path("run/manifest.json")]
    assert not (run / ".ranks").exists()  # the followers' outputs were temporary
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run / "model")
    assert AutoTokenizer.from_pretrained(run / "model").chat_template


def test_accelerate_launch_trains_data_parallel_on_two_processes(tmp_path):
    """``accelerate launch`` (its multi-process launcher, gloo on CPU): one epoch on two ranks takes half the
    steps of one process, each rank a shard of the rows; one manifest, one model folder that loads."""
    cfg = config(tmp_path)
    cfg.write_text(cfg.read_text().replace(f"max_steps: {STEPS}, save_steps: 4", "epochs: 1, save_steps: 1000"))
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "pipeline", "run", str(cfg), "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    model = manifest["stages"]["model"]
    assert model["state"] == "complete"
    rows, batch = model["rows_out"], 2
    assert model["metrics"]["steps"] == -(-(-(-rows // 2)) // batch)  # ceil(ceil(rows / ranks) / batch)
    assert "training on 2 processes" in (run / "seedtune.log").read_text()
    assert [m.relative_to(tmp_path) for m in tmp_path.rglob("manifest.json")] == [Path("run/manifest.json")]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "model")


INJECT = """
import sys
import pipeline.stages.sft as sft

def train(*args, **kwargs):
    raise RuntimeError("CUDA out of memory on this rank (injected)")

sft.train = train
from pipeline.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_follower_whose_stage_fails_ends_every_rank_promptly_with_its_line(tmp_path):
    """The two ranks started as a launcher starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT), without torchrun's
    agent, which would stop the other rank itself: each rank's own exit is what is observed. Rank 1's sft stage
    raises before training while rank 0 goes on into the Trainer's first collective; both exit non-zero within
    seconds of the failure, rank 0 records rank 1's line as the stage's error, and both print it."""
    import socket

    cfg = config(tmp_path)
    cfg.write_text(cfg.read_text().replace(f"max_steps: {STEPS}, save_steps: 4", "max_steps: 20, save_steps: 1000"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["run", str(cfg), "--no-progress"]
    procs, logs = [], []
    for r in (0, 1):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "pipeline", *args] if r == 0 else [sys.executable, "-c", INJECT, *args]
        logs.append(open(tmp_path / f"rank{r}.log", "w+"))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    ended = {}
    deadline = time.monotonic() + 120
    while len(ended) < 2 and time.monotonic() < deadline:
        for r, p in enumerate(procs):
            if r not in ended and p.poll() is not None:
                ended[r] = time.monotonic()
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    out = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    assert len(ended) == 2, "a rank is still waiting:\n" + "\n".join(o[-2000:] for o in out)
    assert abs(ended[0] - ended[1]) < 30, ended  # the other rank did not wait out a timeout
    line = "rank 1: stage model failed: RuntimeError: CUDA out of memory on this rank (injected)"
    assert procs[1].returncode == 1 and f"error: {line}" in out[1], out[1][-2000:]
    assert procs[0].returncode == 1 and f"error: {line}" in out[0], out[0][-2000:]
    model = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["model"]
    assert model["state"] == "failed" and line in model["error"]
    assert not (tmp_path / "run" / "model").exists()
