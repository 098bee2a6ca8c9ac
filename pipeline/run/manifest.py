"""``manifest.json``: what a run is, and where each stage stands. Rewritten atomically after every change."""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import time
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.records import write_json

MANIFEST = "manifest.json"
PACKAGES = ["torch", "transformers", "datasets", "accelerate", "peft", "openai", "vllm", "rapidfuzz", "pydantic",
            "jinja2", "gguf"]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "seedtune": __version__}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def now_iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / MANIFEST
    if not p.exists():
        return None
    return json.loads(p.read_text(encoding="utf-8"))


def write_manifest(run_dir: Path, data: dict[str, Any]) -> None:
    data["updated"] = now_iso()
    write_json(Path(run_dir) / MANIFEST, data)
