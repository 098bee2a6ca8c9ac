"""``sft``: tune a base model on the templated data with transformers' Trainer, then save it ready to use.

Objectives: ``instruct`` (loss on responses only; ``replay`` mixes in a share of general text, the usual
guard against forgetting) and ``continued`` (plain next-token training on ``text_files``, loss on every
token, texts joined and cut into ``max_length`` blocks). Input: the export stage's dataset when there is
one, else the template stage's records. Checkpoints go to the stage's scratch folder every ``save_steps``;
a re-run after a kill continues from the last one. The output folder (``<run_dir>/model/`` when the stage
is named ``model``) holds safetensors weights, the tokenizer with the template that was trained, a
generation config with the right end ids, and a model card with the before/after evaluation.

No tokenised data is cached between runs (B11): every run tokenises from the records with the templates
whose text is in the stage fingerprint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import UserError
from pipeline.models.loading import load_model_and_tokenizer, weights_identity
from pipeline.paths import DATA_DIR
from pipeline.records import TrainingExample
from pipeline.stages.context import StageContext
from pipeline.text.templates import render, template_file
from pipeline.training.data import (
    Collator, alpaca_chat_template, encode_dataset, ensure_pad_token, is_chat, response_end_ids, text_blocks,
)
from pipeline.training.trainer import TrainOptions, finalize, precision_flags, train

try:  # written by the evaluation engineer; the stage trains without it
    from pipeline.training import evaluation as _evaluation
    from pipeline.training.evaluation import EvalOptions
except ImportError:  # pragma: no cover - only while the module is missing
    _evaluation = None
    EvalOptions = dict  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)
CHATML = "chat/chatml.j2"
CARD = "card/model_card.md.j2"
ALPACA_NO_INPUT = "formats/alpaca_no_input.j2"
ALPACA_INPUT = "formats/alpaca_input.j2"


class Replay(BaseModel):
    model_config = ConfigDict(extra="forbid")

    share: float = Field(0.1, ge=0.0, le=10.0)  # replay rows as a share of the instruction rows
    text_files: list[str] = Field(default_factory=list)  # general text or original data; default data/general_text.txt
    block_size: int = 256


class Options(TrainOptions):
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
    evaluation: EvalOptions | None = None


def dependencies(options: Options) -> list[Path]:
    """Template and text files whose content enters the fingerprint (a template edit re-runs the stage)."""
    deps = [template_file(CARD), template_file(options.chat_template or CHATML), template_file(ALPACA_NO_INPUT),
            template_file(ALPACA_INPUT)]
    files = options.text_files + (replay_files(options.replay) if options.replay else [])
    return deps + [Path(f) for f in files]


def replay_files(replay: Replay) -> list[str]:
    return replay.text_files or [str(DATA_DIR / "general_text.txt")]


def check(options: Options) -> None:
    if options.objective == "continued" and not options.text_files:
        raise UserError("sft.text_files: objective 'continued' needs text files to train on")
    for f in options.text_files + (options.replay.text_files if options.replay else []):
        if not Path(f).is_file():
            raise UserError(f"sft: text file '{f}' not found")


# ---- input --------------------------------------------------------------------------------------------

def load_examples(ctx: StageContext) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(train, validation): the export stage's splits, or the template stage's records (held out by task
    only when evaluation is on)."""
    o: Options = ctx.options
    export = ctx.find_input("export")
    if export is not None and (export.dir / "dataset").exists():
        import datasets

        dd = datasets.load_from_disk(str(export.dir / "dataset"))
        conv = lambda ds: [TrainingExample.model_validate(r) for r in ds]  # noqa: E731
        return conv(dd["train"]), conv(dd["validation"]) if "validation" in dd else []
    src = ctx.find_input("template")
    if src is None:
        if o.objective == "continued" or not ctx.inputs:
            return [], []
        src = ctx.previous()
    examples = list(ctx.read_records(src, TrainingExample))
    if o.evaluation is None or o.holdout <= 0:
        return examples, []
    from pipeline.stages.export import split_by_task

    return split_by_task(examples, o.holdout, ctx.seed)


def read_texts(files: list[str]) -> list[str]:
    out = []
    for f in files:
        try:
            out.append(Path(f).read_text(encoding="utf-8"))
        except OSError as e:
            raise UserError(f"sft: cannot read text file '{f}' ({e.strerror})") from None
    return out


