"""BEiT's relative position geometry, shared by the data2vec 1.0 converter and references (numpy only).

The index is derived, never stored by us: models rebuild it and converters check a
stored copy against it before dropping it.
"""

from __future__ import annotations

import math

import numpy as np


def table_window(rows: int) -> int | None:
    """Window side W of a square relative position table of (2W-1)^2 + 3 rows (the 3: cls→tok,
    tok→cls, cls→cls), or None when no W gives that many rows."""
    side = math.isqrt(rows - 3) if rows >= 3 else 0
    return (side + 1) // 2 if side * side == rows - 3 and side % 2 else None


def relative_position_index(window: tuple[int, int]) -> np.ndarray:
    """The [N+1, N+1] int64 index into the (2Wh-1)(2Ww-1)+3 row table, as BEiT builds it.

    Patch pairs index (dh + Wh-1) * (2Ww-1) + (dw + Ww-1) with dh = h_q - h_k
    (row-major patches); row 0 (cls query) is rows-3, column 0 (cls key) rows-2,
    [0, 0] rows-1.
    """
    wh, ww = window
    rows = (2 * wh - 1) * (2 * ww - 1) + 3
    h, w = np.divmod(np.arange(wh * ww), ww)                                  # N
    index = np.empty((wh * ww + 1,) * 2, dtype=np.int64)
    index[1:, 1:] = (h[:, None] - h[None, :] + wh - 1) * (2 * ww - 1) + (w[:, None] - w[None, :] + ww - 1)
    index[0, :], index[:, 0], index[0, 0] = rows - 3, rows - 2, rows - 1
    return index
