"""vLLM on GPU workers through Ray Data's own LLM processor (``ray.data.llm``), for ``ray: {ray_data_llm: true}``.

Thin by design: each chunk row of the executor becomes one row per request for the processor (chat requests
only: the processor applies the model's chat template), and each answered row comes back as a one-result chunk.
It needs GPU workers and vLLM, so it runs only in bench/gpu_check.sh, never in the CPU tests; the default Ray path
(seedtune's own vllm backend inside each actor) answers exactly as the local executor does and is tested.
The processor is built once per executor, but Ray Data starts its engine actors anew for each dataset it runs,
that is for each call (each round of a stage): it suits stages that send their requests in one call, while
seedtune's own actors (the default) keep their engines from the model's first stage to its last.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.errors import UserError
from pipeline.models.base import ModelRequest
from pipeline.models.loading import resolve_model_path
from pipeline.models.vllm_backend import request_seed


def _sampling(req: ModelRequest) -> dict[str, Any]:
    p = req.params
    sp: dict[str, Any] = dict(n=p.n, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                              presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                              stop=list(p.stop) or None, seed=request_seed(req))
    if p.json_schema is not None:
        sp["guided_decoding"] = {"json": p.json_schema}
    return sp


def _rows(row: dict[str, Any]):
    for index, raw in json.loads(row["chunk"]):
        req = ModelRequest.model_validate(raw)
        if req.messages is None:
            raise UserError("ray.ray_data_llm takes chat requests only; this stage sends raw prompts "
                            "(set ray_data_llm: false to run them through the vllm backend on Ray)")
        yield {"index": index, "max_tokens": req.params.max_tokens,
               "messages": [m.model_dump() for m in req.messages], "sampling_params": _sampling(req)}


def _result(row: dict[str, Any]) -> dict[str, Any]:
    error = row.get("__inference_error__")
    if error:
        result: dict[str, Any] = {"status": "failed", "error": str(error)[:500], "kind": "generation_error"}
    else:
        generated = int(row.get("num_generated_tokens") or 0)
        result = {"status": "ok", "texts": [row["generated_text"]],
                  "finish_reasons": ["length" if generated >= int(row["max_tokens"]) else "stop"],
                  "usage": {"prompt_tokens": int(row.get("num_input_tokens") or 0), "completion_tokens": generated}}
    return {"results": json.dumps([[int(row["index"]), result, None]])}


def vllm_processor(options: Any, ray_options: Any) -> Any:
    """The processor, built once per executor and applied to every call's dataset."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    engine = dict(dtype=options.dtype, tensor_parallel_size=options.tensor_parallel_size, seed=options.seed,
                  gpu_memory_utilization=options.gpu_memory_utilization, enforce_eager=options.enforce_eager,
                  trust_remote_code=options.trust_remote_code)
    if options.max_model_len:
        engine["max_model_len"] = options.max_model_len
    if options.tokenizer:
        engine["tokenizer"] = resolve_model_path(options.tokenizer)
    config = vLLMEngineProcessorConfig(model_source=resolve_model_path(options.model), engine_kwargs=engine,
                                       concurrency=ray_options.workers, batch_size=ray_options.batch_size or 64,
                                       should_continue_on_error=True)
    return build_processor(config, postprocess=_result)


def run_processor(processor: Any, ds: Any) -> Any:
    return processor(ds.flat_map(_rows))  # the processor maps one row to one row
