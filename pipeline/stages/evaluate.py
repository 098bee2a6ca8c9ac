"""``evaluate``: the base model and the tuned model, measured with the same code on the same data.

Validation loss on the validation split (the latest ``export`` stage's ``dataset/``, else the same
task-level split of the ``template`` stage's records that ``sft`` uses), ROUGE-L and stop rate of greedy
answers to held-out instructions, and perplexity on a general-text sample — the forgetting check. The
tuned model is the latest earlier ``sft`` stage's folder unless ``tuned`` names one.

Outputs in the stage folder: ``results.json`` (both results and the table), ``generations.jsonl`` (every
held-out answer of both models) and ``README.md`` (the before/after table). The numbers also go to the
manifest (``metrics.evaluation``), where ``seedtune status`` shows them.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from pydantic import ConfigDict

from pipeline.errors import UserError
from pipeline.records import TrainingExample, write_json, write_jsonl
from pipeline.stages.context import StageContext
from pipeline.training.evaluation import (DEFAULT_GENERAL_TEXT, DEFAULT_HELDOUT, EvalOptions, evaluate_model,
                                          render_results_table, summary)


class Options(EvalOptions):
    model_config = ConfigDict(extra="forbid")

    base_model: str  # folder, hub id, .gguf file or pkg://DIST/PATH
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    tuned: str | None = None  # default: the latest earlier sft stage's folder
    dtype: str = "float32"
    device: str = "auto"  # auto: cuda when available, else cpu


def dependencies(options: Options) -> list[Path]:
    """The data files scored; the models enter through the options and the upstream sft stage."""
    deps = [Path(options.general_text) if options.general_text else DEFAULT_GENERAL_TEXT]
    heldout = Path(options.heldout) if options.heldout else DEFAULT_HELDOUT
    if options.heldout or heldout.exists():
        deps.append(heldout)
    return deps


def check(options: Options) -> None:
    for p in dependencies(options):
        if not p.exists():
            raise UserError(f"evaluate: file not found: {p}")


def eval_options(o: Options) -> EvalOptions:
    return EvalOptions(**{k: getattr(o, k) for k in EvalOptions.model_fields})


def validation_examples(ctx: StageContext) -> list[TrainingExample]:
    """The export stage's validation split, else the template stage's records split as ``sft`` splits them."""
    export = ctx.find_input("export")
    if export is not None and (export.dir / "dataset").exists():
        import datasets

        dd = datasets.load_from_disk(str(export.dir / "dataset"))
        if "validation" not in dd:
            return []
        return [TrainingExample.model_validate(row) for row in dd["validation"]]
    src = ctx.find_input("template")
    if src is None:
        return []
    from pipeline.stages.export import split_by_task

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


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _evaluate(spec: str, o: Options, examples: list[TrainingExample], label: str, chat_template: str | None,
              **load: Any) -> dict[str, Any]:
    """Load one model, evaluate it, free it."""
    from pipeline.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(spec, dtype=o.dtype, device=_device(o.device),
                                          trust_remote_code=o.trust_remote_code, **load)
    if chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = chat_template  # the base model is prompted exactly as the tuned one (B4)
    try:
        return evaluate_model(model, tok, examples, eval_options(o), label)
    finally:
        del model
        gc.collect()
        _empty_cache()


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def report(name: str, base: str, tuned: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    return (f"# Evaluation: {name}\n\nBase model `{base}` against tuned model `{tuned}`, measured with the same "
            "code on the same data.\n\n" + render_results_table(before, after) +
            "\nPer-answer details (both models): `generations.jsonl`; all numbers: `results.json`.\n")


def run(ctx: StageContext) -> None:
    from transformers import AutoTokenizer

    o: Options = ctx.options
    tuned = tuned_folder(ctx)
    examples = validation_examples(ctx)
    ctx.stats.rows_in = len(examples)
    tuned_tok = AutoTokenizer.from_pretrained(str(tuned), trust_remote_code=o.trust_remote_code)
    template = getattr(tuned_tok, "chat_template", None)
    before = _evaluate(o.base_model, o, examples, "base", template, gguf_file=o.gguf_file, revision=o.revision)
    after = _evaluate(str(tuned), o, examples, "tuned", None)
    table = render_results_table(before, after)
    write_json(ctx.out_dir / "results.json", {"before": before, "after": after, "table": table,
                                              "base_model": o.base_model, "tuned": str(tuned)})
    rows = [{"model": r["label"], **s} for r in (before, after) for s in r["samples"]]
    write_jsonl(ctx.out_dir / "generations.jsonl", rows)
    (ctx.out_dir / "README.md").write_text(report(ctx.name, o.base_model, str(tuned), before, after),
                                           encoding="utf-8")
    ctx.stats.rows_out = len(rows)
    ctx.stats.metrics["evaluation"] = {"before": summary(before), "after": summary(after)}
