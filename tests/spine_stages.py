"""Stage modules used only by the runner tests (test doubles for the generation stages).

``ask``: in rounds, asks the model to continue a numbered list whose examples depend on earlier answers
(like Self-Instruct's bootstrap), so request i+1 depends on the answer to request i.
``upper``: a model-free stage whose output depends on an option (for recompute/restore tests).
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict

from pipeline.models.base import Completion, GenParams, ModelRequest
from pipeline.records import Instance, Task
from pipeline.stages.context import StageContext


class AskOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    rounds: int = 10
    batch_size: int = 4


class UpperOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    suffix: str = "!"


class ask:  # noqa: N801 - a module-like namespace
    Options = AskOptions

    @staticmethod
    def run(ctx: StageContext) -> None:
        seeds = [t.instruction for t in ctx.read_records(ctx.find_input("seeds"))]
        client = ctx.model(ctx.options.model)
        pool: list[str] = []
        out: list[Task] = []
        for r in range(ctx.options.rounds):
            reqs = []
            for b in range(ctx.options.batch_size):
                i = r * ctx.options.batch_size + b
                rng = random.Random(f"{ctx.seed}:{i}")
                examples = rng.sample(seeds, 2) + (rng.sample(pool, 1) if pool else [])
                prompt = "".join(f"{n + 1}. {e}\n" for n, e in enumerate(examples)) + f"{len(examples) + 1}."
                reqs.append(ModelRequest(prompt=prompt, params=GenParams(temperature=0.7, seed=i), tag=str(i)))
            for i, res in enumerate(client.generate(reqs)):
                if isinstance(res, Completion):
                    text = res.texts[0].strip().splitlines()[0]
                    pool.append(text)
                    out.append(Task(id=f"gen_{r}_{i}", instruction=text, instances=[Instance(output="x")],
                                    source="generated"))
        ctx.stats.rows_in = len(seeds)
        ctx.write_records(out)


class upper:  # noqa: N801
    Options = UpperOptions

    @staticmethod
    def run(ctx: StageContext) -> None:
        recs = list(ctx.read_records())
        ctx.stats.rows_in = len(recs)
        ctx.write_records(t.model_copy(update={"instruction": t.instruction.upper() + ctx.options.suffix})
                          for t in recs)


class PairOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    first: str
    second: str
    requests: int = 6


class pair:  # noqa: N801
    """Asks two models the same prompts, one request at a time, alternating (for per-model budgets)."""

    Options = PairOptions

    @staticmethod
    def models(options: PairOptions) -> list[str]:
        return [options.first, options.second]

    @staticmethod
    def run(ctx: StageContext) -> None:
        out = []
        for i in range(ctx.options.requests):
            for name in (ctx.options.first, ctx.options.second):
                req = ModelRequest(prompt=f"Say something about topic {i} 1.", tag=f"{name}:{i}")
                res = ctx.model(name).generate([req])[0]
                out.append(Task(id=f"{name}_{i}", instruction=res.texts[0].strip().splitlines()[0],
                                instances=[Instance(output="x")], source="generated"))
        ctx.write_records(out)
