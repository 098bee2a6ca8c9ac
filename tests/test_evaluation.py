"""Before/after evaluation: loss masking, perplexity, left-padded greedy generation, stop rate, the paired
bootstrap interval of each change, the table, and the ``evaluate`` stage end to end (tiny models built
offline)."""

from __future__ import annotations

import json
import logging
import math

import pytest

torch = pytest.importorskip("torch")

from tinymodel import save_tiny_causal, tiny_causal_lm, tiny_seq2seq_lm, tiny_tokenizer  # noqa: E402

from pipeline.errors import UserError  # noqa: E402
from pipeline.records import TrainingExample  # noqa: E402
from pipeline.stages import seeds, template  # noqa: E402
from pipeline.stages.context import StageContext, StageInput  # noqa: E402
from pipeline.training import evaluation as ev  # noqa: E402
from pipeline.training import metrics  # noqa: E402
from pipeline.training.report import render_results_table  # noqa: E402
from pipeline.training.data import encode_prompt, response_end_ids  # noqa: E402

TEXT = ("The sun warms the oceans and water rises into the air. It cools, forms clouds and falls again as rain. "
        "Bread is made from flour, water, salt and yeast. The quick brown fox jumps over the lazy dog.")
INPUTS = ["abc", "abc def ghi", "The cat sat on the mat.", "", "Positive. Negative. abc def ghi jkl mno pqr"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def causal(tok):
    return tiny_causal_lm(tok, seed=0)


@pytest.fixture(scope="module")
def seq2seq(tok):
    return tiny_seq2seq_lm(tok, seed=0)


def _examples(fmt: str = "alpaca") -> list[TrainingExample]:
    opts = template.Options(format=fmt)
    from pipeline.records import Instance, Task

    out = []
    for i, inp in enumerate(INPUTS):
        task = Task(id=f"t{i}", instruction="Copy the input exactly." if inp else "Say hello.",
                    instances=[Instance(input=inp, output=inp or "hello")])
        out.append(template.render_example(task, 0, opts))
    return out


def _opts(tmp_path, **kw) -> ev.EvalOptions:
    text = tmp_path / "general.txt"
    text.write_text(TEXT, encoding="utf-8")
    base = dict(max_new_tokens=6, batch_size=4, general_text=str(text), heldout=None)
    base.update(kw)
    o = ev.EvalOptions(**base)
    return o


def _ppl(model, tok, o):
    return metrics.perplexity(model, tok, TEXT, o.max_general_tokens, o.block_size, o.stride, o.batch_size)


def _text_nll(model, tok, o):
    total, count, _ = metrics.text_nll(model, tok, TEXT, o.max_general_tokens, o.block_size, o.stride, o.batch_size)
    return total, count


def _val_loss(model, tok, examples, o):
    return metrics.validation_loss(model, tok, examples, o.max_length, o.batch_size)


def _gen(model, tok, examples, o):
    return metrics.generate_ids(model, tok, examples, o.max_new_tokens, o.batch_size)


def _evaluate(model, tok, examples, o, label):
    """Evaluate on the examples, generating for the held-out file the options name (or the examples)."""
    path = ev.heldout_path(o)
    tasks = seeds.load_tasks(seeds.Options(path=str(path))) if path else None
    held = ev.heldout_examples(examples, o, tasks, str(path) if path else None)
    return ev.evaluate_model(model, tok, examples, *held, o, label)


# ---- perplexity --------------------------------------------------------------------------------------------

def _hand_nll(model, ids: list[int]) -> tuple[float, int]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    nll = -sum(float(logp[k, ids[k + 1]]) for k in range(len(ids) - 1))
    return nll, len(ids) - 1


def test_perplexity_is_exp_of_mean_token_nll(tok, causal, tmp_path):
    o = _opts(tmp_path, block_size=512, stride=512)
    ids = [tok.bos_token_id] + tok(TEXT, add_special_tokens=False)["input_ids"]
    nll, n = _hand_nll(causal, ids)
    assert _ppl(causal, tok, o) == pytest.approx(math.exp(nll / n), rel=1e-5)
    total, count = _text_nll(causal, tok, o)
    assert count == n == len(ids) - 1


def test_sliding_window_perplexity_scores_each_token_once_with_context(tok, causal, tmp_path):
    o = _opts(tmp_path, block_size=24, stride=8, batch_size=3)
    ids = [tok.bos_token_id] + tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 60
    # by hand: window by window, no batching, score the tokens the window adds
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), 8):
        end = min(begin + 24, len(ids))
        window = ids[begin:end]
        with torch.no_grad():
            logp = torch.log_softmax(causal(input_ids=torch.tensor([window])).logits[0].double(), -1)
        for k in range(len(window) - (end - prev_end), len(window)):
            if k > 0:
                total -= float(logp[k - 1, window[k]])
                count += 1
        prev_end = end
        if end == len(ids):
            break
    got_total, got_count = _text_nll(causal, tok, o)
    assert got_count == count == len(ids) - 1
    assert got_total == pytest.approx(total, rel=1e-5)
    assert _ppl(causal, tok, o) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_window_is_capped_at_model_positions(tok, tmp_path):
    model = tiny_causal_lm(tok, seed=0)
    model.config.max_position_embeddings = 16
    assert metrics.window(model, 512) == 16


