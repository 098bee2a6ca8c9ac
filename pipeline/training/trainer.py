"""Training on transformers' ``Trainer``: arguments, LoRA, gradient checkpointing, checkpoint resume.

``Trainer`` already normalises gradient accumulation by the number of label tokens (docs/sft-pitfalls.md:
*accumulation-normalisation*), handles mixed precision, distributed training (accelerate/torchrun) and
checkpoint resume; seedtune writes only the data layer.
"""

from __future__ import annotations

import dataclasses
import os
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import MissingExtra, UserError

log = logging.getLogger(__name__)


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    merge_on_save: bool = True


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: float = 3.0
    max_steps: int = -1
    # None: 2e-5 for full fine-tuning, 2e-4 with LoRA (its adapters start at zero and need a larger step; PEFT's and
    # TRL's examples use 1e-4 to 2e-4)
    learning_rate: float | None = None
    per_device_batch_size: int = 4
    gradient_accumulation: int = 1
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)  # a share of the Trainer's total steps, all ranks counted
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"  # auto: bf16 on a GPU that supports it, else fp32
    group_by_length: bool = True
    save_steps: int = 50
    logging_steps: int = 5
    lora: LoraOptions | None = None
    extra_args: dict[str, Any] = Field(default_factory=dict)  # any other TrainingArguments field


FULL_LEARNING_RATE = 2e-5
LORA_LEARNING_RATE = 2e-4


def learning_rate(o: TrainOptions) -> float:
    """The learning rate given, else the default for full fine-tuning or for LoRA."""
    if o.learning_rate is not None:
        return o.learning_rate
    return LORA_LEARNING_RATE if o.lora is not None else FULL_LEARNING_RATE


def base_dtype(o: TrainOptions, device: str) -> str:
    """The dtype to load the base model in: bf16 under LoRA (the frozen base needs no fp32 master weights; the
    adapters are kept in fp32 by PEFT) where the device computes in bf16, fp32 otherwise."""
    import torch

    if o.lora is None:
        return "float32"
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device == "cpu" else "float32"


def pick_device(name: str = "auto") -> str:
    """``auto``: cuda when available, else cpu; any other name as given."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def precision_flags(precision: str) -> dict[str, bool]:
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise UserError("sft.precision: this GPU does not support bf16; use fp16 or fp32")
        return {"bf16": True}
    if precision == "fp16":
        if not cuda:
            raise UserError("sft.precision: fp16 training needs a GPU; use bf16 or fp32 on a CPU")
        return {"fp16": True}
    if precision != "fp32":
        raise UserError(f"sft.precision: unknown precision '{precision}' (fp32, bf16, fp16 or auto)")
    return {}


def apply_lora(model: Any, lora: LoraOptions, gradient_checkpointing: bool) -> Any:
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise MissingExtra("LoRA training", "lora", "peft") from None
    task = TaskType.SEQ_2_SEQ_LM if getattr(model.config, "is_encoder_decoder", False) else TaskType.CAUSAL_LM
    if gradient_checkpointing:
        # Without inputs that require grad, checkpointed LoRA layers get no gradient (*lora-checkpointing*).
        model.enable_input_require_grads()
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules, task_type=task)
    return get_peft_model(model, cfg)


def training_arguments(o: TrainOptions, output_dir: Path, seed: int):
    """The Trainer's arguments. The schedule is the Trainer's own: total steps and epochs come from its
    dataloader (sharded over the ranks under torchrun/accelerate), and the warm-up is a ratio of that total, so
    it is the same share of training on one process or eight."""
    import torch
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5 takes a ratio as a float warmup_steps below 1; 4.x has warmup_ratio
    warmup = {"warmup_ratio": o.warmup_ratio} if "warmup_ratio" in names else {"warmup_steps": o.warmup_ratio}
    args = dict(
        output_dir=str(output_dir), num_train_epochs=o.epochs, max_steps=o.max_steps,
        learning_rate=learning_rate(o), per_device_train_batch_size=o.per_device_batch_size,
        gradient_accumulation_steps=o.gradient_accumulation, **warmup,
        lr_scheduler_type=o.lr_scheduler, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
        logging_steps=o.logging_steps, save_steps=o.save_steps, save_total_limit=2, report_to="none", seed=seed,
        data_seed=seed, remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(), **precision_flags(o.precision),
    )
    if "train_sampling_strategy" in names:  # transformers 5; 4.x has group_by_length
        args["train_sampling_strategy"] = "group_by_length" if o.group_by_length else "random"
    else:
        args["group_by_length"] = o.group_by_length
    if o.gradient_checkpointing:
        # non-reentrant checkpointing gives LoRA layers gradients (*lora-checkpointing*); transformers 5
        # renamed the fields
        key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        args.update({key: True, f"{key}_kwargs": {"use_reentrant": False}})
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args["use_cpu"] = True  # without it transformers trains each CPU rank alone instead of data-parallel
    args.update(o.extra_args)
    return TrainingArguments(**args)


def last_checkpoint(output_dir: Path) -> str | None:
    """The latest complete checkpoint: one whose trainer state (written last) is there; a kill while a
    checkpoint was being written leaves one without it, which is skipped."""
    if not Path(output_dir).is_dir():
        return None
    done = [c for c in Path(output_dir).glob("checkpoint-*")
            if c.name.split("-")[-1].isdigit() and (c / "trainer_state.json").is_file()]
    return str(max(done, key=lambda c: int(c.name.split("-")[-1]))) if done else None


def train(model: Any, tokenizer: Any, dataset: Any, collator: Any, o: TrainOptions, output_dir: Path, seed: int,
          callbacks: list | None = None) -> tuple[Any, dict[str, Any]]:
    """Train (resuming from the last checkpoint in ``output_dir``); returns the model and the log history."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    if o.lora is not None:
        model = apply_lora(model, o.lora, o.gradient_checkpointing)
    elif o.gradient_checkpointing:
        model.config.use_cache = False
    args = training_arguments(o, output_dir, seed)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # library code does not print; losses go to the log and the card
    resume = last_checkpoint(output_dir)
    if resume:
        log.info("resuming training from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    history = [h for h in trainer.state.log_history if "loss" in h]
    info = {"global_step": trainer.state.global_step, "train_loss": result.training_loss,
            "resumed_from": Path(resume).name if resume else None,
            "loss_curve": [{"step": h["step"], "loss": round(h["loss"], 4)} for h in history]}
    return trainer.model, info


def finalize(model: Any, o: TrainOptions) -> Any:
    """The plain model to save: LoRA adapters merged in (or the adapter model when merge_on_save is off)."""
    if o.lora is not None and o.lora.merge_on_save:
        return model.merge_and_unload()
    return model
