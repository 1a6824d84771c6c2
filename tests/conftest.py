"""Test-wide settings: strict numerics, and an import order that keeps TensorFlow safe."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # oneDNN reorders float sums: keep TF exact

import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401  triton must load before TensorFlow, or the process segfaults

import pytest  # noqa: E402

from checkpoints.synthetic import TINY_BIT, bit_arrays, write_bit_npz  # noqa: E402
from parity.capture import strict_numerics  # noqa: E402

strict_numerics()
torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    """The tiny BiT (`TINY_BIT`, seed 1) in the original npz layout, one per test module."""
    path = tmp_path_factory.mktemp("src") / "tiny.npz"
    write_bit_npz(path, bit_arrays(**TINY_BIT, seed=1))
    return path
