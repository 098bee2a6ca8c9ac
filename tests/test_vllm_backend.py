"""The vLLM adapter up to the ``LLM.generate`` / ``LLM.chat`` call, with a stand-in ``vllm`` module in
``sys.modules`` (the real call runs on a GPU: bench/gpu_check.sh). API names as in vLLM 0.1x-0.3x:
``vllm.LLM(model=..., tensor_parallel_size=..., gpu_memory_utilization=..., max_model_len=..., dtype=...)``,
``vllm.SamplingParams(n, temperature, top_p, max_tokens, stop, seed, presence_penalty, frequency_penalty,
structured_outputs=StructuredOutputsParams(json=schema))``, ``LLM.generate(prompts, sampling_params=[...])``,
``LLM.chat(conversations, sampling_params=[...])`` returning ``RequestOutput``s with ``prompt_token_ids`` and
``outputs[k].text / .token_ids / .finish_reason``."""

import sys
import types

import pytest

from pipeline.errors import MissingExtra
from pipeline.models.base import BackendUnavailable, Completion, Failure, GenParams, Message, ModelRequest
from pipeline.models.vllm_backend import Options, create, request_seed


class FakeOut:
    def __init__(self, text, reason="stop"):
        self.text, self.finish_reason, self.token_ids = text, reason, [1, 2, 3]


class FakeRequestOutput:
    def __init__(self, text, n):
        self.prompt_token_ids = [0] * 4
        self.outputs = [FakeOut(f"{text}#{k}") for k in range(n)]


class FakeTokenizer:
    """One token per word; the chat template joins the messages' contents after a role word each."""

    def encode(self, text, add_special_tokens=True):
        return [0] * (len(text.split()) + (1 if add_special_tokens else 0))

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        if any(m["role"] == "system" and m["content"] == "reject me" for m in messages):
            raise ValueError("System role not supported")
        text = " ".join(f"{m['role']} {m['content']}" for m in messages)
        return text + (" assistant" if add_generation_prompt else "")


def fake_module(calls, structured=True, max_model_len=None):
    mod = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            if kw["temperature"] < 0:
                raise ValueError("temperature must be non-negative")
            self.kw = kw

    class Engine:
        model_config = types.SimpleNamespace(max_model_len=max_model_len)

        def shutdown(self):
            calls["shutdown"] = calls.get("shutdown", 0) + 1

    class LLM:
        def __init__(self, **kw):
            calls["init"] = kw
            if kw["model"] == "broken":
                raise ValueError("no such model\nmore")
            self.llm_engine = Engine()

        if max_model_len is not None:
            def get_tokenizer(self):
                return FakeTokenizer()

        def generate(self, prompts, sampling_params=None, use_tqdm=True):
            assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
            calls.setdefault("generate", []).append((prompts, [sp.kw for sp in sampling_params]))
            if any(p == "too long" for p in prompts):
                raise ValueError("The decoder prompt is longer than the maximum model length")
            return [FakeRequestOutput(f"out:{p}", sp.kw["n"]) for p, sp in zip(prompts, sampling_params)]

        def chat(self, messages, sampling_params=None, use_tqdm=True):
            calls.setdefault("chat", []).append((messages, [sp.kw for sp in sampling_params]))
            if any(c[-1]["content"] == "crash" for c in messages):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return [FakeRequestOutput(f"chat:{c[-1]['content']}", sp.kw["n"]) for c, sp in zip(messages, sampling_params)]

    mod.SamplingParams, mod.LLM = SamplingParams, LLM
    sp_mod = types.ModuleType("vllm.sampling_params")

    class Constraint:
        def __init__(self, json=None):
            self.json = json

    if structured:
        sp_mod.StructuredOutputsParams = Constraint
    else:
        sp_mod.GuidedDecodingParams = Constraint
    mod.sampling_params = sp_mod
    dist_mod = types.ModuleType("vllm.distributed")
    dist_mod.parallel_state = types.SimpleNamespace(
        destroy_model_parallel=lambda: calls.setdefault("destroyed", []).append("model_parallel"),
        destroy_distributed_environment=lambda: calls.setdefault("destroyed", []).append("distributed_environment"))
    mod.distributed = dist_mod
    return mod, sp_mod


