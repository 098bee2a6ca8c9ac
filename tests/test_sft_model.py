"""SFT pitfalls that need a model (docs/sft-pitfalls.md): padding-side, packing-leak, accumulation-normalisation,
lora-checkpointing, saved-not-trained."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from pipeline.errors import UserError
from pipeline.training.saving import save_model
from pipeline.training.data import Collator, encode_dataset
from pipeline.training.packing import PackedCollator, pack_rows, packing_mode
from pipeline.training.trainer import LoraOptions, TrainOptions, finalize, train
from test_sft_data import examples
from tinymodel import tiny_causal_lm, tiny_seq2seq_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def rows(tok, n_copies: int = 2):
    return encode_dataset(tok, examples("alpaca") * n_copies, 512).rows


def dataset(rs):
    import datasets

    return datasets.Dataset.from_list([{**r, "length": len(r["input_ids"])} for r in rs])


def options(**kw) -> TrainOptions:
    base = dict(max_steps=3, learning_rate=1e-3, per_device_batch_size=2, warmup_ratio=0.0, lr_scheduler="constant",
                save_steps=1000, logging_steps=1, precision="fp32", group_by_length=False,
                extra_args={"train_sampling_strategy": "sequential"})
    base.update(kw)
    return TrainOptions(**base)


def test_padding_side_right_padded_row_equals_row_alone(tok):
    model = tiny_causal_lm(tok).eval()
    rs = rows(tok, 1)[:2]
    batch = Collator(tok.pad_token_id)(rs)
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, r in enumerate(rs):
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            assert torch.allclose(padded[i, : len(r["input_ids"])], alone, atol=1e-5)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packing_leak_packed_example_equals_example_alone(tok, impl):
    model = tiny_causal_lm(tok)
    model.set_attn_implementation(impl)
    model.eval()
    rs = rows(tok, 1)
    packs = pack_rows(rs, 256)
    assert len(packs) < len(rs)
    pack = max(packs, key=lambda p: len(p["seq_lens"]))
    batch = PackedCollator(tok.pad_token_id)(packs)
    row = packs.index(pack)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"]).logits[row]
        naive = model(input_ids=batch["input_ids"][row:row + 1]).logits[0]
    start = 0
    leak = 0.0
    for n in pack["seq_lens"]:
        ids = pack["input_ids"][start:start + n]
        assert pack["labels"][start] == -100  # nothing learns an example's first token from the one before
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ids])).logits[0]
        assert torch.allclose(packed[start:start + n], alone, atol=1e-6, rtol=0)
        leak = max(leak, (naive[start:start + n] - alone).abs().max().item())
        start += n
    assert leak > 1e-2  # without the mask the examples do attend to each other: the test can fail
    assert packing_mode(model) == "mask4d"


def test_packing_refused_where_it_cannot_isolate_examples(tok):
    with pytest.raises(UserError, match="packing"):
        packing_mode(tiny_seq2seq_lm(tok))


def test_accumulation_normalisation_batch_4_equals_batch_1_times_accumulation_4(tok, tmp_path):
    rs = rows(tok, 2)[:8]
    results = []
    for bs, acc in [(4, 1), (1, 4)]:
        model = tiny_causal_lm(tok, seed=1)
        o = options(max_steps=2, per_device_batch_size=bs, gradient_accumulation=acc)
        tuned, info = train(model, tok, dataset(rs), Collator(tok.pad_token_id), o, tmp_path / f"b{bs}", 0)
        results.append(([p["loss"] for p in info["loss_curve"]], {k: v.detach().clone() for k, v in
                                                                   tuned.state_dict().items()}))
    (l4, w4), (l1, w1) = results
    assert l4 == pytest.approx(l1, abs=1e-4)
    assert all(torch.allclose(w4[k], w1[k], atol=1e-5) for k in w4)
    init = tiny_causal_lm(tok, seed=1).state_dict()
    assert any(not torch.equal(w4[k].cpu(), init[k]) for k in w4)


def _lora_trained(tok, tmp_path):
    model = tiny_causal_lm(tok, seed=2)
    o = options(max_steps=4, gradient_checkpointing=True,
                lora=LoraOptions(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    tuned, _ = train(model, tok, dataset(rows(tok)), Collator(tok.pad_token_id), o, tmp_path / "lora", 0)
    return tuned.to("cpu"), o  # Trainer moves it to a GPU where there is one


def test_lora_checkpointing_trains_the_adapters(tok, tmp_path):
    tuned, _ = _lora_trained(tok, tmp_path)
    inner = tuned.base_model.model
    assert getattr(inner, "is_activation_checkpointing", None) or inner.is_gradient_checkpointing
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero
    ids = torch.tensor([rows(tok)[0]["input_ids"]])
    tuned.eval()
    with torch.no_grad():
        out = tuned(input_ids=ids).logits
        base = tiny_causal_lm(tok, seed=2).eval()(input_ids=ids).logits
    assert (out - base).abs().max() > 1e-4


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    print(json.dumps(m(input_ids=ids).logits[0].tolist()))
"""


