"""Training on several ranks without launching them: the schedule counts the world size, and the waits between
ranks have bounds a user sets (the launched runs are in tests/test_torchrun.py)."""

import math
from datetime import timedelta

import pytest

from pipeline.errors import UserError
from pipeline.run import distributed
from pipeline.training.trainer import TrainOptions, training_arguments


@pytest.mark.parametrize("ranks", [1, 2, 8])
def test_warmup_is_its_share_of_the_trainers_own_total_on_any_number_of_ranks(tmp_path, ranks):
    """800 rows, 4 per device, one epoch: the Trainer's dataloader gives 200 steps on one rank, 25 on eight.
    The warm-up is 3% of whichever total the Trainer computes (it asks ``get_warmup_steps`` with it)."""
    args = training_arguments(TrainOptions(epochs=1, per_device_batch_size=4, warmup_ratio=0.03), tmp_path, 0)
    total = 800 // (4 * ranks)
    assert args.get_warmup_steps(total) == math.ceil(0.03 * total)
    assert args.get_warmup_steps(total) <= math.ceil(0.03 * 200 / ranks)


def test_a_warmup_ratio_is_below_one():
    with pytest.raises(ValueError):
        TrainOptions(warmup_ratio=1.5)


def test_the_waits_between_ranks_are_bounded_as_the_user_sets(monkeypatch):
    monkeypatch.delenv("SEEDTUNE_RANK_WAIT_HOURS", raising=False)
    monkeypatch.delenv("SEEDTUNE_RANK_TIMEOUT_MINUTES", raising=False)
    assert distributed.wait_bound() == timedelta(hours=72)
    assert distributed.collective_bound() == timedelta(minutes=60)
    monkeypatch.setenv("SEEDTUNE_RANK_WAIT_HOURS", "0.5")
    monkeypatch.setenv("SEEDTUNE_RANK_TIMEOUT_MINUTES", "5")
    assert distributed.wait_bound() == timedelta(minutes=30)
    assert distributed.collective_bound() == timedelta(minutes=5)
    monkeypatch.setenv("SEEDTUNE_RANK_TIMEOUT_MINUTES", "soon")
    with pytest.raises(UserError, match=r"^SEEDTUNE_RANK_TIMEOUT_MINUTES='soon': not a number of minutes$"):
        distributed.collective_bound()
    monkeypatch.setenv("SEEDTUNE_RANK_TIMEOUT_MINUTES", "0")
    with pytest.raises(UserError, match="must be above 0"):
        distributed.collective_bound()
