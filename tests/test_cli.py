"""The command line itself: where its options go, what its help says, the order of what it prints."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from parityport.cli import build_parser, main


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


README = Path(__file__).resolve().parents[1] / "README.md"
# Shown by every command's --help and documented once, beside the exit codes, not in each synopsis.
EVERY_COMMANDS_OPTIONS = {"--help", "--debug"}


def readme_synopses(text: str) -> dict[str, set[str]]:
    """{command: the options its synopsis names} for each synopsis in the README's code blocks: a line
    `parityport COMMAND ...` whose words are placeholders (SRC, DIR), options or brackets, with the
    indented lines that continue it; an example with real paths (/tmp/fx/...) is not a synopsis."""
    synopses: dict[str, set[str]] = {}
    command, fenced = None, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced, command = not fenced, None
            continue
        words = line.split("#")[0].split()
        if fenced and words[:1] == ["parityport"] and len(words) > 1:
            values = [w for w in re.sub(r"\[[^]]*\]", "", " ".join(words[2:])).split() if not w.startswith("-")]
            command = words[1] if all(re.fullmatch(r"[A-Z_./]+", w) for w in values) else None
            if command:
                synopses[command] = set()
        elif not (fenced and command and line.startswith(" ")):
            command = None
        if command:
            synopses[command] |= set(re.findall(r"--[a-z][a-z0-9-]*", " ".join(words)))
    return synopses


def help_options(command: str) -> set[str]:
    """The long options of `parityport COMMAND --help`, as argparse holds them."""
    parser = build_parser([command])
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {o for a in commands.choices[command]._actions for o in a.option_strings if o.startswith("--")}


def test_each_documented_synopsis_names_exactly_the_options_of_its_help():
    synopses = readme_synopses(README.read_text())
    assert sorted(synopses) == ["convert", "eval", "publish", "verify"]
    for command, documented in synopses.items():
        expected = help_options(command) - EVERY_COMMANDS_OPTIONS
        assert (command, sorted(documented - expected), sorted(expected - documented)) == (command, [], [])


def test_the_readme_names_the_login_that_publish_names():
    from parityport.publish import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "`hf auth login`" in " ".join(parser.format_help().split()) and "`hf auth login`" in README.read_text()
    assert "huggingface-cli" not in README.read_text()
