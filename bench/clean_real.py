"""Cleaning existing data sets with the defaults, side by side with the originals' rules (``rules: self_instruct``).

The pipeline is seeds -> filter -> dedup -> template -> export, run through the CLI in its own process (peak RSS
from that process), on:

* the real public sets in ../shared/data/real/ (GPTeacher codegen-instruct, CodeAlpaca-2K): rows in/out per
  stage and rule. Both sets were written by models and hold some real defects, so the filter's drops are an
  upper bound of the valid records lost;
* a synthetic Alpaca-size set of 52,000 records (seeded), with a known share of planted defects (one of each
  kind the rules are for), exact copies and near-duplicates (one word changed, same input), beside valid
  records of the kinds public sets hold: plain tasks with and without input, word problems that mention
  pictures, videos, files, maps and "go to", programming tasks that read files or parse URLs, records that
  share an instruction and differ in input, and tool-use tasks behind one long shared description. It
  prints the planted defects caught and the valid records lost, for each profile.

    python bench/clean_real.py [--size 52000] [--only-synthetic]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT.parent / "shared" / "data" / "real"
STAGES = ("seeds", "filter", "dedup", "template", "export")

DEFECTS = [  # (kind, instruction, input, output): each a defect the filter is for
    ("empty_output", "Summarize the main idea of {w} in one sentence.", "", ""),
    ("placeholder_output", "Explain why {w} matters to most people.", "", "N/A"),
    ("merged_item", "Name one use of {w}.", "", "Cooking.\n\n2. Instruction: Name another use of {w}."),
    ("url_only_input", "Summarize the article about {w} at this link.", "https://example.com/{u}", "It says things."),
    ("attached_photo", "Describe what is shown in the attached photo of {w}.", "", "A sunny scene."),
    ("draw_request", "Draw a picture of {w} for my classroom.", "", "I cannot draw."),
    ("plot_request", "Plot the graph of the {w} data over time.", "", "I cannot plot."),
    ("real_world_action", "Go to the {w} shop and buy some bread.", "", "I cannot go there."),
    ("watch_video", "Watch the video about {w} and summarize it.", "", "It was about things."),
    ("repetition", "Explain {w} " + "again " * 12, "", "Done."),
    ("truncated_output", "List the steps for planning {w}.", "", "The steps are:"),
    ("input_equals_output", "Correct the spelling in the sentence about {w}.", "the {w} is here", "the {w} is here"),
    ("other_language", "Explique en une phrase pourquoi le {w} est important pour la ville.", "",
     "Parce que le {w} aide beaucoup les habitants de la ville chaque jour."),
]
PREAMBLE = ("You can call these tools while you work. Calculator(expression) evaluates arithmetic and returns the "
            "number. Search(query) returns the first paragraph of the best matching article. Calendar() returns "
            "today's date. Weather(city) returns the forecast for a city. Translator(text, language) returns the "
            "text in that language. Use a tool by writing [Tool(arguments)] where its answer belongs. Task:")
NAMES = "Tom Lisa Priya Omar Chen Maria Kofi Sara Ben Aiko Lucas Nina Ravi Elena Sam Zoe".split()


def vocabulary() -> list[str]:
    """English words from the project's own data (and the shared real sets where present)."""
    texts = [p.read_text(encoding="utf-8") for p in (ROOT / "data").glob("*.json*")]
    texts += [p.read_text(encoding="utf-8") for p in REAL.glob("*.json")] if REAL.exists() else []
    words = {w for t in texts for w in re.findall(r"\b[a-z]{4,12}\b", t)}
    # Random words stand in for a valid record's content: none that would turn it into a planted defect's kind
    # ("Summarize the video ...", "... the attached file") or a shared phrase.
    return sorted(words - MEDIA_WORDS)


