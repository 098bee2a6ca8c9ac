"""``executor: ray`` on the data stages: ``filter``, ``dedup`` (MinHash) and ``decontaminate`` write byte for
byte the files of the one-process mode on a few thousand records with planted defects and near-duplicates; a
driver killed (SIGKILL) during the Ray dedup stage and run again writes them too, and leaves no Ray process."""

import json
import random
import time
from pathlib import Path

import pytest

from test_filter_dedup_stages import as_task, defect_records, run_stage, stage_dir, write_eval_sets
from test_ray_executor import Driver, ray_processes, wait_ray_gone

from pipeline.records import Instance, Task, write_jsonl
from pipeline.stages import decontaminate, dedup
from pipeline.stages import filter as filter_stage
from pipeline.stages.context import REJECTED_FILE

pytest.importorskip("ray.data")

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("river planet budget violin harbor recipe garden ladder census poetry saddle tunnel magnet orchid "
         "summer winter city village teacher student letter story friend market museum bridge ocean forest "
         "train kitchen window doctor engine castle desert island music paper science history").split()
VERBS = ["Describe", "Explain", "Summarize", "Compare", "List three facts about", "Write a short poem about"]


def corpus(n: int, seed: int = 7) -> list[Task]:
    """``n`` tasks: English instructions, a fifth of them near-duplicates (one word changed or added) or exact
    duplicates (another case) of an earlier one, and the defect sample's records and instructions close to an
    evaluation set's spread among them."""
    rng = random.Random(seed)
    defects = [as_task(r) for r in defect_records()]
    out: list[Task] = []
    for k in range(n):
        if k % 97 == 0:
            d = defects[(k // 97) % len(defects)]
            out.append(d.model_copy(update={"id": f"{d.id}_{k}"}))
            continue
        if k % 89 == 5:  # close to an instruction of the evaluation sets (tests/test_filter_dedup_stages.py)
            out.append(Task(id=f"e{k}", instruction=f"Recommend three movies for a rainy {rng.choice(WORDS)}.",
                            instances=[Instance(input="", output="Up, Heat and Big.")]))
            continue
        if out and rng.random() < 0.2:
            base = rng.choice(out)
            words = base.instruction.split()
            r = rng.random()
            if r < 0.25:
                ins = base.instruction.upper()
            elif r < 0.6:
                words[rng.randrange(len(words))] = rng.choice(WORDS)
                ins = " ".join(words)
            else:
                ins = " ".join(words + [rng.choice(WORDS)])
        else:
            ins = f"{rng.choice(VERBS)} the {' and the '.join(rng.sample(WORDS, rng.randint(2, 5)))}."
        out.append(Task(id=f"t{k}", instruction=ins,
                        instances=[Instance(input="", output=f"It is about the {rng.choice(WORDS)} in the "
                                                             f"{rng.choice(WORDS)} and the {rng.choice(WORDS)}.")]))
    return out


def outputs(out_dir: Path) -> tuple[bytes, bytes]:
    rej = out_dir / REJECTED_FILE
    return (out_dir / "records.jsonl").read_bytes(), rej.read_bytes() if rej.exists() else b""


def test_filter_dedup_and_decontaminate_on_ray_match_the_local_files(tmp_path):
    import ray

    tasks = corpus(3000)
    seeds = [Task(id=f"s{k}", instruction=f"Describe the {a} and the {b}.", instances=[])
             for k, (a, b) in enumerate(zip(WORDS, WORDS[1:]))]
    user, _ = write_eval_sets(tmp_path)
    ray_opts = {"workers": 2, "chunk_records": 400}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one instance for the three stages
    try:
        for executor in ("local", "ray"):
            base = tmp_path / executor
            seeds_in = stage_dir(base, "seeds", seeds)
            generated = stage_dir(base, "generate", tasks)
            extra = {"executor": executor, "ray": ray_opts}
            data = stage_dir(base, "data", tasks)  # a file being cleaned: the general profile, with langid
            _, _, fs = run_stage(base, filter_stage, filter_stage.Options(**extra), [data])
            # against the seeds (a generation stage lies between), with more than six candidates for some
            _, _, ds = run_stage(base, dedup, dedup.Options(mode="minhash", threshold=0.6, **extra),
                                 [seeds_in, generated])
            _, _, cs = run_stage(base, decontaminate, decontaminate.Options(eval_sets=[str(user)], **extra),
                                 [generated])
            if executor == "local":
                local = {s: (st.as_dict(), outputs(base / f"out_{s}"))
                         for s, st in (("filter", fs), ("dedup", ds), ("decontaminate", cs))}
                assert ds.rejected["exact_duplicate"] > 100 and ds.rejected["rouge_near_duplicate"] > 100
                assert fs.rejected and fs.metrics["languages"] == ["en"] and cs.rejected
        for s, st in (("filter", fs), ("dedup", ds), ("decontaminate", cs)):
            assert (st.as_dict(), outputs(tmp_path / "ray" / f"out_{s}")) == local[s], s
    finally:
        ray.shutdown()


def raylet_running(tmpdir: str) -> bool:
    for pid in ray_processes(tmpdir):
        try:
            if b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


def test_ray_dedup_killed_mid_stage_and_run_again_writes_the_local_files(tmp_path):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, corpus(2500, seed=3))
    config = tmp_path / "clean.yaml"
    config.write_text(f"name: clean-ray\nstages:\n  seeds: {{path: {data}}}\n  filter: {{}}\n"
                      f"  dedup: {{mode: minhash}}\n", encoding="utf-8")
    Driver(config, tmp_path / "local", [], {}).run()
    run = tmp_path / "ray"
    driver = Driver(config, run, ["stages.dedup.executor=ray", "stages.dedup.ray.workers=2",
                                  "stages.dedup.ray.chunk_records=300"], {})
    p = driver.start()
    while p.poll() is None and not raylet_running(driver.rt):  # the dedup stage has started Ray
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before the kill"
    p.kill()
    p.wait()
    wait_ray_gone(driver.rt)
    assert not (run / "dedup" / "records.jsonl").exists()
    driver.run()
    for stage in ("filter", "dedup"):
        assert outputs(run / stage) == outputs(tmp_path / "local" / stage), stage
    manifest = json.loads((run / "manifest.json").read_text())["stages"]["dedup"]
    assert manifest["rejected"]["rouge_near_duplicate"] > 50
