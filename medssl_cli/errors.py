"""User-facing errors.

A ``UserError`` is a mistake the user can fix (bad option, missing data, wrong checkpoint). The CLI
prints its one-line message and exits with code 2, without a traceback. Stage functions raise it;
they never call ``sys.exit`` themselves, so they stay usable from Python.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input, reported as one line with the fix. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        # One line, bounded: a message quoting a user's value must never print megabytes.
        self.message = _bounded(message, MAX_MESSAGE)
        self.hint = _bounded(hint, MAX_MESSAGE // 2) if hint else hint
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


MAX_MESSAGE = 2000  # characters of a UserError's message (its hint: half): bounded, yet room for long paths


def _bounded(text: str, n: int) -> str:
    text = " ".join(str(text).split("\n")) if "\n" in str(text) else str(text)
    return text if len(text) <= n else text[: n - 5] + " ... "


def short(value: object, width: int = 80) -> str:
    """A bounded repr of a user's value for messages (cheap even for huge or deeply nested values)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 6, 6, width, width
    return _bounded(r.repr(value), width)


class TrainingDiverged(UserError):
    """The loss became NaN or Inf; the last good checkpoint is kept and the run is marked failed."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The known names closest to ``name`` (for 'did you mean' hints)."""
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not found:
        found = [c for c in choices if name.lower() in c.lower() or c.lower() in name.lower()][:n]
    return found


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    near = closest(name, choices)
    return f"Did you mean: {', '.join(near)}?" if near else f"Known: {', '.join(sorted(choices))}."
