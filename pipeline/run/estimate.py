"""What a run will cost before it starts (``seedtune validate``), per model: requests, tokens, dollars, time.

Requests follow the generate stage's plan: ``max_requests`` generation requests (bootstrap or Alpaca), then, for
Self-Instruct, up to ``target`` classification and ``target`` instance requests. Prompt tokens come from prompts
rendered with the stage's own templates on the seed tasks (a sample of them), counted with the model's tokenizer
where one is known (the openai backend's ``tokenizer:``, a local model's own), else at about 4 characters a token
(said so). Completion tokens are the worst case: every request at ``max_tokens``. Cost is at the model's price
with its batch discount; time is the requests at the configured concurrency, from the latency of one probe request.
Other stages' model calls depend on the data a run produces and are named without a number.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, stage_models
from pipeline.models import backend_module
from pipeline.records import Task
from pipeline.stages import stage_module

log = logging.getLogger(__name__)
SAMPLE = 8  # prompts rendered per step to measure their length
CHARS_PER_TOKEN = 4


@dataclass
class Step:
    name: str
    requests: int
    prompts: list[str]  # a sample of rendered prompts
    max_tokens: int


@dataclass
class ModelEstimate:
    model: str
    steps: list[Step] = field(default_factory=list)
    other_stages: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    counted_with: str = ""
    cost_usd: float = 0.0
    priced: bool = False
    discount: float = 1.0
    latency_s: float | None = None
    concurrency: int = 1
    batch: bool = False

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.steps)


def _seed_tasks(config: Config) -> list[Task]:
    for spec in config.stages:
        if spec.kind == "seeds" and getattr(spec.options, "path", None):
            path = Path(spec.options.path)
            try:
                lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
                return [Task.model_validate({k: v for k, v in json.loads(x).items() if k in Task.model_fields})
                        for x in lines]
            except (OSError, ValueError):
                return []
    return []


def generate_steps(options: Any, seeds: list[Task]) -> list[Step]:
    """The generate stage's plan: its steps with request counts and a sample of their prompts."""
    from pipeline.stages.generation.prompts import example_dicts
    from pipeline.text.templates import render

    o, t = options, options.templates
    rng = random.Random(0)
    sample = lambda k: rng.sample(seeds, min(k, len(seeds))) if seeds else []  # noqa: E731
    if o.mode == "alpaca":
        tpl = t.alpaca_chat if o.alpaca_style == "chat" else t.alpaca
        prompts = [render(tpl, examples=example_dicts(sample(o.alpaca_examples)), num_tasks=o.alpaca_num_tasks)
                   for _ in range(SAMPLE)] if seeds else []
        return [Step("alpaca", o.max_requests, prompts, o.alpaca_params.max_tokens * o.alpaca_params.n)]
    tpl = t.bootstrap_chat if o.bootstrap_style == "chat" else t.bootstrap
    prompts = [render(tpl, instructions=[x.instruction for x in sample(o.num_prompt_instructions)],
                      num_new=o.num_prompt_instructions) for _ in range(SAMPLE)] if seeds else []
    steps = [Step("bootstrap", o.max_requests, prompts, o.bootstrap_params.max_tokens * o.bootstrap_params.n)]
    # Classification and instance prompts show examples plus one new instruction: measured on seed examples.
    examples = lambda k: "\n\n".join(json.dumps(d, ensure_ascii=False) for d in example_dicts(sample(k)))  # noqa: E731
    if o.classify:
        steps.append(Step("classify", o.target, [examples(o.classify_examples) for _ in range(SAMPLE)],
                          o.classify_params.max_tokens))
    steps.append(Step("instances", o.target, [examples(o.instance_examples) for _ in range(SAMPLE)],
                      o.instances_params.max_tokens * o.instances_params.n))
    return steps


def _counter(backend_name: str, options: Any) -> tuple[Any, str]:
    """A token counter for the model (a function of text) and what it is."""
    spec = getattr(options, "tokenizer", None) or (getattr(options, "model", None) if backend_name != "openai"
                                                     else None)
    if spec:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(spec)
            return (lambda text: len(tok.encode(text))), f"counted with the tokenizer {spec}"
        except Exception:  # noqa: BLE001 - no tokenizer at hand: estimate
            log.debug("no tokenizer for %s", spec, exc_info=True)
    return (lambda text: -(-len(text) // CHARS_PER_TOKEN)), f"estimated at {CHARS_PER_TOKEN} characters a token"


def estimate(config: Config, table: dict[str, str], probe: bool = True) -> list[ModelEstimate]:
    seeds = _seed_tasks(config)
    out: dict[str, ModelEstimate] = {}
    for spec in config.stages:
        module = stage_module(spec.kind, table)
        for name in stage_models(module, spec.options):
            est = out.setdefault(name, ModelEstimate(name))
            if spec.kind == "generate":
                est.steps += generate_steps(spec.options, seeds)
            else:
                est.other_stages.append(spec.name)
    for name, est in out.items():
        m = config.models[name]
        count, est.counted_with = _counter(m.backend, m.options)
        for s in est.steps:
            per = sum(count(p) for p in s.prompts) / len(s.prompts) if s.prompts else 0
            est.prompt_tokens += int(per * s.requests)
            est.completion_tokens += s.max_tokens * s.requests
        est.batch = bool(getattr(m.options, "batch", False))
        est.discount = getattr(m.options, "batch_discount", 1.0) if est.batch else 1.0
        est.cost_usd = m.price.cost(est.prompt_tokens, est.completion_tokens) * est.discount
        est.priced = bool(m.price.input_per_million or m.price.output_per_million)
        est.concurrency = int(getattr(m.options, "max_concurrency", 1) or 1)
        if probe and est.requests and not est.batch:
            est.latency_s = _probe(m)
    return list(out.values())


def _probe(m: Any) -> float | None:
    backend = backend_module(m.backend).create(m.options)
    try:
        if hasattr(backend, "probe"):
            return float(backend.probe()["latency_s"])
    except Exception as e:  # noqa: BLE001 - an estimate without a time is still an estimate
        log.warning("model %s: the probe request failed (%s)", m.name, e)
    finally:
        backend.close()
    return None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def estimate_lines(config: Config, table: dict[str, str], probe: bool = True) -> list[str]:
    """The estimate as lines for ``seedtune validate``."""
    lines = []
    for e in estimate(config, table, probe):
        if e.requests:
            steps = ", ".join(f"{s.requests:,} {s.name}" for s in e.steps)
            cost = f"${e.cost_usd:,.4f}" + (f" (batch discount {e.discount:g} applied)" if e.batch else "") \
                if e.priced else "unknown (no price set)"
            if e.batch:
                when = "within the batch window (24h)"
            elif e.latency_s is not None:
                when = (f"~{_duration(e.requests * e.latency_s / e.concurrency)} at {e.concurrency} in flight "
                        f"(probe: {e.latency_s:.2f}s a request)")
            else:
                when = "unknown (no probe)"
            lines.append(f"  model {e.model}: at most {e.requests:,} requests ({steps}); prompt tokens "
                         f"~{e.prompt_tokens:,} ({e.counted_with}); completion tokens at most {e.completion_tokens:,} "
                         f"(every request at max_tokens); cost at most {cost}; time {when}")
        if e.other_stages:
            lines.append(f"  model {e.model}: also called by {', '.join(e.other_stages)} (requests depend on "
                         f"the data)")
    return lines
