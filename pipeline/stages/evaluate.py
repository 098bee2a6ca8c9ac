"""``evaluate``: the base model and the tuned model, measured with the same code on the same data.

Validation loss on the validation split (the latest ``export`` stage's ``dataset/``, else the same
task-level split of the ``template`` stage's records that ``sft`` uses), ROUGE-L and stop rate of greedy
answers to held-out instructions, and perplexity on a general-text sample — the forgetting check; each
change with n and a paired bootstrap 95% interval. The tuned model is the latest earlier ``sft`` stage's
folder unless ``tuned`` names one.

With ``evaluation.judge`` a judge model also compares the two models' held-out answers head to head (both
orders; :mod:`pipeline.training.winrate`): the tuned model's win rate with its 95% interval.

Outputs in the stage folder: ``results.json`` (both results, the changes, the win rate and the table),
``generations.jsonl`` (every held-out answer of both models), ``judgements.jsonl`` (every verdict of the judge,
with its reason, when there is one) and ``README.md`` (the before/after table).
The numbers also go to the manifest (``metrics.evaluation``), where ``seedtune status`` shows them.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import UserError
from pipeline.models.loading import load_model_and_tokenizer, weights_identity
from pipeline.records import TrainingExample, write_json, write_jsonl
from pipeline.stages import seeds
from pipeline.stages.context import StageContext
from pipeline.text.templates import render, template_file
from pipeline.training import evaluation
from pipeline.training.evaluation import EvalOptions
from pipeline.training.modelcard import display_name
from pipeline.training.report import TABLE, render_results_table
from pipeline.training.splits import read_dataset, split_by_task
from pipeline.training.trainer import pick_device

REPORT = "card/evaluation.md.j2"
# The option fields naming weights (model, GGUF file, revision): a Hub revision is pinned to its commit.
WEIGHTS = (("base_model", "gguf_file", "revision"),)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str  # folder, hub id, .gguf file or pkg://DIST/PATH
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    tuned: str | None = None  # default: the latest earlier sft stage's folder
    dtype: str = "float32"
    device: str = "auto"  # auto: cuda when available, else cpu
    evaluation: EvalOptions = Field(default_factory=EvalOptions)  # what is measured, as under sft's evaluation:


def dependencies(options: Options) -> list[Path]:
    """The data files scored and the report's templates; the tuned model enters through the upstream stage."""
    return evaluation.dependencies(options.evaluation) + [template_file(TABLE), template_file(REPORT)]


def identity(options: Options) -> dict[str, Any]:
    """The base model's weights: a content hash, or a Hub commit (never loads them)."""
    return {"base_weights": weights_identity(options.base_model, options.gguf_file, options.revision)}


def models(options: Options) -> list[str]:
    """The judge model, when the evaluation has one."""
    return evaluation.judge_models(options.evaluation)


def check(options: Options) -> None:
    for p in dependencies(options):
        if not p.exists():
            raise UserError(f"evaluate: file not found: {p}")


def validation_examples(ctx: StageContext) -> list[TrainingExample]:
    """The export stage's validation split, else the template stage's records split as ``sft`` splits them."""
    export = ctx.find_input("export")
    if export is not None and (export.dir / "dataset").exists():
        return read_dataset(export.dir / "dataset")[1]
    src = ctx.find_input("template")
    if src is None:
        return []
    return split_by_task(list(ctx.read_records(src, TrainingExample)), 0.1, ctx.seed)[1]


def tuned_folder(ctx: StageContext) -> Path:
    o: Options = ctx.options
    if o.tuned:
        folder = Path(o.tuned)
    else:
        sft = ctx.find_input("sft")
        if sft is None:
            raise UserError(f"stages.{ctx.name}.tuned: no tuned model: set `tuned` or run an sft stage before it")
        folder = sft.dir
    if not (folder / "config.json").exists():
        raise UserError(f"stages.{ctx.name}.tuned: {folder} holds no saved model (config.json missing)")
    return folder


def measure(spec: str, o: Options, examples: list[TrainingExample], held: tuple[list[TrainingExample], str],
            label: str, chat_template: str | None, **load: Any) -> dict[str, Any]:
    """Load one model, evaluate it, free it."""
    import torch

    model, tok = load_model_and_tokenizer(spec, dtype=o.dtype, device=pick_device(o.device),
                                          trust_remote_code=o.trust_remote_code, **load)
    if chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = chat_template  # the base model is prompted exactly as the tuned one (*template-drift*)
    try:
        return evaluation.evaluate_model(model, tok, examples, *held, o.evaluation, label)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run(ctx: StageContext) -> None:
    from transformers import AutoTokenizer

    o: Options = ctx.options
    tuned = tuned_folder(ctx)
    examples = validation_examples(ctx)
    ctx.stats.rows_in = len(examples)
    path = evaluation.heldout_path(o.evaluation)
    tasks = seeds.load_tasks(seeds.Options(path=str(path))) if path else None
    held = evaluation.heldout_examples(examples, o.evaluation, tasks,
                                       display_name(str(path), ctx.run_dir) if path else None)
    template = getattr(AutoTokenizer.from_pretrained(str(tuned), trust_remote_code=o.trust_remote_code),
                       "chat_template", None)
    before = measure(o.base_model, o, examples, held, "base", template, gguf_file=o.gguf_file, revision=o.revision)
    after = measure(str(tuned), o, examples, held, "tuned", None)
    change = evaluation.compare(before, after, o.evaluation.seed)
    win, judgements = evaluation.win_rate(o.evaluation, ctx.model, before, after)
    table = render_results_table(before, after, change, win)
    write_json(ctx.out_dir / "results.json", {"before": before, "after": after, "change": change, "win_rate": win,
                                              "table": table, "base_model": o.base_model,
                                              "tuned": display_name(str(tuned), ctx.run_dir)})
    rows = [{"model": r["label"], **s} for r in (before, after) for s in r["samples"]]
    write_jsonl(ctx.out_dir / "generations.jsonl", rows)
    if o.evaluation.judge:
        write_jsonl(ctx.out_dir / "judgements.jsonl", judgements)
    (ctx.out_dir / "README.md").write_text(
        render(REPORT, name=ctx.name, base=display_name(o.base_model, ctx.run_dir),
               tuned=display_name(str(tuned), ctx.run_dir), table=table), encoding="utf-8")
    ctx.stats.rows_out = len(rows)
    ctx.stats.metrics["evaluation"] = {"before": evaluation.summary(before), "after": evaluation.summary(after),
                                       "change": change, "win_rate": win}
