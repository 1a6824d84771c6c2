"""Compare named taps between a reference side and another side.

Each tap is judged by its max-abs error against a tolerance made of an absolute
part and a part relative to the tap's scale (the max |reference| value), so a
residual stream of magnitude 150 and logits of magnitude 1 are judged fairly.
`max_rel` is max-abs divided by that scale; `cosine` is over the whole tap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Pass when max_abs <= atol + rtol * scale."""

    atol: float
    rtol: float

    def limit(self, scale: float) -> float:
        return self.atol + self.rtol * scale


# Gating comparisons always run on float32 weights (a bfloat16/float16 output is gated on
# the float32 conversion it was rounded from; see parity/families.py). Logits are held to
# 1e-4 absolute; intermediate taps to 1e-5 + 1e-4 of the tap's scale.
INTERMEDIATE = Tolerance(1e-5, 1e-4)
LOGITS = Tolerance(1e-4, 0.0)

# Rounding error in a residual stream is added to by every block it passes through, so
# the intermediate rtol is calibrated at 16 blocks (BiT-R50, the deepest model it was
# measured on: 4e-5 at its last unit) and grows linearly with the tap's position after
# that (BiT-R101, 33 units: 1.3e-4 at block4.unit03 with cosine 1 - 6e-9, against
# transformers and timm alike). Logits keep their absolute tolerance at any depth.
CALIBRATED_POSITION = 16


def tolerance_for(tap: str, position: int = 1) -> Tolerance:
    """The tolerance of `tap`, the `position`-th tap in forward order (float32 weights)."""
    if tap == "logits":
        return LOGITS
    return Tolerance(INTERMEDIATE.atol, INTERMEDIATE.rtol * max(1.0, position / CALIBRATED_POSITION))


@dataclass(frozen=True)
class TapResult:
    """One tap of one input, one side against the reference."""

    tap: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float
    scale: float
    limit: float
    passed: bool
    nonfinite: int = 0  # NaN/Inf values of the reference, matched exactly by the other side

    @property
    def compared(self) -> int:
        """How many values were measured: the finite ones (a tap with none cannot pass)."""
        return int(np.prod(self.shape)) - self.nonfinite

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def compare_tap(tap: str, reference: np.ndarray, other: np.ndarray, tolerance: Tolerance) -> TapResult:
    """Max-abs, max-rel (to the tap's scale) and cosine of `other` against `reference`."""
    ref = np.asarray(reference, np.float64)
    got = np.asarray(other, np.float64)
    if ref.shape != got.shape:
        return TapResult(tap, tuple(ref.shape), float("inf"), float("inf"), 0.0,
                         float(np.abs(ref).max(initial=0)), tolerance.limit(0), False)
    # Weights converted with --allow-nonfinite carry NaN/Inf into both sides: those must sit at
    # the same positions with the same values; the errors are measured over the finite rest.
    finite = np.isfinite(ref)
    same_nonfinite = bool(np.array_equal(finite, np.isfinite(got))
                          and np.array_equal(ref[~finite], got[~finite], equal_nan=True))
    scale = float(np.abs(ref[finite]).max(initial=0.0))
    limit = tolerance.limit(scale)
    if not same_nonfinite:
        return TapResult(tap, tuple(ref.shape), float("inf"), float("inf"), 0.0, scale, limit, False,
                         int(finite.size - np.count_nonzero(finite)))
    if ref.size and not finite.any():  # NaN/Inf everywhere on both sides: nothing was compared
        nan = float("nan")
        return TapResult(tap, tuple(ref.shape), nan, nan, nan, scale, limit, False, int(ref.size))
    ref, got = ref[finite], got[finite]
    max_abs = float(np.abs(ref - got).max(initial=0.0))
    norms = np.linalg.norm(ref) * np.linalg.norm(got)
    cosine = float(np.sum(ref * got) / norms) if norms > 0 else float(max_abs == 0)
    passed = max_abs <= limit
    return TapResult(tap, tuple(np.shape(reference)), max_abs, max_abs / scale if scale else max_abs,
                     cosine, scale, limit, passed, int(finite.size - np.count_nonzero(finite)))


def compare_taps(reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> list[TapResult]:
    """Compare every tap of `reference`, in its order; a tap missing from `other` fails."""
    results = []
    for position, (tap, ref) in enumerate(reference.items(), 1):
        tolerance = tolerance_for(tap, position)
        if tap not in other:
            results.append(TapResult(tap, tuple(np.shape(ref)), float("inf"), float("inf"), 0.0,
                                     float(np.abs(ref).max(initial=0)), tolerance.limit(0), False))
            continue
        results.append(compare_tap(tap, ref, other[tap], tolerance))
    return results


def first_divergence(results: list[TapResult]) -> str | None:
    """The first tap (in forward order) that fails its tolerance, or None."""
    return next((r.tap for r in results if not r.passed), None)
