"""Names from a file reach the terminal, the error line and the card escaped and cut, never raw."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from attacks_escape import INJECTION, SEEDS
from converters.errors import InputError
from parityport.cli import main

# INJECTION as it must be shown: each control, format and bidi character escaped, nothing else changed.
INJECTION_SHOWN = ("\\n parityport: wrote out (parity passed)\\x1b]0;pwned\\x07\\x1b[2K\\x1b[1A\\r"
                   "\\u202eevil\\u2066\\u2067\\u2068\\u2069\\u200f")
# What each attack's one line must say, besides naming the file: the injected name escaped, or the
# count of what was cut from a name of hostile length (80 characters are kept: 60 before, 20 after).
EXPECTED = {
    "npz_member_name": f"not a BiT or data2vec-vision checkpoint (npz; first keys: w{INJECTION_SHOWN})",
    "npz_long_member_name": f"first keys: {'k' * 60}…(+65,451 chars)…{'k' * 20})",
    "npz_bit_with_hostile_extra": f"no rule for resnet/{INJECTION_SHOWN}",
    "torch_dict_key": f"(torch-zip; first keys: w{INJECTION_SHOWN})",
    "torch_long_key": f"a dotted path of 1500000 characters (over 4096): '{'k' * 79}...",
    "h5_external_link_target": f"is an external link to /tmp/{INJECTION_SHOWN}.h5:/{INJECTION_SHOWN}; refused",
    "h5_layer_name": f"missing '/w{INJECTION_SHOWN}kkk",
    "path_control_chars": "not a BiT or data2vec-vision checkpoint (npz; first keys: w)",
}
CUT = re.compile(r"…\(\+[\d,]+ chars\)…")


def _shown(text: object) -> str:
    return str(text).replace(INJECTION, INJECTION_SHOWN)


def _printable(text: str) -> bool:
    """No character a terminal would act on: every line's characters are printable."""
    return all(line.isprintable() for line in text.split("\n"))


@pytest.mark.parametrize("attack", sorted(SEEDS))
def test_convert_shows_a_hostile_name_escaped_on_one_line(tmp_path: Path, capsys, attack: str) -> None:
    src = SEEDS[attack](tmp_path)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n")
    assert _printable(captured.err)
    line = captured.err.rstrip("\n")
    assert line.startswith(f"parityport: error: {_shown(src)}: ")
    assert EXPECTED[attack] in line
    assert len(line) < 1100  # a path of 400 characters, a problem of 600
    assert not out.exists()


def test_every_seed_has_its_expected_message() -> None:
    assert sorted(EXPECTED) == sorted(SEEDS)


def test_a_layer_name_of_hostile_length_is_cut_within_the_message(tmp_path: Path) -> None:
    from converters.readers.keras_h5 import read_keras_h5

    with pytest.raises(InputError) as error:
        read_keras_h5(SEEDS["h5_layer_name"](tmp_path))
    assert len(CUT.findall(str(error.value))) == 1 and str(error.value).endswith("kkk'")


def _cells(row: str) -> int:
    """The cells of a Markdown table row: pipes not escaped by a backslash."""
    return len(re.findall(r"(?<!\\)\|", row)) - 1


def test_convert_under_a_hostile_file_name_prints_and_writes_it_escaped(tmp_path: Path, capsys) -> None:
    from huggingface_hub import ModelCard

    from checkpoints.synthetic import TINY_BIT, bit_arrays, write_bit_npz

    src = tmp_path / f"tiny|*_`<b>{INJECTION}.npz"
    write_bit_npz(src, bit_arrays(**TINY_BIT, seed=1))
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out), "--no-parity"]) == 0
    err = capsys.readouterr().err
    assert _printable(err)
    assert err.splitlines() == [f"parityport: {_shown(src.name)}: bit R17x0.5, 54 tensors (0 dropped "
                                f"by rule) -> {out} [float32]", f"parityport: wrote {out}"]
    card = (out / "README.md").read_text()
    assert _printable(card)
    # In Markdown the punctuation is backslash-escaped, and so is each escape's own backslash.
    escaped = INJECTION_SHOWN.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
    name = f"tiny\\|\\*\\_\\`\\<b\\>{escaped}.npz"
    assert f"The original BiT checkpoint {name} converted" in card
    rows = {line.split(" | ")[0]: line for line in card.splitlines() if line.startswith("| ")}
    assert rows["| source file"] == f"| source file | {name} (npz) |" and _cells(rows["| source file"]) == 2
    assert _cells(rows["| command"]) == 2
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["model_name"] == _shown(src.stem)


def test_verify_names_a_hostile_file_in_the_folder_escaped(tmp_path: Path, capsys) -> None:
    from checkpoints.synthetic import TINY_BIT, bit_arrays, write_bit_npz

    src = tmp_path / "tiny.npz"
    write_bit_npz(src, bit_arrays(**TINY_BIT, seed=1))
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out)]) == 0  # with parity: a folder verify checks
    (out / f"x{INJECTION}").write_text("planted")
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    captured = capsys.readouterr()
    assert _printable(captured.out) and _printable(captured.err)
    assert f"  x{INJECTION_SHOWN}: not listed in SHA256SUMS" in captured.out.splitlines()
    assert captured.err.count("\n") == 1


def test_an_os_error_on_a_hostile_output_path_is_one_escaped_line(tmp_path: Path, capsys) -> None:
    from checkpoints.synthetic import TINY_BIT, bit_arrays, write_bit_npz

    src = tmp_path / "tiny.npz"
    write_bit_npz(src, bit_arrays(**TINY_BIT, seed=1))
    parent = tmp_path / f"f{INJECTION}"
    parent.write_text("a file, not a folder")
    assert main(["convert", str(src), "--out", str(parent / "out"), "--no-parity"]) == 2
    err = capsys.readouterr().err
    assert _printable(err)
    assert err.splitlines()[-1] == (f"parityport: error: {_shown(parent)}: is not a folder, so --out "
                                    f"{_shown(parent / 'out')} cannot be made in it")
