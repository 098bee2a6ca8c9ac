"""``backend: transformers`` — local generation on CPU or GPU.

Batched with left padding; chat requests go through the tokenizer's chat template; stop strings are
honoured (the text is cut at the first one, finish reason "stop"). Sampling is reproducible: each batch's
members are fixed in request order, its random seed derives from the members' keys, and the batch is
reported (and so committed) as one unit, so an answer is the same after a resume. Requests fail one by one:
a prompt that does not fit the model's context with its ``max_tokens`` is refused before the batch runs
(permanent), and a batch whose generation raises is split until the request at fault is alone.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.models.base import (release_accelerator_memory, BackendUnavailable, Completion, Failure, ModelRequest, ModelResult, ResultSink,
                                  Usage, cut_at_stop, error_line, isolate, over_context)
from pipeline.models.loading import load_model_and_tokenizer, resolve_model_path, weights_identity

log = logging.getLogger(__name__)

# The option fields naming weights (model, GGUF file, revision): a Hub revision is pinned to its commit.
WEIGHTS = (("model", "gguf_file", "revision"),)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str  # local folder, hub id, .gguf file or pkg://DIST/PATH
    gguf_file: str | None = None
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # bf16: about 2x fp32 on recent CPUs
    device: str = "cpu"  # cpu | cuda | cuda:1 | mps
    batch_size: int = Field(8, ge=1)  # requests generated together (and committed together)
    trust_remote_code: bool = False


class TransformersBackend:
    def __init__(self, options: Options):
        self.options = options
        self._model = None
        self._tok = None
        self._identity: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = identity(self.options)
        return self._identity

    def check(self) -> None:
        try:
            resolve_model_path(self.options.model)
            self._load()
        except Exception as e:  # noqa: BLE001 - reported as one line
            cause = error_line(e)
            raise BackendUnavailable(f"model '{self.options.model}': {cause}") from None

    def _load(self):
        if self._model is None:
            o = self.options
            self._model, self._tok = load_model_and_tokenizer(
                o.model, gguf_file=o.gguf_file, revision=o.revision, dtype=o.dtype, device=o.device,
                trust_remote_code=o.trust_remote_code)
            self._model.eval()
            tok = self._tok
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            tok.padding_side = "left"
        return self._model, self._tok

    def tokenizer(self):
        return self._load()[1]

    def _prompt_text(self, req: ModelRequest) -> str:
        if req.prompt is not None:
            return req.prompt
        tok = self._tok
        msgs = [m.model_dump() for m in req.messages or []]
        if not getattr(tok, "chat_template", None):
            return "\n\n".join(m["content"] for m in msgs) + "\n\n"
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def _generate_batch(self, batch: Sequence[ModelRequest]) -> list[ModelResult]:
        import torch

        model, tok = self._load()
        p = batch[0].params
        texts = [self._prompt_text(r) for r in batch]
        # Chat templates already hold the special tokens they need.
        add_special = batch[0].messages is None
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special).to(model.device)
        do_sample = p.temperature > 0
        samples = p.n if do_sample else 1  # greedy samples are all the same: generate once, repeat
        kwargs: dict[str, Any] = dict(max_new_tokens=p.max_tokens, do_sample=do_sample,
                                      num_return_sequences=samples, pad_token_id=tok.pad_token_id)
        if do_sample:
            kwargs.update(temperature=p.temperature, top_p=p.top_p, top_k=0)  # no top-k, as in the APIs
        if p.presence_penalty or p.frequency_penalty:
            kwargs["repetition_penalty"] = 1.0 + max(p.presence_penalty, p.frequency_penalty) / 10
        prompt_len = enc["input_ids"].shape[1]
        if p.stop:
            kwargs["stopping_criteria"] = [stop_criteria(tok, p.stop, prompt_len)]
        with torch.no_grad(), _seeded(batch_seed(batch), model.device):
            out = model.generate(**enc, **kwargs)
        eos_ids = set(_as_list(model.generation_config.eos_token_id)) | {tok.eos_token_id}
        results: list[ModelResult] = []
        for i in range(len(batch)):
            texts_i, reasons, completion_tokens = [], [], 0
            for j in range(samples):
                text, reason, n_tokens = self._decode(out[i * samples + j][prompt_len:].tolist(), eos_ids, p.stop)
                texts_i.append(text)
                reasons.append(reason)
                completion_tokens += n_tokens
            reps = p.n // samples
            results.append(Completion(texts=texts_i * reps, finish_reasons=reasons * reps, usage=Usage(
                prompt_tokens=int(enc["attention_mask"][i].sum()), completion_tokens=completion_tokens * reps)))
        return results

    def _decode(self, seq: list[int], eos_ids: set[int], stops: list[str]) -> tuple[str, str, int]:
        """(text, finish reason, completion tokens) of one generated sequence."""
        tok = self._tok
        end = next((k for k, t in enumerate(seq) if t in eos_ids), None)
        if end is not None:
            seq = seq[:end]
        else:
            while seq and seq[-1] == tok.pad_token_id:  # finished early inside a batch
                seq.pop()
        text = tok.decode(seq, skip_special_tokens=True)
        reason = "stop" if end is not None else "length"
        cut = cut_at_stop(text, stops)
        if cut is not None:
            text, reason = cut, "stop"
        return text, reason, len(seq)

    def refusal(self, req: ModelRequest) -> Failure | None:
        """Why ``req`` cannot be sent (its messages break the chat template, or the prompt and ``max_tokens`` do
        not fit the model's context, counted with its tokenizer), else None. Both are permanent."""
        model, tok = self._load()
        try:
            text = self._prompt_text(req)
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages (jinja raises its own types)
            return Failure(error=f"chat template: {error_line(e)}", kind="invalid_request", permanent=True)
        context = context_length(model)
        if context is None:
            return None
        prompt_tokens = len(tok(text, add_special_tokens=req.messages is None)["input_ids"])
        return over_context(prompt_tokens, req.params.max_tokens, context)

    def generate(self, requests: Sequence[ModelRequest], on_result: ResultSink, store: Any = None) -> None:
        for members in batches(self.options, requests):
            results = {i: self.refusal(requests[i]) for i in members}
            fit = [i for i in members if results[i] is None]
            results.update(isolate(lambda part: self._generate_batch([requests[i] for i in part]), fit))
            if not on_result([(i, results[i]) for i in members]):
                return

    def close(self) -> None:
        self._model = None
        release_accelerator_memory()


def batches(options: Options, requests: Sequence[ModelRequest]) -> list[list[int]]:
    """The batches ``generate`` forms: requests with the same parameters and kind, in request order, at most
    ``batch_size`` each. A batch samples with one seed drawn from its members, so an executor that spreads
    requests over workers sends whole batches (see pipeline/run/executors)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.params.model_dump_json() + str(r.messages is None), []).append(i)
    bs = max(1, options.batch_size)
    return [idx[s : s + bs] for idx in groups.values() for s in range(0, len(idx), bs)]


def context_length(model: Any) -> int | None:
    """The positions a decoder-only model can attend over (prompt and answer together); None where the config
    states none (encoder-decoder models, whose prompt and answer have separate limits, and Mamba)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def stop_criteria(tok: Any, stops: list[str], prompt_len: int) -> Any:
    """Stop a row once its generated text (never the prompt: transformers' own ``stop_strings`` also match
    across the prompt's end) contains a stop string. Checks the last few tokens' text at every step."""
    import torch
    from transformers import StoppingCriteria

    window = max(len(s) for s in stops) + 4  # tokens: each decodes to at least part of one character

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            gen = input_ids[:, prompt_len:]
            tails = tok.batch_decode(gen[:, -window:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops if s) for t in tails], device=input_ids.device)

    return StopOnStrings()


def batch_seed(batch: Sequence[ModelRequest]) -> int:
    """The batch's random seed, from its members' keys in order: the same batch samples the same answers."""
    blob = "|".join(r.key({}) for r in batch).encode()
    return int(hashlib.sha256(blob).hexdigest()[:8], 16)


@contextmanager
def _seeded(seed: int, device: Any) -> Iterator[None]:
    """Seed torch for one ``generate`` call (which samples from the global generator), then restore its state."""
    import torch

    devices = [device.index or 0] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def identity(options: Options) -> dict[str, Any]:
    """Every option shapes the answers (the batch size too: a batch samples with one seed); the weights enter
    as a content hash, computed without loading them."""
    return {"backend": "transformers", **options.model_dump(mode="json"),
            "weights": weights_identity(options.model, options.gguf_file, options.revision)}


def capacity(options: Options) -> int:
    """Requests generated together: one batch."""
    return options.batch_size


def gpus(options: Options) -> int:
    """One GPU for a model placed on one, else none."""
    return 1 if options.device.startswith("cuda") else 0


def create(options: Options) -> TransformersBackend:
    return TransformersBackend(options)
