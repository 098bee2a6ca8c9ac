"""``sft``: tune a base model on the templated data with transformers' Trainer, then save it ready to use.

Objectives: ``instruct`` (loss on responses only; ``replay`` mixes in a share of general text, the usual
guard against forgetting) and ``continued`` (plain next-token training on ``text_files``, loss on every
token, texts joined and cut into ``max_length`` blocks). Input: the export stage's dataset when there is
one, else the template stage's records. Checkpoints go to the stage's scratch folder every ``save_steps``;
a re-run after a kill continues from the last one. The output folder (``<run_dir>/model/`` when the stage
is named ``model``) holds safetensors weights, the tokenizer with the template that was trained, a
generation config with the right end ids, and a model card with the before/after evaluation.

The procedure, top to bottom in :func:`run`: data (:mod:`pipeline.training.rows`), the base model's
evaluation, training (:mod:`pipeline.training.trainer`), the tuned model's evaluation, saving
(:mod:`pipeline.training.saving`), the card.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import UserError
from pipeline.models.loading import load_model_and_tokenizer, weights_identity
from pipeline.paths import DATA_DIR
from pipeline.records import TrainingExample
from pipeline.stages import seeds
from pipeline.stages.context import StageContext
from pipeline.text.templates import render, template_file
from pipeline.training import evaluation, rows
from pipeline.training.data import ensure_pad_token, is_chat
from pipeline.training.evaluation import EvalOptions
from pipeline.training.modelcard import display_name, hub_id
from pipeline.training.report import TABLE, render_results_table
from pipeline.training.saving import save_model, set_templates, template_files
from pipeline.training.splits import read_dataset, split_by_task
from pipeline.training.trainer import TrainOptions, base_dtype, finalize, learning_rate, pick_device, train

CARD = "card/model_card.md.j2"
# The option fields naming weights (model, GGUF file, revision): a Hub revision is pinned to its commit.
WEIGHTS = (("base_model", "gguf_file", "revision"),)


class Replay(BaseModel):
    model_config = ConfigDict(extra="forbid")

    share: float = Field(0.1, ge=0.0, le=10.0)  # replay rows as a share of the instruction rows
    text_files: list[str] = Field(default_factory=list)  # general text or original data; default data/general_text.txt
    block_size: int = 256


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    objective: Literal["instruct", "continued"] = "instruct"
    text_files: list[str] = Field(default_factory=list)  # objective: continued
    max_length: int = 512
    replay: Replay | None = None
    packing: bool = False
    chat_template: str | None = None  # a template file for base models without one (default: prompts/chat/chatml.j2)
    holdout: float = 0.1  # share of tasks held out for evaluation when the input is the template stage
    train: TrainOptions = Field(default_factory=TrainOptions)  # the Trainer's settings: steps, lr, batch, LoRA
    evaluation: EvalOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _training_keys_under_train(cls, data: Any) -> Any:
        """A training setting at the top level (``max_steps: 24``) belongs under ``train:``: say so."""
        misplaced = sorted(set(data) & set(TrainOptions.model_fields)) if isinstance(data, dict) else []
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)}: a training setting, it goes under 'train:' "
                             f"(train: {{{misplaced[0]}: ...}})")
        return data


def replay_files(replay: Replay) -> list[str]:
    return replay.text_files or [str(DATA_DIR / "general_text.txt")]


def dependencies(options: Options) -> list[Path]:
    """Files whose content enters the fingerprint: templates, text files, and the evaluation's data."""
    deps = [template_file(CARD), template_file(TABLE)] + template_files(options.chat_template)
    files = options.text_files + (replay_files(options.replay) if options.replay else [])
    evals = evaluation.dependencies(options.evaluation) if options.evaluation else []
    return deps + [Path(f) for f in files] + evals


def identity(options: Options) -> dict[str, Any]:
    """The base model's weights: a content hash, or a Hub commit (never loads them)."""
    return {"base_weights": weights_identity(options.base_model, options.gguf_file, options.revision)}


def models(options: Options) -> list[str]:
    """The evaluation's judge model, when it has one."""
    return evaluation.judge_models(options.evaluation)


def check(options: Options) -> None:
    if options.objective == "continued" and not options.text_files:
        raise UserError("sft.text_files: objective 'continued' needs text files to train on")
    for f in options.text_files + (options.replay.text_files if options.replay else []):
        if not Path(f).is_file():
            raise UserError(f"sft: text file '{f}' not found")


