"""`--force` and a failed run replace only what parityport wrote: a file of the user's is never deleted."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from checkpoints.synthetic import TINY_BIT, bit_arrays, write_bit_npz
from converters.writer import check_sha256sums
from parityport.cli import main

YOURS = ("a folder holding anything of yours is never replaced, even with --force, as that would delete it; "
         "move them out or choose another --out")


@pytest.fixture(scope="module")
def converted(tiny_npz, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "tiny"
    assert main(["convert", str(tiny_npz), "--out", str(out), "--no-parity"]) == 0
    return out


def test_force_refuses_a_folder_holding_files_its_sha256sums_does_not_list(tiny_npz, converted, tmp_path, capsys):
    out = tmp_path / "tiny"
    shutil.copytree(converted, out)
    (out / "my-eval.json").write_text('{"top1": 88.6}\n')
    (out / "evals").mkdir()  # a folder of the user's counts as much as a file
    capsys.readouterr()
    for force in (["--force"], []):  # without --force too: "pass --force" would only lead here
        assert main(["convert", str(tiny_npz), "--out", str(out), "--no-parity", *force]) == 2
        assert capsys.readouterr().err.strip() == (
            f"parityport: error: {out}: holds evals, my-eval.json (not listed in its SHA256SUMS, so not "
            f"parityport's): {YOURS}")
        assert (out / "my-eval.json").read_text() == '{"top1": 88.6}\n' and (out / "evals").is_dir()
    assert not list(tmp_path.glob(".tiny.*"))
    (out / "my-eval.json").unlink()
    (out / "evals").rmdir()
    assert main(["convert", str(tiny_npz), "--out", str(out), "--no-parity", "--force"]) == 0


def test_force_refuses_a_folder_of_copied_weights_with_no_sha256sums(tiny_npz, converted, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(converted / "model.safetensors", mine)  # parityport's weights, but the folder is the user's
    (mine / "notes.txt").write_text("precious")
    capsys.readouterr()
    assert main(["convert", str(tiny_npz), "--out", str(mine), "--no-parity", "--force"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"parityport: error: {mine}: holds model.safetensors, notes.txt (no SHA256SUMS says parityport wrote "
        f"them): {YOURS}")
    assert sorted(p.name for p in mine.iterdir()) == ["model.safetensors", "notes.txt"]


@pytest.fixture(scope="module")
def failing_npz(tmp_path_factory) -> Path:
    """NaN in the weights: with --allow-nonfinite it converts, and parity fails (nothing to compare)."""
    arrays = bit_arrays(**TINY_BIT, seed=1)
    arrays["resnet/block2/unit01/b/standardized_conv2d/kernel"][0, 0, 0, 0] = np.nan
    path = tmp_path_factory.mktemp("nan") / "nan.npz"
    write_bit_npz(path, arrays)
    return path


def test_a_failed_run_never_deletes_a_file_of_yours_in_its_parity_failed_folder(failing_npz, tiny_npz, tmp_path,
                                                                                capsys):
    out = tmp_path / "out"
    failed = tmp_path / "out.parity-failed"
    assert main(["convert", str(failing_npz), "--out", str(out), "--allow-nonfinite"]) == 1
    assert check_sha256sums(failed) == []  # its SHA256SUMS lists every file the run wrote
    (failed / "notes.txt").write_text("why it failed")
    capsys.readouterr()
    assert main(["convert", str(failing_npz), "--out", str(out), "--allow-nonfinite"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"parityport: error: {failed}: holds notes.txt (not listed in its SHA256SUMS, so not parityport's): {YOURS}")
    assert (failed / "notes.txt").read_text() == "why it failed" and not out.exists()
    (failed / "notes.txt").unlink()  # then all of it is parityport's, and --force may replace it
    assert main(["convert", str(tiny_npz), "--out", str(failed), "--no-parity", "--force"]) == 0
    assert check_sha256sums(failed) == [] and not (failed / "parity.json").exists()
    capsys.readouterr()
    shutil.rmtree(failed)
    failed.mkdir()
    (failed / "notes.txt").write_text("a folder of mine, named so by chance")
    assert main(["convert", str(failing_npz), "--out", str(out), "--allow-nonfinite"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"parityport: error: {failed}: exists and is not a folder parityport wrote (no model.safetensors of its "
        "own), so it is never replaced, even with --force; choose another --out")
    assert [p.name for p in failed.iterdir()] == ["notes.txt"]



# ---------------------------------------------------------------------------
# An --out that cannot be written: one line naming the folder, exit 2, nothing left

def _refuse_writes_in(folder: Path, monkeypatch, error: int, calls=("open", "mkdir")) -> None:
    """Make creating anything directly inside `folder` fail with `error`, as a read-only mount or missing
    permission does. Tests run as root, whom permission bits do not stop, and mounting a read-only file
    system needs privileges the test has not: so the two calls that create entries are made to fail."""
    import errno
    import os

    def refusing(real):
        def call(path, *args, **kwargs):
            flags = args[0] if real is os.open and args else kwargs.get("flags", os.O_CREAT)
            creates = real is os.mkdir or flags & os.O_CREAT
            if creates and Path(os.fsdecode(path)).parent == folder:
                raise OSError(error, os.strerror(error), os.fsdecode(path))
            return real(path, *args, **kwargs)
        return call

    assert error in (errno.EROFS, errno.EACCES)
    for name in calls:
        monkeypatch.setattr(os, name, refusing(getattr(os, name)))


@pytest.mark.parametrize("error", ["EROFS", "EACCES"])
@pytest.mark.parametrize("calls", [("open", "mkdir"), ("mkdir",)])
@pytest.mark.parametrize("below", ["model", "new/model"])
def test_an_out_in_a_folder_that_is_not_writable_is_named(tiny_npz, tmp_path, monkeypatch, capsys, error, calls,
                                                          below):
    import errno
    import os

    folder = tmp_path / "read-only"
    folder.mkdir()
    out = folder / below
    _refuse_writes_in(folder, monkeypatch, getattr(errno, error), calls)
    assert main(["convert", str(tiny_npz), "--out", str(out), "--no-parity"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"parityport: error: {folder}: is not writable ({os.strerror(getattr(errno, error))}), so --out {out} "
        "cannot be made in it; choose an --out in a folder you can write")
    monkeypatch.undo()
    assert list(folder.iterdir()) == []


def test_an_out_below_a_file_is_named(tiny_npz, tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("not a folder")
    for out in (afile / "model", afile / "new" / "model"):
        assert main(["convert", str(tiny_npz), "--out", str(out), "--no-parity"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"parityport: error: {afile}: is not a folder, so --out {out} cannot be made in it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
