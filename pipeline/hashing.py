"""Content hashes of files and folders, and URLs without credentials.

A file's SHA-256 is cached by absolute path, size and modification time (``~/.cache/seedtune/hashes.sqlite``,
or ``$SEEDTUNE_CACHE``), so a 14 GB checkpoint is read once and a changed file is always read again. Nothing
here imports anything of seedtune.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

_SKIP_NAMES = {".git", "__pycache__", ".cache"}
_SECRET_QUERY = re.compile(r"(api[_-]?key|key|token|secret|password|sig|signature)$", re.I)


def cache_root() -> Path:
    base = os.environ.get("SEEDTUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "seedtune"
    return Path(base)


def _db() -> sqlite3.Connection | None:
    try:
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(root / "hashes.sqlite"), timeout=30, isolation_level=None)
        conn.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                     "sha256 TEXT)")
        return conn
    except (OSError, sqlite3.Error):
        return None  # a read-only home: hash every time


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, cached by (absolute path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    conn = _db()
    try:
        if conn is not None:
            row = conn.execute("SELECT size, mtime_ns, sha256 FROM files WHERE path = ?", (str(p),)).fetchone()
            if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
                return row[2]
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = h.hexdigest()
        if conn is not None:
            try:
                conn.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?)",
                             (str(p), st.st_size, st.st_mtime_ns, digest))
            except sqlite3.Error:
                pass
        return digest
    finally:
        if conn is not None:
            conn.close()


def tree_files(path: str | Path) -> list[Path]:
    root = Path(path)
    return sorted(f for f in root.rglob("*")
                  if f.is_file() and not any(part in _SKIP_NAMES for part in f.relative_to(root).parts))


def content_hash(path: str | Path) -> str:
    """Hash of a file's bytes, or of a folder's files (relative names and bytes); "missing" if absent."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in tree_files(p):
            h.update(str(f.relative_to(p)).encode() + b"\0" + sha256_file(f).encode() + b"\0")
        return "dir:" + h.hexdigest()
    return "missing"


def strip_credentials(url: str) -> str:
    """``https://user:pw@host/v1?api_key=x`` -> ``https://host/v1?api_key=<redacted>``; other text unchanged."""
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1] if "@" in parts.netloc else parts.netloc
    query = parts.query
    if query:
        pairs = []
        for pair in query.split("&"):
            k, sep, v = pair.partition("=")
            pairs.append(f"{k}=<redacted>" if sep and _SECRET_QUERY.search(k) else pair)
        query = "&".join(pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


SECRET_KEY_RE = re.compile(r"(api[_-]?key|token|secret|password)$", re.I)


def redact_secrets(data: object) -> object:
    """Values of keys that look like secrets become "<redacted>" (placeholders like ${VAR} stay); URLs lose
    their credentials. For anything written down: identities, manifests, cards."""
    if isinstance(data, dict):
        return {k: ("<redacted>" if SECRET_KEY_RE.search(str(k)) and not (isinstance(v, str) and "${" in v)
                    else redact_secrets(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [redact_secrets(v) for v in data]
    if isinstance(data, str):
        return strip_credentials_in_text(data)
    return data


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def strip_credentials_in_text(text: str) -> str:
    """Every URL inside ``text`` without its credentials (for log lines and error messages)."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: strip_credentials(m.group(0)), text)
