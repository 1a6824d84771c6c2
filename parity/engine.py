"""Run the same inputs through a source side and other sides, tap by tap.

A side is a function from one NCHW float32 batch to `{tap: array}` in forward
order, feature maps NCHW. The SOURCE side is the original framework on the
original weights; the TARGET is what users will load; PEERS are independent
implementations (timm) shown for agreement but not gating the verdict; a
MEASURED side is the target with its weights as stored in half precision, whose
errors are recorded, not judged (the rounding is checked exactly instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from parity.compare import TapResult, compare_taps, first_divergence

Taps = Mapping[str, np.ndarray]
SideFn = Callable[[np.ndarray], Taps]


@dataclass(frozen=True)
class Side:
    """One implementation to compare. `role` is "source", "target" or "peer"."""

    name: str
    role: str
    run: SideFn = field(repr=False)


@dataclass(frozen=True)
class ParityInput:
    """A named input batch, already preprocessed: (N, 3, H, W) float32."""

    name: str
    pixels: np.ndarray


@dataclass
class SideResult:
    side: str
    role: str
    input: str
    dtype: str
    taps: list[TapResult]

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.taps)

    @property
    def first_divergence(self) -> str | None:
        return first_divergence(self.taps)


@dataclass
class ParityReport:
    """Every side against the source on every input; passes when every TARGET result passes."""

    family: str
    variant: str
    source: str
    results: list[SideResult]
    notes: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)  # exact checks beside the taps, e.g. rounding

    @property
    def passed(self) -> bool:
        gating = [r for r in self.results if r.role == "target"]
        return bool(gating) and all(r.passed for r in gating) and all(self.checks.values())

    @property
    def first_divergence(self) -> str | None:
        return next((r.first_divergence for r in self.results
                     if r.role == "target" and not r.passed), None)

    @property
    def failure(self) -> str:
        """What failed, for one-line messages: the first diverging tap or the failed exact check."""
        tap = next((t for r in self.results if r.role == "target" for t in r.taps if not t.passed), None)
        if tap is not None:
            empty = " (NaN/Inf in every value on both sides: nothing to compare)" if tap.compared == 0 else ""
            return f"first diverging tap: {tap.tap}{empty}"
        failed = [name for name, ok in self.checks.items() if not ok]
        return f"failed check: {failed[0]}" if failed else "no judged run"

    def worst(self, tap: str = "logits", role: str = "target") -> float:
        """The largest max-abs error of `tap` over inputs for sides of `role`."""
        values = [t.max_abs for r in self.results if r.role == role for t in r.taps if t.tap == tap]
        return max(values, default=float("nan"))


def run_parity(source: Side, others: list[tuple[Side, str]], inputs: list[ParityInput],
               *, family: str, variant: str) -> ParityReport:
    """Compare each (side, weight dtype label) in `others` against `source` on every input."""
    results = []
    for item in inputs:
        reference = {k: np.asarray(v) for k, v in source.run(item.pixels).items()}
        for side, dtype in others:
            taps = compare_taps(reference, side.run(item.pixels))
            results.append(SideResult(side.name, side.role, item.name, dtype, taps))
    return ParityReport(family, variant, source.name, results)
