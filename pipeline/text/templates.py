"""Rendering Jinja templates from prompts/ (or a user's path) with data. Never builds a template from data."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from pipeline.errors import UserError
from pipeline.paths import prompt_path


@lru_cache(maxsize=1)
def _env() -> SandboxedEnvironment:
    return SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


@lru_cache(maxsize=128)
def _load(path: str, mtime: float) -> jinja2.Template:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read template ({e})") from None
    try:
        return _env().from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: template syntax error: {e.message}") from None


def template_file(name_or_path: str) -> Path:
    p = prompt_path(name_or_path)
    if not p.exists():
        raise UserError(f"template '{name_or_path}' not found (looked at {p})")
    return p


def render(name_or_path: str, **data: Any) -> str:
    p = template_file(name_or_path)
    try:
        return _load(str(p), p.stat().st_mtime).render(**data)
    except jinja2.UndefinedError as e:
        raise UserError(f"{p}: {e.message}") from None
