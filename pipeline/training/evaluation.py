"""Before/after evaluation of a model, with the same code for the base and the tuned model.

* **validation loss** — mean token loss on the response tokens of the validation split; the inputs and
  labels come from :func:`pipeline.training.data.encode_example`, the code that built the training rows, so
  the prompt is masked exactly as in training; batches are right-padded (B3);
* **instruction following** — greedy generations for held-out instructions (``data/eval_instructions.jsonl``
  or a user file in any format the ``seeds`` stage reads; the validation split when there is none), scored
  with ROUGE-L F1 against the references (Self-Instruct's metric), and the **stop rate**: the share of
  generations that end with an end id (EOS or the chat template's end-of-turn) before ``max_new_tokens``.
  Prompts come from :func:`pipeline.training.data.encode_prompt` (B4); batches are left-padded;
* **forgetting** — perplexity on a general-text sample (``data/general_text.txt`` or a user file). Plain
  fine-tuning and instruct tuning can make a model lose what it knew: a perplexity that rises after tuning
  measures how much.

Works for causal LMs and encoder-decoder models; deterministic (greedy decoding, seeded example choice).
"""

from __future__ import annotations

import copy
import logging
import math
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pipeline.errors import UserError
from pipeline.paths import DATA_DIR
from pipeline.records import TrainingExample
from pipeline.training.data import Collator, encode_example, encode_prompt, response_end_ids, response_text

try:
    from pipeline.text.rouge import rouge_l_f1, tokenize
except ImportError:  # pragma: no cover - the project module is the normal path
    from rouge_score import rouge_scorer as _rs

    _scorer = _rs.RougeScorer(["rougeL"], use_stemmer=False)

    def tokenize(text: str) -> list[str]:
        return text.split()

    def rouge_l_f1(target: list[str], prediction: list[str]) -> float:
        return _scorer.score(" ".join(target), " ".join(prediction))["rougeL"].fmeasure

log = logging.getLogger(__name__)

DEFAULT_GENERAL_TEXT = DATA_DIR / "general_text.txt"
DEFAULT_HELDOUT = DATA_DIR / "eval_instructions.jsonl"
SAMPLES_KEPT = 5
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


class EvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_examples: int = 32  # held-out instances generated for
    max_new_tokens: int = 128
    batch_size: int = 8
    max_length: int = 512  # validation rows are cut like training rows
    max_validation_examples: int | None = 256  # validation rows scored for the loss (None: all)
    general_text: str | None = None  # default: data/general_text.txt
    max_general_tokens: int = 4096
    block_size: int = 512  # perplexity window (capped at the model's positions)
    stride: int = 256  # perplexity window step (< block_size: every token scored once, with overlap as context)
    heldout: str | None = None  # default: data/eval_instructions.jsonl, else the validation split
    heldout_format: Literal["auto", "alpaca", "chat"] = "auto"  # auto: the validation examples' format
    seed: int = 0


# ---- helpers ----------------------------------------------------------------------------------------------

def _device(model: Any):
    return next(model.parameters()).device


def is_seq2seq(model: Any) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _pad_id(tok: Any) -> int:
    """The pad id for batches; models without a pad token get an end id (always masked out)."""
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    ends = response_end_ids(tok)
    return ends[0] if ends else 0


def _promptable(example: TrainingExample) -> TrainingExample:
    """ShareGPT rows carry ``conversations``; the prompt code reads ``messages``."""
    if example.messages or example.prompt is not None or not example.conversations:
        return example
    msgs = [{"role": SHAREGPT_ROLES.get(t["from"], t["from"]), "content": t["value"]} for t in example.conversations]
    return example.model_copy(update={"messages": msgs})


def _sample(items: list[Any], n: int | None, seed: int, salt: str) -> list[Any]:
    """A seeded subset of at most n items, in their original order."""
    if n is None or len(items) <= n:
        return list(items)
    keep = sorted(random.Random(f"{seed}:{salt}").sample(range(len(items)), n))
    return [items[i] for i in keep]


class _EvalMode:
    """model.eval() and no_grad for the block; the model's training mode comes back afterwards."""

    def __init__(self, model: Any):
        self.model = model

    def __enter__(self):
        import torch

        self.was_training = self.model.training
        self.model.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()
        return self

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        self.model.train(self.was_training)
        return False


# ---- validation loss --------------------------------------------------------------------------------------

