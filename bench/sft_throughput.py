"""SFT throughput, side by side in one run: seedtune's data path vs a Stanford-Alpaca-style baseline and TRL.

Same tiny Llama (hidden 256, 4 layers, built offline), same Alpaca-formatted data with varied lengths (the
Self-Instruct seed tasks from ../shared/data when present, else data/seed_tasks.jsonl), same Trainer,
batch size and step count. Configurations:

* ``baseline`` — Stanford Alpaca's ``train.py`` collation: tokenise ``prompt`` and ``prompt + output + eos``
  as strings, mask the first ``len(tokenize(prompt))`` labels, pad to the longest in the batch, random order;
* ``seedtune`` — :func:`pipeline.training.data.encode_dataset` + right-padding collator + length-grouped
  batches (no packing);
* ``seedtune+packing`` — the same rows packed with the float 4D block-diagonal mask (or FlashAttention
  varlen on a GPU that has it); reported separately;
* ``trl`` — TRL's ``SFTTrainer`` on the same examples as a prompt-completion dataset with
  ``completion_only_loss=True`` (what most users would pick), no packing; its tokenisation happens before
  the timed part, as the other configurations' does. Needs the ``bench`` extra (``pip install trl``).

Each configuration runs in its own subprocess (so peak memory is its own), twice, alternating; the better
run counts. Prints trained tokens/s (labels != -100), input tokens/s (non-pad), padding fraction and peak
memory, and the seedtune / baseline ratio of trained tokens/s (target >= 1.0 without packing).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sft_throughput.py [--steps 30] [--batch 8] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
CONFIGS = ["baseline", "seedtune", "seedtune+packing", "trl"]


def load_examples(limit: int):
    from pipeline.records import Task
    from pipeline.training.formats import render_instance

    shared = ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"
    path = shared if shared.exists() else ROOT / "data" / "seed_tasks.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        raw = json.loads(line)
        t = Task(id=raw["id"], instruction=raw["instruction"],
                 instances=[{"input": i.get("input", ""), "output": i.get("output", "")} for i in raw["instances"]])
        out += [render_instance(t, i, "alpaca") for i in range(len(t.instances))]
    return out[:limit], path


def alpaca_rows(tok, examples, max_length: int):
    """Stanford Alpaca's preprocess(): strings tokenised, prompt length masked."""
    rows = []
    for e in examples:
        full = e.prompt + e.response + tok.eos_token
        ids = tok(full, max_length=max_length, truncation=True)["input_ids"]
        n_prompt = len(tok(e.prompt, max_length=max_length, truncation=True)["input_ids"])
        labels = list(ids)
        labels[:n_prompt] = [-100] * n_prompt
        rows.append({"input_ids": ids, "labels": labels})
    return rows


class AlpacaCollator:
    """DataCollatorForSupervisedDataset: pad to the longest with the pad id; labels padded with -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features):
        import torch
        from torch.nn.utils.rnn import pad_sequence

        ids = [torch.tensor(f["input_ids"]) for f in features]
        labels = [torch.tensor(f["labels"]) for f in features]
        ids = pad_sequence(ids, batch_first=True, padding_value=self.pad_id)
        labels = pad_sequence(labels, batch_first=True, padding_value=-100)
        return {"input_ids": ids, "labels": labels, "attention_mask": ids.ne(self.pad_id).long()}


class Counting:
    """Wraps a collator and counts trained tokens, input tokens and padded positions."""

    def __init__(self, inner):
        self.inner = inner
        self.trained = self.real = self.positions = 0

    def __call__(self, features):
        b = self.inner(features)
        labels = b["labels"]
        self.trained += int((labels[:, 1:] != -100).sum())
        self.real += sum(len(f["input_ids"]) for f in features)
        self.positions += labels.numel()
        return b


def trl_trainer(model, tok, examples, o, max_length: int, out: Path):
    """TRL's SFTTrainer with the same hyperparameters, on prompt-completion rows (loss on completions only)."""
    import datasets
    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from pipeline.training.trainer import precision_flags

    ds = datasets.Dataset.from_list([{"prompt": e.prompt, "completion": e.response} for e in examples])
    flags = precision_flags(o.precision)  # TRL defaults to bf16; the same precision as the others
    args = SFTConfig(output_dir=str(out), max_steps=o.max_steps, per_device_train_batch_size=o.per_device_batch_size,
                     learning_rate=o.learning_rate, lr_scheduler_type=o.lr_scheduler, warmup_steps=0,
                     save_strategy="no", logging_steps=o.logging_steps, report_to="none", seed=0, data_seed=0,
                     dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=True, max_length=max_length, packing=False,
                     completion_only_loss=True, bf16=flags.get("bf16", False), fp16=flags.get("fp16", False))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    return trainer


