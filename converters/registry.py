"""The model families parityport converts: how each is recognised and converted."""

from __future__ import annotations

from converters import bit
from converters.family import Converter, Detector

DETECTORS: dict[str, Detector] = {"bit": bit.is_bit}
CONVERTERS: dict[str, Converter] = {"bit": bit.convert}