def validation_loss(model: Any, tok: Any, examples: list[TrainingExample], o: EvalOptions) -> float | None:
    """Mean loss per trained token (response + end id) over the examples, prompt tokens masked as in training."""
    import torch
    import torch.nn.functional as F

    if not examples:
        return None
    s2s = is_seq2seq(model)
    enc = [encode_example(tok, _promptable(e), o.max_length, s2s) for e in examples]
    collate = Collator(_pad_id(tok), s2s)
    total, count = 0.0, 0
    dev = _device(model)
    with _EvalMode(model):
        for i in range(0, len(enc), o.batch_size):
            batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in enc[i:i + o.batch_size]])
            batch = {k: v.to(dev) for k, v in batch.items()}
            if s2s:
                logits = model(**batch).logits  # decoder inputs are the labels shifted right
                labels = batch["labels"]
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                labels = batch["labels"][:, 1:]
            total += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count if count else None


# ---- generation -------------------------------------------------------------------------------------------

def _generation_config(model: Any, ends: list[int], pad: int, max_new_tokens: int):
    gc = copy.deepcopy(model.generation_config)
    gc.do_sample = False
    gc.num_beams = 1
    gc.temperature = gc.top_p = gc.top_k = None
    gc.repetition_penalty = None
    gc.min_new_tokens = None
    gc.min_length = 0
    gc.max_length = None
    gc.max_new_tokens = max_new_tokens
    gc.eos_token_id = list(ends)
    gc.pad_token_id = pad
    gc.use_cache = True
    return gc


def generate_ids(model: Any, tok: Any, examples: list[TrainingExample], o: EvalOptions) -> list[tuple[list[int], bool]]:
    """Greedy new token ids per example (up to the first end id), and whether generation stopped by itself.

    Causal models get left-padded prompt batches (the last prompt token sits next to the first new one);
    encoder inputs are right-padded. A row's answer does not depend on the batch it is in.
    """
    import torch

    if not examples:
        return []
    s2s = is_seq2seq(model)
    ends = response_end_ids(tok)
    if not ends:
        raise UserError("evaluation: the tokenizer has neither an EOS token nor a chat end-of-turn token")
    pad = _pad_id(tok)
    gc = _generation_config(model, ends, pad, o.max_new_tokens)
    dev = _device(model)
    out: list[tuple[list[int], bool]] = []
    with _EvalMode(model):
        for i in range(0, len(examples), o.batch_size):
            prompts = [encode_prompt(tok, _promptable(e), s2s) for e in examples[i:i + o.batch_size]]
            n = max(len(p) for p in prompts)
            if s2s:
                rows = [p + [pad] * (n - len(p)) for p in prompts]
                mask = [[1] * len(p) + [0] * (n - len(p)) for p in prompts]
            else:
                rows = [[pad] * (n - len(p)) + p for p in prompts]
                mask = [[0] * (n - len(p)) + [1] * len(p) for p in prompts]
            gen = model.generate(input_ids=torch.tensor(rows, device=dev), attention_mask=torch.tensor(mask, device=dev),
                                 generation_config=gc)
            for row in gen.tolist():
                new = row[1:] if s2s else row[n:]  # seq2seq output starts with the decoder start token
                stop = next((k for k, t in enumerate(new) if t in ends), None)
                out.append((new[:stop] if stop is not None else new, stop is not None))
    return out


def generate(model: Any, tok: Any, examples: list[TrainingExample], o: EvalOptions) -> list[tuple[str, bool]]:
    """Greedy answers as text, and whether each stopped by itself."""
    return [(tok.decode(ids, skip_special_tokens=True).strip(), stopped)
            for ids, stopped in generate_ids(model, tok, examples, o)]


def rouge_l(reference: str, prediction: str) -> float:
    return rouge_l_f1(tokenize(reference), tokenize(prediction))


# ---- held-out instructions --------------------------------------------------------------------------------

def heldout_examples(examples: list[TrainingExample], o: EvalOptions) -> tuple[list[TrainingExample], str]:
    """Held-out instances rendered like the training data, and where they came from.

    The file (any format the ``seeds`` stage reads) is rendered with the ``template`` stage's own code in the
    validation examples' format; a ``custom`` template cannot be recovered here, so such runs generate for
    the validation split instead, as they do when there is no held-out file.
    """
    path = Path(o.heldout) if o.heldout else DEFAULT_HELDOUT
    fmt = o.heldout_format if o.heldout_format != "auto" else (examples[0].format if examples else "alpaca")
    if o.heldout and not path.exists():
        raise UserError(f"evaluation.heldout: file not found: {path}")
    if not path.exists() or fmt == "custom":
        if fmt == "custom":
            log.info("custom training format: generating for the validation split instead of %s", path)
        return _sample(examples, o.max_examples, o.seed, "heldout"), "validation"
    from pipeline.stages import seeds, template

    tasks = seeds.load_tasks(seeds.Options(path=str(path)))
    system = next((m["content"] for e in examples[:1] for m in (e.messages or []) if m["role"] == "system"), None)
    topt = template.Options(format="chat" if fmt in ("chat", "sharegpt") else "alpaca", system_prompt=system)
    pairs = [(t, i) for t in tasks for i in range(len(t.instances))]
    chosen = _sample(pairs, o.max_examples, o.seed, "heldout")
    return [template.render_example(t, i, topt) for t, i in chosen], str(path)


