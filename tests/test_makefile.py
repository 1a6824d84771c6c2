"""The make targets' commands, as `make -n` prints them (nothing is run)."""

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def convert_command(target: str, *variables: str) -> list[str]:
    """The `parityport convert` command line `make -n TARGET VARIABLES...` would run."""
    printed = subprocess.run(["make", "-n", "-s", "-C", str(REPO), target, *variables], check=True,
                             capture_output=True, text=True).stdout
    (line,) = [line for line in printed.splitlines() if "parityport convert" in line]
    return shlex.split(line)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("target, variables, out", [
    ("convert-bit", ["CKPT=fixture-BiT-R14x0.5-shapes10"], "out/fixture-BiT-R14x0.5-shapes10"),
    ("convert-bit", ["CKPT=path/to/BiT-M-R50x3.npz"], "out/BiT-M-R50x3"),
    ("convert-bit", ["CKPT=dir.v2/R50x1.h5"], "out/R50x1"),
    ("convert-data2vec", ["CKPT=ckpt/checkpoint-799.pth"], "out/checkpoint-799"),
    ("convert-data2vec", ["CKPT=data2vec2.base_ft.pt", "DTYPE=bfloat16"], "out/data2vec2.base_ft-bfloat16"),
    ("convert-data2vec", [], "out/data2vec-vision-base-ft1k"),
])
def test_only_a_checkpoint_extension_is_cut_from_the_folder_name(target, variables, out):
    command = convert_command(target, *variables)
    assert command[command.index("--out") + 1] == out
