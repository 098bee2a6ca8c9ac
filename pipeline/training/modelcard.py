"""How a card names a model: a Hub id where the model is known, else a spec without local absolute paths."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.models.loading import PKG_PREFIX
from pipeline.paths import ROOT

# Models seedtune ships or loads from packages, by the spec's file stem: the Hub repository they come from.
KNOWN_HUB_IDS = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(spec: str) -> str | None:
    """The Hub id of a model spec: the spec itself when it is one, a known packaged model's origin, else None."""
    if spec.startswith(PKG_PREFIX) or spec.endswith(".gguf") or Path(spec).exists():
        stem = Path(spec.rstrip("/")).name.split(".")[0]
        return KNOWN_HUB_IDS.get(stem)
    return spec if HUB_ID.match(spec) else None


def display_name(spec: str, run_dir: Path) -> str:
    """A model spec or file as a card shows it: a Hub id or ``pkg://`` spec as given, seedtune's own files as
    ``data/...``, any other path relative to the run folder; never an absolute local path."""
    if spec.startswith(PKG_PREFIX) or not os.path.isabs(spec):
        return spec
    path = Path(spec).resolve()
    if path.is_relative_to(ROOT) and not Path(run_dir).resolve().is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    try:
        return os.path.relpath(path, Path(run_dir).resolve())
    except ValueError:  # another drive
        return path.name
