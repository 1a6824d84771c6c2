"""The command line itself: where its options go, what its help says, the order of what it prints."""

from __future__ import annotations

import pytest

from parityport.cli import main


def test_debug_after_the_command_adds_the_traceback_as_before_it(tmp_path, capsys):
    missing = tmp_path / "missing.npz"
    problem = f"parityport: error: {missing}: no such file, and not a catalog name (parityport catalog lists them)"
    for argv in (["--debug", "convert", str(missing)], ["convert", str(missing), "--debug"]):
        assert main([*argv, "--out", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (err[0], err[-1]) == ("Traceback (most recent call last):", problem)
    assert main(["convert", str(missing), "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.splitlines() == [problem]  # without it, the one line alone


def test_parity_help_says_what_dir_is(capsys):
    with pytest.raises(SystemExit) as done:
        main(["parity", "--help"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1:4] for line in lines if line.split()[:1] == ["dir"]] == [["the", "folder", "to"]]


def test_a_no_op_rerun_of_a_synthetic_stand_in_says_only_nothing_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARITYPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PARITYPORT_BASE_URL", "http://127.0.0.1:9/")  # nothing listens there
    out = tmp_path / "o"
    argv = ["convert", "BiT-M-R50x1-CIFAR10", "--out", str(out), "--synthetic-if-offline", "--no-parity"]
    assert main(argv) == 0
    assert "NOT the real weights" in capsys.readouterr().err
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"parityport: {out} is already a float32 conversion of ") and err[0].endswith("; nothing to do")

