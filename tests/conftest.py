import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # The README's test command runs two workers on two cores: one compute thread each (and in the processes
    # the tests start). With torch's default of one thread per core, four OpenMP threads would share two cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SHARED_SEEDS = ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture
def shared_seeds() -> Path:
    if not SHARED_SEEDS.exists():
        pytest.skip("../shared/data/self_instruct_seed_tasks.jsonl is not present")
    return SHARED_SEEDS
