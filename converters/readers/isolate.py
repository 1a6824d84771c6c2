"""Parse an untrusted file's structure in a child process with memory and time limits first.

Pickle and HDF5 parsing run C code on attacker-controlled bytes; a crash there
(a segfault in libhdf5, an allocation the size of the declared shape) would
kill the converter with no useful message. So the file is first opened by
`open_checkpoint` in a child process under RLIMIT_AS and a wall-clock timeout;
only a file the child parsed cleanly is opened again, in this process. The
second parse reads only headers and the pickle, not tensor data.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from converters.errors import InputError, UnsafeInputError
from converters.readers.detect import open_checkpoint
from converters.tensors import Checkpoint

MEMORY_LIMIT = 4 << 30   # bytes of address space for the parse; headers and pickles need far less
TIME_LIMIT = 300.0       # seconds


def _limit_memory(limit: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    for held in (soft, hard):  # never above a limit this process already runs under
        if held != resource.RLIM_INFINITY:
            limit = min(limit, held)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core dumps from a crashing parse


# The child runs in isolated mode (-I: no current folder, no PYTHON* variables on its path), with
# this process's own import path given explicitly, so it runs the code this process runs: `-m`
# would put the current folder first, and a `converters/` package there would run instead.
_CHILD = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
          "from converters.readers.isolate import _child; sys.exit(_child(sys.argv[2], int(sys.argv[3])))")


def _import_path() -> str:
    """The folders this process imports from, as JSON: the one holding `converters` first, and the
    current folder only where that is it."""
    root = str(Path(__file__).resolve().parents[2])
    here = os.getcwd()
    return json.dumps([root, *(p for p in sys.path if p and os.path.abspath(p) != here)])


def preflight(path: Path, memory: int = MEMORY_LIMIT, timeout: float = TIME_LIMIT) -> None:
    """Parse `path` in a child process; raise the child's InputError, or one for a crash or limit."""
    command = [sys.executable, "-I", "-c", _CHILD, _import_path(), str(path), str(memory)]
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise InputError(path, f"parsing the file took longer than {timeout:.0f} s; refused") from None
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        raise InputError(path, f"the {name} signal killed the parser on this file (malformed or hostile); refused")
    _raise_reported(path, child.stdout, child.stderr)


def _raise_reported(path: Path, stdout: str, stderr: str) -> None:
    try:
        verdict = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(path, f"the parser failed on this file: {tail}") from None
    if verdict["ok"]:
        return
    error = UnsafeInputError if verdict["unsafe"] else InputError
    raise error(path, verdict["problem"])


def open_isolated(path: Path, memory: int = MEMORY_LIMIT, timeout: float = TIME_LIMIT) -> Checkpoint:
    """`open_checkpoint`, after the same parse succeeded in a limited child process."""
    preflight(Path(path), memory, timeout)
    return open_checkpoint(path)


def _child(path: str, memory: int) -> int:
    _limit_memory(memory)  # set here, not in preexec_fn: the parent may run threads
    try:
        open_checkpoint(path)
        verdict = {"ok": True}
    except InputError as e:
        verdict = {"ok": False, "unsafe": isinstance(e, UnsafeInputError), "problem": e.problem}
    except MemoryError:
        verdict = {"ok": False, "unsafe": False,
                   "problem": f"parsing needs more than {memory / (1 << 30):g} GiB of memory; refused"}
    print(json.dumps(verdict), flush=True)
    return 0
