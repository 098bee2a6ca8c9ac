"""The pipeline config: one YAML file validated by pydantic, with line numbers in every error.

* top level: ``name``, ``run_dir`` (default ``runs/<name>``), ``seed``, ``models``, ``stages``;
* ``stages`` is an ordered mapping from a stage name to its options; the kind defaults to the name
  (``kind:`` when two stages share one);
* ``${VAR}`` and ``${VAR:-default}`` are replaced from the environment; the config *as given* (with the
  placeholders, never their values) is what the manifest keeps;
* ``--set dotted.path=value`` overrides any key and is validated like the file.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import UserError
from pipeline.hashing import SECRET_KEY_RE, redact_secrets, strip_credentials_in_text
from pipeline.models import COMMON_KEYS, BACKENDS, Budget, Price, RayOptions, backend_module, capacity, worker_gpus
from pipeline.stages import STAGES, stage_module

ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
STAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class TopLevel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    run_dir: str | None = None
    seed: int = 0
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    stages: dict[str, dict[str, Any] | None]


@dataclass
class ModelSpec:
    name: str
    backend: str
    options: BaseModel
    price: Price
    budget: Budget
    executor: str = "local"  # local | ray
    ray: RayOptions = field(default_factory=RayOptions)


@dataclass
class StageSpec:
    name: str
    kind: str
    options: BaseModel


@dataclass
class Config:
    path: Path
    name: str
    run_dir: Path
    seed: int
    models: dict[str, ModelSpec]
    stages: list[StageSpec]
    as_given: dict[str, Any]  # the file's data before interpolation, with overrides applied, secrets redacted
    overrides: list[str] = field(default_factory=list)

    @property
    def overrides_redacted(self) -> list[str]:
        return [redact_override(o) for o in self.overrides]

    @property
    def hash(self) -> str:
        blob = json.dumps(self.as_given, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---- YAML with line numbers ---------------------------------------------------------------------------

def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map every key path to the 1-based line it appears on."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[path + (key,)] = k.start_mark.line + 1
            _line_map(v, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[path + (i,)] = v.start_mark.line + 1
            _line_map(v, path + (i,), out)
    return out


def _where(path_file: Path, lines: dict[tuple, int], loc: tuple, overridden: set[tuple]) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in overridden:
            return f"{path_file} (--set {'.'.join(map(str, loc[:n]))})"
        if loc[:n] in lines:
            return f"{path_file}:{lines[loc[:n]]}"
    return str(path_file)


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _interpolate(value: Any, loc: tuple, fail) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, loc + (k,), fail) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, loc + (i,), fail) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        def repl(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            got = os.environ.get(var)
            if got is None or (got == "" and default is not None):
                if default is None:
                    fail(loc, f"environment variable {var} is not set (use ${{{var}:-default}} for a default)")
                    return ""
                return default
            return got

        full = ENV_RE.fullmatch(value)
        out = ENV_RE.sub(repl, value)
        # A value that is only a placeholder keeps YAML typing ("${N:-3}" -> 3).
        if full:
            try:
                return yaml.safe_load(out) if out != "" else out
            except yaml.YAMLError:
                return out
        return out
    return value


def _apply_override(data: dict, expr: str) -> tuple:
    if "=" not in expr:
        raise UserError(f"--set {expr}: expected dotted.path=value")
    dotted, raw = expr.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise UserError(f"--set {expr}: empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)) and not raw.strip().startswith(("{", "[")):
        value = raw  # e.g. "?" or "- x": plain text, not YAML structure
    if value is None and raw.strip() not in ("null", "~"):
        value = raw
    node = data
    for k in keys[:-1]:
        if not isinstance(node, dict):
            raise UserError(f"--set {expr}: '{k}' is not a mapping")
        if node.get(k) is None:
            node[k] = {}
        node = node[k]
    if not isinstance(node, dict):
        raise UserError(f"--set {expr}: '{keys[-2]}' is not a mapping")
    node[keys[-1]] = value
    return tuple(keys)


def redact(data: Any) -> Any:
    """Drop values of keys that look like secrets (an API key written into the file by mistake) and the
    credentials inside URLs."""
    return redact_secrets(data)


def _placeholder(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def redact_override(expr: str) -> str:
    """``--set a.api_key=sk-...`` -> ``a.api_key=<redacted>``, as the file's own keys are."""
    dotted, sep, raw = expr.partition("=")
    last = dotted.strip().split(".")[-1]
    if sep and SECRET_KEY_RE.search(last) and not _placeholder(raw):
        return f"{dotted}=<redacted>"
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):
        return f"{dotted}={json.dumps(redact(value))}"
    return f"{dotted}{sep}{strip_credentials_in_text(raw)}"


def _error_line(errors: list[dict], prefix: tuple, where) -> str:
    msgs = []
    for err in errors:
        loc = prefix + tuple(err["loc"])
        etype = err["type"]
        if etype == "extra_forbidden":
            msg = "unknown key"
            fields = err.get("ctx", {}).get("fields")
            if fields:
                close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
                if close:
                    msg += f" (did you mean '{close[0]}'?)"
        elif etype == "missing":
            msg = "missing required key"
        else:
            msg = err["msg"].removeprefix("Value error, ")  # a validator's own message reads as it is
        msgs.append(f"{where(loc)}: {_dotted(loc)}: {msg}")
    return "; ".join(msgs[:3]) + (f" (and {len(msgs) - 3} more)" if len(msgs) > 3 else "")


