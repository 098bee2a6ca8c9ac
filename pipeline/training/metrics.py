"""What the before/after evaluation measures, one model at a time, with the code that built the training rows.

* :func:`validation_nll` — token loss on the response tokens of validation examples; inputs and labels come
  from :func:`pipeline.training.data.encode_example`, so the prompt is masked exactly as in training, and
  batches are right-padded (docs/sft-pitfalls.md: *padding-side*);
* :func:`generate_ids` — greedy answers from the prompt :func:`pipeline.training.data.encode_prompt` builds
  (*template-drift*), left-padded batches, and whether each answer stopped with an end id;
* :func:`text_nll` — next-token loss on general text in sliding windows (the forgetting check).

Every measurement also comes per unit (example or window) so that the change between two models can be
given an interval by resampling the same units (:mod:`pipeline.training.evaluation`).
Works for causal LMs, recurrent ones (Mamba) and encoder-decoders.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from pipeline.errors import UserError
from pipeline.records import TrainingExample
from pipeline.text.rouge import rouge_l_f1, tokenize
from pipeline.training.data import Collator, encode_example, encode_prompt, response_end_ids

Units = list[tuple[float, int]]  # (summed NLL, scored tokens) per example or window


def is_seq2seq(model: Any) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def pad_id(tok: Any) -> int:
    """The pad id for batches; models without a pad token get an end id (always masked out)."""
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    ends = response_end_ids(tok)
    return ends[0] if ends else 0


class EvalMode:
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


def _nll(logits: Any, labels: Any) -> tuple[float, int, Units]:
    """Summed NLL and scored tokens of a batch, and the same per row."""
    import torch.nn.functional as F

    flat = logits.float().reshape(-1, logits.size(-1))
    per = F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="none").view(labels.shape)
    rows = [(float(s), int(c)) for s, c in zip(per.sum(-1).tolist(), (labels != -100).sum(-1).tolist())]
    # The total is the sum of the rows (in float64), so that a metric and the same metric recomputed from its
    # units (the bootstrap's) agree; a separate float32 reduction differs from it in the last digits.
    return sum(s for s, _ in rows), sum(c for _, c in rows), rows


def ratio(total: float, count: int) -> float | None:
    return total / count if count else None


def ppl(total: float, count: int) -> float | None:
    """exp(mean NLL), None when nothing was scored."""
    if not count:
        return None
    try:
        return math.exp(total / count)
    except OverflowError:
        return math.inf


# ---- validation loss ----------------------------------------------------------------------------------

def validation_nll(model: Any, tok: Any, examples: list[TrainingExample], max_length: int,
                   batch_size: int) -> tuple[float, int, Units]:
    """Summed loss over the trained tokens (response + end id) of the examples, their count, and per example."""
    s2s = is_seq2seq(model)
    enc = [encode_example(tok, e, max_length, s2s) for e in examples]
    collate = Collator(pad_id(tok), s2s)
    total, count, units = 0.0, 0, []
    with EvalMode(model):
        for i in range(0, len(enc), batch_size):
            batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in enc[i:i + batch_size]])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            if s2s:
                logits = model(**batch).logits  # decoder inputs are the labels shifted right
                labels = batch["labels"]
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                labels = batch["labels"][:, 1:]
            s, c, rows = _nll(logits, labels)
            total, count, units = total + s, count + c, units + rows
    return total, count, units


def validation_loss(model: Any, tok: Any, examples: list[TrainingExample], max_length: int = 512,
                    batch_size: int = 8) -> float | None:
    """Mean loss per trained token, prompt tokens masked as in training; None without examples."""
    total, count, _ = validation_nll(model, tok, examples, max_length, batch_size)
    return ratio(total, count)


# ---- generation ---------------------------------------------------------------------------------------

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


def generate_ids(model: Any, tok: Any, examples: list[TrainingExample], max_new_tokens: int,
                 batch_size: int) -> list[tuple[list[int], bool]]:
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
    pad = pad_id(tok)
    gc = _generation_config(model, ends, pad, max_new_tokens)
    out: list[tuple[list[int], bool]] = []
    with EvalMode(model):
        for i in range(0, len(examples), batch_size):
            prompts = [encode_prompt(tok, e, s2s) for e in examples[i:i + batch_size]]
            n = max(len(p) for p in prompts)
            if s2s:
                rows = [p + [pad] * (n - len(p)) for p in prompts]
                mask = [[1] * len(p) + [0] * (n - len(p)) for p in prompts]
            else:
                rows = [[pad] * (n - len(p)) + p for p in prompts]
                mask = [[0] * (n - len(p)) + [1] * len(p) for p in prompts]
            gen = model.generate(input_ids=torch.tensor(rows, device=model.device),
                                 attention_mask=torch.tensor(mask, device=model.device), generation_config=gc)
            for row in gen.tolist():
                new = row[1:] if s2s else row[n:]  # seq2seq output starts with the decoder start token
                stop = next((k for k, t in enumerate(new) if t in ends), None)
                out.append((new[:stop] if stop is not None else new, stop is not None))
    return out


def rouge_l(reference: str, prediction: str) -> float:
    return rouge_l_f1(tokenize(reference), tokenize(prediction))


# ---- perplexity on general text -----------------------------------------------------------------------

def window(model: Any, block_size: int) -> int:
    """The perplexity window: ``block_size`` capped at the model's positions (recurrent models have none)."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return max(2, min(block_size, limit) if isinstance(limit, int) and limit > 0 else block_size)