def install(monkeypatch, calls, **kw):
    mod, sp_mod = fake_module(calls, **kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp_mod)
    monkeypatch.setitem(sys.modules, "vllm.distributed", mod.distributed)
    return calls


@pytest.fixture
def fake_vllm(monkeypatch):
    return install(monkeypatch, {})


def run(b, requests):
    got, groups = {}, []
    b.generate(requests, lambda g: groups.append([i for i, _ in g]) or got.update(g) or True)
    return got, groups


def test_generate_and_chat_map_parameters(fake_vllm):
    b = create(Options(model="some/model", tensor_parallel_size=2, max_model_len=2048, gpu_memory_utilization=0.5,
                       dtype="bfloat16", tokenizer="some/tokenizer"))
    assert "init" not in fake_vllm  # the engine starts on the first generate
    params = GenParams(temperature=0.7, max_tokens=9, stop=["\n"], seed=3, presence_penalty=0.5, top_p=0.9)
    reqs = [ModelRequest(prompt="a", params=params), ModelRequest(prompt="b", params=params),
            ModelRequest(messages=[Message(role="system", content="s"), Message(role="user", content="hi")],
                         params=GenParams(json_schema={"type": "array"}, n=2))]
    got, groups = run(b, reqs)
    assert got[0].texts == ["out:a#0"] and got[1].texts == ["out:b#0"] and got[2].texts == ["chat:hi#0", "chat:hi#1"]
    assert all(isinstance(r, Completion) for r in got.values())
    assert got[2].usage.completion_tokens == 6 and got[2].usage.prompt_tokens == 4
    assert sorted(groups) == [[0, 1], [2]]
    init = fake_vllm["init"]
    assert init["tensor_parallel_size"] == 2 and init["max_model_len"] == 2048 and init["dtype"] == "bfloat16"
    assert init["gpu_memory_utilization"] == 0.5 and init["tokenizer"] == "some/tokenizer"
    prompts, kws = fake_vllm["generate"][0]
    assert prompts == ["a", "b"]
    assert kws[0] == dict(n=1, temperature=0.7, top_p=0.9, max_tokens=9, presence_penalty=0.5,
                          frequency_penalty=0.0, stop=["\n"], seed=3)
    convs, chat_kws = fake_vllm["chat"][0]
    assert convs == [[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]]
    assert chat_kws[0]["structured_outputs"].json == {"type": "array"} and chat_kws[0]["stop"] is None


def test_each_request_gets_its_own_reproducible_seed(fake_vllm):
    p = GenParams(temperature=1.0)
    reqs = [ModelRequest(prompt="same", params=p, tag=str(k)) for k in range(3)]
    run(create(Options(model="m")), reqs)
    run(create(Options(model="m")), reqs[1:])  # a resume that only needs the last two
    first, second = (kws for _, kws in fake_vllm["generate"])
    seeds = [kw["seed"] for kw in first]
    assert len(set(seeds)) == 3 and [kw["seed"] for kw in second] == seeds[1:]
    assert seeds[0] == request_seed(reqs[0])


def test_chunks_are_committed_as_units_and_a_false_sink_stops(fake_vllm):
    reqs = [ModelRequest(prompt=f"p{i}") for i in range(7)]
    _, groups = run(create(Options(model="m", chunk_size=3)), reqs)
    assert groups == [[0, 1, 2], [3, 4, 5], [6]]
    seen = []
    create(Options(model="m", chunk_size=3)).generate(reqs, lambda g: seen.append(g) and False)
    assert len(seen) == 1 and len(fake_vllm["generate"]) == 4


def test_a_failing_call_fails_its_chunk_only(fake_vllm):
    reqs = [ModelRequest(prompt="too long"), ModelRequest(prompt="x", params=GenParams(max_tokens=3))]
    got, _ = run(create(Options(model="m")), reqs)
    assert isinstance(got[0], Failure) and "maximum model length" in got[0].error
    assert isinstance(got[1], Completion)


def test_engine_start_failure_is_one_line(fake_vllm):
    with pytest.raises(BackendUnavailable, match=r"^model 'broken': vLLM could not start: no such model$"):
        run(create(Options(model="broken")), [ModelRequest(prompt="x")])


def test_older_vllm_uses_guided_decoding(monkeypatch):
    calls = {}
    mod, sp_mod = fake_module(calls, structured=False)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp_mod)
    run(create(Options(model="m")), [ModelRequest(prompt="x", params=GenParams(json_schema={"type": "object"}))])
    kw = calls["generate"][0][1][0]
    assert kw["guided_decoding"].json == {"type": "object"} and "structured_outputs" not in kw