# ---- perplexity -------------------------------------------------------------------------------------------

def read_general_text(o: EvalOptions) -> str:
    path = Path(o.general_text) if o.general_text else DEFAULT_GENERAL_TEXT
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"evaluation.general_text: cannot read {path} ({e})") from None


def _window(model: Any, o: EvalOptions) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return max(2, min(o.block_size, limit) if isinstance(limit, int) and limit > 0 else o.block_size)


def _causal_windows(n: int, block: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) windows as in transformers' perplexity guide: each token is scored once."""
    out, prev_end = [], 0
    for begin in range(0, n, max(1, stride)):
        end = min(begin + block, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


def _nll_sum(logits: Any, labels: Any) -> tuple[float, int]:
    import torch.nn.functional as F

    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return float(loss), int((labels != -100).sum())


def _pad_rows(rows: list[list[int]], value: int):
    import torch

    n = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (n - len(r)) for r in rows])


def text_nll(model: Any, tok: Any, text: str, o: EvalOptions) -> tuple[float, int]:
    """Summed next-token NLL over the text's tokens, and how many tokens were scored.

    Causal: the text (after the BOS token, where the tokenizer has one) in sliding windows of ``block_size``
    moved by ``stride``. Encoder-decoder: chunks of ``block_size // 2`` tokens, each predicted by the decoder
    with the previous chunk as the encoder input.
    """
    import torch

    ids = list(tok(text, add_special_tokens=False)["input_ids"])[: o.max_general_tokens]
    pad, dev, block = _pad_id(tok), _device(model), _window(model, o)
    total, count = 0.0, 0
    with _EvalMode(model):
        if is_seq2seq(model):
            chunk = max(1, block // 2)
            end = [tok.eos_token_id] if tok.eos_token_id is not None else []
            pieces = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
            jobs = [((pieces[k - 1] if k else []) + end or [pad], p) for k, p in enumerate(pieces)]
            for i in range(0, len(jobs), o.batch_size):
                part = jobs[i:i + o.batch_size]
                enc = _pad_rows([list(src) for src, _ in part], pad).to(dev)
                mask = _pad_rows([[1] * len(src) for src, _ in part], 0).to(dev)
                labels = _pad_rows([list(t) for _, t in part], -100).to(dev)
                logits = model(input_ids=enc, attention_mask=mask, labels=labels).logits
                s, c = _nll_sum(logits, labels)
                total, count = total + s, count + c
            return total, count
        if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
            ids = [tok.bos_token_id] + ids
        jobs = []
        for begin, stop, scored in _causal_windows(len(ids), block, min(o.stride, block)):
            window = ids[begin:stop]
            jobs.append((window, [-100] * (len(window) - scored) + window[len(window) - scored:]))
        for i in range(0, len(jobs), o.batch_size):
            part = jobs[i:i + o.batch_size]
            inp = _pad_rows([w for w, _ in part], pad).to(dev)
            mask = _pad_rows([[1] * len(w) for w, _ in part], 0).to(dev)
            labels = _pad_rows([lab for _, lab in part], -100).to(dev)
            logits = model(input_ids=inp, attention_mask=mask).logits
            s, c = _nll_sum(logits[:, :-1], labels[:, 1:])
            total, count = total + s, count + c
    return total, count


def _ppl(total: float, count: int) -> float | None:
    if not count:
        return None
    try:
        return math.exp(total / count)
    except OverflowError:
        return math.inf


def perplexity(model: Any, tok: Any, text: str, o: EvalOptions) -> float | None:
    """exp(mean next-token NLL) of the text; None for an empty text."""
    return _ppl(*text_nll(model, tok, text, o))


# ---- the evaluation ---------------------------------------------------------------------------------------

def evaluate_model(model: Any, tokenizer: Any, examples: list[TrainingExample], options: EvalOptions,
                   label: str) -> dict[str, Any]:
    """Evaluate one model; run it on the base and on the tuned model with the same examples and options."""
    import torch

    torch.manual_seed(options.seed)
    val = _sample(examples, options.max_validation_examples, options.seed, "validation")
    held, source = heldout_examples(examples, options)
    answers = generate_ids(model, tokenizer, held, options)
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids, _ in answers]
    scores = [rouge_l(response_text(e), t) for e, t in zip(held, texts)]
    general = read_general_text(options)
    nll, n_general = text_nll(model, tokenizer, general, options)
    result = {
        "label": label,
        "n_examples": len(val),
        "validation_loss": validation_loss(model, tokenizer, val, options),
        "n_generated": len(held),
        "heldout_source": source,
        "rouge_l": sum(scores) / len(scores) if scores else None,
        "stop_rate": sum(s for _, s in answers) / len(answers) if answers else None,
        "mean_new_tokens": sum(len(ids) for ids, _ in answers) / len(answers) if answers else None,
        "general_ppl": _ppl(nll, n_general),
        "general_tokens": n_general,
        "samples": [{"id": e.id, "instruction": e.instruction, "input": e.input, "reference": response_text(e),
                     "answer": t, "stopped": s, "rouge_l": round(r, 4)}
                    for e, t, (_, s), r in zip(held, texts, answers, scores)],
    }
    log.info("%s: validation loss %s, ROUGE-L %s, stop rate %s, general-text perplexity %s", label,
             result["validation_loss"], result["rouge_l"], result["stop_rate"], result["general_ppl"])
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """A result without the per-example generations (for the manifest)."""
    return {k: v for k, v in result.items() if k != "samples"}


