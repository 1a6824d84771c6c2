"""MAE's fixed 2-D sin-cos position table of data2vec 2.0 (numpy only).

The one statement of the table: the PyTorch reference and the synthetic writer take
it from here, and converters check a stored table against it without importing a
framework (they keep the stored values). The folder's own modeling code
(reference/data2vec2_hf) builds it again in torch, because that file must run alone.
"""

from __future__ import annotations

import numpy as np

# The stored positions are fp16-rounded when the model was trained with common.fp16
# (fairseq halves the model, then upcasts on save): half an fp16 ulp at |x| < 1 is 2.4e-4.
POSITIONS_ATOL = 5e-4


def sincos_positions(dim: int, grid: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos table [1, grid*grid, dim] float32, patches only (no cls row).

    The first dim/2 channels encode the COLUMN index and the last dim/2 the ROW
    index (mae.py meshgrid(grid_w, grid_h) puts w first); each half is
    [sin(p·ω), cos(p·ω)] with ω_i = 10000^(-i/(dim/4)). Computed in float64
    (numpy's float, as MAE), then cast to float32.
    """
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.divmod(np.arange(grid * grid, dtype=np.float64), grid)  # row-major patches

    def encode(pos: np.ndarray) -> np.ndarray:
        out = pos[:, None] * omega                                   # N, dim/4
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)    # N, dim/2

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)[None]  # 1, N, dim
