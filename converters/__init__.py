"""Readers, key-mapping rules, per-family converters and the safetensors writer."""

__version__ = "0.1.0"
