"""The model families parityport converts: how each is recognised and converted."""

from __future__ import annotations

from converters import bit, data2vec
from converters.family import Converter, Detector

DETECTORS: dict[str, Detector] = {"bit": bit.is_bit, "data2vec1": data2vec.is_data2vec1,
                                  "data2vec2": data2vec.is_data2vec2}
CONVERTERS: dict[str, Converter] = {"bit": bit.convert, "data2vec1": data2vec.convert_data2vec1,
                                    "data2vec2": data2vec.convert_data2vec2}
# What a reader calls each family (cards and reports): the keys above are internal ids.
FAMILY_NAMES: dict[str, str] = {"bit": "BiT", "data2vec1": "data2vec-vision 1.0", "data2vec2": "data2vec-vision 2.0"}
