"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config, bad seed file, unreachable server, missing extra).

    The message must name the file, line or key it concerns; the CLI prints it without a traceback.
    """


class MissingExtra(UserError):
    def __init__(self, what: str, extra: str, package: str | None = None):
        pkg = package or extra
        super().__init__(
            f"{what} needs the optional package '{pkg}': pip install \"seedtune[{extra}]\""
        )
