"""The errors that leave parityport as exit codes instead of tracebacks."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from converters.display import MESSAGE_LIMIT, PATH_LIMIT, shown

# The exit code of an exception nobody expected: a fault of parityport's, which must not read as a
# failed check (1) or bad input (2) to a script that tells those apart.
INTERNAL_ERROR = 3


class InputError(Exception):
    """Bad input or usage: the command exits 2 with one line naming the file and the problem.

    `str(error)` is that line: ``"<path>: <problem>"`` when a path is known,
    otherwise just the problem, both `shown` (escaped and cut: the names in a problem come from
    the file); `path` and `problem` keep the exact text. Every reader, converter and the writer
    raise only this (or a subclass) for anything wrong with what the user gave us.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        line = shown(problem, MESSAGE_LIMIT)
        super().__init__(f"{shown(self.path, PATH_LIMIT)}: {line}" if self.path else line)


class UnsafeInputError(InputError):
    """The file asks for something we refuse to do (run code, follow an external link)."""


class CheckFailed(Exception):
    """A parity or expected-accuracy check failed: the command exits 1. Its message names the
    source file, so it is `shown` like an InputError's."""

    def __init__(self, message: str) -> None:
        # room for the three paths such a line names (source, kept report, output) and the problem
        super().__init__(shown(message, MESSAGE_LIMIT + 3 * PATH_LIMIT))


class UsageParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other exit-2 error: argparse's
    own prints the whole usage block first. Subcommand parsers made from it are of this class too."""

    def error(self, message: str):  # noqa: D102 (argparse's hook; never returns)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class QuotedTraceback(Exception):
    """An exception whose message is another process's traceback: printed a line per line, each `shown`."""


def print_traceback() -> None:
    """Print the traceback of the exception being handled, each line `shown`: an exception's
    message may quote a name from the file, so it is one line however many newlines it holds."""
    for line in _traceback_lines(traceback.TracebackException(*sys.exc_info())):
        print(shown(line, MESSAGE_LIMIT), file=sys.stderr)


def _traceback_lines(exception: traceback.TracebackException):
    """The lines `traceback.print_exc` prints, with each exception's message kept to one line."""
    if exception.__cause__ is not None:
        yield from _traceback_lines(exception.__cause__)
        yield from ("", "The above exception was the direct cause of the following exception:", "")
    elif exception.__context__ is not None and not exception.__suppress_context__:
        yield from _traceback_lines(exception.__context__)
        yield from ("", "During handling of the above exception, another exception occurred:", "")
    yield "Traceback (most recent call last):"
    for frame in exception.stack.format():
        yield from frame.rstrip("\n").split("\n")
    last = "".join(exception.format_exception_only()).rstrip("\n")
    quoted = isinstance(exception.exc_type, type) and issubclass(exception.exc_type, QuotedTraceback)
    yield from last.split("\n") if quoted else (last,)


def internal_error(prog: str) -> int:
    """Print the traceback of the exception being handled and a line saying that it is parityport's
    fault, not a failed check or bad input; return INTERNAL_ERROR."""
    print_traceback()
    kind, error = sys.exc_info()[:2]
    problem = shown(str(error).splitlines()[0], MESSAGE_LIMIT) if str(error) else ""
    print(f"{prog}: internal error: {kind.__name__}{': ' * bool(problem)}{problem} (a fault in parityport, not a "
          "failed check or bad input: the traceback above says where)", file=sys.stderr)
    return INTERNAL_ERROR
