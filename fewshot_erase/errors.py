"""The tool's own exceptions. Each carries one user-facing line: the problem and the fix.

Only the CLI turns them into exit codes; the API raises them as they are.
"""

import re


class EraseError(Exception):
    """Base class: `str(error)` is the one line shown to the user."""

    exit_code = 1


class BadInput(EraseError):
    """The user's input cannot be used (exit code 2). Nothing was written."""

    exit_code = 2


class RunFailure(EraseError):
    """Something failed while running (exit code 1). Nothing was written."""

    exit_code = 1


class EraseWarning(UserWarning):
    """Something worth telling the user that does not stop the run."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """A library's error, cut to what fits in the tool's one-line message (some span pages or carry ANSI codes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
