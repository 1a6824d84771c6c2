"""The standard parity inputs: seeded noise at an even and an odd size, and a real photo.

Inputs are produced in [0, 1] pixel space and normalised with the family's
mean/std, so every side receives the same preprocessed tensor (preprocessing
parity is measured separately from model parity).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from parity.engine import ParityInput


def photo_path() -> Path:
    """A real photograph that ships with matplotlib (Grace Hopper, 512x600 JPEG)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _normalise(pixels01: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    m = np.asarray(mean, np.float32)[None, :, None, None]
    s = np.asarray(std, np.float32)[None, :, None, None]
    return ((pixels01 - m) / s).astype(np.float32)


def photo(size: tuple[int, int]) -> np.ndarray:
    """The photo squashed to (height, width) bilinear, as a (1, 3, H, W) array in [0, 1]."""
    image = Image.open(photo_path()).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
    return (np.asarray(image, np.float32) / 255.0).transpose(2, 0, 1)[None]


def standard_inputs(sizes: Sequence[tuple[int, int]], mean: Sequence[float], std: Sequence[float],
                    seed: int = 0) -> list[ParityInput]:
    """Seeded uniform noise at each size (first size also gets the photo), normalised."""
    rng = np.random.default_rng(seed)
    inputs = []
    for i, (h, w) in enumerate(sizes):
        noise = rng.uniform(0.0, 1.0, (1, 3, h, w)).astype(np.float32)
        inputs.append(ParityInput(f"noise {h}x{w}", _normalise(noise, mean, std)))
        if i == 0:
            inputs.append(ParityInput(f"photo {h}x{w}", _normalise(photo((h, w)), mean, std)))
    return inputs
