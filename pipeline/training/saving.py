"""The template a model is trained with, and saving the tuned model ready to use.

The template put on the tokenizer before training is the one saved with it, so inference and evaluation
prompt the model exactly as it was trained (docs/sft-pitfalls.md: *template-drift*).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.text.templates import template_file
from pipeline.training.data import alpaca_chat_template, response_end_ids
from pipeline.training.formats import ALPACA_INPUT, ALPACA_NO_INPUT

CHATML = "chat/chatml.j2"


def template_files(chat_template: str | None) -> list[Path]:
    """Every template whose text can end up on the tokenizer."""
    return [template_file(chat_template or CHATML), template_file(ALPACA_NO_INPUT), template_file(ALPACA_INPUT)]


def set_templates(tok: Any, fmt: str, chat_template: str | None, chat: bool) -> None:
    """Put the template the model is trained with on the tokenizer (Alpaca prompts as a chat template;
    ``chat_template`` or ChatML for chat data where the tokenizer has none, or where one is given)."""
    if fmt == "alpaca":
        tok.chat_template = alpaca_chat_template(tok, template_file(ALPACA_NO_INPUT).read_text(encoding="utf-8"))
    elif chat and (chat_template or not getattr(tok, "chat_template", None)):
        tok.chat_template = template_file(chat_template or CHATML).read_text(encoding="utf-8")


def save_model(out: Path, model: Any, tok: Any, fmt: str) -> None:
    """Weights (safetensors), tokenizer with the trained template, generation config with the end ids."""
    if fmt == "alpaca":
        for name in (ALPACA_INPUT, ALPACA_NO_INPUT):
            stem = Path(name).stem  # alpaca_input -> prompt_input.j2
            (out / f"prompt_{stem.split('_', 1)[1]}.j2").write_text(template_file(name).read_text(encoding="utf-8"),
                                                                    encoding="utf-8")
    model.generation_config.eos_token_id = response_end_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    side, init_side = tok.padding_side, tok.init_kwargs.get("padding_side")
    # saved left-padded for batched generation; training pads on the right (*padding-side*)
    tok.padding_side = tok.init_kwargs["padding_side"] = "left"
    try:
        tok.save_pretrained(out)
    finally:
        tok.padding_side = side
        tok.init_kwargs.pop("padding_side") if init_side is None else tok.init_kwargs.update(padding_side=init_side)
