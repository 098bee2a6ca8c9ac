"""The SFT data path, one linear procedure: template -> tokenise -> labels -> truncate -> drop fully masked -> pack.

:func:`instruct_rows` does the first five on records (their template is already on the tokenizer, see
:mod:`pipeline.training.saving`); :func:`text_rows` makes loss-on-every-token rows from plain text (the
``continued`` objective and ``replay``); :func:`trainer_dataset` packs (or not) and hands the rows to
``Trainer``. Nothing is cached between runs (docs/sft-pitfalls.md: *stale-tokenisation*).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.records import TrainingExample
from pipeline.training.data import Collator, encode_dataset, text_blocks
from pipeline.training.packing import FlatteningCollator, PackedCollator, mask_dtype, pack_rows, packing_mode
from pipeline.training.trainer import precision_flags


@dataclass
class Rows:
    """Training rows, the examples dropped with no trainable token, and what tokenisation did."""

    rows: list[dict[str, Any]]
    dropped: list[TrainingExample]
    report: dict[str, int]


def read_texts(files: list[str]) -> list[str]:
    out = []
    for f in files:
        try:
            out.append(Path(f).read_text(encoding="utf-8"))
        except OSError as e:
            raise UserError(f"sft: cannot read text file '{f}' ({e.strerror})") from None
    return out


def instruct_rows(tok: Any, examples: list[TrainingExample], max_length: int, seq2seq: bool) -> Rows:
    """Loss on responses only; truncation counted (*silent-truncation*), fully masked rows dropped (*no-target*)."""
    rep = encode_dataset(tok, examples, max_length, seq2seq)
    return Rows(rep.rows, rep.dropped, {**rep.as_dict(), "replay_rows": 0})


def text_rows(tok: Any, files: list[str], block: int) -> list[dict[str, Any]]:
    """Plain text joined with EOS and cut into blocks; loss on every token."""
    return text_blocks(tok, read_texts(files), block)


def continued_rows(tok: Any, files: list[str], max_length: int, seq2seq: bool) -> Rows:
    if seq2seq:
        raise UserError("sft.objective: 'continued' is for decoder-only models")
    rows = text_rows(tok, files, max_length)
    n = sum(len(r["input_ids"]) for r in rows)
    return Rows(rows, [], {"rows": len(rows), "dropped_no_trainable_tokens": 0, "truncated": 0,
                           "lost_response_tokens": 0, "trained_tokens": n, "input_tokens": n, "replay_rows": 0})


def add_replay(data: Rows, tok: Any, files: list[str], share: float, block: int, seq2seq: bool) -> Rows:
    """Mix in plain-text rows, ``share`` of the instruction rows, against forgetting."""
    if seq2seq:
        raise UserError("sft.replay: replaying plain text is for decoder-only models")
    replay = text_rows(tok, files, block)[: int(round(len(data.rows) * share))]
    report = dict(data.report)
    report["trained_tokens"] += sum(len(r["labels"]) - 1 for r in replay)
    report["input_tokens"] += sum(len(r["input_ids"]) for r in replay)
    report["replay_rows"] = len(replay)
    return Rows(data.rows + replay, data.dropped, report)


def trainer_dataset(rows: list[dict], model: Any, tok: Any, packing: bool, max_length: int, precision: str,
                    seq2seq: bool) -> tuple[Any, Any, str]:
    """The Trainer dataset, its collator and the packing mode (``none``, ``mask4d`` or ``varlen``)."""
    import datasets

    mode = "none"
    collator: Any = Collator(tok.pad_token_id, seq2seq)
    if packing:
        mode = packing_mode(model)
        if mode == "mask4d":
            rows = pack_rows(rows, max_length)
            collator = PackedCollator(tok.pad_token_id, mask_dtype(precision_flags(precision)))
        else:
            collator = FlatteningCollator()
    rows = [{**r, "length": len(r["input_ids"])} for r in rows]
    return datasets.Dataset.from_list(rows), collator, mode
