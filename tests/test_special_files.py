"""The source as an attacker may hand it over: a special file in its place, a file swapped between the
isolated parse and the main one, a parse that runs out of memory or trips over a reader's own bug."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import converters
from attacks_special import SEEDS, SPECIAL_KINDS
from converters.errors import InputError
from converters.readers import isolate

REPO = Path(converters.__file__).resolve().parents[1]  # the code under test, in the children too


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a read to /dev/zero's end fails, not the machine


def _parityport(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """The command in a child process under a memory limit and a timeout (a FIFO read would block forever)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "parityport.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=_limited)


@pytest.mark.parametrize("name, command", [*((name, "convert") for name in SPECIAL_KINDS),
                                           ("fifo", "parity"), ("link_to_dev_zero", "parity")])
def test_a_special_file_is_refused_by_what_it_is(tmp_path: Path, name: str, command: str) -> None:
    src = SEEDS[name](tmp_path)
    folder = tmp_path / "converted"
    if command == "parity":  # a folder that looks converted, so only SRC can be what is refused
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        result = _parityport("parity", str(src), str(folder))
    else:  # --no-parity: the same refusal, without the seconds of setting up transformers' progress bars
        result = _parityport("convert", str(src), "--out", str(folder), "--no-parity")
    problem = SPECIAL_KINDS[name].format(folder=os.path.realpath(tmp_path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [f"parityport: error: {src}: {problem}"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"] if command == "parity" else not folder.exists()


@pytest.mark.parametrize("name", ["fifo", "link_to_dev_zero", "link_chain_to_fifo"])
def test_is_stand_in_reads_only_regular_files(tmp_path: Path, name: str) -> None:
    """It reads a file's last bytes; a device has no end, and a FIFO blocks the opening."""
    src = SEEDS[name](tmp_path)
    result = subprocess.run([sys.executable, "-c", "import sys; from checkpoints.offline import is_stand_in; "
                             "print(is_stand_in(sys.argv[1]))", str(src)], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=_limited)
    assert (result.returncode, result.stdout) == (0, "False\n"), result.stderr[-2000:]


def test_open_checkpoint_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    src = SEEDS["fifo"](tmp_path)
    result = subprocess.run([sys.executable, "-c", "import sys; from converters.readers.detect import open_checkpoint; "
                             "open_checkpoint(sys.argv[1])", str(src)], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=_limited)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"converters.errors.InputError: {src}: is a named pipe (FIFO), not a regular file; refused")


# ---------------------------------------------------------------- one opening for both parses


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    return path


def _swap_after_preflight(monkeypatch: pytest.MonkeyPatch, path: Path, replacement: Path,
                          in_place: bool = False) -> None:
    """Replace `path` by `replacement` the moment the isolated parse has passed it, before the main parse."""
    checked = isolate.preflight

    def then_swap(*args, **kwargs):
        checked(*args, **kwargs)
        if in_place:  # the same inode rewritten
            path.write_bytes(replacement.read_bytes())
        else:
            os.replace(replacement, path)

    monkeypatch.setattr(isolate, "preflight", then_swap)


def test_the_main_parse_reads_the_file_the_child_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _npz(tmp_path / "model.npz", checked=np.arange(6, dtype=np.float32))
    _swap_after_preflight(monkeypatch, src, _npz(tmp_path / "bomb.npz", swapped_in=np.ones(2, np.float32)))
    checkpoint = isolate.open_isolated(src)
    assert list(checkpoint.tensors) == ["checked"] and checkpoint.path == src
    np.testing.assert_array_equal(checkpoint.tensors["checked"].load(), np.arange(6, dtype=np.float32))
    assert list(np.load(src)) == ["swapped_in"]  # the path does name the other file now


def test_a_file_rewritten_in_place_between_the_parses_is_refused(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = _npz(tmp_path / "model.npz", checked=np.arange(6, dtype=np.float32))
    rewrite = _npz(tmp_path / "bomb.npz", swapped_in=np.ones(3, np.float64))
    _swap_after_preflight(monkeypatch, src, rewrite, in_place=True)
    with pytest.raises(InputError) as caught:
        isolate.open_isolated(src)
    assert str(caught.value) == f"{src}: changed while it was being read; refused"


def test_convert_never_parses_a_file_swapped_in_after_the_isolated_parse(
        tiny_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from parityport.cli import main

    src = Path(shutil.copy(tiny_npz, tmp_path / "model.npz"))
    swapped_in = tmp_path / "bomb.npz"
    swapped_in.write_bytes(b"not a checkpoint: the main parse must never see these bytes")
    _swap_after_preflight(monkeypatch, src, swapped_in)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out), "--no-parity"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"parityport: error: {src}: changed while it was being converted; nothing was written"
    assert not out.exists()


# ---------------------------------------------------------------- what the child reports

def _child_reader(monkeypatch: pytest.MonkeyPatch, reader: str) -> None:
    """Run the real child, with `reader` (Python source defining `open_checkpoint(path)`) in place of
    the readers: how a fault inside one of them reaches the parent."""
    real_run = isolate.subprocess.run

    def run(command, **kwargs):
        code = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1])\n"
                "import converters.readers.isolate as isolate\n" + reader +
                "\nisolate.open_checkpoint = open_checkpoint\n" + command[3])
        return real_run([*command[:3], code, *command[4:]], **kwargs)

    monkeypatch.setattr(isolate.subprocess, "run", run)


