"""Readers: one container format each; none knows a model family."""
