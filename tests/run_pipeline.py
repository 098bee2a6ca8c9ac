"""The seedtune CLI with the runner-test stages added to the stage table (used in subprocesses)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.cli import main  # noqa: E402
from pipeline.stages import STAGES  # noqa: E402

TABLE = {**STAGES, "ask": "spine_stages:ask", "upper": "spine_stages:upper", "pair": "spine_stages:pair"}

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], TABLE))
