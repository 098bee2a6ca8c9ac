"""``sft``: tune a base model on the templated data with transformers' Trainer, then save it ready to use.

Objectives: ``instruct`` (loss on responses only; ``replay`` mixes in a share of general text, the usual
guard against forgetting) and ``continued`` (plain next-token training on text files, loss on every token).
Checkpoints go to the stage's scratch folder every ``save_steps``; a re-run after a kill continues from the
last one. The output folder (``<run_dir>/model/`` when the stage is named ``model``) holds safetensors
weights, the tokenizer with the template that was trained, a generation config with the right end ids, and a
model card with the before/after evaluation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import UserError
from pipeline.models.loading import load_model_and_tokenizer, weights_fingerprint
from pipeline.records import TrainingExample
from pipeline.stages.context import StageContext
from pipeline.text.templates import render, template_file
from pipeline.training.data import Collator, encode_example, ensure_pad_token, response_end_ids
from pipeline.training.evaluation import EvalOptions, evaluate_model, render_results_table
from pipeline.training.trainer import TrainOptions, finalize, train

log = logging.getLogger(__name__)
CHATML = "chat/chatml.j2"
CARD = "card/model_card.md.j2"


class Replay(BaseModel):
    model_config = ConfigDict(extra="forbid")

    share: float = 0.1  # replay rows as a share of the instruction rows
    text_files: list[str] = Field(default_factory=list)  # default: data/general_text.txt
    block_size: int = 128


class Options(TrainOptions):
    model_config = ConfigDict(extra="forbid")

    base_model: str
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    objective: Literal["instruct", "continued"] = "instruct"
    text_files: list[str] = Field(default_factory=list)  # for objective: continued
    max_length: int = 512
    replay: Replay | None = None
    chat_template: str | None = None  # a template file for base models without one (default: ChatML)
    evaluation: EvalOptions | None = None


def dependencies(options: Options) -> list[Path]:
    deps = [template_file(CARD), template_file(options.chat_template or CHATML),
            template_file("formats/alpaca_input.j2"), template_file("formats/alpaca_no_input.j2")]
    files = options.text_files + (options.replay.text_files if options.replay else [])
    deps += [Path(f) for f in files]
    return deps


def _examples(ctx: StageContext) -> tuple[list[TrainingExample], list[TrainingExample]]:
    export = ctx.find_input("export")
    if export is not None and (export.dir / "dataset").exists():
        import datasets

        dd = datasets.load_from_disk(str(export.dir / "dataset"))
        conv = lambda ds: [TrainingExample.model_validate(r) for r in ds]  # noqa: E731
        return conv(dd["train"]), conv(dd["validation"]) if "validation" in dd else []
    from pipeline.stages.export import split_by_task

    src = ctx.find_input("template") or ctx.previous()
    return split_by_task(list(ctx.read_records(src, TrainingExample)), 0.1, ctx.seed)


def _text_blocks(tok, files: list[str], block: int, limit: int | None) -> list[dict]:
    from pipeline.paths import DATA_DIR

    ids: list[int] = []
    for f in files or [str(DATA_DIR / "general_text.txt")]:
        ids += tok(Path(f).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
    rows = [{"input_ids": ids[i:i + block], "labels": ids[i:i + block]} for i in range(0, len(ids) - 1, block)]
    return rows[:limit] if limit is not None else rows


def _set_templates(tok, fmt: str, o: Options) -> None:
    """The template the model is trained with is the one saved with it (B4)."""
    if fmt == "alpaca":
        body = template_file("formats/alpaca_no_input.j2").read_text(encoding="utf-8")
        tok.chat_template = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                             "{% set instruction = message['content'] %}" + body +
                             "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
                             "{% endif %}{% endfor %}")
    elif fmt in ("chat", "sharegpt") and (o.chat_template or not getattr(tok, "chat_template", None)):
        tok.chat_template = template_file(o.chat_template or CHATML).read_text(encoding="utf-8")


def run(ctx: StageContext) -> None:
    import torch

    o: Options = ctx.options
    torch.manual_seed(ctx.seed)
    train_ex, val_ex = _examples(ctx)
    if o.objective == "instruct" and not train_ex:
        raise UserError(f"stage '{ctx.name}': no training examples (is there a template stage before it?)")
    model, tok = load_model_and_tokenizer(o.base_model, gguf_file=o.gguf_file, revision=o.revision,
                                          dtype="float32", trust_remote_code=o.trust_remote_code)
    s2s = bool(getattr(model.config, "is_encoder_decoder", False))
    fmt = train_ex[0].format if train_ex else "text"
    if any(e.messages for e in train_ex) and not getattr(tok, "chat_template", None) or o.chat_template:
        _set_templates(tok, "chat", o)
    ensure_pad_token(tok, model)
    tok.padding_side = "right"

    before = None
    if o.evaluation is not None:
        before = evaluate_model(model, tok, val_ex, o.evaluation, "base")

    rows, truncated, lost, dropped = [], 0, 0, 0
    if o.objective == "instruct":
        for e in train_ex:
            enc = encode_example(tok, e, o.max_length, s2s)
            if not any(label != -100 for label in enc.labels):
                ctx.reject(e, "no_trainable_tokens", "every label is masked after truncation")
                dropped += 1
                continue
            truncated += enc.truncated
            lost += enc.lost_response_tokens
            rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
        n_replay = int(len(rows) * o.replay.share) if o.replay else 0
        replay = _text_blocks(tok, o.replay.text_files, o.replay.block_size, n_replay) if o.replay and not s2s else []
    else:
        replay = []
        rows = _text_blocks(tok, o.text_files, o.max_length, None)
    rows += replay
    ctx.stats.rows_in = len(train_ex)
    import datasets

    ds = datasets.Dataset.from_list(rows)
    ds = ds.add_column("length", [len(r["input_ids"]) for r in rows])
    trained_tokens = sum(sum(1 for x in r["labels"] if x != -100) for r in rows)
    model.config.use_cache = False
    tuned, info = train(model, tok, ds, Collator(tok.pad_token_id, s2s), o, ctx.scratch_dir / "checkpoints", ctx.seed,
                        callbacks=[_progress(ctx)])
    tuned = finalize(tuned, o)
    tuned.config.use_cache = True
    tuned.eval()

    after = evaluate_model(tuned, tok, val_ex, o.evaluation, "tuned") if o.evaluation is not None else None
    _save(ctx, tuned, tok, fmt, o)
    table = render_results_table(before, after) if before and after else None
    card = render(CARD, name=f"{ctx.name} ({o.base_model})", base_model=o.base_model, objective=o.objective,
                  train_rows=len(train_ex), format=fmt, lora=o.lora, path=str(ctx.run_dir / ctx.name),
                  results_table=table, dropped=dropped, max_length=o.max_length, truncated=truncated, lost=lost,
                  replay_rows=len(replay), trained_tokens=trained_tokens, steps=info["global_step"],
                  train_loss=round(info["train_loss"], 4), o=o, loss_curve=info["loss_curve"])
    (ctx.out_dir / "README.md").write_text(card, encoding="utf-8")
    ctx.stats.rows_out = len(rows)
    ctx.stats.metrics.update(train_rows=len(train_ex), validation_rows=len(val_ex), replay_rows=len(replay),
                             truncated=truncated, lost_response_tokens=lost, trained_tokens=trained_tokens,
                             steps=info["global_step"], train_loss=info["train_loss"],
                             resumed_from=info["resumed_from"], base_weights=weights_fingerprint(o.base_model, o.gguf_file))
    if before and after:
        strip = lambda r: {k: v for k, v in r.items() if k != "samples"}  # noqa: E731
        ctx.stats.metrics["evaluation"] = {"before": strip(before), "after": strip(after)}
        (ctx.out_dir / "evaluation.json").write_text(json.dumps({"before": before, "after": after}, indent=2),
                                                     encoding="utf-8")


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


def _save(ctx: StageContext, model, tok, fmt: str, o: Options) -> None:
    out = ctx.out_dir
    _set_templates(tok, fmt, o) if fmt == "alpaca" else None
    if fmt == "alpaca":
        for name in ("alpaca_input", "alpaca_no_input"):
            src = template_file(f"formats/{name}.j2").read_text(encoding="utf-8")
            (out / f"prompt_{name.split('_', 1)[1]}.j2").write_text(src, encoding="utf-8")
    ends = response_end_ids(tok)
    model.generation_config.eos_token_id = ends if len(ends) > 1 else ends[0]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.padding_side = "left"  # for batched generation
    tok.save_pretrained(out)
