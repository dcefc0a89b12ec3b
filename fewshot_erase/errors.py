"""The tool's own exceptions. Each carries one user-facing line: the problem and the fix.

Only the CLI turns them into exit codes; the API raises them as they are, naming its keywords where the CLI's
messages name options.
"""

import contextvars
import functools
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


OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")
# an option whose keyword is not its name with underscores
KEYWORDS = {"no-preserve": "preserve_weight=0", "format": "fmt", "file": "target", "prompt": "prompts",
            "grid": "grid_path", "concept": "specs"}
FROM_CLI = contextvars.ContextVar("fewshot_erase_from_cli", default=False)  # set while a command runs


def in_python_terms(message: str, keywords: dict[str, str] = KEYWORDS) -> str:
    """The message for a caller of the Python API: `lr` where the CLI's says --lr."""
    return OPTION.sub(lambda m: f"`{keywords.get(m.group(1), m.group(1).replace('-', '_'))}`", message)


def python_terms(function=None, /, **renamed):
    """For the public API's functions: their errors name keywords unless the CLI called them. `renamed`: this
    function's own keyword for an option, where it is not the usual one (`@python_terms(concept="concept")`)."""
    if function is None:
        return lambda decorated: python_terms(decorated, **renamed)
    keywords = KEYWORDS | renamed

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except EraseError as error:
            if FROM_CLI.get():
                raise
            raise type(error)(in_python_terms(str(error), keywords)) from error.__cause__

    return wrapper


def first_line(error: BaseException, limit: int = 200) -> str:
    """A library's error, cut to what fits in the tool's one-line message (some span pages or carry ANSI codes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
