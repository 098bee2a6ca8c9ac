"""Tokenisation and masking for SFT, built so that the usual SFT bugs cannot happen (the names in
*italics* are entries of docs/sft-pitfalls.md).

* Prompt and response are tokenised separately and their ids concatenated (*token-boundary*); the prompt's
  labels are -100 and the response's labels are its ids plus the real end id — the EOS id, or the chat
  template's end-of-turn id — appended as an id, never as a string (*never-stops*).
* The length budget is split between prompt and response; truncation keeps the end id and is reported
  (*silent-truncation*); rows left with no trainable token are dropped and counted (*no-target*).
* :func:`encode_prompt` builds the inference prompt with the same code as training (*template-drift*).
* The collator right-pads and pads labels with -100 whatever the pad id (*never-stops*, *padding-side*).
* Encoder-decoders (T5, BART): input = the prompt, labels = response + EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.records import TrainingExample

SENTINEL = "\u2063SEEDTUNE\u2063"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    lost_response_tokens: int = 0
    decoder: bool = False  # seq2seq: input_ids = encoder input, labels = decoder target
    prompt_length: int = 0  # causal: how many leading ids are the prompt

    @property
    def trainable(self) -> int:
        return sum(1 for x in self.labels if x != -100)


@dataclass
class EncodeReport:
    """What tokenisation did to a dataset: kept rows, truncation, rows dropped with no trainable token."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[TrainingExample] = field(default_factory=list)
    truncated: int = 0
    lost_response_tokens: int = 0
    trained_tokens: int = 0
    input_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"rows": len(self.rows), "dropped_no_trainable_tokens": len(self.dropped),
                "truncated": self.truncated, "lost_response_tokens": self.lost_response_tokens,
                "trained_tokens": self.trained_tokens, "input_tokens": self.input_tokens}


