"""``export``: the data set users take away, in the formats their trainers read, with a dataset card.

Into the stage folder (``<run_dir>/export/`` when the stage is named ``export``): ``dataset/`` (an HF
DatasetDict with train/validation splits, split by task so no task straddles both), ``alpaca_data.json``
(exactly instruction/input/output), ``messages.jsonl``, ``train.parquet``/``validation.parquet``, and
``README.md``, a dataset card with the filter funnel, statistics and plots. ``push_to_hub`` is optional;
its token comes from the ``HF_TOKEN`` environment variable only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from pipeline.records import write_json, write_jsonl
from pipeline.stages import card
from pipeline.stages.context import StageContext, StageInput
from pipeline.text.templates import render, template_file
from pipeline.training.data import messages_of
from pipeline.training.modelcard import hub_id
from pipeline.training.splits import split_by_task

CARD_TEMPLATE = "card/dataset_card.md.j2"


class PushToHub(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: str
    private: bool = True


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    validation_fraction: float = 0.1
    license: str = "other"
    description: str = ""
    card_template: str = CARD_TEMPLATE
    push_to_hub: PushToHub | None = None


def dependencies(options: Options) -> list[Path]:
    return [template_file(options.card_template)]


def run(ctx: StageContext) -> None:
    import datasets

    o: Options = ctx.options
    src = ctx.find_input("template") or ctx.previous()
    examples = card.read_examples(src)
    ctx.stats.rows_in = len(examples)
    train, val = split_by_task(examples, o.validation_fraction, ctx.seed)
    rows = lambda xs: [e.model_dump(mode="json") for e in xs]  # noqa: E731
    features = None
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(train), features=features),
                               "validation": datasets.Dataset.from_list(rows(val), features=features)})
    out = ctx.out_dir
    dd.save_to_disk(str(out / "dataset"))
    for split, ds in dd.items():
        ds.to_parquet(str(out / f"{split}.parquet"))
    write_json(out / "alpaca_data.json", [{"instruction": e.instruction, "input": e.input, "output": e.output}
                                          for e in examples])
    write_jsonl(out / "messages.jsonl", ({"messages": messages_of(e, plain=True)} for e in examples))

    funnel, instance_notes = card.funnel(ctx.inputs, len(examples))
    write_json(out / "funnel.json", {"funnel": funnel, "instance_drops": instance_notes})
    seeds_in = ctx.find_input("seeds")
    seeds = list(ctx.read_records(seeds_in)) if seeds_in else []
    rouge_label, rouge = card.similarity(ctx.inputs, examples, seeds)
    verbs = card.leading_verbs(examples)
    manifest_path = ctx.run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    models, templates = _generation_provenance([inp for inp in ctx.inputs if inp.kind == "generate"])
    n = len(examples)
    size = "n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" if n < 100_000 else "100K<n<1M"
    text = render(
        o.card_template, license=o.license, size_category=size, name=manifest.get("name", ctx.name),
        description=o.description, final=n,
        final_tasks=len({e.task_id for e in examples}), seed_count=len(seeds), train_rows=len(train),
        validation_rows=len(val), models=models, templates=templates, config_hash=manifest.get("config_hash", "-"),
        format=examples[0].format if examples else "-", funnel=funnel, instance_notes=instance_notes,
        judges=card.judge_scores(ctx.inputs), drop_warnings=card.drop_warnings(ctx.inputs),
        languages=_languages(ctx), rouge_label=rouge_label,
        lengths=card.length_stats(examples), share_input=sum(bool(e.input) for e in examples) / max(1, n),
        share_classification=sum(bool(e.is_classification) for e in examples) / max(1, n), verbs=verbs[:10],
        rouge={"mean": round(sum(rouge) / len(rouge), 3) if rouge else "-", "max": round(max(rouge), 3) if rouge else "-",
               "hist": card.histogram(rouge)},
        plots=card.plots(out, examples, rouge, verbs, rouge_label))
    (out / "README.md").write_text(text, encoding="utf-8")
    ctx.stats.rows_out = n
    ctx.stats.metrics.update(train_rows=len(train), validation_rows=len(val), final=n)
    if o.push_to_hub:
        push(dd, out, o.push_to_hub, os.environ.get("HF_TOKEN"))


def push(dd, out: Path, to: PushToHub, token: str | None) -> None:
    """Upload the splits, then the card and its plots as the dataset repo's README.md. The card keeps the data
    files' metadata that ``push_to_hub`` wrote into the repo's own card (``configs``, ``dataset_info``)."""
    from huggingface_hub import DatasetCard, HfApi

    dd.push_to_hub(to.repo_id, private=to.private, token=token)
    ours = DatasetCard((out / "README.md").read_text(encoding="utf-8"))
    theirs = DatasetCard.load(to.repo_id, repo_type="dataset", token=token)
    for key in ("configs", "dataset_info"):
        if theirs.data.get(key) is not None:
            ours.data[key] = theirs.data.get(key)
    api = HfApi(token=token)
    api.upload_folder(repo_id=to.repo_id, repo_type="dataset", folder_path=out, allow_patterns=["*.png"],
                      commit_message="seedtune: dataset card plots")
    api.upload_file(path_or_fileobj=str(ours).encode("utf-8"), path_in_repo="README.md", repo_id=to.repo_id,
                    repo_type="dataset", commit_message="seedtune: dataset card")


def _languages(ctx: StageContext) -> list[str]:
    """The data's languages as the filter identified them (English where no filter identified any)."""
    for inp in reversed(ctx.inputs):
        if inp.kind == "filter":
            langs = card.stage_info(inp).get("stats", {}).get("metrics", {}).get("languages")
            if langs:
                return langs
    return ["en"]


def _generation_provenance(stages: list[StageInput]) -> tuple[list[dict], list[str]]:
    """The models (as resolved when the run called them) and templates that wrote the generated records."""
    models: dict[tuple, dict] = {}
    used: set[str] = set()
    for inp in stages:
        path = inp.dir / "records.jsonl"
        if not path.exists():
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                prov = json.loads(line).get("provenance") or {}
                m = prov.get("model") or {}
                if m.get("model"):
                    models.setdefault((inp.name, m.get("backend"), m["model"]),
                                      {"name": inp.name, "backend": m.get("backend"), "model": m["model"],
                                       "hub_id": hub_id(m["model"])})
                if prov.get("template"):
                    used.add(prov["template"])
                if (prov.get("extra") or {}).get("instances_template"):
                    used.add(prov["extra"]["instances_template"])
    return list(models.values()), sorted(used)
