"""``executor: ray`` on the data stages: ``filter``, ``dedup`` (MinHash and exact mode) and ``decontaminate``
write byte for byte the files of the one-process mode on a few thousand records with planted defects and
near-duplicates (exact mode also against the seeds, on compared inputs with a shared preamble, on Evol rewrites
and with ``exact_nearest``); a driver killed (SIGKILL) during the Ray dedup stage and run again writes them too,
and leaves no Ray process."""

import json
import random
import time
from pathlib import Path

import pytest

from test_filter_dedup_stages import as_task, defect_records, run_stage, stage_dir, write_eval_sets
from test_ray_executor import Driver, ray_processes, wait_ray_gone

from pipeline.records import Instance, Provenance, Task, read_jsonl, write_jsonl
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


PREAMBLE = ("You can use the calculator tool, which takes an arithmetic expression and returns its value; call it "
             "by writing the expression between brackets and wait for its answer before you go on.")


def corpus_with_inputs(n: int, seed: int = 11) -> list[Task]:
    """``n`` tasks with inputs, for a file being cleaned (instruction and input compared): a third open with
    the same tool description (shared text), and later records repeat an earlier one with its input changed
    (another task), with one word of the input changed (a near-duplicate), as an exact copy, or as an Evol
    rewrite of it (a longer instruction, never a duplicate of its parent)."""
    rng = random.Random(seed)
    out: list[Task] = []
    for k in range(n):
        r = rng.random()
        if out and r < 0.4:
            base = rng.choice(out)
            ins, inp = base.instruction, base.instances[0].input
            extra: dict = {}
            if r < 0.1:
                inp = " ".join(rng.sample(WORDS, 6))
            elif r < 0.2 and inp:
                words = inp.split()
                words[rng.randrange(len(words))] = rng.choice(WORDS)
                inp = " ".join(words)
            elif r < 0.3:
                extra = {"evol_parent": ins}
                ins = f"{ins} Also name the {rng.choice(WORDS)}."
        else:
            ins = f"{rng.choice(VERBS)} the {' and the '.join(rng.sample(WORDS, rng.randint(2, 4)))}."
            if rng.random() < 0.33:
                ins = f"{PREAMBLE} {ins}"
            inp = " ".join(rng.sample(WORDS, 6)) if rng.random() < 0.8 else ""
        out.append(Task(id=f"i{k}", instruction=ins, instances=[Instance(input=inp, output="It is.")],
                        provenance=Provenance(extra=extra) if out and r < 0.4 and extra else None))
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
            # exact mode: against the seeds; and on a file being cleaned (inputs compared, shared text, Evol)
            _, _, xs = run_stage(base, dedup, dedup.Options(mode="exact", **extra), [seeds_in, generated],
                                 name="dedup_exact")
            cleaned = stage_dir(base, "cleaned", corpus_with_inputs(1200))
            _, _, ws = run_stage(base, dedup, dedup.Options(mode="exact", exact_nearest=True, **extra), [cleaned],
                                 name="dedup_inputs")
            stats = (("filter", fs), ("dedup", ds), ("decontaminate", cs), ("dedup_exact", xs),
                     ("dedup_inputs", ws))
            if executor == "local":
                local = {s: (st.as_dict(), outputs(base / f"out_{s}")) for s, st in stats}
                assert ds.rejected["exact_duplicate"] > 100 and ds.rejected["rouge_near_duplicate"] > 100
                assert fs.rejected and fs.metrics["languages"] == ["en"] and cs.rejected
                exact_mode_covers_the_cases(base, xs, ws, len(seeds))
        for s, st in stats:
            assert (st.as_dict(), outputs(tmp_path / "ray" / f"out_{s}")) == local[s], s
    finally:
        ray.shutdown()


def exact_mode_covers_the_cases(base: Path, xs, ws, seeds: int) -> None:
    """What the local exact-mode runs decided reaches every case the Ray path must reproduce."""
    assert xs.rejected["exact_duplicate"] > 100 and xs.rejected["rouge_near_duplicate"] > 100
    assert xs.metrics["pool_seeds"] == seeds and xs.metrics["compared"] == "instruction"
    rejected = [json.loads(line) for line in (base / "out_dedup_exact" / REJECTED_FILE).read_text().splitlines()]
    assert any(r["record"]["meta"].get("rouge_nearest", "").startswith("s") for r in rejected)  # a seed
    kept = list(read_jsonl(base / "out_dedup_exact" / "records.jsonl", Task))
    assert sum(0 < t.meta["rouge_score"] <= 0.7 for t in kept) > 100  # the best candidate of a kept record
    assert ws.rejected["exact_duplicate"] > 20 and ws.rejected["rouge_near_duplicate"] > 20
    assert ws.metrics["compared"] == "instruction_input" and ws.metrics["shared_text"]["records"] > 100
    kept = list(read_jsonl(base / "out_dedup_inputs" / "records.jsonl", Task))
    assert sum(t.provenance is not None and t.meta["rouge_score"] > 0.7 for t in kept) > 20  # Evol, kept
    assert sum(t.meta["rouge_score"] == 1.0 for t in kept) > 20  # the same instruction, another input


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
