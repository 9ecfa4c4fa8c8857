"""Exceptions that carry the process exit code (DESIGN.md section 2).

0 ok, 1 failure, 2 bad input or usage, 3 a diagnosis that found a problem. Core code raises these;
the CLI turns them into a one-paragraph message and the exit code, never a traceback.
"""

from __future__ import annotations

# The most characters of one value from the user's input (a record id, a config value, a line of a file) that
# a message quotes: a 1 MB record id must not become 1 MB of stderr.
QUOTE_LIMIT = 200


def shorten(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` as a message quotes it: whole up to `limit` characters, else its start and its length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


class Evo2Error(Exception):
    """A failure the user should see as a message, not a traceback."""

    exit_code = 1


class InputError(Evo2Error):
    """Bad input or usage: a file, a record, a config key. The message names it and the fix."""

    exit_code = 2


class ConfigError(InputError):
    """A config value that failed validation; `where` is 'FILE:LINE' or '--set'."""

    def __init__(self, key: str, message: str, where: str | None = None, hint: str | None = None):
        self.key, self.where, self.hint = key, where, hint
        text = f"{where}: " if where else ""
        text += f"config key '{shorten(key)}': {message}" if key else message
        if hint:
            text += f"\n  hint: {hint}"
        super().__init__(text)


class DiagnosisFailed(Evo2Error):
    """A diagnosis ran to completion and found a problem (for CI gating)."""

    exit_code = 3
