"""Peak RSS and CPU time of a command's whole process tree, measured where pytest's size cannot leak in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs the command with stdout and stderr passed through, then prints the peak RSS and CPU seconds of
# its process tree. It is exec'd fresh from this small process, not forked from pytest: Linux starts a
# child's ru_maxrss at the RSS of the process it was forked from (gigabytes, late in a full run).
_MEASURE = """
import resource, subprocess, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
code = subprocess.run(sys.argv[2:]).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"MEASURED {code} {usage.ru_maxrss * 1024} {usage.ru_utime + usage.ru_stime}", file=sys.stderr)
"""


def run_measured(argv: list[str], address_space: int, timeout: float,
                 cwd: Path = REPO) -> tuple[int, list[str], int, float]:
    """(exit code, stderr lines, peak RSS in bytes, CPU seconds) of `parityport argv`, run under an
    address-space limit of `address_space` bytes; a run past `timeout` seconds fails the test."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    child = subprocess.run([sys.executable, "-c", _MEASURE, str(address_space), sys.executable, "-m",
                            "parityport.cli", *argv], capture_output=True, text=True, env=env,
                           timeout=timeout, cwd=cwd)
    lines = child.stderr.splitlines()
    _, code, rss, cpu = lines[-1].split()
    return int(code), lines[:-1], int(rss), float(cpu)
