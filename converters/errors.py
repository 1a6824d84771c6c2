"""The errors that leave parityport as exit codes instead of tracebacks."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

# The exit code of an exception nobody expected: a fault of parityport's, which must not read as a
# failed check (1) or bad input (2) to a script that tells those apart.
INTERNAL_ERROR = 3


class InputError(Exception):
    """Bad input or usage: the command exits 2 with one line naming the file and the problem.

    `str(error)` is that line: ``"<path>: <problem>"`` when a path is known,
    otherwise just the problem. Every reader, converter and the writer raise only
    this (or a subclass) for anything wrong with what the user gave us.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class UnsafeInputError(InputError):
    """The file asks for something we refuse to do (run code, follow an external link)."""


class CheckFailed(Exception):
    """A parity or expected-accuracy check failed: the command exits 1."""


class UsageParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other exit-2 error: argparse's
    own prints the whole usage block first. Subcommand parsers made from it are of this class too."""

    def error(self, message: str):  # noqa: D102 (argparse's hook; never returns)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def internal_error(prog: str) -> int:
    """Print the traceback of the exception being handled and a line saying that it is parityport's
    fault, not a failed check or bad input; return INTERNAL_ERROR."""
    traceback.print_exc()
    kind, error = sys.exc_info()[:2]
    problem = str(error).splitlines()[0] if str(error) else ""
    print(f"{prog}: internal error: {kind.__name__}{': ' * bool(problem)}{problem} (a fault in parityport, not a "
          "failed check or bad input: the traceback above says where)", file=sys.stderr)
    return INTERNAL_ERROR