# what the readers do with a MemoryError (torch_pickle, keras_h5 and npz catch it as a sign of a bad file)
_RUNS_OUT_OF_MEMORY = """
from converters.errors import InputError
def open_checkpoint(path):
    try:
        bytearray(1 << 40)
    except MemoryError as error:
        raise InputError(path, f"corrupt or truncated pickle ({type(error).__name__}: {error})") from None
"""
_HAS_A_BUG = """
def open_checkpoint(path):
    return int("9" * 5000)
"""


def test_memory_exhaustion_in_the_child_is_said_as_such(tiny_npz: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from parityport.cli import main

    _child_reader(monkeypatch, _RUNS_OUT_OF_MEMORY)
    out = tmp_path / "out"
    assert main(["convert", str(tiny_npz), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"parityport: error: {tiny_npz}: parsing needs more than 4 GiB of memory; refused"]
    assert not out.exists()


@pytest.mark.parametrize("where", ["reader", "child"])
def test_a_readers_own_bug_in_the_child_is_an_internal_error_with_its_traceback(
        tiny_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, where: str) -> None:
    """A reader raising something other than InputError is our fault (exit 3), not bad input; so is a
    child that dies of an exception before it can say anything."""
    from parityport.cli import main

    _child_reader(monkeypatch, _HAS_A_BUG if where == "reader" else 'int("9" * 5000)\n' + _HAS_A_BUG)
    out = tmp_path / "out"
    assert main(["convert", str(tiny_npz), "--out", str(out)]) == 3
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    bug = "ValueError: Exceeds the limit (4300 digits) for integer string conversion"
    assert "Traceback (most recent call last):" in err and any(line.startswith(bug) for line in err[:-1])
    assert err[-1].startswith(f"parityport: internal error: ParserFault: the parser failed on {tiny_npz}: {bug}")
    assert "a fault in parityport" in err[-1] and captured.out == "" and not out.exists()


def test_the_parse_runs_under_a_lower_memory_limit_than_its_own(tiny_npz: Path, tmp_path: Path) -> None:
    """Under `ulimit -v` below the child's limit the child keeps the lower one (a limit cannot be
    raised); it is not a parser failure on every file."""
    out = tmp_path / "out"
    result = _parityport("convert", str(tiny_npz), "--out", str(out), "--no-parity", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == f"parityport: wrote {out}"


def test_a_stand_in_is_still_known_by_its_name_when_read_through_its_opening(tiny_npz: Path, tmp_path: Path,
                                                                             capsys) -> None:
    """The reads go through the opening's /proc path; the name that marks a stand-in is the user's."""
    from parityport.cli import main

    src = Path(shutil.copy(tiny_npz, tmp_path / "BiT-M-R50x1-ILSVRC2012.synthetic.npz"))  # named, not marked
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out), "--no-parity"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"parityport: wrote {out} (SYNTHETIC weights (random values), not the published checkpoint)")