def messages_of(example: TrainingExample, plain: bool = False) -> list[dict[str, str]] | None:
    """Chat messages: ``messages``, or ShareGPT ``conversations`` mapped to roles. A prompt format has none
    (None), unless ``plain``: then a user turn (instruction, a blank line, input) and the output, as the
    exported ``messages.jsonl`` has them."""
    if example.messages:
        return [{"role": m["role"], "content": m["content"]} for m in example.messages]
    if example.conversations:
        return [{"role": SHAREGPT_ROLES.get(c["from"], c["from"]), "content": c["value"]}
                for c in example.conversations]
    if not plain:
        return None
    user = example.instruction + (f"\n\n{example.input}" if example.input else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": example.output}]


def is_chat(example: TrainingExample) -> bool:
    return messages_of(example) is not None


def prompt_messages(example: TrainingExample) -> list[dict[str, str]]:
    """Every message before the final assistant turn (earlier turns stay in the prompt)."""
    msgs = messages_of(example) or []
    if msgs and msgs[-1]["role"] == "assistant":
        return msgs[:-1]
    return msgs


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
    """Ids that end a response: the chat template's end-of-turn token and the EOS token (for generation)."""
    out = []
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        out.append(eot)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
    return out


def end_id(tokenizer: Any, example: TrainingExample) -> int:
    """The id appended to every response: end-of-turn for chat templates that have one, else EOS."""
    if is_chat(example):
        eot = end_of_turn_id(tokenizer)
        if eot is not None:
            return eot
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: set one before training")
    return tokenizer.eos_token_id


def adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def encode_prompt(tokenizer: Any, example: TrainingExample, seq2seq: bool = False) -> list[int]:
    """The prompt ids exactly as they start the training input_ids (the encoder input for seq2seq).

    Chat: ``apply_chat_template(messages before the final assistant turn, add_generation_prompt=True)``;
    prompt formats: ``example.prompt`` tokenised with special tokens (one BOS if the tokenizer adds one).
    """
    if is_chat(example):
        out = tokenizer.apply_chat_template(prompt_messages(example), add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids)
    if example.prompt is None:
        raise ValueError(f"example {example.id} has neither messages nor a prompt")
    ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if not seq2seq and len(ids) > 1 and eos is not None and ids[-1] == eos:
        ids = ids[:-1]  # tokenizers that append EOS to every text (T5-style): a causal prompt does not end there
    return ids


def response_text(example: TrainingExample) -> str:
    if example.response is not None:
        return example.response
    msgs = messages_of(example)
    if msgs and msgs[-1]["role"] == "assistant":
        return msgs[-1]["content"]
    return example.output


def encode_response(tokenizer: Any, example: TrainingExample) -> list[int]:
    """Response ids (no special tokens) followed by the end id."""
    return list(tokenizer(response_text(example), add_special_tokens=False)["input_ids"]) + [end_id(tokenizer, example)]


def _cut_prompt(prompt: list[int], budget: int) -> list[int]:
    """Keep the start (BOS, instruction) and the end (the response marker) of a too-long prompt."""
    if len(prompt) <= budget:
        return prompt
    tail = min(16, budget // 2)
    return prompt[: budget - tail] + (prompt[-tail:] if tail else [])


def encode_example(tokenizer: Any, example: TrainingExample, max_length: int, seq2seq: bool = False,
                   min_response_share: float = 0.5) -> EncodedExample:
    """Token ids and labels for one example within ``max_length`` (the response keeps at least its share)."""
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    prompt = encode_prompt(tokenizer, example, seq2seq)
    response = encode_response(tokenizer, example)
    end = response[-1]
    if seq2seq:
        lost = max(0, len(response) - max_length)
        resp = response if not lost else response[: max_length - 1] + [end]
        inp = _cut_prompt(prompt, max_length)
        return EncodedExample(inp, resp, truncated=bool(lost) or len(inp) < len(prompt), lost_response_tokens=lost,
                              decoder=True, prompt_length=len(inp))
    if len(prompt) + len(response) <= max_length:
        return EncodedExample(prompt + response, [-100] * len(prompt) + response, prompt_length=len(prompt))
    # Split the budget: the response keeps at least its share, the prompt the rest; the end id is
    # re-appended (*never-stops*).
    resp_budget = max(max_length - len(prompt), min(len(response), int(max_length * min_response_share)))
    resp_budget = max(1, min(resp_budget, max_length - 1))
    lost = max(0, len(response) - resp_budget)
    resp = response if not lost else response[: resp_budget - 1] + [end]
    p = _cut_prompt(prompt, max_length - len(resp))
    return EncodedExample(p + resp, [-100] * len(p) + resp, truncated=True, lost_response_tokens=lost,
                          prompt_length=len(p))


def encode_dataset(tokenizer: Any, examples: list[TrainingExample], max_length: int,
                   seq2seq: bool = False) -> EncodeReport:
    """Encode every example; rows with no trainable token go to ``report.dropped`` (*no-target*)."""
    rep = EncodeReport()
    for e in examples:
        enc = encode_example(tokenizer, e, max_length, seq2seq)
        # causal: the first label is never predicted (nothing precedes it), so it does not count
        trainable = enc.trainable if seq2seq else sum(1 for x in enc.labels[1:] if x != -100)
        if trainable == 0:
            rep.dropped.append(e)
            continue
        rep.truncated += enc.truncated
        rep.lost_response_tokens += enc.lost_response_tokens
        rep.trained_tokens += trainable
        rep.input_tokens += len(enc.input_ids)
        rep.rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return rep


def text_blocks(tokenizer: Any, texts: list[str], block: int) -> list[dict[str, Any]]:
    """Continued pre-training rows: texts joined with EOS and cut into blocks, loss on every token."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return [{"input_ids": ids[i:i + block], "labels": ids[i:i + block]} for i in range(0, len(ids) - 1, block)
            if len(ids[i:i + block]) > 1]


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
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return True


def alpaca_chat_template(tokenizer: Any, prompt_template: str) -> str:
    """A tokenizer chat template that renders the trained Alpaca prompt from messages (*template-drift*).

    ``prompt_template`` is the text of the no-input Alpaca template (from prompts/formats/); the wrapper
    only loops over messages: a user message fills ``instruction``, an assistant message is followed by EOS.
    A BOS is rendered first when the tokenizer adds one, since ``apply_chat_template`` adds no special tokens.
    """
    bos = "{{ bos_token }}" if adds_bos(tokenizer) else ""
    return (bos + "{% for message in messages %}{% if message['role'] == 'user' %}"
            "{% set instruction = message['content'] %}" + prompt_template +
            "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
            "{% endif %}{% endfor %}")
