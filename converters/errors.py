"""The errors that leave parityport as exit codes instead of tracebacks."""

from __future__ import annotations

from pathlib import Path


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