MEDIA_WORDS = set("""picture pictures image images photo photos photograph photographs drawing drawings painting
paintings illustration sketch diagram diagrams flowchart chart charts graph graphs plot plots logo icon poster map
maps video videos animation meme screenshot audio recording recordings clip clips podcast figure figures
attachment attached spreadsheet slide slides file files document documents article articles page pages website
link links webpage webpages website websites url urls pdf draw sketch paint watch listen visit call purchase buy
vous""".split())
WORD_PROBLEMS = [  # a word problem's shape: about half its words are the problem's own
    "{n} {v1} {a} {t} at the {w2} and {v2} {b} of them to a friend who studies {w3}. How many {t} are left?",
    "A {w2} club owns {a} {t} and adds {b} after {w3}. How many {t} now?",
    "{n} sorts {a} {t} about {w2} into boxes of {b}. How many full boxes are there, with {w3} aside?",
    "Each of {b} {w2} teams needs {a} {t} for the {w3} fair. How many {t} are needed in all?",
]
CODE_TASKS = [
    "Write a Python function that reads {w3} records from a file and returns their {w2}.",
    "Implement {w2} search over a list of {w3} in JavaScript.",
    "Write an SQL query that counts the {w3} per {w2}.",
    "Fix the bug in this {w2} parser for {w3} strings.",
]


def synthetic(n: int, seed: int = 0) -> tuple[list[dict], dict[str, str]]:
    """Records and, for each planted one, what it is (a defect kind, 'exact_copy' or 'near_duplicate')."""
    rng = random.Random(seed)
    vocab = vocabulary()
    words = lambda k: " ".join(rng.choice(vocab) for _ in range(k))  # noqa: E731
    recs: list[dict] = []
    planted: dict[str, str] = {}
    valid: list[int] = []
    while len(recs) < n:
        i = len(recs)
        r = rng.random()
        if r < 0.05 and valid:  # a defect
            kind, ins, inp, out = rng.choice(DEFECTS)
            w = words(3)
            rec = {"instruction": ins.format(w=w), "input": inp.format(w=w, u=rng.randrange(10**9)),
                   "output": out.format(w=w)}
            planted[f"record_{i}"] = kind
        elif r < 0.07 and valid:  # an exact copy of an earlier valid record
            rec = dict(recs[rng.choice(valid)])
            planted[f"record_{i}"] = "exact_copy"
        elif r < 0.12 and valid:  # a near-duplicate: one word of a long enough instruction changed
            src = recs[rng.choice(valid)]
            toks = src["instruction"].split()
            if len(toks) < 8 or src["instruction"].startswith(PREAMBLE):
                continue
            toks[rng.randrange(len(toks))] = rng.choice(vocab)
            rec = {**src, "instruction": " ".join(toks)}
            planted[f"record_{i}"] = "near_duplicate"
        elif r < 0.20:  # a word problem that mentions the originals' blacklist words
            a, b = rng.randrange(3, 90), rng.randrange(2, 9)
            thing = rng.choice(["pictures", "videos", "files", "songs", "maps", "cards", "drawings"])
            ins = rng.choice(WORD_PROBLEMS).format(n=rng.choice(NAMES), a=a, b=b, t=thing, w2=words(2), w3=words(3),
                                                   v1=rng.choice(["takes", "draws", "brings", "finds"]),
                                                   v2=rng.choice(["gives", "sends", "shows", "lends"]))
            rec = {"instruction": f"{ins} {words(rng.randrange(5, 9)).capitalize()} matter to the story.",
                   "input": "", "output": f"{a} - {b} = {a - b}. There are {a - b} {thing} left."}
        elif r < 0.28:  # a programming task
            rec = {"instruction": rng.choice(CODE_TASKS).format(w2=words(2), w3=words(3)) + " "
                                  + f"Name it {words(2).replace(' ', '_')} and handle {words(3)}.",
                   "input": rng.choice(["", f"data_{rng.randrange(999)}.txt", f"https://{words(1)}.org/{words(1)}"]),
                   "output": f"def read_{i}(path):\n    with open(path) as f:\n        return [line.split() "
                             f"for line in f]  # {words(4)}"}
        elif r < 0.31:  # the same instruction, another input
            review = words(14)
            rec = {"instruction": "Classify the sentiment of the review as positive or negative.",
                   "input": review.capitalize() + ".", "output": rng.choice(["Positive", "Negative"])}
        elif r < 0.33:  # a tool-use task behind the shared description
            rec = {"instruction": f"{PREAMBLE} {rng.choice(['What is', 'Find', 'Tell me'])} the {words(5)}?",
                   "input": "", "output": f"[Search({words(2)})] The answer is {words(6)}."}
        else:  # a plain task, with an input two times in five
            rec = {"instruction": f"{rng.choice(['Explain', 'Describe', 'Summarize', 'Compare', 'Suggest'])} "
                                  f"the {words(3)} of the {words(3)}.",
                   "input": words(rng.randrange(8, 30)).capitalize() + "." if rng.random() < 0.4 else "",
                   "output": words(rng.randrange(10, 60)).capitalize() + "."}
            if rec["instruction"].startswith(("Describe", "Summarize")) and rec["input"]:
                rec["instruction"] = rec["instruction"].replace("the", "this", 1)
        if f"record_{i}" not in planted:
            valid.append(i)
        recs.append(rec)
    return recs, planted