def load_examples(ctx: StageContext) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(train, validation): the export stage's splits, or the template stage's records (held out by task
    only when evaluation is on)."""
    o: Options = ctx.options
    export = ctx.find_input("export")
    if export is not None and (export.dir / "dataset").exists():
        return read_dataset(export.dir / "dataset")
    src = ctx.find_input("template")
    if src is None:
        if o.objective == "continued" or not ctx.inputs:
            return [], []
        src = ctx.previous()
    examples = list(ctx.read_records(src, TrainingExample))
    if o.evaluation is None or o.holdout <= 0:
        return examples, []
    return split_by_task(examples, o.holdout, ctx.seed)


def training_rows(ctx: StageContext, tok: Any, train_ex: list[TrainingExample], s2s: bool) -> rows.Rows:
    """The rows to train on; examples left with no trainable token are rejected with the reason."""
    o: Options = ctx.options
    if o.objective == "continued":
        return rows.continued_rows(tok, o.text_files, o.max_length, s2s)
    data = rows.instruct_rows(tok, train_ex, o.max_length, s2s)
    for e in data.dropped:
        ctx.reject(e, "no_trainable_tokens", f"no response token is left within max_length {o.max_length}")
    if o.replay is None or o.replay.share <= 0:
        return data
    data = rows.add_replay(data, tok, replay_files(o.replay), o.replay.share, min(o.replay.block_size, o.max_length),
                           s2s)
    if data.report["replay_rows"] and o.evaluation is not None:
        general = evaluation.general_text_path(o.evaluation)
        overlap = any(Path(f).resolve() == general.resolve() for f in replay_files(o.replay))
        data.report["replay_is_forgetting_text"] = overlap
        if overlap:
            ctx.log.warning("sft.replay trains on %s, the text the evaluation measures forgetting on: the "
                            "after-tuning perplexity is optimistic; give replay.text_files another file", general)
    return data


def heldout(ctx: StageContext, val_ex: list[TrainingExample]) -> tuple[list[TrainingExample], str]:
    """The held-out instances (and their source, as the card names it) both models answer."""
    o: EvalOptions = ctx.options.evaluation
    path = evaluation.heldout_path(o)
    tasks = seeds.load_tasks(seeds.Options(path=str(path))) if path else None
    return evaluation.heldout_examples(val_ex, o, tasks, display_name(str(path), ctx.run_dir) if path else None)


def run(ctx: StageContext) -> None:
    import torch

    o: Options = ctx.options
    check(o)
    torch.manual_seed(ctx.seed)
    # data
    train_ex, val_ex = load_examples(ctx)
    if o.objective == "instruct" and not train_ex:
        raise UserError(f"stage '{ctx.name}': no training examples (is there a template stage before it?)")
    model, tok = load_model_and_tokenizer(o.base_model, gguf_file=o.gguf_file, revision=o.revision,
                                          dtype=base_dtype(o.train, pick_device("auto")),
                                          trust_remote_code=o.trust_remote_code)
    s2s = bool(getattr(model.config, "is_encoder_decoder", False))
    fmt = train_ex[0].format if train_ex else "text"
    set_templates(tok, fmt, o.chat_template, any(is_chat(e) for e in train_ex))
    ensure_pad_token(tok, model)
    tok.padding_side = "right"  # training pads on the right (docs/sft-pitfalls.md: padding-side)
    model.to(pick_device("auto"))
    # Under torchrun/accelerate only rank 0 evaluates; the other ranks train.
    held = heldout(ctx, val_ex) if o.evaluation and os.environ.get("RANK", "0") == "0" else None
    before = evaluation.evaluate_model(model, tok, val_ex, *held, o.evaluation, "base") if held else None
    data = training_rows(ctx, tok, train_ex, s2s)
    if not data.rows:
        raise UserError(f"stage '{ctx.name}': every example was dropped (no trainable token within max_length)")
    ctx.stats.rows_in = len(train_ex) if o.objective == "instruct" else len(o.text_files)
    ds, collator, mode = rows.trainer_dataset(data.rows, model, tok, o.packing, o.max_length, o.train.precision,
                                                s2s)
    # train
    model.config.use_cache = False
    tuned, info = train(model, tok, ds, collator, o.train, ctx.scratch_dir / "checkpoints", ctx.seed,
                        callbacks=[_progress(ctx)])
    tuned = finalize(tuned, o.train)
    tuned.config.use_cache = True
    tuned.eval()
    after = evaluation.evaluate_model(tuned, tok, val_ex, *held, o.evaluation, "tuned") if held else None
    # save
    save_model(ctx.out_dir, tuned, tok, fmt)
    change = evaluation.compare(before, after, o.evaluation.seed) if held else None
    win, judgements = evaluation.win_rate(o.evaluation, ctx.model, before, after) if held else (None, [])
    # card and numbers
    report = data.report
    card = render(CARD, name=f"{ctx.name} ({display_name(o.base_model, ctx.run_dir)})",
                  base_model=display_name(o.base_model, ctx.run_dir), hub_id=hub_id(o.base_model),
                  objective=o.objective, train_rows=len(train_ex), format=fmt, lora=o.train.lora, path=ctx.name,
                  results_table=render_results_table(before, after, change, win) if held else None,
                  dropped=report["dropped_no_trainable_tokens"], max_length=o.max_length,
                  truncated=report["truncated"], lost=report["lost_response_tokens"],
                  replay_rows=report["replay_rows"], trained_tokens=report["trained_tokens"],
                  steps=info["global_step"], train_loss=round(info["train_loss"], 4), o=o,
                  loss_curve=info["loss_curve"], lr=learning_rate(o.train))
    (ctx.out_dir / "README.md").write_text(card, encoding="utf-8")
    ctx.stats.rows_out = len(data.rows)
    ctx.stats.metrics.update(
        train_rows=len(train_ex), validation_rows=len(val_ex), replay_rows=report["replay_rows"],
        dropped=report["dropped_no_trainable_tokens"], truncated=report["truncated"],
        lost_response_tokens=report["lost_response_tokens"], trained_tokens=report["trained_tokens"],
        input_tokens=report["input_tokens"], packing=mode,
        replay_is_forgetting_text=report.get("replay_is_forgetting_text", False), steps=info["global_step"],
        train_loss=info["train_loss"], loss_curve=info["loss_curve"], resumed_from=info["resumed_from"],
        **identity(o))
    if held:
        ctx.stats.metrics["evaluation"] = {"before": evaluation.summary(before), "after": evaluation.summary(after),
                                           "change": change, "win_rate": win}
        ctx.write_side_json("evaluation.json", {"before": before, "after": after, "change": change, "win_rate": win,
                                                "judgements": judgements})


def _progress(ctx: StageContext):
    """A progress bar over training steps, and the losses in the log."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = ctx.progress(state.max_steps, "training", unit="step")
            self.bar.update(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}")
                ctx.log.info("step %d: loss %.4f", state.global_step, logs["loss"])

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return Progress()
