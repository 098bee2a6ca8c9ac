import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
