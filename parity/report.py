"""parity.json, parity.md and parity.png: the evidence written into every output folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parity.engine import ParityReport, SideResult


def _sci(x: float) -> str:
    return f"{x:.2e}" if x == x else "n/a"


def _no_nan(value: Any) -> Any:
    """`value` with every NaN float as None: JSON has no NaN, and a strict parser rejects the token."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def recorded_failure(parity: dict[str, Any]) -> str:
    """What failed, from a parity.json (one written before "failure" was recorded names its tap)."""
    return parity.get("failure") or f"first diverging tap: {parity.get('first_diverging_tap')}"


def report_dict(report: ParityReport, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON form: verdict, what failed, worst logits error, every tap of every run (NaN as null)."""
    return _no_nan({
        "passed": report.passed,
        "failure": None if report.passed else report.failure,
        "family": report.family,
        "variant": report.variant,
        "source": report.source,
        "first_diverging_tap": report.first_divergence,
        "max_abs_logits": {"target": report.worst("logits", "target"),
                           "peer": report.worst("logits", "peer")},
        "notes": report.notes,
        "checks": report.checks,
        "runs": [{"side": r.side, "role": r.role, "input": r.input, "dtype": r.dtype,
                  "passed": r.passed, "first_diverging_tap": r.first_divergence,
                  "taps": [t.as_dict() for t in r.taps]} for r in report.results],
        **(extra or {}),
    })


def verdict(result: SideResult) -> str:
    """pass / FAIL for judged runs; a measured run (half-precision weights) is only measured."""
    if result.role == "measured":
        return "measured"
    return "pass" if result.passed else "FAIL"


def _summary_rows(report: ParityReport) -> list[str]:
    rows = ["| side | role | input | weights | logits max-abs | worst tap (max-rel) | first diverging | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    for r in report.results:
        logits = next((t for t in r.taps if t.tap == "logits"), None)
        worst = max(r.taps, key=lambda t: t.max_rel)
        rows.append(f"| {r.side} | {r.role} | {r.input} | {r.dtype} | "
                    f"{_sci(logits.max_abs) if logits else 'n/a'} | {worst.tap} ({_sci(worst.max_rel)}) | "
                    f"{r.first_divergence or '-'} | {verdict(r)} |")
    return rows


def _tap_rows(result: SideResult) -> list[str]:
    rows = [f"#### {result.side} vs source, {result.input}, {result.dtype} weights", "",
            "| tap | shape | max-abs | max-rel | cosine | limit | |", "|---|---|---|---|---|---|---|"]
    for t in result.taps:
        rows.append(f"| {t.tap} | {'x'.join(map(str, t.shape))} | {_sci(t.max_abs)} | {_sci(t.max_rel)} | "
                    f"{t.cosine:.8f} | {_sci(t.limit)} | {'ok' if t.passed else 'FAIL'} |")
    return rows + [""]


def report_markdown(report: ParityReport) -> str:
    """A readable table: one summary line per run, then every tap of the first input's runs."""
    verdict = "PASSED" if report.passed else f"FAILED ({report.failure})"
    lines = [f"# Parity: {report.family} {report.variant}", "",
             f"Source side: {report.source}. Verdict: **{verdict}**.", "",
             "max-rel is max-abs divided by the tap's largest |reference| value; "
             "a tap passes when max-abs <= limit. Runs marked measured use the weights as stored in "
             "half precision: their errors are the rounding's, recorded and not judged.", "",
             *_summary_rows(report), ""]
    if report.checks:
        lines += ["## Exact checks", "", *[f"- {'ok' if ok else 'FAILED'}: {name}" for name, ok in report.checks.items()], ""]
    if report.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in report.notes], ""]
    lines += ["## Per tap", ""]
    first_input = report.results[0].input if report.results else None
    for r in report.results:
        if r.input == first_input or (not r.passed and r.role != "measured"):
            lines += _tap_rows(r)
    return "\n".join(lines)


# A log axis has no zero: an exact 0 is drawn at this floor, with its own marker and legend entry.
ZERO_DRAWN_AT = 1e-12
SYNTHETIC_MARK = "SYNTHETIC weights (random values), not the published checkpoint"


def plot_report(report: ParityReport, path: Path, synthetic: bool = False) -> None:
    """PNG: max-rel error per tap (log scale), one line per run, limits dashed; a tap whose error is exactly
    0 is marked as such at `ZERO_DRAWN_AT`, and `synthetic` weights are named in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(report.results[0].taps)), 4), dpi=100)
    zeros_labelled = False
    for r in report.results:
        ys = [max(t.max_rel, ZERO_DRAWN_AT) for t in r.taps]
        (line,) = ax.plot(range(len(ys)), ys, marker=".", label=f"{r.side} / {r.input} / {r.dtype}")
        zeros = [i for i, t in enumerate(r.taps) if t.max_rel == 0]
        if zeros:
            ax.plot(zeros, [ZERO_DRAWN_AT] * len(zeros), "v", color=line.get_color(), linestyle="none",
                    label="_nolegend_" if zeros_labelled else f"exactly 0 (drawn at {ZERO_DRAWN_AT:g})")
            zeros_labelled = True
    taps = report.results[0].taps
    ax.plot(range(len(taps)), [t.limit / t.scale if t.scale else t.limit for t in taps],
            "k--", linewidth=0.8, label="limit (float32)" if report.results[0].dtype == "float32" else "limit")
    ax.set_yscale("log")
    ax.set_xticks(range(len(taps)), [t.tap for t in taps], rotation=90, fontsize=6)
    ax.set_ylabel("max-abs / tap scale")
    title = f"{report.family} {report.variant}: error per tap"
    if synthetic:
        ax.set_title(f"{title}\n{SYNTHETIC_MARK}", color="red", fontsize=9)
    else:
        ax.set_title(title)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(report: ParityReport, folder: Path, extra: dict[str, Any] | None = None,
                  synthetic: bool = False) -> None:
    """Write parity.json, parity.md and parity.png into `folder` (`synthetic`: the source's weights are a
    stand-in, which the plot names)."""
    (folder / "parity.json").write_text(json.dumps(report_dict(report, extra), indent=2, allow_nan=False) + "\n")
    (folder / "parity.md").write_text(report_markdown(report) + "\n")
    plot_report(report, folder / "parity.png", synthetic)
