"""SFT data layer on a tiny BPE tokenizer (no model, no training): the pitfalls never-stops, no-target,
template-drift, token-boundary and silent-truncation of docs/sft-pitfalls.md."""

from __future__ import annotations

import pytest

from pipeline.records import Instance, Task, TrainingExample
from pipeline.stages import template as template_stage
from pipeline.text.templates import template_file
from pipeline.training.data import (
    Collator, alpaca_chat_template, encode_dataset, encode_example, encode_prompt, encode_response, end_id,
    ensure_pad_token, response_end_ids,
)
from tinymodel import tiny_tokenizer

TASKS = [
    Task(id="t1", instruction="Copy the input exactly.", instances=[Instance(input="abc def", output="abc def")]),
    Task(id="t2", instruction="Classify the sentiment of the review.",
         instances=[Instance(input="Great!", output="C")]),
    Task(id="t3", instruction="Give three tips for staying healthy.",
         instances=[Instance(output="Eat well, sleep enough, and move every day.")]),
    Task(id="t4", instruction="Translate the sentence into French.",
         instances=[Instance(input="Hello", output=" Bonjour")]),
    Task(id="t5", instruction="Answer with a number.", instances=[Instance(input="2+2=?", output="4\n")]),
]


def examples(fmt: str) -> list[TrainingExample]:
    o = template_stage.Options(format=fmt, system_prompt="Be brief." if fmt == "sharegpt" else None)
    return [template_stage.render_example(t, 0, o) for t in TASKS]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


ALL_FORMATS = ["alpaca", "chat", "sharegpt"]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_never_stops_last_label_is_the_end_id(tok, fmt):
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for e in examples(fmt):
        enc = encode_example(tok, e, 512)
        want = tok.eos_token_id if fmt == "alpaca" else eot
        assert enc.labels[-1] == want == enc.input_ids[-1]
    assert response_end_ids(tok) == [eot, tok.eos_token_id]


def test_never_stops_end_id_survives_truncation_and_pad_equal_to_eos(tok):
    e = examples("alpaca")[2]
    enc = encode_example(tok, e, 24)
    assert len(enc.input_ids) == 24 and enc.truncated and enc.labels[-1] == tok.eos_token_id
    # pad == eos: the collator must still keep EOS as a label and pad labels with -100
    batch = Collator(pad_id=tok.eos_token_id)([{"input_ids": enc.input_ids, "labels": enc.labels},
                                               {"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}])
    assert batch["labels"][0, -1].item() == tok.eos_token_id
    assert batch["labels"][1, 3:].tolist() == [-100] * 21
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 21


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_no_target_trained_tokens_decode_to_output_plus_end(tok, fmt):
    for e in examples(fmt):
        enc = encode_example(tok, e, 512)
        trained = [t for t, label in zip(enc.input_ids, enc.labels) if label != -100]
        assert trained == enc.labels[enc.prompt_length:]
        assert tok.decode(trained[:-1]) == e.output
        assert trained[-1] == end_id(tok, e)
    rep = encode_dataset(tok, examples(fmt), 512)
    assert not rep.dropped and all(any(x != -100 for x in r["labels"][1:]) for r in rep.rows)


def test_no_target_rows_with_no_trainable_token_are_dropped_and_counted():
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    # no BOS, empty prompt and response: the only label (EOS) sits at position 0 and is never predicted
    empty = TrainingExample(id="e", task_id="e", instruction="i", format="custom", prompt="", response="")
    kept = examples("alpaca")
    rep = encode_dataset(tok, [empty] + kept, 512)
    assert [e.id for e in rep.dropped] == ["e"] and len(rep.rows) == len(kept)
    assert rep.as_dict()["dropped_no_trainable_tokens"] == 1
    # a response cut to nothing still trains its EOS: the end id is re-appended (never-stops)
    enc = encode_example(tiny_tokenizer(), kept[2], 2)
    assert enc.input_ids == [tok.bos_token_id, tok.eos_token_id] and enc.labels[-1] == tok.eos_token_id


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_template_drift_eval_prompt_is_token_identical_and_has_one_bos(tok, fmt):
    if fmt == "alpaca":
        tok = tiny_tokenizer(chat_template=False)
        tok.chat_template = alpaca_chat_template(tok, template_file("formats/alpaca_no_input.j2").read_text())
    for e in examples(fmt):
        enc = encode_example(tok, e, 512)
        prompt = encode_prompt(tok, e)
        assert enc.input_ids[: len(prompt)] == prompt and enc.prompt_length == len(prompt)
        assert prompt.count(tok.bos_token_id) == (1 if fmt == "alpaca" else 0)
        if fmt == "alpaca" and not e.input:
            # the saved chat template renders the very same prompt for inference through plain transformers
            via_chat = tok.apply_chat_template([{"role": "user", "content": e.instruction}],
                                               add_generation_prompt=True, tokenize=True)["input_ids"]
            assert list(via_chat) == prompt


def test_template_drift_multi_turn_keeps_earlier_turns_in_the_prompt(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Copy: abc"}, {"role": "assistant", "content": "abc"}]
    e = TrainingExample(id="m", task_id="m", instruction="", format="chat", messages=msgs, response="abc")
    prompt = encode_prompt(tok, e)
    assert "Hello" in tok.decode(prompt) and tok.decode(prompt).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_token_boundary_ids_are_the_exact_concatenation_for_every_example(tok, fmt):
    for e in examples(fmt):
        enc = encode_example(tok, e, 512)
        assert enc.input_ids == encode_prompt(tok, e) + encode_response(tok, e)
        assert enc.labels == [-100] * enc.prompt_length + encode_response(tok, e)


def test_token_boundary_one_token_answer_is_not_masked(tok):
    e = examples("alpaca")[1]  # output "C": would merge with the prompt's last token in joint tokenisation
    enc = encode_example(tok, e, 512)
    trained = [t for t, label in zip(enc.input_ids, enc.labels) if label != -100]
    assert tok.decode(trained[:-1]) == "C"


def test_silent_truncation_is_counted_and_reported(tok):
    long = TrainingExample(id="l", task_id="l", instruction="i", format="custom",
                           prompt="The quick brown fox jumps over the lazy dog. " * 8,
                           response="Eat well, sleep enough, and move every day. " * 8)
    rep = encode_dataset(tok, [long] + examples("alpaca"), 48)
    d = rep.as_dict()
    assert d["truncated"] >= 1 and d["lost_response_tokens"] > 0
    full = len(encode_response(tok, long))
    enc = encode_example(tok, long, 48)
    assert len(enc.input_ids) == 48 and enc.trainable == full - enc.lost_response_tokens
    assert enc.trainable >= 24  # the response keeps at least half of the budget
    assert enc.input_ids[0] == tok.bos_token_id  # the prompt keeps its start


def test_seq2seq_input_is_prompt_and_labels_are_response_plus_eos(tok):
    for e in examples("alpaca"):
        enc = encode_example(tok, e, 512, seq2seq=True)
        assert enc.input_ids == encode_prompt(tok, e, seq2seq=True)
        assert enc.labels == encode_response(tok, e) and enc.labels[-1] == tok.eos_token_id


def test_pad_token_added_only_where_missing_and_never_eos():
    tok = tiny_tokenizer()
    assert not ensure_pad_token(tok)
    tok.pad_token = None
    from tinymodel import tiny_causal_lm

    model = tiny_causal_lm(tiny_tokenizer())
    n = len(tok)
    assert ensure_pad_token(tok, model)
    assert tok.pad_token_id not in (None, tok.eos_token_id) and len(tok) == n + 1
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
