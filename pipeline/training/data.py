"""Tokenisation and masking for SFT, built so that the usual SFT bugs cannot happen.

* Prompt and response are tokenised separately and their ids concatenated (B5: no token-boundary drift);
  the prompt's labels are -100 and the response's labels are its ids plus the real end id — the EOS id, or
  the chat template's end-of-turn id — appended as an id, never as a string (B1).
* The length budget is split between prompt and response; truncation keeps the end id and is reported (B10).
* :func:`encode_prompt` builds the inference prompt with the same code as training (B4).
* The collator right-pads and pads labels with -100 whatever the pad id (B1, B3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.records import TrainingExample

SENTINEL = "\u2063SEEDTUNE\u2063"


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    lost_response_tokens: int = 0
    decoder: bool = False  # seq2seq: input_ids = encoder input, labels = decoder target


def is_chat(example: TrainingExample) -> bool:
    return bool(example.messages)


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token a chat template puts right after an assistant message, if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # noqa: BLE001 - templates that reject the probe have no usable end marker
        return None
    after = text.split(SENTINEL, 1)[1] if SENTINEL in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids)
    return ids[0] if ids and ids[0] in special else None


def response_end_ids(tokenizer: Any) -> list[int]:
    """Ids that end a response: the end-of-turn token of the chat template and the EOS token."""
    out = []
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        out.append(eot)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
    return out


def end_id(tokenizer: Any, example: TrainingExample) -> int:
    if is_chat(example):
        eot = end_of_turn_id(tokenizer)
        if eot is not None:
            return eot
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: set one before training")
    return tokenizer.eos_token_id


def encode_prompt(tokenizer: Any, example: TrainingExample, seq2seq: bool = False) -> list[int]:
    """The prompt ids exactly as they start the training input_ids (and the encoder input for seq2seq)."""
    if is_chat(example):
        msgs = [m for m in example.messages if m["role"] != "assistant"] if example.messages else []
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    if example.prompt is None:
        raise ValueError(f"example {example.id} has neither messages nor a prompt")
    ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
    if not seq2seq and ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id \
            and len(ids) > 1 and not example.prompt.endswith(tokenizer.eos_token or "\0"):
        ids = ids[:-1]  # tokenizers that append EOS to every text: the prompt does not end the sequence
    return ids


def response_text(example: TrainingExample) -> str:
    if example.response is not None:
        return example.response
    if example.messages and example.messages[-1]["role"] == "assistant":
        return example.messages[-1]["content"]
    return example.output


def _cut_prompt(prompt: list[int], budget: int) -> list[int]:
    """Keep the start (the instruction) and the end (the response marker) of a too-long prompt."""
    if len(prompt) <= budget:
        return prompt
    tail = min(16, budget // 2)
    return prompt[: budget - tail] + (prompt[-tail:] if tail else [])


def encode_example(tokenizer: Any, example: TrainingExample, max_length: int, seq2seq: bool = False,
                   min_response_share: float = 0.5) -> EncodedExample:
    prompt = encode_prompt(tokenizer, example, seq2seq)
    end = end_id(tokenizer, example)
    response = list(tokenizer(response_text(example), add_special_tokens=False)["input_ids"]) + [end]
    if seq2seq:
        lost = max(0, len(response) - max_length)
        resp = response if not lost else response[: max_length - 1] + [end]
        inp = _cut_prompt(prompt, max_length)
        return EncodedExample(inp, resp, truncated=bool(lost) or len(inp) < len(prompt), lost_response_tokens=lost,
                              decoder=True)
    total = len(prompt) + len(response)
    if total <= max_length:
        return EncodedExample(prompt + response, [-100] * len(prompt) + response)
    # Split the budget: the response keeps at least its share, the prompt the rest.
    resp_budget = max(max_length - len(prompt), min(len(response), int(max_length * min_response_share)))
    resp_budget = max(1, min(resp_budget, max_length - 1))
    lost = max(0, len(response) - resp_budget)
    resp = response if not lost else response[: resp_budget - 1] + [end]
    p = _cut_prompt(prompt, max_length - len(resp))
    return EncodedExample(p + resp, [-100] * len(p) + resp, truncated=True, lost_response_tokens=lost)


@dataclass
class Collator:
    """Right-pads input_ids with the pad id and labels with -100 (whatever the pad id is)."""

    pad_id: int
    seq2seq: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
            n = max(len(s) for s in seqs)
            return torch.tensor([list(s) + [value] * (n - len(s)) for s in seqs], dtype=torch.long)

        ids = [f["input_ids"] for f in features]
        labels = [f["labels"] for f in features]
        batch = {"input_ids": pad(ids, self.pad_id), "labels": pad(labels, -100)}
        batch["attention_mask"] = pad([[1] * len(s) for s in ids], 0)
        return batch


def ensure_pad_token(tokenizer: Any, model: Any = None) -> bool:
    """Give the tokenizer a pad token where it has none (never the EOS); returns True if the vocab grew."""
    if tokenizer.pad_token_id is not None:
        return False
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": "<|seedtune_pad|>"})
    if model is not None:
        model.resize_token_embeddings(len(tokenizer))
    return True