# ---- validation loss ---------------------------------------------------------------------------------------

def test_validation_loss_is_mean_over_response_tokens_only(tok, causal, tmp_path):
    examples = _examples()[:3]
    total, count, all_total, all_count = 0.0, 0, 0.0, 0
    for e in examples:
        prompt = encode_prompt(tok, e)
        response = tok(e.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = prompt + response
        with torch.no_grad():
            logp = torch.log_softmax(causal(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for k in range(1, len(ids)):
            nll = -float(logp[k - 1, ids[k]])
            all_total, all_count = all_total + nll, all_count + 1
            if k >= len(prompt):
                total, count = total + nll, count + 1
    got = _val_loss(causal, tok, examples, _opts(tmp_path, batch_size=3))  # right-padded batch
    assert got == pytest.approx(total / count, rel=1e-5)
    assert got != pytest.approx(all_total / all_count, rel=1e-3)  # the prompt is not scored
    assert _val_loss(causal, tok, [], _opts(tmp_path)) is None


def test_validation_loss_same_batched_and_alone(tok, causal, tmp_path):
    examples = _examples()
    a = _val_loss(causal, tok, examples, _opts(tmp_path, batch_size=5))
    b = _val_loss(causal, tok, examples, _opts(tmp_path, batch_size=1))
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_eval_prompt_is_the_training_prompt_with_one_bos(tok, fmt):
    """template-drift: the prompt evaluation generates from is token-identical to the training row's prompt."""
    from pipeline.training.data import encode_example

    for e in _examples(fmt):
        prompt = encode_prompt(tok, e)
        row = encode_example(tok, e, 512)
        assert row.input_ids[: len(prompt)] == prompt
        assert all(label == -100 for label in row.labels[: len(prompt)])
        if fmt == "alpaca":
            assert prompt.count(tok.bos_token_id) == 1 and prompt[0] == tok.bos_token_id


# ---- generation --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_left_padded_batched_generation_equals_one_at_a_time(tok, causal, tmp_path, fmt):
    examples = _examples(fmt)
    assert len({len(encode_prompt(tok, e)) for e in examples}) > 1  # the batch really is padded
    batched = _gen(causal, tok, examples, _opts(tmp_path, batch_size=5, max_new_tokens=10))
    alone = _gen(causal, tok, examples, _opts(tmp_path, batch_size=1, max_new_tokens=10))
    assert batched == alone
    assert all(len(ids) == 10 for ids, stopped in batched if not stopped)


def _bias(model, ids: list[int], value: float):
    """Add ``value`` to the logits of ``ids`` (a hook on the output layer)."""
    bias = torch.zeros(model.get_output_embeddings().weight.shape[0])
    bias[ids] = value
    return model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_stop_rate_tells_a_stopping_model_from_one_that_never_stops(tok, causal, tmp_path, fmt):
    examples = _examples(fmt)
    o = _opts(tmp_path, max_new_tokens=5)
    # chat rows end with the template's end-of-turn token, alpaca rows with EOS
    end = tok.convert_tokens_to_ids("<|im_end|>") if fmt == "chat" else tok.eos_token_id
    handle = _bias(causal, [end], 1e4)
    try:
        stops = _evaluate(causal, tok, examples, o, "stops")
    finally:
        handle.remove()
    handle = _bias(causal, response_end_ids(tok), -1e4)
    try:
        never = _evaluate(causal, tok, examples, o, "never")
    finally:
        handle.remove()
    assert stops["stop_rate"] == 1.0 and stops["mean_new_tokens"] == 0
    assert never["stop_rate"] == 0.0 and never["mean_new_tokens"] == 5
    assert all(s["stopped"] for s in stops["samples"]) and not any(s["stopped"] for s in never["samples"])


def test_rouge_l_scores_answers_against_references(tok, causal, tmp_path, monkeypatch):
    examples = _examples()
    monkeypatch.setattr(metrics, "generate_ids", lambda m, t, exs, n, b: [
        (t(e.response, add_special_tokens=False)["input_ids"], True) for e in exs])
    perfect = _evaluate(causal, tok, examples, _opts(tmp_path), "copy")
    assert perfect["rouge_l"] == pytest.approx(1.0)
    assert metrics.rouge_l("a b c d", "a b x d") == pytest.approx(0.75)


# ---- held-out instructions ---------------------------------------------------------------------------------

def _heldout_file(path):
    rows = [{"id": f"h{i}", "name": f"h{i}", "instruction": f"Repeat the word {w}.",
             "instances": [{"input": "", "output": w}, {"input": "twice", "output": f"{w} {w}"}],
             "is_classification": False} for i, w in enumerate(["apple", "river", "stone", "cloud"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_heldout_file_is_rendered_in_the_training_format(tmp_path):
    path = _heldout_file(tmp_path / "heldout.jsonl")
    o = _opts(tmp_path, heldout=str(path), max_examples=5)
    tasks = seeds.load_tasks(seeds.Options(path=str(path)))
    alpaca, src = ev.heldout_examples(_examples("alpaca"), o, tasks, str(path))
    assert src == str(path) and len(alpaca) == 5
    assert all(e.prompt.endswith("### Response:\n") for e in alpaca)
    assert {e.task_id for e in alpaca} <= {"h0", "h1", "h2", "h3"}
    rendered = {template.render_example(t, i, template.Options(format="alpaca")).id: t.instances[i].output
                for t in tasks for i in range(len(t.instances))}
    assert all(rendered[e.id] == e.response for e in alpaca)  # the template stage's own rendering
    again, _ = ev.heldout_examples(_examples("alpaca"), o, tasks, str(path))
    assert again == alpaca  # seeded choice
    chat, _ = ev.heldout_examples(_examples("chat"), o, tasks, str(path))
    assert all(e.messages and e.messages[-1]["role"] == "assistant" for e in chat)
    assert [e.id for e in chat] == [e.id for e in alpaca]
    with pytest.raises(UserError, match="heldout"):
        ev.heldout_path(_opts(tmp_path, heldout=str(tmp_path / "missing.jsonl")))


def test_without_heldout_file_the_validation_split_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "DEFAULT_HELDOUT", tmp_path / "absent.jsonl")
    o = _opts(tmp_path, max_examples=3)
    assert ev.heldout_path(o) is None
    held, src = ev.heldout_examples(_examples(), o, None)
    assert src == "validation" and len(held) == 3


# ---- seq2seq -----------------------------------------------------------------------------------------------

def test_seq2seq_model_evaluates(tok, seq2seq, tmp_path):
    examples = _examples()
    o = _opts(tmp_path, block_size=32)
    r = _evaluate(seq2seq, tok, examples, o, "t5")
    assert math.isfinite(r["validation_loss"]) and r["validation_loss"] > 0
    assert math.isfinite(r["general_ppl"]) and r["general_ppl"] > 1
    assert r["general_tokens"] == len(tok(TEXT, add_special_tokens=False)["input_ids"])
    assert 0 <= r["rouge_l"] <= 1 and r["stop_rate"] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    alone = _gen(seq2seq, tok, examples, _opts(tmp_path, batch_size=1))
    assert _gen(seq2seq, tok, examples, _opts(tmp_path, batch_size=5)) == alone
    handle = _bias(seq2seq, [tok.eos_token_id], 1e4)
    try:
        assert _evaluate(seq2seq, tok, examples, o, "t5")["stop_rate"] == 1.0
    finally:
        handle.remove()


def test_evaluation_is_deterministic_and_keeps_training_mode(tok, causal, tmp_path):
    causal.train()
    a = _evaluate(causal, tok, _examples(), _opts(tmp_path), "x")
    assert causal.training
    b = _evaluate(causal, tok, _examples(), _opts(tmp_path), "x")
    assert a == b
    causal.eval()


# ---- table -------------------------------------------------------------------------------------------------

def test_results_table_shows_before_after_change_and_forgetting():
    before = {"label": "base", "validation_loss": 2.5, "rouge_l": 0.1, "stop_rate": 0.25, "general_ppl": 20.0,
              "n_examples": 10, "n_generated": 4, "heldout_source": "data/eval_instructions.jsonl",
              "general_tokens": 100}
    after = {**before, "label": "tuned", "validation_loss": 2.0, "rouge_l": 0.4, "stop_rate": 1.0,
             "general_ppl": 22.0}
    table = render_results_table(before, after)
    lines = table.splitlines()
    assert lines[0].startswith("| metric | base | tuned | change |")
    row = next(x for x in lines if x.startswith("| validation loss"))
    assert "2.5000" in row and "2.0000" in row and "-0.5000 (-20.0%)" in row
    assert "+0.7500" in next(x for x in lines if x.startswith("| generations that stop"))
    ppl = next(x for x in lines if x.startswith("| perplexity on general text"))
    assert "20.00" in ppl and "22.00" in ppl and "+10.0%" in ppl
    assert "rose by 10.0%" in table and "lost some general knowledge" in table
    assert "none measured" in render_results_table(before, {**after, "general_ppl": 19.0})
    missing = render_results_table({"label": "base"}, {"label": "tuned", "rouge_l": None})
    assert "not measured" in missing and "| – | – | – |" in missing


# ---- the stage ---------------------------------------------------------------------------------------------

def _ctx(tmp_path, options, inputs, seed=0) -> StageContext:
    out = tmp_path / "run" / "evaluate"
    out.mkdir(parents=True)
    return StageContext(name="evaluate", kind="evaluate", options=options, seed=seed, run_dir=tmp_path / "run",
                        out_dir=out, scratch_dir=tmp_path / "scratch", inputs=inputs,
                        get_model=lambda name: None, log=logging.getLogger("test"))


def test_evaluate_stage_end_to_end(tmp_path):
    import datasets

    from pipeline.stages import evaluate

    base = save_tiny_causal(tmp_path / "base", seed=0)
    tuned = save_tiny_causal(tmp_path / "sft", seed=1)
    export = tmp_path / "export"
    examples = _examples()
    rows = [e.model_dump(mode="json") for e in examples]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                          "validation": datasets.Dataset.from_list(rows[2:])}).save_to_disk(str(export / "dataset"))
    heldout = _heldout_file(tmp_path / "heldout.jsonl")
    text = tmp_path / "general.txt"
    text.write_text(TEXT, encoding="utf-8")
    o = evaluate.Options(base_model=str(base), evaluation=dict(heldout=str(heldout), general_text=str(text),
                                                               max_new_tokens=4, max_examples=3))
    deps = set(map(str, evaluate.dependencies(o)))
    assert {str(text), str(heldout)} <= deps and any(d.endswith("results_table.md.j2") for d in deps)
    ctx = _ctx(tmp_path, o, [StageInput("export", "export", export), StageInput("model", "sft", tuned)])
    evaluate.run(ctx)

    results = json.loads((ctx.out_dir / "results.json").read_text())
    before, after = results["before"], results["after"]
    assert before["label"] == "base" and after["label"] == "tuned"
    assert before["n_examples"] == after["n_examples"] == 3  # the export stage's validation split
    assert before["n_generated"] == 3 and before["heldout_source"] == "../heldout.jsonl"  # from the run folder
    assert before["general_ppl"] != after["general_ppl"]  # two different models
    readme = (ctx.out_dir / "README.md").read_text()
    assert "| metric | base | tuned | change | 95% interval of the change | n | note |" in readme
    assert "Forgetting" in readme and str(tmp_path) not in readme  # no absolute local paths
    assert len((ctx.out_dir / "generations.jsonl").read_text().splitlines()) == 6
    m = ctx.stats.metrics["evaluation"]
    assert m["before"]["general_ppl"] == before["general_ppl"] and "samples" not in m["after"]
    assert "units" not in m["after"] and set(m["change"]) == {"validation_loss", "rouge_l", "stop_rate",
                                                              "general_ppl"}
    assert m["change"]["rouge_l"]["n"] == 3 and m["change"]["validation_loss"]["n"] == 3
    assert ctx.stats.rows_in == 3

    # the same models evaluated directly give the same numbers (same code path as the sft stage)
    from pipeline.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tuned))
    direct = _evaluate(model, tok, [TrainingExample.model_validate(r) for r in rows[2:]], o.evaluation,
                       "tuned")
    assert direct["general_ppl"] == pytest.approx(after["general_ppl"], rel=1e-6)
    assert direct["validation_loss"] == pytest.approx(after["validation_loss"], rel=1e-6)


def test_evaluate_stage_reads_template_records_and_needs_a_tuned_model(tmp_path):
    from pipeline.records import write_jsonl
    from pipeline.stages import evaluate

    base = save_tiny_causal(tmp_path / "base")
    tdir = tmp_path / "template"
    write_jsonl(tdir / "records.jsonl", _examples())
    text = tmp_path / "general.txt"
    text.write_text(TEXT, encoding="utf-8")
    o = evaluate.Options(base_model=str(base), evaluation=dict(general_text=str(text), max_new_tokens=2,
                                                               max_examples=2,
                                                               heldout=str(_heldout_file(tmp_path / "h.jsonl"))))
    ctx = _ctx(tmp_path, o, [StageInput("template", "template", tdir)])
    with pytest.raises(UserError, match="tuned"):
        evaluate.run(ctx)
    assert len(evaluate.validation_examples(ctx)) == 1  # 5 tasks, 10% by task (at least one)
    o2 = o.model_copy(update={"tuned": str(tmp_path / "nowhere")})
    with pytest.raises(UserError, match="no saved model"):
        evaluate.run(_ctx(tmp_path / "b", o2, [StageInput("template", "template", tdir)]))
    o3 = o.model_copy(update={"tuned": str(base)})
    ctx3 = _ctx(tmp_path / "c", o3, [StageInput("template", "template", tdir)])
    evaluate.run(ctx3)
    ev_ = ctx3.stats.metrics["evaluation"]
    assert ev_["before"]["general_ppl"] == pytest.approx(ev_["after"]["general_ppl"])  # same weights
    assert ev_["before"]["n_examples"] == 1


# ---- error bars --------------------------------------------------------------------------------------------

def test_paired_bootstrap_tells_a_real_change_from_noise():
    import random

    rng = random.Random(0)
    before = [rng.random() for _ in range(40)]
    shifted = [b + 0.2 + rng.gauss(0, 0.01) for b in before]  # every example better by about 0.2
    c = ev.metric_change("mean", before, shifted, seed=0)
    assert c["n"] == 40 and c["delta"] == pytest.approx(0.2, abs=0.01)
    assert 0 < c["low"] < c["delta"] < c["high"] and c["measurable"]
    noise = [b + rng.gauss(0, 0.2) for b in before]  # unpaired noise, no shift
    c = ev.metric_change("mean", before, noise, seed=0)
    assert c["low"] < 0 < c["high"] and not c["measurable"]
    assert ev.metric_change("mean", before, noise, seed=0) == c  # seeded
    # pairing: a constant shift under large between-example spread is still measurable
    wide = [rng.gauss(0, 5) for _ in range(20)]
    assert ev.metric_change("mean", wide, [w + 0.1 for w in wide], seed=1)["measurable"]
    # ratio metrics resample (nll, tokens) pairs; too few units give no interval
    ratio = ev.metric_change("ratio", [(2.0, 1), (4.0, 2)], [(1.0, 1), (2.0, 2)], seed=0)
    assert ratio["delta"] == pytest.approx(1.0 - 2.0)
    one = ev.metric_change("mean", [0.5], [1.0], seed=0)
    assert one["n"] == 1 and one["low"] is None and not one["measurable"]
    assert ev.metric_change("mean", [], [], seed=0)["delta"] is None


def test_table_says_no_measurable_change_where_the_interval_includes_zero():
    before = {"label": "base", "rouge_l": 0.20, "stop_rate": 0.5, "general_ppl": 20.0, "validation_loss": 2.0,
              "units": {"rouge_l": [0.1, 0.3, 0.2, 0.2], "stop_rate": [0, 1, 0, 1],
                        "general_ppl": [[30.0, 10], [29.0, 10]], "validation_loss": [[2.0, 1], [2.0, 1]]}}
    after = {"label": "tuned", "rouge_l": 0.225, "stop_rate": 1.0, "general_ppl": 21.0, "validation_loss": 1.0,
             "units": {"rouge_l": [0.3, 0.1, 0.2, 0.3], "stop_rate": [1, 1, 1, 1],
                       "general_ppl": [[30.5, 10], [29.0, 10]], "validation_loss": [[1.0, 1], [1.0, 1]]}}
    change = ev.compare(before, after, seed=0)
    assert not change["rouge_l"]["measurable"] and change["rouge_l"]["n"] == 4
    assert change["validation_loss"]["measurable"] and change["validation_loss"]["high"] < 0
    lines = render_results_table(before, after, change).splitlines()
    rouge = next(x for x in lines if x.startswith("| ROUGE-L"))
    assert "no measurable change" in rouge and "| 4 |" in rouge
    loss = next(x for x in lines if x.startswith("| validation loss"))
    assert "no measurable change" not in loss and "-1.0000 … -1.0000" in loss


def test_evaluation_result_carries_units_paired_across_models(tok, causal, tmp_path):
    o = _opts(tmp_path, max_examples=4, block_size=16, stride=8)
    a = _evaluate(causal, tok, _examples(), o, "a")
    b = _evaluate(tiny_causal_lm(tok, seed=3), tok, _examples(), o, "b")
    for key in ("validation_loss", "rouge_l", "stop_rate", "general_ppl"):
        assert len(a["units"][key]) == len(b["units"][key]) > 1
    nll, n = map(sum, zip(*a["units"]["general_ppl"]))
    assert math.exp(nll / n) == pytest.approx(a["general_ppl"], rel=1e-6)
    c = ev.compare(a, b, seed=0)
    assert c["general_ppl"]["delta"] == pytest.approx(b["general_ppl"] - a["general_ppl"], rel=1e-6)
    assert "units" not in ev.summary(a) and "samples" not in ev.summary(a)
