"""Tap comparison: tolerances, first divergence, scale-relative errors."""

import numpy as np
import pytest

from parity.compare import compare_tap, compare_taps, first_divergence, tolerance_for


def test_max_abs_max_rel_and_cosine():
    ref = np.array([[1.0, -2.0], [4.0, 0.5]])
    got = ref + np.array([[0.0, 2.0 ** -10], [0.0, 0.0]])  # exactly representable
    r = compare_tap("t", ref, got, tolerance_for("t"))
    assert r.max_abs == 2.0 ** -10 and r.scale == 4.0 and r.max_rel == 2.0 ** -12
    assert 0.999999 < r.cosine < 1.0 and not r.passed  # 1e-3 > 1e-5 + 1e-4 * 4


def test_shape_mismatch_and_missing_tap_fail():
    taps = compare_taps({"a": np.zeros(3), "b": np.ones(2)}, {"a": np.zeros(4)})
    assert [t.passed for t in taps] == [False, False] and first_divergence(taps) == "a"


def test_logits_keep_their_absolute_tolerance_at_any_depth():
    assert tolerance_for("logits", 1) == tolerance_for("logits", 60)
    assert tolerance_for("logits", 60).atol == 1e-4


def test_intermediate_tolerance_grows_linearly_past_the_calibrated_depth():
    assert tolerance_for("block1.unit01", 2).rtol == 1e-4
    assert tolerance_for("block4.unit03", 16).rtol == 1e-4
    assert tolerance_for("block4.unit03", 32).rtol == 2e-4


def test_first_divergence_is_in_forward_order():
    ref = {"stem": np.ones(4), "block1": np.ones(4), "logits": np.ones(2)}
    got = {"stem": np.ones(4), "block1": np.ones(4) * 2, "logits": np.ones(2) * 3}
    assert first_divergence(compare_taps(ref, got)) == "block1"


def test_a_report_says_what_failed_a_tap_or_an_exact_check():
    from parity.engine import ParityReport, SideResult

    ok = compare_taps({"logits": np.ones(2)}, {"logits": np.ones(2)})
    bad = compare_taps({"stem": np.ones(2)}, {"stem": np.ones(2) * 3})
    report = ParityReport("bit", "tiny", "src", [SideResult("t", "target", "x", "float32", bad)])
    assert not report.passed and report.failure == "first diverging tap: stem"
    report = ParityReport("bit", "tiny", "src", [SideResult("t", "target", "x", "float32", ok)],
                          checks={"stored bfloat16 tensors are the rounded float32 ones": False})
    assert not report.passed and report.failure == "failed check: stored bfloat16 tensors are the rounded float32 ones"
    from parity.report import recorded_failure, report_dict, report_markdown

    recorded = report_dict(report)
    assert recorded_failure(recorded) == report.failure  # what parity.json keeps for verify, publish and the card
    assert f"FAILED ({report.failure})" in report_markdown(report)
    assert recorded_failure({"first_diverging_tap": "stem"}) == "first diverging tap: stem"  # an older parity.json


def test_a_tap_with_no_finite_values_cannot_pass():
    ref = np.full((2, 3), np.nan)
    r = compare_tap("logits", ref, ref.copy(), tolerance_for("logits"))
    assert not r.passed and r.compared == 0 and r.nonfinite == 6 and np.isnan(r.max_abs)
    partly = compare_tap("logits", np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), tolerance_for("logits"))
    assert partly.passed and partly.compared == 1 and partly.max_abs == 0.0


@pytest.mark.parametrize("synthetic", [False, True])
def test_the_plot_marks_an_exact_zero_and_synthetic_weights(tmp_path, monkeypatch, synthetic):
    """A log axis cannot show 0: the plot says where it draws one, and says when the weights are random."""
    import matplotlib.pyplot as plt

    from parity.engine import ParityReport, SideResult
    from parity.report import plot_report

    taps = compare_taps({"stem": np.ones(2), "logits": np.ones(2)}, {"stem": np.ones(2), "logits": np.ones(2) * 1.001})
    report = ParityReport("bit", "tiny", "src", [SideResult("t", "target", "x", "float32", taps)])
    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)
    plot_report(report, tmp_path / "parity.png", synthetic=synthetic)
    [ax] = drawn[0].axes
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [
        "t / x / float32", "exactly 0 (drawn at 1e-12)", "limit (float32)"]
    assert ax.lines[1].get_xydata().tolist() == [[0.0, 1e-12]]  # the stem, where both sides agree exactly
    assert ax.get_title() == "bit tiny: error per tap" + (
        "\nSYNTHETIC weights (random values), not the published checkpoint" if synthetic else "")
    assert (tmp_path / "parity.png").stat().st_size > 0
