"""The generate stage's options: one model, a mode, the stopping rule, templates and sampling per step."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.models.base import GenParams
from pipeline.text.rules import InstructionRules


class Templates(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap: str = "self_instruct/bootstrap.j2"
    bootstrap_chat: str = "self_instruct/bootstrap_chat.j2"
    classify: str = "self_instruct/classify.j2"
    input_first: str = "self_instruct/instances_input_first.j2"
    output_first: str = "self_instruct/instances_output_first.j2"
    answer: str = "self_instruct/answer.j2"
    alpaca: str = "alpaca/generate.j2"
    alpaca_chat: str = "alpaca/generate_chat.j2"
    evol_depth: str = "evol/depth.j2"
    evol_breadth: str = "evol/breadth.j2"


def _params(**kw) -> GenParams:
    return GenParams(**kw)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    mode: Literal["self_instruct", "alpaca", "evol"] = "self_instruct"
    target: int = Field(100, ge=1)  # instructions that pass the online filters
    max_requests: int = Field(1000, ge=1)  # bootstrap (or alpaca) requests at most
    # Requests per round; None: what the model runs at once (its backend's capacity, times its Ray workers),
    # resolved when the config is loaded, so that the stage's fingerprint covers it.
    batch_size: int | None = Field(None, ge=1)
    num_prompt_instructions: int = Field(8, ge=1)  # in-context instructions per bootstrap prompt
    num_machine_examples: int = Field(2, ge=0)  # of them from the machine pool once it holds this many
    bootstrap_style: Literal["completion", "chat"] = "completion"
    first_line_only: bool = False  # keep only the first line of each item (for small models)
    classify: bool = True  # false: every new task is treated as non-classification
    classify_examples: int = 12
    instances_style: Literal["input_first", "answer"] = "input_first"
    instance_examples: int = 2
    max_instances: int = Field(5, ge=1)
    alpaca_style: Literal["completion", "chat"] = "completion"
    alpaca_examples: int = 3
    alpaca_num_tasks: int = 20
    evol_rounds: int = Field(3, ge=1)  # evol: rounds of evolution, each one journaled batch
    evol_breadth_share: float = Field(0.2, ge=0.0, le=1.0)  # evol: share of in-breadth evolutions
    evol_min_words: int = Field(3, ge=1)  # evol: shorter evolved instructions are eliminated
    evol_params: GenParams = Field(default_factory=lambda: _params(temperature=0.7, max_tokens=256))
    json_mode: bool = False  # ask the backend for JSON output in chat prompts
    templates: Templates = Field(default_factory=Templates)
    bootstrap_params: GenParams = Field(default_factory=lambda: _params(
        temperature=0.7, top_p=0.5, max_tokens=1024, presence_penalty=2.0, stop=["\n\n", "\n16."]))
    classify_params: GenParams = Field(default_factory=lambda: _params(temperature=0.0, max_tokens=3))
    instances_params: GenParams = Field(default_factory=lambda: _params(
        temperature=0.0, max_tokens=300, presence_penalty=1.5, stop=["\nTask:"]))
    alpaca_params: GenParams = Field(default_factory=lambda: _params(temperature=1.0, top_p=1.0, max_tokens=3072))
    instruction_rules: InstructionRules = Field(default_factory=InstructionRules)
    rouge_threshold: float = Field(0.7, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _examples_fit(self) -> Options:
        if self.num_machine_examples >= self.num_prompt_instructions:
            raise ValueError("num_machine_examples must be smaller than num_prompt_instructions")
        return self
