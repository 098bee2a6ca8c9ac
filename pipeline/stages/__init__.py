"""The table of stage kinds. Each entry is a module with ``Options`` and ``run(ctx)``.

The CLI hands this table to the config loader and the runner; a stage's kind defaults to its name in
the config, and ``kind:`` picks another when two stages share a kind.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES: dict[str, str] = {
    "seeds": "pipeline.stages.seeds",
    "generate": "pipeline.stages.generate",
    "filter": "pipeline.stages.filter",
    "dedup": "pipeline.stages.dedup",
    "judge": "pipeline.stages.judge",
    "decontaminate": "pipeline.stages.decontaminate",
    "template": "pipeline.stages.template",
    "export": "pipeline.stages.export",
    "sft": "pipeline.stages.sft",
    "evaluate": "pipeline.stages.evaluate",
}


def stage_module(kind: str, table: dict[str, str] | None = None) -> ModuleType:
    """Import a stage kind's module (``package.module``, or ``package.module:attribute``)."""
    target = (table or STAGES)[kind]
    module, _, attr = target.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attr) if attr else loaded
