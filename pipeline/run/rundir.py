"""What seedtune owns in a run folder: the lock, the ownership check, and what ``--fresh`` may delete.

seedtune never deletes or moves what it did not write. A folder is a seedtune run when its manifest or its
journal is there; a stage folder is seedtune's when its ``_stage.json`` is.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
OWN_FILES = ("manifest.json", "journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm", "seedtune.log",
             LOCK_FILE)
OWN_DIRS = (".partial", ".scratch", ".backup")
STAGE_FILE = "_stage.json"


def is_run_dir(path: Path) -> bool:
    return (path / "manifest.json").is_file() or (path / "journal.sqlite").is_file()


def ensure_owned(stage_dir: Path) -> None:
    """Stop (exit 2) before moving a folder that seedtune did not write."""
    if not (stage_dir / STAGE_FILE).is_file():
        raise UserError(f"{stage_dir}: exists and was not written by seedtune (no {STAGE_FILE}); "
                        f"move it away or rename the stage — seedtune does not touch it")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def fresh_start(run_dir: Path, config_path: Path, stage_names: list[str]) -> None:
    """Delete a previous run's files — only a seedtune run's, and only what seedtune wrote there."""
    target = run_dir.resolve()
    if not target.exists():
        return
    cwd = Path.cwd().resolve()
    if _inside(cwd, target) or _inside(Path(config_path).resolve().parent, target):
        raise UserError(f"--fresh: run_dir {run_dir} is the working folder or holds the config; refusing to "
                        f"delete anything (set run_dir to a folder of its own, e.g. runs/<name>)")
    if not is_run_dir(target):
        if any(target.iterdir()):
            raise UserError(f"--fresh: {run_dir} is not a seedtune run (no manifest.json or journal.sqlite); "
                            f"nothing was deleted")
        return
    with RunLock(target):
        for name in OWN_DIRS:
            shutil.rmtree(target / name, ignore_errors=True)
        for child in sorted(target.iterdir()):
            if child.is_dir() and (child / STAGE_FILE).is_file():
                shutil.rmtree(child)
        kept = [c.name for c in target.iterdir() if c.name not in OWN_FILES]
        for name in OWN_FILES:
            if name != LOCK_FILE and (target / name).exists():
                (target / name).unlink()
    if kept:
        log.warning("--fresh left %d entries in %s that seedtune did not write: %s", len(kept), run_dir,
                    ", ".join(sorted(kept)[:5]))


class RunLock:
    """An exclusive lock on a run folder for the whole run; a second run stops at once (exit 2)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path.parent}: another seedtune run is using this folder ({holder}); "
                            f"wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
