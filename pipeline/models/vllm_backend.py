"""``backend: vllm`` — offline batched generation with ``vllm.LLM`` on one or more GPUs.

A thin adapter: vLLM is imported only when a model is created with this backend (``pip install
"seedtune[vllm]"``). Chat requests go through the model's chat template (``LLM.chat``); JSON schemas become
structured outputs. Requests with the same parameters share one ``generate`` call; each call's results are
reported together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.errors import MissingExtra
from pipeline.models.base import BackendUnavailable, Completion, ModelRequest, ResultSink, Usage
from pipeline.models.loading import resolve_model_path, weights_fingerprint


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    revision: str | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    dtype: str = "auto"
    seed: int = 0
    trust_remote_code: bool = False
    chunk_size: int = 1024  # requests per generate call (results are committed per chunk)


def _vllm():
    try:
        import vllm
    except ImportError:
        raise MissingExtra("the vllm backend", "vllm") from None
    return vllm


def sampling_params(vllm: Any, p: Any) -> Any:
    kw: dict[str, Any] = dict(n=p.n, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                              presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                              stop=p.stop or None, seed=p.seed)
    if p.json_schema is not None:
        from vllm.sampling_params import StructuredOutputsParams

        kw["structured_outputs"] = StructuredOutputsParams(json=p.json_schema)
    return vllm.SamplingParams(**kw)


class VLLMBackend:
    def __init__(self, options: Options):
        self.options = options
        self._llm = None

    def identity(self) -> dict[str, Any]:
        o = self.options
        return {"backend": "vllm", "model": o.model, "revision": o.revision, "dtype": o.dtype,
                "weights": weights_fingerprint(o.model, None, o.revision)}

    def check(self) -> None:
        _vllm()
        try:
            resolve_model_path(self.options.model)
        except Exception as e:  # noqa: BLE001
            raise BackendUnavailable(str(e)) from None

    def llm(self):
        if self._llm is None:
            vllm = _vllm()
            o = self.options
            kw: dict[str, Any] = dict(model=resolve_model_path(o.model), revision=o.revision,
                                      tensor_parallel_size=o.tensor_parallel_size,
                                      gpu_memory_utilization=o.gpu_memory_utilization, dtype=o.dtype, seed=o.seed,
                                      trust_remote_code=o.trust_remote_code)
            if o.max_model_len:
                kw["max_model_len"] = o.max_model_len
            self._llm = vllm.LLM(**kw)
        return self._llm

    def generate(self, requests: Sequence[ModelRequest], on_result: ResultSink) -> None:
        vllm = _vllm()
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.params.model_dump_json() + ("chat" if r.messages else "prompt"), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.options.chunk_size):
                members = idx[s:s + self.options.chunk_size]
                first = requests[members[0]]
                sp = sampling_params(vllm, first.params)
                if first.messages is not None:
                    convs = [[m.model_dump() for m in requests[i].messages or []] for i in members]
                    outs = self.llm().chat(convs, sp, use_tqdm=False)
                else:
                    outs = self.llm().generate([requests[i].prompt for i in members], sp, use_tqdm=False)
                group = []
                for i, out in zip(members, outs):
                    texts = [c.text for c in out.outputs]
                    reasons = [c.finish_reason or "stop" for c in out.outputs]
                    usage = Usage(prompt_tokens=len(out.prompt_token_ids or []),
                                  completion_tokens=sum(len(c.token_ids) for c in out.outputs))
                    group.append((i, Completion(texts=texts, finish_reasons=reasons, usage=usage)))
                if not on_result(group):
                    return

    def close(self) -> None:
        self._llm = None


def create(options: Options) -> VLLMBackend:
    return VLLMBackend(options)
