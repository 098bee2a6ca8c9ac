"""``backend: vllm`` — offline batched generation with ``vllm.LLM`` on one or more GPUs.

A thin adapter: vLLM is imported only when a model is created with this backend (``pip install
"seedtune[vllm]"``), and the engine starts on the first ``generate``. Chat requests go through the model's chat
template (``LLM.chat``); a request's JSON schema becomes structured output (``StructuredOutputsParams``; the
older ``GuidedDecodingParams`` where that is what vLLM has). Requests with the same parameters and kind share
one ``generate`` call of at most ``chunk_size`` requests, whose results are reported (committed) together.
Requests fail one by one: each is checked against the engine's context (prompt tokens by its own tokenizer plus
``max_tokens``) before it is sent, and a call that still raises is split until the request at fault is alone.
``close()`` shuts the engine down and frees its GPU memory for the next stage.
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
                                  ResultSink, Usage, error_line, isolate, over_context)
from pipeline.models.loading import resolve_model_path, weights_identity

log = logging.getLogger(__name__)

# The option fields naming weights (model, GGUF file, revision): a Hub revision is pinned to its commit.
WEIGHTS = (("model", None, "revision"),)


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
        self._context: tuple[Any, int] | None = None  # the engine's tokenizer and context length
        self._owns_distributed = False  # torch.distributed was started by the engine, not before it

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
            self._owns_distributed = not _distributed_started()
            try:
                self._llm = vllm.LLM(**self.engine_args())
            except (OSError, ValueError, RuntimeError) as e:
                cause = error_line(e)
                raise BackendUnavailable(f"model '{self.options.model}': vLLM could not start: {cause}") from None
            self._context = engine_context(self._llm)
        return self._llm

    def refusal(self, vllm: Any, req: ModelRequest) -> Failure | Any:
        """The request's SamplingParams, or why it cannot be sent: parameters vLLM rejects, messages the chat
        template rejects, or a prompt that does not fit the engine's context with its ``max_tokens`` (counted
        with the engine's own tokenizer). Each is permanent."""
        try:
            sp = sampling_params(vllm, req)
        except (ValueError, TypeError) as e:
            return Failure(error=f"invalid sampling parameters: {error_line(e)}", kind="invalid_request",
                           permanent=True)
        if self._context is None:
            return sp
        tok, context = self._context
        try:
            n = prompt_tokens(tok, req)
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages (jinja raises its own types)
            return Failure(error=f"chat template: {error_line(e)}", kind="invalid_request", permanent=True)
        return over_context(n, req.params.max_tokens, context) or sp

    def _chunk(self, vllm: Any, requests: Sequence[ModelRequest], members: list[int]) -> list[ModelResult]:
        llm = self.llm()
        prepared = {i: self.refusal(vllm, requests[i]) for i in members}
        results: dict[int, ModelResult] = {i: p for i, p in prepared.items() if isinstance(p, Failure)}
        chat = requests[members[0]].messages is not None

        def call(part: list[int]) -> list[ModelResult]:
            sps = [prepared[i] for i in part]
            if chat:
                convs = [[m.model_dump() for m in requests[i].messages or []] for i in part]
                outs = llm.chat(convs, sampling_params=sps, use_tqdm=False)
            else:
                outs = llm.generate([requests[i].prompt for i in part], sampling_params=sps, use_tqdm=False)
            return [_completion(out) for out in outs]

        results.update(isolate(call, [i for i in members if i not in results]))
        return [results[i] for i in members]

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
        """Shut the engine down and hand its GPU memory back: the next stage (an ``sft`` on the same GPU) starts
        on an empty device. Dropping the reference is not enough: the engine's worker processes, its
        distributed state and its KV cache outlive it."""
        llm, self._llm, self._context = self._llm, None, None
        if llm is not None:
            shutdown_engine(llm, self._owns_distributed)
            del llm
        release_accelerator_memory()


def engine_context(llm: Any) -> tuple[Any, int] | None:
    """The engine's tokenizer and context length (``max_model_len``, its own or the model's); None where the
    engine has no tokenizer (``skip_tokenizer_init``), so requests go unchecked."""
    try:
        tok = llm.get_tokenizer()
        config = getattr(llm, "model_config", None) or llm.llm_engine.model_config
        context = int(config.max_model_len)
    except Exception as e:  # noqa: BLE001 - any vLLM without these: generate unchecked, say so once
        log.warning("vLLM: requests are not checked against the context before sending (%s)", error_line(e))
        return None
    return (tok, context) if tok is not None else None


def prompt_tokens(tok: Any, req: ModelRequest) -> int:
    """The prompt's tokens as the engine counts them: chat messages through the chat template (whose text holds
    its special tokens), a plain prompt with the tokenizer's special tokens."""
    if req.messages is None:
        return len(tok.encode(req.prompt))
    text = tok.apply_chat_template([m.model_dump() for m in req.messages], add_generation_prompt=True,
                                   tokenize=False)
    return len(tok.encode(text, add_special_tokens=False))


def _distributed_started() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized()


def shutdown_engine(llm: Any, owns_distributed: bool) -> None:
    """Stop an engine's workers and tear down the distributed state it set up. The process group is destroyed
    only when the engine started it: one that existed before (seedtune's own, under torchrun) is left alone."""
    engine = getattr(llm, "llm_engine", None)
    for stop in (getattr(engine, "shutdown", None), getattr(getattr(engine, "engine_core", None), "shutdown", None),
                 getattr(getattr(engine, "model_executor", None), "shutdown", None)):
        if callable(stop):
            try:
                stop()
            except Exception as e:  # noqa: BLE001 - an engine already gone: the rest of the cleanup still runs
                log.warning("vLLM engine shutdown: %s", error_line(e))
            break
    try:
        from vllm.distributed import parallel_state
    except ImportError:
        return
    steps = [parallel_state.destroy_model_parallel] + ([parallel_state.destroy_distributed_environment]
                                                        if owns_distributed else [])
    for step in steps:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - state never set up (one GPU, no model parallelism)
            log.debug("vLLM cleanup %s: %s", step.__name__, error_line(e))


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


ENGINE_CAPACITY = 256  # vLLM's default number of sequences scheduled at once (max_num_seqs)


def capacity(options: Options) -> int:
    """Requests the engine schedules at once."""
    return ENGINE_CAPACITY


def gpus(options: Options) -> int:
    """One GPU per tensor-parallel shard."""
    return options.tensor_parallel_size


def create(options: Options) -> VLLMBackend:
    if not vllm_available():
        raise MissingExtra("the vllm backend", "vllm")
    return VLLMBackend(options)