def set_templates(tok: Any, fmt: str, o: Options, chat: bool) -> None:
    """Put the template the model is trained with on the tokenizer; it is saved with the model (B4)."""
    if fmt == "alpaca":
        tok.chat_template = alpaca_chat_template(tok, template_file(ALPACA_NO_INPUT).read_text(encoding="utf-8"))
    elif chat and (o.chat_template or not getattr(tok, "chat_template", None)):
        tok.chat_template = template_file(o.chat_template or CHATML).read_text(encoding="utf-8")


# ---- run ----------------------------------------------------------------------------------------------

def build_rows(ctx: StageContext, tok: Any, train_ex: list[TrainingExample], s2s: bool) -> tuple[list, dict]:
    """Training rows and the tokenisation report; dropped rows are rejected with a reason (B2, B10)."""
    o: Options = ctx.options
    if o.objective == "continued":
        if s2s:
            raise UserError("sft.objective: 'continued' is for decoder-only models")
        rows = text_blocks(tok, read_texts(o.text_files), o.max_length)
        n = sum(len(r["input_ids"]) for r in rows)
        return rows, {"rows": len(rows), "dropped_no_trainable_tokens": 0, "truncated": 0,
                      "lost_response_tokens": 0, "trained_tokens": n, "input_tokens": n, "replay_rows": 0}
    rep = encode_dataset(tok, train_ex, o.max_length, s2s)
    for e in rep.dropped:
        ctx.reject(e, "no_trainable_tokens", f"no response token is left within max_length {o.max_length}")
    rows = rep.rows
    report = rep.as_dict()
    replay: list[dict] = []
    if o.replay is not None and o.replay.share > 0:
        if s2s:
            raise UserError("sft.replay: replaying plain text is for decoder-only models")
        want = int(round(len(rows) * o.replay.share))
        replay = text_blocks(tok, read_texts(replay_files(o.replay)), min(o.replay.block_size, o.max_length))[:want]
        report["trained_tokens"] += sum(len(r["labels"]) - 1 for r in replay)
        report["input_tokens"] += sum(len(r["input_ids"]) for r in replay)
    report["replay_rows"] = len(replay)
    if replay and o.evaluation is not None:
        general = getattr(o.evaluation, "general_text", None) or str(DATA_DIR / "general_text.txt")
        overlap = any(Path(f).resolve() == Path(general).resolve() for f in replay_files(o.replay))
        report["replay_is_forgetting_text"] = overlap
        if overlap:
            ctx.log.warning("sft.replay trains on %s, the text the evaluation measures forgetting on: the "
                            "after-tuning perplexity is optimistic; give replay.text_files another file", general)
    return rows + replay, report


def make_dataset(rows: list[dict], model: Any, tok: Any, o: Options, s2s: bool) -> tuple[Any, Any, str]:
    """The Trainer dataset, its collator and the packing mode (``none``, ``mask4d`` or ``varlen``)."""
    import datasets

    mode = "none"
    collator: Any = Collator(tok.pad_token_id, s2s)
    if o.packing:
        from pipeline.training.packing import FlatteningCollator, PackedCollator, mask_dtype, pack_rows, packing_mode

        mode = packing_mode(model)
        if mode == "mask4d":
            rows = pack_rows(rows, o.max_length)
            collator = PackedCollator(tok.pad_token_id, mask_dtype(precision_flags(o.precision)))
        else:
            collator = FlatteningCollator()
    rows = [{**r, "length": len(r["input_ids"])} for r in rows]
    return datasets.Dataset.from_list(rows), collator, mode


def evaluate(model: Any, tok: Any, examples: list[TrainingExample], o: Options, label: str) -> dict | None:
    if o.evaluation is None or os.environ.get("RANK", "0") != "0":  # other ranks of a multi-process run train only
        return None
    if _evaluation is None:  # pragma: no cover
        log.warning("pipeline.training.evaluation is missing: skipping evaluation")
        return None
    opts = o.evaluation if not isinstance(o.evaluation, dict) else _evaluation.EvalOptions(**o.evaluation)
    return _evaluation.evaluate_model(model, tok, examples, opts, label)


