"""``backend: transformers`` — local generation on CPU or GPU.

Batched with left padding; chat requests go through the tokenizer's chat template; stop strings are
honoured (the text is cut at the first one, finish reason "stop"). Sampling is reproducible: each batch's
members are fixed in request order, its random seed derives from the members' keys, and the batch is
reported (and so committed) as one unit, so an answer is the same after a resume.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.models.base import (BackendUnavailable, Completion, Failure, ModelRequest, ModelResult, ResultSink,
                                  Usage)
from pipeline.models.loading import load_model_and_tokenizer, resolve_model_path, weights_fingerprint

log = logging.getLogger(__name__)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str  # local folder, hub id, .gguf file or pkg://DIST/PATH
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 (about 2x faster on recent CPUs) | float16 | auto
    device: str = "cpu"
    batch_size: int = 8
    trust_remote_code: bool = False


class TransformersBackend:
    def __init__(self, options: Options):
        self.options = options
        self._model = None
        self._tok = None
        self._identity: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            o = self.options
            self._identity = {"backend": "transformers", "model": o.model, "gguf_file": o.gguf_file,
                              "revision": o.revision, "weights": weights_fingerprint(o.model, o.gguf_file, o.revision),
                              "dtype": o.dtype}
        return self._identity

    def check(self) -> None:
        try:
            resolve_model_path(self.options.model)
            self._load()
        except Exception as e:  # noqa: BLE001 - reported as one line
            raise BackendUnavailable(f"model '{self.options.model}': {str(e).splitlines()[0]}") from None

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
        seed_src = "|".join(r.key({}) for r in batch).encode()
        seed = int(hashlib.sha256(seed_src).hexdigest()[:8], 16)
        torch.manual_seed(seed)  # HF sampling draws from torch's global generator
        do_sample = p.temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=p.max_tokens, do_sample=do_sample,
                                      num_return_sequences=p.n, pad_token_id=tok.pad_token_id)
        if do_sample:
            kwargs.update(temperature=p.temperature, top_p=p.top_p)
        if p.presence_penalty or p.frequency_penalty:
            kwargs["repetition_penalty"] = 1.0 + max(p.presence_penalty, p.frequency_penalty) / 10
        if p.stop:
            kwargs.update(stop_strings=p.stop, tokenizer=tok)
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        results: list[ModelResult] = []
        eos_ids = set(_as_list(model.generation_config.eos_token_id)) | {tok.eos_token_id}
        for i, req in enumerate(batch):
            texts_i, reasons, completion_tokens = [], [], 0
            for j in range(p.n):
                seq = out[i * p.n + j][prompt_len:].tolist()
                while seq and seq[-1] == tok.pad_token_id and tok.pad_token_id not in eos_ids:
                    seq.pop()
                ended = any(t in eos_ids for t in seq)
                if ended:
                    seq = seq[: next(k for k, t in enumerate(seq) if t in eos_ids)]
                text = tok.decode(seq, skip_special_tokens=True)
                reason = "stop" if ended else "length"
                cut = _cut_at_stop(text, p.stop)
                if cut is not None:
                    text, reason = cut, "stop"
                texts_i.append(text)
                reasons.append(reason)
                completion_tokens += len(seq)
            prompt_tokens = int(enc["attention_mask"][i].sum())
            results.append(Completion(texts=texts_i, finish_reasons=reasons,
                                      usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)))
        return results

    def generate(self, requests: Sequence[ModelRequest], on_result: ResultSink) -> None:
        bs = max(1, self.options.batch_size)
        # Requests with the same parameters and kind share batches; order stays fixed.
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.params.model_dump_json() + str(r.messages is None), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), bs):
                members = idx[s : s + bs]
                try:
                    res = self._generate_batch([requests[i] for i in members])
                except (RuntimeError, ValueError) as e:
                    log.warning("generation failed: %s", e)
                    res = [Failure(error=str(e).splitlines()[0], kind="generation_error")] * len(members)
                if not on_result(list(zip(members, res))):
                    return

    def close(self) -> None:
        self._model = None


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _cut_at_stop(text: str, stops: list[str]) -> str | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None


def create(options: Options) -> TransformersBackend:
    return TransformersBackend(options)
