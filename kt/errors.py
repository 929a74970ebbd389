"""User-facing errors, and the one-line JSON summaries every command prints.

Anything a user can cause (a missing path, an unknown model name, a cache built for another teacher)
raises `UserError`. Command-line entry points catch it, print its one-line message and exit 2;
every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error caused by the user's input; its message is one line that says what to fix."""


def cli_entry(prog: str) -> Callable:
    """Wrap a `main(argv) -> int` so that a `UserError` becomes one line on stderr and exit code 2."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def main(argv=None) -> int:
            try:
                return fn(argv) or 0
            except UserError as e:
                print(f"{prog}: error: {user_message(e)}", file=sys.stderr)
                return EXIT_USER_ERROR
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130

        return main

    return wrap


def user_message(error: UserError) -> str:
    """The one line of a `UserError`, also when it was raised in a DataLoader worker: PyTorch re-raises a
    worker's exception as the same type with the worker's traceback folded into the message, whose last
    line is `module.ErrorType: the original message`."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().rsplit("\n", 1)[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def print_json_line(obj) -> None:
    """One JSON line in one write: processes of a multi-process job share stdout, and `print` may write
    the text and the newline separately, interleaving lines from different ranks."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line error inside a `UserError`)."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
