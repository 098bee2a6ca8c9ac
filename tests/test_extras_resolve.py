"""``pip install "seedtune[vllm]"`` resolves: seedtune's own requirements stay loose enough for vLLM's pins
(vLLM 0.33 pins torch==2.14.0 and transformers<5.21). A dry run from a clean slate (``--ignore-installed``);
about 1.5 minutes, and skipped when pip cannot reach a package index."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-build-isolation",
       "--disable-pip-version-check", "-q"]


def _index_reachable() -> bool:
    try:
        r = subprocess.run(PIP + ["--no-deps", "vllm"], capture_output=True, text=True, timeout=120)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return r.returncode == 0


@pytest.mark.slow
@pytest.mark.network
def test_vllm_extra_resolves(tmp_path):
    if not _index_reachable():
        pytest.skip("pip cannot reach a package index that has vllm")
    report = tmp_path / "report.json"
    r = subprocess.run(PIP + ["--report", str(report), f"{ROOT}[vllm]"], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"]
              for i in json.loads(report.read_text())["install"]}
    assert {"seedtune", "vllm", "torch", "transformers", "openai", "datasets"} <= set(chosen), chosen
