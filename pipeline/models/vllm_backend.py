"""``backend: vllm`` — offline batched generation with ``vllm.LLM`` on one or more GPUs.

A thin adapter: vLLM is imported only when a model is created with this backend (``pip install
"seedtune[vllm]"``), and the engine starts on the first ``generate``. Chat requests go through the model's chat
template (``LLM.chat``); a request's JSON schema becomes structured output (``StructuredOutputsParams``; the
older ``GuidedDecodingParams`` where that is what vLLM has). Requests with the same parameters and kind share
one ``generate`` call of at most ``chunk_size`` requests, whose results are reported (committed) together.
Each request samples with its own seed (its ``seed`` parameter, else one derived from the request itself), so
an answer does not depend on which other requests shared its call, and is the same after a resume.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import MissingExtra
from pipeline.models.base import (release_accelerator_memory, BackendUnavailable, Completion, Failure, GenParams, ModelRequest, ModelResult,
                                  ResultSink, Usage, error_line)
from pipeline.models.loading import resolve_model_path, weights_identity

log = logging.getLogger(__name__)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str  # hub id, local folder, .gguf file or pkg://DIST/PATH
    tokenizer: str | None = None  # e.g. the original repo when ``model`` is a .gguf file
    revision: str | None = None
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = None
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    seed: int = 0
    enforce_eager: bool = False  # skip CUDA graph capture: starts faster, generates slower
    trust_remote_code: bool = False
    chunk_size: int = Field(1024, ge=1)  # requests per generate call (results are committed per chunk)


def vllm_available() -> bool:
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    return importlib.util.find_spec("vllm") is not None


def _vllm() -> Any:
    if not vllm_available():
        raise MissingExtra("the vllm backend", "vllm")
    try:
        import vllm
    except ImportError:
        raise MissingExtra("the vllm backend", "vllm") from None
    return vllm


def request_seed(req: ModelRequest) -> int:
    """The request's own seed, else one derived from the request (so a resume samples the same answer)."""
    if req.params.seed is not None:
        return req.params.seed
    return int(hashlib.sha256(req.key({}).encode()).hexdigest()[:8], 16)


def structured_output(p: GenParams) -> dict[str, Any]:
    """SamplingParams keywords that constrain the answer to ``p.json_schema`` (none when it has no schema)."""
    if p.json_schema is None:
        return {}
    try:
        from vllm.sampling_params import StructuredOutputsParams  # vLLM >= 0.11
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams  # older vLLM

        return {"guided_decoding": GuidedDecodingParams(json=p.json_schema)}
    return {"structured_outputs": StructuredOutputsParams(json=p.json_schema)}


def sampling_params(vllm: Any, req: ModelRequest) -> Any:
    p = req.params
    kw: dict[str, Any] = dict(n=p.n, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                              presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                              stop=list(p.stop) or None, seed=request_seed(req))
    kw.update(structured_output(p))
    return vllm.SamplingParams(**kw)


class VLLMBackend:
    def __init__(self, options: Options):
        self.options = options
        self._llm = None

    def identity(self) -> dict[str, Any]:
        return identity(self.options)

    def check(self) -> None:
        _vllm()
        try:
            resolve_model_path(self.options.model)
        except Exception as e:  # noqa: BLE001 - one line
            raise BackendUnavailable(f"model '{self.options.model}': {e}") from None

    def engine_args(self) -> dict[str, Any]:
        o = self.options
        kw: dict[str, Any] = dict(model=resolve_model_path(o.model), revision=o.revision,
                                  tensor_parallel_size=o.tensor_parallel_size,
                                  gpu_memory_utilization=o.gpu_memory_utilization, dtype=o.dtype, seed=o.seed,
                                  trust_remote_code=o.trust_remote_code, enforce_eager=o.enforce_eager)
        if o.tokenizer:
            kw["tokenizer"] = resolve_model_path(o.tokenizer)
        if o.max_model_len:
            kw["max_model_len"] = o.max_model_len
        return kw

    def llm(self) -> Any:
        if self._llm is None:
            vllm = _vllm()
            try:
                self._llm = vllm.LLM(**self.engine_args())
            except (OSError, ValueError, RuntimeError) as e:
                cause = error_line(e)
                raise BackendUnavailable(f"model '{self.options.model}': vLLM could not start: {cause}") from None
        return self._llm

    def _chunk(self, vllm: Any, requests: Sequence[ModelRequest], members: list[int]) -> list[ModelResult]:
        sps = [sampling_params(vllm, requests[i]) for i in members]
        llm = self.llm()
        try:
            if requests[members[0]].messages is not None:
                convs = [[m.model_dump() for m in requests[i].messages or []] for i in members]
                outs = llm.chat(convs, sampling_params=sps, use_tqdm=False)
            else:
                outs = llm.generate([requests[i].prompt for i in members], sampling_params=sps, use_tqdm=False)
        except (ValueError, RuntimeError) as e:  # e.g. a prompt longer than max_model_len
            error = error_line(e)
            log.warning("vLLM generation failed: %s", error)
            return [Failure(error=error, kind="generation_error")] * len(members)
        return [_completion(out) for out in outs]

    def generate(self, requests: Sequence[ModelRequest], on_result: ResultSink, store: Any = None) -> None:
        vllm = _vllm()
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            kind = "chat" if r.messages is not None else "prompt"
            groups.setdefault(r.params.model_dump_json(exclude={"seed"}) + kind, []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.options.chunk_size):
                members = idx[s:s + self.options.chunk_size]
                if not on_result(list(zip(members, self._chunk(vllm, requests, members)))):
                    return

    def close(self) -> None:
        self._llm = None
        release_accelerator_memory()


def _completion(out: Any) -> ModelResult:
    texts = [c.text for c in out.outputs]
    if not texts:
        return Failure(error="vLLM returned no output", kind="malformed")
    reasons = [c.finish_reason or "stop" for c in out.outputs]
    usage = Usage(prompt_tokens=len(out.prompt_token_ids or []),
                  completion_tokens=sum(len(c.token_ids or []) for c in out.outputs))
    return Completion(texts=texts, finish_reasons=reasons, usage=usage)


# Scheduling knobs that never change an answer (each request carries its own seed).
_NOT_IDENTITY = {"gpu_memory_utilization", "chunk_size", "enforce_eager"}


def identity(options: Options) -> dict[str, Any]:
    """Static: the options that shape answers and a content hash of the weights; vLLM is not imported."""
    return {"backend": "vllm", **options.model_dump(mode="json", exclude=_NOT_IDENTITY),
            "weights": weights_identity(options.model, None, options.revision)}


def create(options: Options) -> VLLMBackend:
    if not vllm_available():
        raise MissingExtra("the vllm backend", "vllm")
    return VLLMBackend(options)
