"""The vLLM adapter up to the LLM call, with a stand-in ``vllm`` module (the real call runs on a GPU:
bench/gpu_check.sh)."""

import sys
import types

import pytest

from pipeline.errors import MissingExtra
from pipeline.models.base import Completion, GenParams, Message, ModelRequest
from pipeline.models.vllm_backend import Options, create


class FakeOut:
    def __init__(self, text):
        self.text, self.finish_reason, self.token_ids = text, "stop", [1, 2, 3]


class FakeRequestOutput:
    def __init__(self, text, n):
        self.prompt_token_ids = [0] * 4
        self.outputs = [FakeOut(text) for _ in range(n)]


@pytest.fixture
def fake_vllm(monkeypatch):
    calls = {}
    mod = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            calls["init"] = kw

        def generate(self, prompts, sp, use_tqdm=False):
            calls.setdefault("generate", []).append((prompts, sp.kw))
            return [FakeRequestOutput(f"out:{p}", sp.kw["n"]) for p in prompts]

        def chat(self, convs, sp, use_tqdm=False):
            calls.setdefault("chat", []).append((convs, sp.kw))
            return [FakeRequestOutput(f"chat:{c[-1]['content']}", sp.kw["n"]) for c in convs]

    mod.SamplingParams, mod.LLM = SamplingParams, LLM
    sp_mod = types.ModuleType("vllm.sampling_params")

    class StructuredOutputsParams:
        def __init__(self, json=None):
            self.json = json

    sp_mod.StructuredOutputsParams = StructuredOutputsParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp_mod)
    return calls


def test_generate_and_chat_map_parameters(fake_vllm):
    b = create(Options(model="some/model", tensor_parallel_size=2, max_model_len=2048))
    reqs = [ModelRequest(prompt="a", params=GenParams(temperature=0.7, max_tokens=9, stop=["\n"], seed=3)),
            ModelRequest(prompt="b", params=GenParams(temperature=0.7, max_tokens=9, stop=["\n"], seed=3)),
            ModelRequest(messages=[Message(role="user", content="hi")],
                         params=GenParams(json_schema={"type": "array"}, n=2))]
    got = {}
    b.generate(reqs, lambda g: got.update(g) or True)
    assert got[0].texts == ["out:a"] and got[1].texts == ["out:b"] and got[2].texts == ["chat:hi", "chat:hi"]
    assert all(isinstance(r, Completion) for r in got.values()) and got[0].usage.completion_tokens == 3
    assert fake_vllm["init"]["tensor_parallel_size"] == 2 and fake_vllm["init"]["max_model_len"] == 2048
    prompts, kw = fake_vllm["generate"][0]
    assert prompts == ["a", "b"] and kw["max_tokens"] == 9 and kw["stop"] == ["\n"] and kw["seed"] == 3
    assert fake_vllm["chat"][0][1]["structured_outputs"].json == {"type": "array"}


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    b = create(Options(model="m"))
    with pytest.raises(MissingExtra, match=r'pip install "seedtune\[vllm\]"'):
        b.check()
