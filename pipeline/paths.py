"""Where the project's own files live (templates, sample data)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS_DIR = ROOT / "prompts"
DATA_DIR = ROOT / "data"


def prompt_path(name_or_path: str | Path) -> Path:
    """A template given by name (``self_instruct/bootstrap.j2``) lives in prompts/; a path is a path."""
    p = Path(name_or_path)
    if p.is_absolute() or p.exists():
        return p
    return PROMPTS_DIR / p