def _validate(model: type[BaseModel], data: Any, prefix: tuple, where) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # Enrich extra_forbidden errors with the allowed field names for suggestions.
        errs = e.errors()
        for err in errs:
            if err["type"] == "extra_forbidden":
                err.setdefault("ctx", {})["fields"] = list(model.model_fields)
        raise UserError(_error_line(errs, prefix, where)) from None


def load_config(path: str | Path, overrides: list[str] | None = None,
                stages_table: dict[str, str] | None = None) -> Config:
    path = Path(path)
    table = stages_table or STAGES
    overrides = list(overrides or [])
    if not path.exists():
        raise UserError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config must be a mapping with 'name' and 'stages'")
    lines = _line_map(node) if node is not None else {}
    overridden: set[tuple] = set()
    for expr in overrides:
        overridden.add(_apply_override(data, expr))
    as_given = redact(copy.deepcopy(data))

    def where(loc: tuple) -> str:
        return _where(path, lines, loc, overridden)

    def fail(loc: tuple, msg: str) -> None:
        raise UserError(f"{where(loc)}: {_dotted(loc)}: {msg}")

    resolved = _interpolate(data, (), fail)
    top = _validate(TopLevel, resolved, (), where)
    assert isinstance(top, TopLevel)

    models: dict[str, ModelSpec] = {}
    for mname, mdata in top.models.items():
        loc = ("models", mname)
        mdata = dict(mdata or {})
        backend = mdata.get("backend")
        if backend is None:
            fail(loc, f"missing required key 'backend' (one of {', '.join(BACKENDS)})")
        if backend not in BACKENDS:
            close = difflib.get_close_matches(str(backend), list(BACKENDS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            fail(loc + ("backend",), f"unknown backend '{backend}'{hint}; one of {', '.join(BACKENDS)}")
        price = _validate(Price, mdata.get("price") or {}, loc + ("price",), where)
        budget = _validate(Budget, mdata.get("budget") or {}, loc + ("budget",), where)
        executor = mdata.get("executor") or "local"
        if executor not in ("local", "ray"):
            fail(loc + ("executor",), f"unknown executor '{executor}'; one of local, ray")
        ray = _validate(RayOptions, mdata.get("ray") or {}, loc + ("ray",), where)
        rest = {k: v for k, v in mdata.items() if k not in COMMON_KEYS}
        options = _validate(backend_module(backend).Options, rest, loc, where)
        need = worker_gpus(backend, options)
        if executor == "ray" and ray.num_gpus_per_worker is not None and ray.num_gpus_per_worker < need:
            fail(loc + ("ray", "num_gpus_per_worker"), f"{ray.num_gpus_per_worker:g} GPUs per worker, but each "
                 f"worker builds one {backend} backend, which needs {need:g} (leave it out to reserve that)")
        models[mname] = ModelSpec(mname, backend, options, price, budget, executor, ray)  # type: ignore[arg-type]

    stages: list[StageSpec] = []
    if not top.stages:
        fail(("stages",), "no stages given")
    for sname, sdata in top.stages.items():
        loc = ("stages", sname)
        if not STAGE_NAME_RE.fullmatch(str(sname)):
            fail(loc, "a stage name is a plain folder name: letters, digits, '_' and '-' (no '/', '.' or '..')")
        sdata = dict(sdata or {})
        kind = sdata.pop("kind", sname)
        if kind not in table:
            close = difflib.get_close_matches(str(kind), list(table), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            key = loc + ("kind",) if "kind" in (top.stages[sname] or {}) else loc
            fail(key, f"unknown stage kind '{kind}'{hint}; one of {', '.join(table)}")
        options = _validate(stage_module(kind, table).Options, sdata, loc, where)
        for used in stage_models(stage_module(kind, table), options):
            if used not in models:
                fail(loc + _path_to(sdata, used), f"no model named '{used}' under models: "
                                                  f"({', '.join(models) or 'none defined'})")
        if hasattr(stage_module(kind, table), "resolve"):  # defaults that depend on the models (a round's size)
            options = stage_module(kind, table).resolve(options, lambda m: model_capacity(models[m]))
        stages.append(StageSpec(sname, kind, options))

    run_dir = Path(top.run_dir) if top.run_dir else Path("runs") / top.name
    return Config(path=path, name=top.name, run_dir=run_dir, seed=top.seed, models=models, stages=stages,
                  as_given=as_given, overrides=overrides)


def model_capacity(spec: ModelSpec) -> int:
    """Requests a model runs at once: its backend's capacity, times its workers on Ray."""
    return capacity(spec.backend, spec.options) * (spec.ray.workers if spec.executor == "ray" else 1)


def _path_to(data: Any, value: str) -> tuple:
    """The keys leading to ``value`` in a stage's options as given (a model named under ``evaluation.judge``)."""
    if isinstance(data, dict):
        for k, v in data.items():
            if v == value:
                return (k,)
            sub = _path_to(v, value)
            if sub:
                return (k, *sub)
    return ()


def stage_models(module: Any, options: BaseModel) -> list[str]:
    """The model names a stage calls."""
    if hasattr(module, "models"):
        return list(module.models(options))
    name = getattr(options, "model", None)
    return [name] if isinstance(name, str) else []
