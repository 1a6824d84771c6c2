"""Tap-by-tap comparison across frameworks, reports, ImageNet evaluation, model cards, verification and benchmarks."""