# ---- the before/after table -------------------------------------------------------------------------------

ROWS = [
    ("validation_loss", "validation loss (response tokens)", "lower", "lower is better"),
    ("rouge_l", "ROUGE-L F1 on held-out instructions", "higher", "higher is better"),
    ("stop_rate", "generations that stop by themselves", "higher", "higher is better"),
    ("general_ppl", "perplexity on general text (forgetting)", "lower",
     "lower is better; a rise means the model lost general knowledge"),
]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _fmt(v: Any) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    x = _num(v)
    if x is None:
        return "–"
    return f"{x:.1f}" if abs(x) >= 1000 else f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def _change(b: float | None, a: float | None) -> str:
    if b is None or a is None:
        return "–"
    rel = f" ({100 * (a - b) / abs(b):+.1f}%)" if b else ""
    return f"{a - b:+.4f}{rel}"


def forgetting_note(before: dict[str, Any], after: dict[str, Any]) -> str:
    """One plain-language sentence on what the general-text perplexity says about forgetting."""
    b, a = _num(before.get("general_ppl")), _num(after.get("general_ppl"))
    if b is None or a is None or b <= 0:
        return "Forgetting was not measured (no general-text perplexity for both models)."
    pct = 100 * (a - b) / b
    if pct > 1:
        return (f"Forgetting: perplexity on general text rose by {pct:.1f}% ({b:.2f} → {a:.2f}): the tuned model "
                "predicts ordinary encyclopaedic text worse than the base model did, i.e. it lost some general "
                "knowledge. Consider fewer epochs, a lower learning rate, LoRA, or `replay`.")
    if pct < -1:
        return (f"Forgetting: none measured — perplexity on general text fell by {-pct:.1f}% "
                f"({b:.2f} → {a:.2f}).")
    return f"Forgetting: none measured — perplexity on general text changed by {pct:+.1f}% ({b:.2f} → {a:.2f})."


def render_results_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A Markdown before/after table with the change of each metric and a note on forgetting."""
    lines = [f"| metric | {before.get('label') or 'before'} | {after.get('label') or 'after'} | change | note |",
             "|---|---:|---:|---:|---|"]
    for key, name, _, note in ROWS:
        b, a = _num(before.get(key)), _num(after.get(key))
        lines.append(f"| {name} | {_fmt(b)} | {_fmt(a)} | {_change(b, a)} | {note} |")
    n = after.get("n_generated") or before.get("n_generated")
    src = after.get("heldout_source") or before.get("heldout_source")
    lines += ["", f"Validation rows: {after.get('n_examples', before.get('n_examples', 0))}; held-out instances "
                  f"generated for: {n or 0} (from {src or '–'}, greedy); general-text tokens: "
                  f"{after.get('general_tokens', before.get('general_tokens', 0))}.",
              "", forgetting_note(before, after)]
    return "\n".join(lines) + "\n"
