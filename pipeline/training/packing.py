"""Padding-free packing that never lets one example attend to another (docs/sft-pitfalls.md: *packing-leak*).

Per-example ``position_ids`` alone do not isolate packed examples under eager / sdpa attention, so:

* ``varlen`` (a GPU with FlashAttention): each batch is flattened into one row with ``position_ids`` that
  restart at 0 for every example (transformers' :class:`DataCollatorWithFlattening`); FlashAttention's varlen
  kernels attend within each example only;
* ``mask4d`` (CPU, eager or sdpa): examples are packed into rows of at most ``max_length`` tokens and the
  collator passes a float additive 4D block-diagonal causal mask (0 where attention is allowed,
  ``finfo.min`` elsewhere; a bool mask fails under eager, which adds the mask to the scores).

The label at each example start is -100 so no example learns to predict its first token from the previous
one. Models where neither works (encoder-decoders, recurrent models, attention that ignores a 4D mask) are
refused with a :class:`~pipeline.errors.UserError` naming the option.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.errors import UserError

log = logging.getLogger(__name__)

FLASH = ("flash_attention_2", "flash_attention_3")


def first_fit(rows: list[dict[str, Any]], max_length: int) -> list[list[int]]:
    """Bins of row indices whose lengths sum to at most ``max_length`` (first-fit decreasing)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_length - n)
    return bins


def pack_rows(rows: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Concatenate rows into packs; each pack keeps ``seq_lens`` and per-example ``position_ids``."""
    packs = []
    for group in first_fit(rows, max_length):
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        lens: list[int] = []
        for i in sorted(group):
            r = rows[i]
            ids += r["input_ids"]
            labels += [-100] + list(r["labels"][1:])
            pos += list(range(len(r["input_ids"])))
            lens.append(len(r["input_ids"]))
        packs.append({"input_ids": ids, "labels": labels, "position_ids": pos, "seq_lens": lens, "length": len(ids)})
    return packs


def block_causal_mask(seq_lens: list[list[int]], length: int, dtype: Any) -> Any:
    """A (batch, 1, length, length) additive mask: 0 inside each example's causal block, finfo.min elsewhere.

    Padding positions form blocks of their own (attending to themselves only), so no row is fully masked.
    """
    import torch

    neg = torch.finfo(dtype).min
    masks = []
    for lens in seq_lens:
        seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        pad = length - int(seg.numel())
        seg = torch.cat([seg, torch.arange(len(lens), len(lens) + pad)])
        same = seg[:, None] == seg[None, :]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = same & causal
        masks.append(torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, neg))
    return torch.stack(masks)[:, None]


@dataclass
class PackedCollator:
    """Collates packs into a right-padded batch with position_ids and a float 4D block-diagonal mask."""

    pad_id: int
    dtype: Any = None  # the mask dtype: the model's compute dtype (float32 by default)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(len(f["input_ids"]) for f in features)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([list(f[key]) + [value] * (n - len(f[key])) for f in features], dtype=torch.long)

        pos = [list(f["position_ids"]) + list(range(n - len(f["position_ids"]))) for f in features]
        return {"input_ids": pad("input_ids", self.pad_id), "labels": pad("labels", -100),
                "position_ids": torch.tensor(pos, dtype=torch.long),
                "attention_mask": block_causal_mask([f["seq_lens"] for f in features], n,
                                                    self.dtype or torch.float32)}


@dataclass
class FlatteningCollator:
    """Padding-free batches for FlashAttention varlen: the whole batch in one row, positions restarting."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        from transformers import DataCollatorWithFlattening

        rows = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        return DataCollatorWithFlattening(return_flash_attn_kwargs=True)(rows)


def mask_dtype(flags: dict[str, bool]) -> Any:
    """The 4D mask's dtype: the compute dtype under mixed precision (sdpa wants the query's dtype)."""
    import torch

    return torch.bfloat16 if flags.get("bf16") else torch.float16 if flags.get("fp16") else torch.float32


def packing_mode(model: Any) -> str:
    """``varlen`` (GPU + FlashAttention), ``mask4d`` (eager / sdpa), or a UserError where neither works."""
    import torch

    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise UserError("sft.packing: packing is for decoder-only models; set packing: false for encoder-decoders")
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl in FLASH and torch.cuda.is_available():
        return "varlen"
    if torch.cuda.is_available():
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            try:
                model.set_attn_implementation("flash_attention_2")
                return "varlen"
            except (ValueError, ImportError) as e:  # the model does not support it
                log.info("FlashAttention not usable for this model (%s); trying a 4D mask", e)
    if impl not in ("eager", "sdpa"):
        raise UserError(f"sft.packing: attention '{impl}' cannot isolate packed examples; set packing: false")
    if not verify_mask4d(model):
        raise UserError(f"sft.packing: {type(model).__name__} ignores a 4D attention mask, so packed examples "
                        "would attend to each other; set packing: false")
    return "mask4d"


def verify_mask4d(model: Any, tol: float = 1e-3) -> bool:
    """Check on the model itself that a packed example's logits equal the example alone."""
    import torch

    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (5,), generator=g).tolist()
    b = torch.randint(0, vocab, (4,), generator=g).tolist()
    batch = PackedCollator(0, next(model.parameters()).dtype)(
        [{"input_ids": a + b, "labels": a + b, "position_ids": list(range(5)) + list(range(4)), "seq_lens": [5, 4]}])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits[0, 5:]
            alone = model(input_ids=torch.tensor([b], device=device)).logits[0]
    except Exception as e:  # noqa: BLE001 - any model that cannot take the mask is refused by the caller
        log.info("4D mask probe failed: %s", e)
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(packed.float(), alone.float(), atol=tol, rtol=0))