def test_saved_not_trained_reloads_in_a_fresh_process_with_the_same_logits(tok, tmp_path):
    tuned, o = _lora_trained(tok, tmp_path)
    tuned.eval()
    ids = rows(tok)[0]["input_ids"]
    with torch.no_grad():
        adapter = tuned(input_ids=torch.tensor([ids])).logits[0]
    merged = finalize(tuned, o).eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(adapter, merged_logits, atol=1e-5, rtol=0)
    out = tmp_path / "model"
    out.mkdir()
    save_model(out, merged, tok, "alpaca")
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), json.dumps(ids)], capture_output=True, text=True,
                          timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    reloaded = torch.tensor(json.loads(proc.stdout))
    assert torch.allclose(reloaded, merged_logits, atol=1e-5, rtol=0)
    cfg = json.loads((out / "generation_config.json").read_text())
    assert isinstance(cfg["eos_token_id"], list) and tok.eos_token_id in cfg["eos_token_id"]
    assert AutoTokenizer.from_pretrained(out).padding_side == "left"
    assert tok.padding_side == "right"


def test_lora_has_its_own_learning_rate_and_a_bf16_base():
    from pipeline.training.trainer import base_dtype, learning_rate, training_arguments

    lora = LoraOptions()
    assert learning_rate(TrainOptions()) == 2e-5 and learning_rate(TrainOptions(lora=lora)) == 2e-4
    assert learning_rate(TrainOptions(lora=lora, learning_rate=1e-4)) == 1e-4  # a rate given is kept
    assert training_arguments(TrainOptions(lora=lora), __import__("pathlib").Path("/tmp/unused"), 0).learning_rate == 2e-4
    assert base_dtype(TrainOptions(lora=lora), "cpu") == "bfloat16"
    assert base_dtype(TrainOptions(), "cpu") == "float32"  # full fine-tuning keeps fp32 master weights


ADAPTER_RELOAD = """
import json, sys, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM
ids = torch.tensor([json.loads(sys.argv[2])])
out = []
for cls in (AutoPeftModelForCausalLM, AutoModelForCausalLM):  # peft's loader, and transformers' own adapter support
    m = cls.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out.append(m(input_ids=ids).logits[0].float().tolist())
print(json.dumps(out))
"""


def test_a_lora_adapter_on_a_bf16_base_saves_alone_and_reloads_with_peft_and_transformers(tmp_path):
    """merge_on_save: false keeps the adapter alone (a few MB); both loaders give the tuned model's logits."""
    from transformers import AutoModelForCausalLM

    from tinymodel import save_tiny_causal

    base = save_tiny_causal(tmp_path / "base", seed=2)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    o = options(max_steps=4, lora=LoraOptions(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                              merge_on_save=False))
    tuned, _ = train(model, tok, dataset(rows(tok)), Collator(tok.pad_token_id), o, tmp_path / "ckpt", 0)
    adapter = finalize(tuned, o).to("cpu").eval()
    assert {p.dtype for n, p in adapter.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in adapter.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    ids = rows(tok)[0]["input_ids"]
    with torch.no_grad():
        expected = adapter(input_ids=torch.tensor([ids])).logits[0].float()
    out = tmp_path / "model"
    out.mkdir()
    save_model(out, adapter, tok, "alpaca")
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    proc = subprocess.run([sys.executable, "-c", ADAPTER_RELOAD, str(out), json.dumps(ids)], capture_output=True,
                          text=True, timeout=180, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for logits in json.loads(proc.stdout):
        assert torch.allclose(torch.tensor(logits), expected, atol=0.05, rtol=0)
    untuned = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert (untuned(input_ids=torch.tensor([ids])).logits[0].float() - expected).abs().max() > 1e-3
