"""Small hostile files are refused quickly and cheaply: the cost of reading is bounded by what the
file legitimately holds. Each attack of `attacks_budgets.SEEDS` runs through the command in a child
process under an address-space limit, and its peak RSS and CPU time are measured."""

from __future__ import annotations

import io
import os
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from attacks_budgets import SEEDS
from converters.errors import InputError
from converters.readers import keras_h5
from converters.readers import torch_pickle
from converters.readers.torch_pickle import read_torch

REPO = Path(__file__).resolve().parents[1]
ADDRESS_SPACE = 3 << 30   # a safety net; python with numpy and h5py maps ~1 GiB before reading anything
MAX_RSS = 512 << 20
MAX_CPU_SECONDS = 5.0
MAX_WALL_SECONDS = 60.0   # only against a hang: wall time is at the mercy of the machine's load

# name -> the stable part of the one line each is refused with
EXPECTED = {
    "pid_memo_dag": r"refusing persistent id \(\(\(\(\(.*\.\.\. \(only torch storages are allowed\)",
    "legacy_protocol_memo_dag": r"legacy torch protocol \(\(\(\(.*\.\.\. is not supported",
    "tensor_size_memo_dag": r"malformed checkpoint pickle: invalid tensor size: \(\(\(\(.*\.\.\.",
    "deflated_opcode_run": r"member 'archive/data\.pkl' declares 134217732 bytes, over the 64 times its "
                           r"\d+ compressed that a real one inflates to; refused",
    "memo_dag_of_tensors": r"more than 10000 tensors for \d+ bytes of pickle \(the memo repeats one tensor under "
                           r"many names\); refused",
    "memo_dag_of_objects": r"object structure too large or too deep at '[0-9.]+' \(over 200000 objects for "
                           r"\d+ bytes of pickle",
    "byteorder_bzip2": r"member 'archive/byteorder' uses compression method 12 \(torch\.save stores",
    "byteorder_lzma": r"member 'archive/byteorder' uses compression method 14 \(torch\.save stores",
    "byteorder_deflate": r"member 'archive/byteorder' inflates past its declared 6 bytes",
    "h5_vlen_names_one_heap_object": r"the weights group: attribute 'layer_names' holds 3500 variable-length "
                                     r"strings \(Keras writes fixed-length names",
    "h5_chunks_inflating_past_their_shape": r"dataset '/d/kernel:0': the chunk at \[0\] stores \d+ bytes for a "
                                            r"chunk of 2688; refused",
    "h5_bit_kernel_inflating_past_its_shape": r"dataset '/[^']+kernel:0': the chunk at \[0, 0, 0, 0\] inflates "
                                              r"past its \d+ bytes",
}

# Runs the command with stdout and stderr passed through, then prints the peak RSS and CPU seconds of
# its process tree. It is exec'd fresh from this small process, not forked from pytest: Linux starts a
# child's ru_maxrss at the RSS of the process it was forked from.
_MEASURE = """
import resource, subprocess, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
code = subprocess.run(sys.argv[2:]).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"MEASURED {code} {usage.ru_maxrss * 1024} {usage.ru_utime + usage.ru_stime}", file=sys.stderr)
"""


def run_cli(*argv: str) -> tuple[int, list[str], int, float]:
    """(exit code, stderr lines, peak RSS in bytes, CPU seconds) of `parityport argv` in a child."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    child = subprocess.run([sys.executable, "-c", _MEASURE, str(ADDRESS_SPACE), sys.executable, "-m",
                            "parityport.cli", *argv], capture_output=True, text=True, env=env,
                           timeout=MAX_WALL_SECONDS, cwd=REPO)
    lines = child.stderr.splitlines()
    _, code, rss, cpu = lines[-1].split()
    return int(code), lines[:-1], int(rss), float(cpu)


@pytest.mark.parametrize("name", list(SEEDS))
def test_attack_is_refused_quickly_and_cheaply(tmp_path: Path, name: str) -> None:
    src = SEEDS[name](tmp_path)
    assert src.stat().st_size < 16 << 20  # the largest, a small BiT .h5, is ~8 MB; the rest under 1.3 MB
    before = sorted(tmp_path.iterdir())
    dest = tmp_path / "out"
    code, err, rss, cpu = run_cli("convert", str(src), "--out", str(dest))
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"parityport: error: {src}: "), err
    assert __import__("re").search(EXPECTED[name], err[0]), err[0]
    assert sorted(tmp_path.iterdir()) == before and not dest.exists()
    assert rss < MAX_RSS, f"{name}: peak RSS {rss >> 20} MiB"
    assert cpu < MAX_CPU_SECONDS, f"{name}: {cpu:.1f} s of CPU"


def test_every_seed_has_an_expected_message() -> None:
    assert EXPECTED.keys() == SEEDS.keys()