def causal_windows(n: int, block: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) windows as in transformers' perplexity guide: each token is scored once."""
    out, prev_end = [], 0
    for begin in range(0, n, max(1, stride)):
        end = min(begin + block, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


def _pad_rows(rows: list[list[int]], value: int):
    import torch

    n = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (n - len(r)) for r in rows])


def _seq2seq_jobs(tok: Any, ids: list[int], block: int, pad: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(encoder input, mask, labels): chunks of ``block // 2`` tokens, each after the previous one."""
    chunk = max(1, block // 2)
    end = [tok.eos_token_id] if tok.eos_token_id is not None else []
    pieces = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    jobs = []
    for k, p in enumerate(pieces):
        src = (pieces[k - 1] if k else []) + end or [pad]
        jobs.append((list(src), [1] * len(src), list(p)))
    return jobs


def _causal_jobs(tok: Any, ids: list[int], block: int, stride: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(window, mask, labels): sliding windows; only the tokens a window adds are scored."""
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    jobs = []
    for begin, stop, scored in causal_windows(len(ids), block, min(stride, block)):
        w = ids[begin:stop]
        jobs.append((w, [1] * len(w), [-100] * (len(w) - scored) + w[len(w) - scored:]))
    return jobs


def text_nll(model: Any, tok: Any, text: str, max_tokens: int, block_size: int, stride: int,
             batch_size: int) -> tuple[float, int, Units]:
    """Summed next-token NLL over the text's first ``max_tokens`` tokens, their count, and per window.

    Causal: the text (after the BOS token, where the tokenizer has one) in sliding windows of ``block_size``
    moved by ``stride``. Encoder-decoder: chunks of ``block_size // 2`` tokens, each predicted by the decoder
    with the previous chunk as the encoder input.
    """
    ids = list(tok(text, add_special_tokens=False)["input_ids"])[:max_tokens]
    pad, block, s2s = pad_id(tok), window(model, block_size), is_seq2seq(model)
    jobs = _seq2seq_jobs(tok, ids, block, pad) if s2s else _causal_jobs(tok, ids, block, stride)
    total, count, units = 0.0, 0, []
    with EvalMode(model):
        for i in range(0, len(jobs), batch_size):
            part = jobs[i:i + batch_size]
            inp = _pad_rows([j[0] for j in part], pad).to(model.device)
            mask = _pad_rows([j[1] for j in part], 0).to(model.device)
            labels = _pad_rows([j[2] for j in part], -100).to(model.device)
            if s2s:
                s, c, rows = _nll(model(input_ids=inp, attention_mask=mask, labels=labels).logits, labels)
            else:
                s, c, rows = _nll(model(input_ids=inp, attention_mask=mask).logits[:, :-1], labels[:, 1:])
            total, count, units = total + s, count + c, units + rows
    return total, count, units


def perplexity(model: Any, tok: Any, text: str, max_tokens: int = 4096, block_size: int = 512, stride: int = 256,
               batch_size: int = 8) -> float | None:
    """exp(mean next-token NLL) of the text; None for an empty text."""
    total, count, _ = text_nll(model, tok, text, max_tokens, block_size, stride, batch_size)
    return ppl(total, count)