def run_pipeline(data: Path, folder: Path, rules: str | None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "clean.yaml"
    filt = f"{{rules: {rules}}}" if rules else "{}"
    cfg.write_text(f"name: clean\nrun_dir: {folder / 'run'}\nstages:\n  seeds: {{path: {data}}}\n"
                   f"  filter: {filt}\n  dedup: {{}}\n  template: {{format: alpaca}}\n  export: {{}}\n",
                   encoding="utf-8")
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress", "--fresh"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cfg}: exit {os.waitstatus_to_exitcode(status)}\n{stderr[-2000:]}")
    stages = json.loads((folder / "run" / "manifest.json").read_text())["stages"]
    final = {json.loads(line)["task_id"] for line in (folder / "run" / "template" / "records.jsonl").open()}
    return {"wall": wall, "rss_mb": usage.ru_maxrss / 1024, "stages": stages, "final": final}


def show(label: str, res: dict) -> None:
    print(f"  {label}: end to end {res['wall']:.1f} s, peak RSS {res['rss_mb']:.0f} MB")
    for name in STAGES:
        st = res["stages"][name]
        rules = ", ".join(f"{k} {v}" for k, v in sorted(st["rejected"].items(), key=lambda kv: -kv[1]))
        print(f"    {name:9s} {st['rows_in']:>7,} -> {st['rows_out']:>7,}  {st['elapsed_s']:6.2f} s  {rules}")


def real_sets() -> None:
    for name in ("gpteacher_codegen", "codealpaca_2k"):
        path = REAL / f"{name}.json"
        if not path.exists():
            print(f"{name}: not present ({path})")
            continue
        print(f"{name} ({path.name})")
        for label, rules in (("defaults", None), ("rules: self_instruct", "self_instruct")):
            with tempfile.TemporaryDirectory() as tmp:
                res = run_pipeline(path, Path(tmp), rules)
            show(label, res)
            f = res["stages"]["filter"]
            print(f"    filter dropped {f['rows_in'] - f['rows_out']:,} of {f['rows_in']:,} "
                  f"({(f['rows_in'] - f['rows_out']) / f['rows_in']:.2%}, an upper bound of the valid records lost)")


def synthetic_set(size: int) -> None:
    recs, planted = synthetic(size)
    kinds: dict[str, int] = {}
    for k in planted.values():
        kinds[k] = kinds.get(k, 0) + 1
    valid = [f"record_{i}" for i in range(len(recs)) if f"record_{i}" not in planted]
    print(f"synthetic Alpaca-size set: {len(recs):,} records, {len(valid):,} valid, planted: "
          + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "alpaca_like.json"
        data.write_text(json.dumps(recs), encoding="utf-8")
        for label, rules in (("defaults", None), ("rules: self_instruct", "self_instruct")):
            res = run_pipeline(data, Path(tmp) / label.replace(" ", "_").replace(":", ""), rules)
            show(label, res)
            caught = {k: sum(1 for rid, kk in planted.items() if kk == k and rid not in res["final"]) for k in kinds}
            lost = [rid for rid in valid if rid not in res["final"]]
            print(f"    planted caught: {sum(caught.values()):,} of {len(planted):,} ("
                  + ", ".join(f"{k} {caught[k]}/{kinds[k]}" for k in sorted(kinds)) + ")")
            print(f"    valid records lost: {len(lost):,} of {len(valid):,} ({len(lost) / len(valid):.2%})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=52_000)
    ap.add_argument("--only-synthetic", action="store_true")
    args = ap.parse_args()
    if not args.only_synthetic:
        real_sets()
    synthetic_set(args.size)


if __name__ == "__main__":
    main()