def run_one(config: str, steps: int, batch: int, max_length: int) -> dict:
    import datasets
    import torch

    from pipeline.training.data import Collator, encode_dataset
    from pipeline.training.packing import FlatteningCollator, PackedCollator, mask_dtype, pack_rows, packing_mode
    from pipeline.training.trainer import TrainOptions, precision_flags, train
    from tinymodel import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=2048)
    examples, _ = load_examples(2000)
    torch.manual_seed(0)
    model = tiny_causal_lm(tok, hidden_size=256, layers=4)
    cuda = torch.cuda.is_available()
    if cuda:
        model.to("cuda")
    group = False
    if config == "baseline":
        rows, collator = alpaca_rows(tok, examples, max_length), AlpacaCollator(tok.pad_token_id)
    else:
        rows, collator, group = encode_dataset(tok, examples, max_length).rows, Collator(tok.pad_token_id), True
        if config == "seedtune+packing":
            mode = packing_mode(model)
            if mode == "mask4d":
                rows = pack_rows(rows, max_length)
                collator = PackedCollator(tok.pad_token_id, mask_dtype(precision_flags("auto")))
            else:
                collator = FlatteningCollator()
            group = False
    ds = datasets.Dataset.from_list([{**r, "length": len(r["input_ids"])} for r in rows])
    counting = Counting(collator)
    o = TrainOptions(max_steps=steps, learning_rate=1e-3, per_device_batch_size=batch, warmup_ratio=0.0,
                     lr_scheduler="constant", save_steps=10**9, logging_steps=10**9, group_by_length=group,
                     precision="auto")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        # one warm-up step so model/allocator start-up is not timed
        train(tiny_causal_lm(tok, hidden_size=256, layers=4).to(model.device), tok, ds, collator,
              o.model_copy(update={"max_steps": 1}), Path(tmp) / "warm", 0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if config == "trl":
            trainer = trl_trainer(model, tok, examples, o, max_length, Path(tmp) / "trl")
            trainer.data_collator = counting = Counting(trainer.data_collator)
            t = time.perf_counter()
            result = trainer.train()
            info = {"train_loss": result.training_loss}
        else:
            t = time.perf_counter()
            _, info = train(model, tok, ds, counting, o, Path(tmp) / "run", 0)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": config, "seconds": wall, "trained_tok_s": counting.trained / wall,
            "input_tok_s": counting.real / wall, "padding": 1 - counting.real / max(1, counting.positions),
            "peak_mib": peak, "train_loss": info["train_loss"], "device": "cuda" if cuda else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", choices=CONFIGS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.steps, a.batch, a.max_length)))
        return
    _, source = load_examples(1)
    best: dict[str, dict] = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    for _ in range(a.rounds):
        for c in CONFIGS:
            cmd = [sys.executable, __file__, "--one", c, "--steps", str(a.steps), "--batch", str(a.batch),
                   "--max-length", str(a.max_length)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{c} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if c not in best or r["trained_tok_s"] > best[c]["trained_tok_s"]:
                best[c] = r
    dev = best["baseline"]["device"]
    print(f"SFT throughput: data {source.name}, tiny Llama hidden 256 x 4 layers, {a.steps} steps, batch {a.batch}, "
          f"max_length {a.max_length}, device {dev}, best of {a.rounds} alternating rounds")
    print(f"{'config':<18}{'trained tok/s':>14}{'input tok/s':>13}{'padding':>9}{'peak MiB':>10}{'loss':>8}")
    for c in CONFIGS:
        r = best[c]
        print(f"{c:<18}{r['trained_tok_s']:>14.0f}{r['input_tok_s']:>13.0f}{r['padding']:>9.1%}"
              f"{r['peak_mib']:>10.0f}{r['train_loss']:>8.3f}")
    base = best["baseline"]["trained_tok_s"]
    print(f"seedtune / baseline trained tokens/s: {best['seedtune']['trained_tok_s'] / base:.2f}x (target >= 1.0x); "
          f"with packing: {best['seedtune+packing']['trained_tok_s'] / base:.2f}x")
    trl = best["trl"]["trained_tok_s"]
    print(f"seedtune / TRL SFTTrainer (completion-only loss) trained tokens/s: "
          f"{best['seedtune']['trained_tok_s'] / trl:.2f}x; with packing: "
          f"{best['seedtune+packing']['trained_tok_s'] / trl:.2f}x; TRL / baseline: {trl / base:.2f}x")


if __name__ == "__main__":
    main()