def test_identity_does_not_start_the_engine(fake_vllm):
    b = create(Options(model="org/model", revision="abc"))
    ident = b.identity()
    assert ident["backend"] == "vllm" and ident["weights"].startswith("hub:org/model@abc") and "init" not in fake_vllm


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(MissingExtra, match=r'the vllm backend needs .*pip install "seedtune\[vllm\]"'):
        create(Options(model="m"))


def test_a_request_over_the_context_fails_alone_permanently_and_is_never_sent(monkeypatch):
    calls = install(monkeypatch, {}, max_model_len=16)
    p = GenParams(max_tokens=8)
    reqs = [ModelRequest(prompt="one two three", params=p), ModelRequest(prompt=" ".join(["w"] * 10), params=p),
            ModelRequest(messages=[Message(role="user", content=" ".join(["w"] * 12))], params=p),
            ModelRequest(messages=[Message(role="user", content="hi")], params=p)]
    got, groups = run(create(Options(model="m")), reqs)
    assert isinstance(got[0], Completion) and isinstance(got[3], Completion)
    for i, tokens in ((1, 11), (2, 14)):  # a BOS for the plain prompt; role words of the chat template
        assert isinstance(got[i], Failure) and got[i].permanent and got[i].kind == "context_length"
        assert f"{tokens} tokens + max_tokens 8 = {tokens + 8} tokens" in got[i].error
        assert "context of 16" in got[i].error
    assert calls["generate"][0][0] == ["one two three"]  # the long prompt never reached the engine
    assert [c[-1]["content"] for c in calls["chat"][0][0]] == ["hi"]
    assert sorted(groups) == [[0, 1], [2, 3]]  # still committed per chunk


def test_a_call_that_raises_is_split_until_the_bad_request_is_alone(monkeypatch):
    calls = install(monkeypatch, {}, max_model_len=4096)
    reqs = [ModelRequest(prompt=f"p{i}") for i in range(7)] + [ModelRequest(prompt="too long")]
    got, groups = run(create(Options(model="m")), reqs)
    assert all(isinstance(got[i], Completion) for i in range(7)) and got[3].texts == ["out:p3#0"]
    assert isinstance(got[7], Failure) and got[7].permanent and "maximum model length" in got[7].error
    assert groups == [list(range(8))]  # the chunk is still committed as one unit
    assert len(calls["generate"]) == 7  # halved three times: 8, then 4+4, 2+2, 1+1
    chat = [ModelRequest(messages=[Message(role="user", content=c)]) for c in ("a", "crash", "b")]
    chat.append(ModelRequest(messages=[Message(role="system", content="reject me"), Message(role="user", content="c")]))
    chat.append(ModelRequest(messages=[Message(role="user", content="d")], params=GenParams(temperature=-1)))
    got, _ = run(create(Options(model="m")), chat)
    assert isinstance(got[0], Completion) and isinstance(got[2], Completion)
    assert isinstance(got[1], Failure) and not got[1].permanent and "illegal memory access" in got[1].error
    assert got[3].permanent and got[3].error == "chat template: System role not supported"
    assert got[4].permanent and "temperature must be non-negative" in got[4].error


def test_close_shuts_the_engine_down_and_frees_gpu_memory(fake_vllm, monkeypatch):
    import torch

    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    b = create(Options(model="m"))
    run(b, [ModelRequest(prompt="x")])
    b.close()
    assert fake_vllm["shutdown"] == 1 and b._llm is None
    assert fake_vllm["destroyed"] == ["model_parallel", "distributed_environment"] and emptied
    b.close()  # a second close, or a close before any request, starts and stops nothing
    assert fake_vllm["shutdown"] == 1


def test_close_leaves_a_process_group_it_did_not_start(fake_vllm, monkeypatch):
    import pipeline.models.vllm_backend as vb

    monkeypatch.setattr(vb, "_distributed_started", lambda: True)  # seedtune's own group, under torchrun
    b = create(Options(model="m"))
    run(b, [ModelRequest(prompt="x")])
    b.close()
    assert fake_vllm["shutdown"] == 1 and fake_vllm["destroyed"] == ["model_parallel"]
