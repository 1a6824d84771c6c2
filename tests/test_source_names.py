"""An error about a converted tensor names it as the original file does, then as converted."""

from pathlib import Path

import numpy as np
import pytest

from checkpoints.synthetic import TINY_BIT, bit_arrays, write_bit_h5, write_bit_npz
from parityport.cli import main

PROJ = "resnet/block2/unit01/a/proj/standardized_conv2d/kernel"
PROJ_CONVERTED = "bit.encoder.stages.1.layers.0.downsample.conv.weight"


def _file(tmp_path: Path, name: str, key: str, index: int, value: float, write=write_bit_npz) -> Path:
    arrays = bit_arrays(**TINY_BIT, seed=1)
    arrays[key].flat[index] = value
    write(tmp_path / name, arrays)
    return tmp_path / name


@pytest.mark.parametrize("value, dtype, problem", [
    (np.nan, "float32", "1 non-finite values (NaN or Inf); pass --allow-nonfinite to convert anyway"),
    (1e6, "float16", "1 values beyond float16's range (largest magnitude 1e+06) would be written as Inf; "
                     "convert to float32, or pass --allow-nonfinite"),
])
def test_a_value_refused_in_a_converted_tensor_is_named_both_ways(tmp_path, capsys, value, dtype, problem):
    src = _file(tmp_path, "bad.npz", PROJ, 0, value)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out), "--no-parity", "--dtype", dtype]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"parityport: error: {src}: {PROJ} (converted to {PROJ_CONVERTED}): {problem}")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_an_h5_tensor_is_named_as_the_h5_file_names_it(tmp_path, capsys):
    """The h5 file's own weight path, not the npz name its position is given while converting."""
    src = _file(tmp_path, "bad.h5", "resnet/head/conv2d/bias", 3, np.inf, write_bit_h5)
    assert main(["convert", str(src), "--out", str(tmp_path / "out"), "--no-parity"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"parityport: error: {src}: head/dense/resnet/head/dense/bias (converted to classifier.1.bias): "
        "1 non-finite values (NaN or Inf); pass --allow-nonfinite to convert anyway")


def test_a_numbered_conv_spelling_is_named_as_the_file_spells_it(tmp_path, capsys):
    arrays = bit_arrays(**TINY_BIT, seed=1)
    arrays[PROJ][0, 0, 0, 0] = np.nan
    arrays = {k.replace("unit01/a/proj/standardized_conv2d/", "unit01/a/proj/standardized_conv2d_7/"): v
              for k, v in arrays.items()}
    src = tmp_path / "numbered.npz"
    write_bit_npz(src, arrays)
    assert main(["convert", str(src), "--out", str(tmp_path / "out"), "--no-parity"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"parityport: error: {src}: resnet/block2/unit01/a/proj/standardized_conv2d_7/kernel (converted to "
        f"{PROJ_CONVERTED}): 1 non-finite values (NaN or Inf); pass --allow-nonfinite to convert anyway")
