"""Before/after evaluation of a model, with the same code for the base and the tuned model.

* validation loss — mean token loss on the response tokens of the validation split (prompt masked);
* instruction following — greedy generations for held-out instructions, ROUGE-L F1 against the references
  (Self-Instruct's metric), and how often generation stops by itself before ``max_new_tokens``;
* forgetting — perplexity on a general-text sample. Plain fine-tuning and instruct tuning can make a model
  lose what it knew: a perplexity that rises after tuning measures how much.

Prompts come from :func:`pipeline.training.data.encode_prompt`, the same code that built the training
inputs (B4); generation uses left padding, loss right padding (B3).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.paths import DATA_DIR
from pipeline.records import TrainingExample
from pipeline.text.rouge import rouge_l
from pipeline.training.data import Collator, encode_example, encode_prompt, response_end_ids, response_text


class EvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_examples: int = 32  # held-out instructions generated for
    max_new_tokens: int = 128
    batch_size: int = 8
    max_length: int = 512
    general_text: str | None = None  # default: data/general_text.txt
    max_general_tokens: int = 4096
    block_size: int = 256


def _device(model: Any):
    return next(model.parameters()).device


def _seq2seq(model: Any) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def validation_loss(model: Any, tok: Any, examples: list[TrainingExample], o: EvalOptions) -> float | None:
    import torch

    if not examples:
        return None
    s2s = _seq2seq(model)
    enc = [encode_example(tok, e, o.max_length, s2s) for e in examples]
    collate = Collator(tok.pad_token_id, s2s)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(enc), o.batch_size):
            chunk = enc[i:i + o.batch_size]
            batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in chunk])
            batch = {k: v.to(_device(model)) for k, v in batch.items()}
            if s2s:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"])
                logits, labels = out.logits, batch["labels"]
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logits, labels = logits[:, :-1], batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
    return total / max(1, count)


def generate(model: Any, tok: Any, examples: list[TrainingExample], o: EvalOptions) -> list[tuple[str, bool]]:
    """Greedy answers, and whether each stopped by itself (an end id before max_new_tokens)."""
    import torch

    s2s = _seq2seq(model)
    ends = response_end_ids(tok)
    out: list[tuple[str, bool]] = []
    pad = tok.pad_token_id
    model.eval()
    for i in range(0, len(examples), o.batch_size):
        prompts = [encode_prompt(tok, e, s2s) for e in examples[i:i + o.batch_size]]
        n = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts], device=_device(model))
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], device=_device(model))
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=o.max_new_tokens, do_sample=False,
                                 eos_token_id=ends, pad_token_id=pad)
        start = 0 if s2s else n
        for row in gen.tolist():
            new = row[start:]
            if s2s and new and new[0] == model.config.decoder_start_token_id:
                new = new[1:]
            stop = next((k for k, t in enumerate(new) if t in ends), None)
            text = tok.decode(new[:stop] if stop is not None else new, skip_special_tokens=True)
            out.append((text.strip(), stop is not None))
    return out


def general_text(o: EvalOptions) -> str:
    path = Path(o.general_text) if o.general_text else DATA_DIR / "general_text.txt"
    return path.read_text(encoding="utf-8")


def perplexity(model: Any, tok: Any, text: str, o: EvalOptions) -> float:
    """exp(mean next-token NLL) over non-overlapping blocks of the text."""
    import torch

    ids = tok(text, add_special_tokens=False)["input_ids"][: o.max_general_tokens]
    s2s = _seq2seq(model)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(ids), o.block_size):
            block = ids[i:i + o.block_size]
            if len(block) < 2:
                continue
            t = torch.tensor([block], device=_device(model))
            if s2s:
                start = torch.tensor([[tok.eos_token_id or 0]], device=_device(model))
                out = model(input_ids=start, labels=t)
                n = len(block)
            else:
                out = model(input_ids=t, labels=t)
                n = len(block) - 1
            total += float(out.loss) * n
            count += n
    return math.exp(total / max(1, count))


def evaluate_model(model: Any, tok: Any, examples: list[TrainingExample], options: EvalOptions,
                   label: str) -> dict[str, Any]:
    held = examples[: options.max_examples]
    answers = generate(model, tok, held, options) if held else []
    scores = [rouge_l(response_text(e), a) for e, (a, _) in zip(held, answers)]
    return {
        "label": label,
        "n_examples": len(examples),
        "n_generated": len(held),
        "validation_loss": validation_loss(model, tok, examples, options),
        "rouge_l": sum(scores) / len(scores) if scores else None,
        "stop_rate": sum(s for _, s in answers) / len(answers) if answers else None,
        "general_ppl": perplexity(model, tok, general_text(options), options),
        "samples": [{"instruction": e.instruction, "input": e.input, "reference": response_text(e), "answer": a,
                     "stopped": s} for e, (a, s) in list(zip(held, answers))[:5]],
    }


ROWS = [("validation_loss", "validation loss (response tokens)", "lower is better"),
        ("rouge_l", "ROUGE-L F1 on held-out instructions", "higher is better"),
        ("stop_rate", "generations that stop by themselves", "higher is better"),
        ("general_ppl", "perplexity on general text (forgetting)", "lower is better; a rise means forgetting")]


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def render_results_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = [f"| metric | {before.get('label', 'before')} | {after.get('label', 'after')} | change | note |",
             "|---|---:|---:|---:|---|"]
    for key, name, note in ROWS:
        b, a = before.get(key), after.get(key)
        change = f"{a - b:+.4f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "-"
        lines.append(f"| {name} | {_fmt(b)} | {_fmt(a)} | {change} | {note} |")
    b, a = before.get("general_ppl"), after.get("general_ppl")
    if isinstance(a, float) and isinstance(b, float) and b > 0:
        pct = 100 * (a - b) / b
        verdict = ("general-text perplexity rose by {:.1f}%: the tuning cost some general knowledge".format(pct)
                   if pct > 1 else "general-text perplexity did not rise by more than 1%: no measurable forgetting")
        lines.append("")
        lines.append(f"Forgetting: {verdict}.")
    return "\n".join(lines) + "\n"
