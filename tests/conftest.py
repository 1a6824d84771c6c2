"""Test-wide settings: strict numerics, and an import order that keeps TensorFlow safe."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # oneDNN reorders float sums: keep TF exact

import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401  triton must load before TensorFlow, or the process segfaults

from parity.capture import strict_numerics  # noqa: E402

strict_numerics()
torch.manual_seed(0)
