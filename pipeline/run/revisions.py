"""Hub models pinned to one commit for the life of a run folder.

A model named by a Hub id is identified by the commit its revision resolves to
(:func:`pipeline.models.loading.hub_commit`: the revision itself when it is a commit, else the local Hub cache's
ref, else the Hub). The first run that resolves it records the commit in the manifest (``revisions``:
``"<id>@<revision>": "<commit>"``); every later run of the folder takes it from there. The commit is put into the
option's revision field, so the identity, the journal keys, the fingerprints and what is loaded (in this
process, on Ray workers, on the other ranks) all name that commit — whatever the Hub's branch points at now, and
whether or not the snapshot is downloaded yet.

A Hub model whose commit cannot be had (offline and not in the local cache, no pin) stays unresolved, and a
stage that depends on it is not computed: its answers and outputs would be keyed under a name that changes as
soon as the commit is known.

A backend or stage module names the option fields that hold weights in ``WEIGHTS``: tuples of (model field,
GGUF file field or None, revision field).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from pipeline.config import Config, stage_models
from pipeline.models import backend_module
from pipeline.models.loading import COMMIT_RE, hub_commit, is_hub_id
from pipeline.stages import stage_module


@dataclass
class Pinned:
    config: Config  # the config with every resolvable Hub revision replaced by its commit
    revisions: dict[str, str]  # "<id>@<revision>" -> commit: the manifest's pins and the ones resolved now
    unresolved: dict[str, str] = field(default_factory=dict)  # stage name -> the one line saying why it cannot run


def pin_key(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision or 'main'}"


def _pin_options(options: BaseModel, module: ModuleType, revisions: dict[str, str]) -> tuple[BaseModel, list[str]]:
    """``options`` with each Hub revision replaced by its commit; and the references left unresolved."""
    update: dict[str, Any] = {}
    missing = []
    for spec_field, gguf_field, rev_field in getattr(module, "WEIGHTS", ()):
        spec = getattr(options, spec_field, None)
        gguf = getattr(options, gguf_field, None) if gguf_field else None
        revision = getattr(options, rev_field, None)
        if not isinstance(spec, str) or not is_hub_id(spec, gguf) or (revision and COMMIT_RE.fullmatch(revision)):
            continue
        key = pin_key(spec, revision)
        commit = revisions.get(key) or hub_commit(spec, revision)
        if commit is None:
            missing.append(key)
            continue
        revisions[key] = commit
        update[rev_field] = commit
    return (options.model_copy(update=update) if update else options), missing


def _why(stage: str, refs: list[str]) -> str:
    return (f"stage '{stage}': cannot resolve {', '.join(refs)} to a commit: not in the local Hugging Face cache and "
            f"the Hub cannot be asked (offline or unreachable). Answers and outputs are keyed by the commit, so "
            f"nothing is computed under an unknown one: run once with the Hub reachable, or set the revision to a "
            f"commit hash")


def pin_revisions(config: Config, table: dict[str, str], pinned: dict[str, str]) -> Pinned:
    """Resolve every Hub model of ``config`` to a commit, the manifest's ``pinned`` ones first."""
    revisions = dict(pinned)
    models, model_missing = {}, {}
    for name, spec in config.models.items():
        options, missing = _pin_options(spec.options, backend_module(spec.backend), revisions)
        models[name] = dataclasses.replace(spec, options=options)
        model_missing[name] = missing
    stages, unresolved = [], {}
    for spec in config.stages:
        module = stage_module(spec.kind, table)
        options, missing = _pin_options(spec.options, module, revisions)
        stages.append(dataclasses.replace(spec, options=options))
        missing += [f"model '{m}' ({ref})" for m in stage_models(module, options) for ref in model_missing.get(m, [])]
        if missing:
            unresolved[spec.name] = _why(spec.name, missing)
    return Pinned(dataclasses.replace(config, models=models, stages=stages), revisions, unresolved)
