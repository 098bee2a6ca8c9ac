"""Training and validation examples: the task-level split, and reading the export stage's dataset."""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.records import TrainingExample


def split_by_task(examples: list[TrainingExample], fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation), split by task so that no task has instances on both sides."""
    tasks = sorted({e.task_id for e in examples})
    random.Random(f"{seed}:split").shuffle(tasks)
    n_val = round(len(tasks) * fraction)
    if len(tasks) >= 2 and fraction > 0:
        n_val = min(max(1, n_val), len(tasks) - 1)
    val = set(tasks[:n_val])
    return [e for e in examples if e.task_id not in val], [e for e in examples if e.task_id in val]


def read_dataset(folder: Path) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(train, validation) from a saved DatasetDict (the export stage's ``dataset/``)."""
    import datasets

    dd = datasets.load_from_disk(str(folder))
    rows = lambda split: [TrainingExample.model_validate(r) for r in dd[split]] if split in dd else []  # noqa: E731
    return rows("train"), rows("validation")
