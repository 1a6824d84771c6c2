"""Parse an untrusted file's structure in a child process with memory and time limits first.

Pickle and HDF5 parsing run C code on attacker-controlled bytes; a crash there
(a segfault in libhdf5, an allocation the size of the declared shape) would
kill the converter with no useful message. So the file is first opened by
`open_checkpoint` in a child process under RLIMIT_AS and a wall-clock timeout;
only a file the child parsed cleanly is parsed again, in this process. The
second parse reads only headers and the pickle, not tensor data.

Both parses read one opening of the file (`source.open_source`, whose
descriptor the child inherits), so the bytes parsed here are the bytes the
child checked, even if the path names another file by then. What the child
reports is told apart: bad input (the readers' InputError) exits 2, memory
beyond its limit is said as such, and any other exception is a fault of the
readers, raised here as `ParserFault` (exit 3) with the child's traceback.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from converters.digest import identity
from converters.errors import InputError, QuotedTraceback, UnsafeInputError
from converters.readers.detect import open_checkpoint
from converters.readers.source import Source, open_source
from converters.tensors import Checkpoint

MEMORY_LIMIT = 4 << 30   # bytes of address space for the parse; headers and pickles need far less
TIME_LIMIT = 300.0       # seconds


class ParserFault(Exception):
    """The isolated parse raised an exception that is not a verdict on the file: a fault of
    parityport's readers (exit 3). Its cause carries the child's traceback."""


class _ChildTraceback(QuotedTraceback):
    """The child's traceback, shown as the cause of a `ParserFault`."""

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.args[0].rstrip()}\n\"\"\""


def _limit_memory(limit: int) -> int:
    """Limit this process's address space to `limit` bytes, or to the lower limit it already runs
    under (one cannot be raised: `ulimit -v`); return the limit in force."""
    for held in resource.getrlimit(resource.RLIMIT_AS):  # soft and hard
        if held != resource.RLIM_INFINITY:
            limit = min(limit, held)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core dumps from a crashing parse
    return limit


# The child runs in isolated mode (-I: no current folder, no PYTHON* variables on its path), with
# this process's own import path given explicitly, so it runs the code this process runs: `-m`
# would put the current folder first, and a `converters/` package there would run instead.
_CHILD = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
          "from converters.readers.isolate import _child; sys.exit(_child(int(sys.argv[2]), int(sys.argv[3])))")


def _import_path() -> str:
    """The folders this process imports from, as JSON: the one holding `converters` first, and the
    current folder only where that is it."""
    root = str(Path(__file__).resolve().parents[2])
    here = os.getcwd()
    return json.dumps([root, *(p for p in sys.path if p and os.path.abspath(p) != here)])


def _opened(source: Source | str | Path) -> Source:
    return source if isinstance(source, Source) else open_source(source)


def preflight(source: Source | str | Path, memory: int | None = None, timeout: float = TIME_LIMIT) -> None:
    """Parse the file in a child process given its descriptor; raise the child's InputError, one for
    a crash or limit, or a `ParserFault` for an exception of the readers' own."""
    source = _opened(source)
    memory = MEMORY_LIMIT if memory is None else memory
    fd = source.file.fileno()
    command = [sys.executable, "-I", "-c", _CHILD, _import_path(), str(fd), str(memory)]
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=timeout, pass_fds=(fd,))
    except subprocess.TimeoutExpired:
        raise InputError(source.path, f"parsing the file took longer than {timeout:.0f} s; refused") from None
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        raise InputError(source.path, f"the {name} signal killed the parser on this file "
                                      "(malformed or hostile); refused")
    _raise_reported(source, child.stdout, child.stderr, memory)


def _raise_reported(source: Source, stdout: str, stderr: str, memory: int) -> None:
    try:
        verdict = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        verdict = {"ok": False, "traceback": stderr.strip() or "the parser exited without a word"}
        if verdict["traceback"].splitlines()[-1].startswith("MemoryError"):
            verdict = {"ok": False, "unsafe": False, "problem": _needs_more(memory)}
    if verdict["ok"]:
        return
    if "traceback" in verdict:
        last = verdict["traceback"].splitlines()[-1]
        raise ParserFault(f"the parser failed on {source.path}: {last}") from _ChildTraceback(verdict["traceback"])
    error = UnsafeInputError if verdict["unsafe"] else InputError
    raise error(source.path, verdict["problem"].replace(str(source.handle), str(source.path)))


def open_isolated(source: Source | str | Path, memory: int | None = None, timeout: float = TIME_LIMIT) -> Checkpoint:
    """`open_checkpoint` of the same opening of the file, after its parse succeeded in a limited
    child process. The checkpoint names `source.path`, and its tensors load through that opening."""
    source = _opened(source)
    preflight(source, memory, timeout)
    if identity(source.file.fileno()) != source.identity:
        raise InputError(source.path, "changed while it was being read; refused")
    try:
        checkpoint = open_checkpoint(source.handle)
    except InputError as error:
        raise _renamed(error, source) from None
    tensors = {name: replace(t, loader=_through(source, t.loader)) for name, t in checkpoint.tensors.items()}
    return replace(checkpoint, path=source.path, tensors=tensors,
                   verify_unread=_through(source, checkpoint.verify_unread))


def _through(source: Source, loader: Callable[[], Any]) -> Callable[[], Any]:
    """`loader` (a tensor's, or the check of unread bytes), naming the user's path in its errors; it
    holds `source`, so the opening it reads through stays open (and its descriptor number ours)
    while any tensor can still be loaded."""
    def load():
        try:
            return loader()
        except InputError as error:
            raise _renamed(error, source) from None
    return load


def _renamed(error: InputError, source: Source) -> InputError:
    """`error` naming the user's path where it names the opening's."""
    handle = str(source.handle)
    path = source.path if error.path == handle else error.path
    return type(error)(path, error.problem.replace(handle, str(source.path)))


def _needs_more(memory: int) -> str:
    return f"parsing needs more than {memory / (1 << 30):g} GiB of memory; refused"


def _memory_ran_out(error: BaseException) -> bool:
    """Whether a MemoryError led to `error`: the readers report one as a corrupt file (raised
    `from None`, which keeps it as the context), but under this child's limit it is the limit."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, MemoryError):
            return True
        error, seen = error.__context__, seen + 1
    return False


def _child(fd: int, memory: int) -> int:
    memory = _limit_memory(memory)  # set here, not in preexec_fn: the parent may run threads
    try:
        open_checkpoint(f"/proc/self/fd/{fd}")
        verdict = {"ok": True}
    except InputError as e:
        verdict = {"ok": False, "unsafe": isinstance(e, UnsafeInputError), "problem": e.problem}
        if _memory_ran_out(e):
            verdict = {"ok": False, "unsafe": False, "problem": _needs_more(memory)}
    except MemoryError:
        verdict = {"ok": False, "unsafe": False, "problem": _needs_more(memory)}
    except Exception:  # noqa: BLE001  a reader's own fault, reported with its traceback
        verdict = {"ok": False, "traceback": traceback.format_exc()}
    print(json.dumps(verdict), flush=True)
    return 0