def run(ctx: StageContext) -> None:
    import torch

    o: Options = ctx.options
    check(o)
    torch.manual_seed(ctx.seed)
    train_ex, val_ex = load_examples(ctx)
    if o.objective == "instruct" and not train_ex:
        raise UserError(f"stage '{ctx.name}': no training examples (is there a template stage before it?)")
    model, tok = load_model_and_tokenizer(o.base_model, gguf_file=o.gguf_file, revision=o.revision,
                                          dtype="float32", trust_remote_code=o.trust_remote_code)
    s2s = bool(getattr(model.config, "is_encoder_decoder", False))
    fmt = train_ex[0].format if train_ex else "text"
    set_templates(tok, fmt, o, any(is_chat(e) for e in train_ex))
    ensure_pad_token(tok, model)
    tok.padding_side = "right"  # training pads on the right (B3)
    if torch.cuda.is_available():
        model.to("cuda")

    before = evaluate(model, tok, val_ex, o, "base")
    rows, report = build_rows(ctx, tok, train_ex, s2s)
    if not rows:
        raise UserError(f"stage '{ctx.name}': every example was dropped (no trainable token within max_length)")
    ctx.stats.rows_in = len(train_ex) if o.objective == "instruct" else len(o.text_files)
    ds, collator, mode = make_dataset(rows, model, tok, o, s2s)
    model.config.use_cache = False
    tuned, info = train(model, tok, ds, collator, o, ctx.scratch_dir / "checkpoints", ctx.seed,
                        callbacks=[_progress(ctx)])
    tuned = finalize(tuned, o)
    tuned.config.use_cache = True
    tuned.eval()
    after = evaluate(tuned, tok, val_ex, o, "tuned")
    save_model(ctx.out_dir, tuned, tok, fmt)

    table = None
    if before is not None and after is not None and _evaluation is not None:
        table = _evaluation.render_results_table(before, after)
    card = render(CARD, name=f"{ctx.name} ({o.base_model})", base_model=o.base_model, objective=o.objective,
                  train_rows=len(train_ex), format=fmt, lora=o.lora, path=str(ctx.run_dir / ctx.name),
                  results_table=table, dropped=report["dropped_no_trainable_tokens"], max_length=o.max_length,
                  truncated=report["truncated"], lost=report["lost_response_tokens"],
                  replay_rows=report["replay_rows"], trained_tokens=report["trained_tokens"],
                  steps=info["global_step"], train_loss=round(info["train_loss"], 4), o=o,
                  loss_curve=info["loss_curve"])
    (ctx.out_dir / "README.md").write_text(card, encoding="utf-8")
    ctx.stats.rows_out = len(rows)
    ctx.stats.metrics.update(
        train_rows=len(train_ex), validation_rows=len(val_ex), replay_rows=report["replay_rows"],
        dropped=report["dropped_no_trainable_tokens"], truncated=report["truncated"],
        lost_response_tokens=report["lost_response_tokens"], trained_tokens=report["trained_tokens"],
        input_tokens=report["input_tokens"], packing=mode,
        replay_is_forgetting_text=report.get("replay_is_forgetting_text", False), steps=info["global_step"],
        train_loss=info["train_loss"], loss_curve=info["loss_curve"], resumed_from=info["resumed_from"],
        base_weights=weights_identity(o.base_model, o.gguf_file, o.revision))
    if before is not None and after is not None:
        strip = lambda r: {k: v for k, v in r.items() if k != "samples"}  # noqa: E731
        ctx.stats.metrics["evaluation"] = {"before": strip(before), "after": strip(after)}
        ctx.write_side_json("evaluation.json", {"before": before, "after": after})


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


def save_model(out: Path, model: Any, tok: Any, fmt: str) -> None:
    """Weights (safetensors), tokenizer with the trained template, generation config with the end ids."""
    if fmt == "alpaca":
        for name in ("alpaca_input", "alpaca_no_input"):
            src = template_file(f"formats/{name}.j2").read_text(encoding="utf-8")
            (out / f"prompt_{name.split('_', 1)[1]}.j2").write_text(src, encoding="utf-8")
    ends = response_end_ids(tok)
    model.generation_config.eos_token_id = ends
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    side, init_side = tok.padding_side, tok.init_kwargs.get("padding_side")
    tok.padding_side = tok.init_kwargs["padding_side"] = "left"  # saved for batched generation (B3)
    try:
        tok.save_pretrained(out)
    finally:
        tok.padding_side = side
        tok.init_kwargs.pop("padding_side") if init_side is None else tok.init_kwargs.update(padding_side=init_side)
