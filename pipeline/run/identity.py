"""What a stage's outputs depend on, hashed into its fingerprint.

A fingerprint covers the stage's kind and options; the content of every file its ``dependencies(options)``
names (templates, data, evaluation sets); what its ``identity(options)`` states (e.g. a base model's weights,
as a content hash or a Hub commit); the static identity of every model it calls (each backend's
``identity(options)``: the options that reach the wire, the weights' content hash or Hub commit); the code that runs it (the stage's module and every
``pipeline`` module it imports, transitively, outside the runner); the digests of all earlier stages' outputs;
the run seed. Computing it never loads a model, starts an engine or opens a connection.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline import __version__
from pipeline.config import Config, StageSpec, stage_models
from pipeline.hashing import content_hash, sha256_file, tree_files
from pipeline.models import model_identity

STAGE_FILE = "_stage.json"
# The runner's own machinery is not a stage's code: a fix there must not recompute every stage.
NOT_STAGE_CODE = ("pipeline.run", "pipeline.cli", "pipeline.config", "pipeline.__main__")


def dir_digest(path: Path) -> str:
    """Content digest of a stage folder (every file but _stage.json)."""
    h = hashlib.sha256()
    root = Path(path)
    for f in (f for f in tree_files(root) if f.name != STAGE_FILE):
        h.update(str(f.relative_to(root)).encode() + b"\0" + sha256_file(f).encode() + b"\0")
    return h.hexdigest()


def stage_dependencies(module: Any, options: Any) -> dict[str, str]:
    deps = module.dependencies(options) if hasattr(module, "dependencies") else []
    return {str(p): content_hash(p) for p in deps}


def _imports(name: str, source: str, is_package: bool) -> set[str]:
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == "pipeline" or m.startswith("pipeline.")}


def _source_of(name: str) -> tuple[Path, bool] | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin), spec.submodule_search_locations is not None


@lru_cache(maxsize=None)
def code_hash(module_name: str) -> str:
    """Hash of a stage module's source and of every pipeline module it imports (transitively)."""
    seen: dict[str, str] = {}
    todo = [module_name]
    while todo:
        name = todo.pop()
        if name in seen or name == "pipeline" or name.startswith(NOT_STAGE_CODE):
            continue
        found = _source_of(name)
        if found is None:
            continue
        path, is_package = found
        source = path.read_text(encoding="utf-8")
        seen[name] = hashlib.sha256(source.encode()).hexdigest()
        todo.extend(_imports(name, source, is_package))
    return hashlib.sha256(json.dumps(sorted(seen.items())).encode()).hexdigest()[:20]


def model_identities(config: Config, module: ModuleType, spec: StageSpec) -> dict[str, Any]:
    out = {}
    for name in stage_models(module, spec.options):
        m = config.models[name]
        out[name] = model_identity(m.backend, m.options)
    return out


def fingerprint(config: Config, spec: StageSpec, module: ModuleType, upstream: list[tuple[str, str]]) -> str:
    payload = {
        "seedtune": __version__,
        "kind": spec.kind,
        "options": spec.options.model_dump(mode="json"),
        "files": stage_dependencies(module, spec.options),
        "identity": module.identity(spec.options) if hasattr(module, "identity") else None,
        "models": model_identities(config, module, spec),
        "code": code_hash(getattr(module, "__module__", None) or module.__name__),
        "upstream": upstream,
        "seed": config.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
