"""The config-only shape functions equal the real transformers classes' state dicts.

For data2vec 2.0 the real classes are our custom code (reference/data2vec2_hf/),
the same classes a converted folder ships and loads with trust_remote_code.

`converters.shapes` lets `convert` check every target key and shape strictly
without importing torch or transformers; these tests prove the lists are the
same ones the classes build, key for key and shape for shape.
"""

from __future__ import annotations

import pytest
from transformers import (BitConfig, BitForImageClassification, Data2VecVisionConfig,
                          Data2VecVisionForImageClassification, Data2VecVisionModel)

from converters.bit import hf_config
from converters.families.bit import BitSpec, target_shapes
from converters.data2vec import D2V2_BACKBONE, D2V2_PRETRAINED_BACKBONE, D2V1Spec, D2V2Spec, d2v1_config, d2v2_config
from converters.family import expected_shapes
from converters.shapes import data2vec2_vision_shapes, data2vec_vision_shapes
from reference.data2vec2_hf import (Data2Vec2VisionConfig, Data2Vec2VisionForImageClassification,
                                    Data2Vec2VisionModel)

BIT_VARIANTS = {  # name: (depths, width factor, classes)
    "tiny": ((1, 1, 1, 1), 0.5, 10),
    "R50x1": ((3, 4, 6, 3), 1, 1000),
    "R101x3": ((3, 4, 23, 3), 3, 21843),
    "R152x4": ((3, 8, 36, 3), 4, 1000),
    "R50x1-no-head": ((3, 4, 6, 3), 1, 0),
}


@pytest.mark.parametrize("name", BIT_VARIANTS)
def test_bit_shapes_equal_transformers(name: str) -> None:
    depths, width, classes = BIT_VARIANTS[name]
    spec = BitSpec(depths, int(64 * width), classes,
                   hidden_sizes=tuple(int(w * width) for w in (256, 512, 1024, 2048)))
    config = hf_config(spec, None)
    expected = expected_shapes(BitForImageClassification, BitConfig(**config))
    assert target_shapes(config) == expected


D2V_VARIANTS = {  # name: (dim, depth, heads, mlp, patch, image)
    "tiny": (64, 2, 4, 128, 16, 64),
    "base": (768, 12, 12, 3072, 16, 224),
    "large": (1024, 24, 16, 4096, 16, 224),
    "large-384": (1024, 24, 16, 4096, 16, 384),
}


@pytest.mark.parametrize("classes", [1000, 0])
@pytest.mark.parametrize("name", D2V_VARIANTS)
def test_data2vec_vision_shapes_equal_transformers(name: str, classes: int) -> None:
    dim, depth, heads, mlp, patch, image = D2V_VARIANTS[name]
    spec = D2V1Spec("", dim, depth, heads, mlp, patch, image, 3, classes, False)
    config = d2v1_config(spec)
    model_class = Data2VecVisionForImageClassification if spec.finetuned else Data2VecVisionModel
    expected = expected_shapes(model_class, Data2VecVisionConfig(**config))
    assert data2vec_vision_shapes(config, spec.finetuned) == expected


D2V2_VARIANTS = {  # name: (dim, prenet blocks, shared blocks, heads, mlp, patch, image)
    "tiny": (64, 1, 2, 4, 256, 16, 64),
    "base": (768, 2, 10, 12, 3072, 16, 224),
    "large": (1024, 0, 24, 16, 4096, 16, 224),
    "huge": (1280, 0, 32, 16, 5120, 14, 224),
}


def _d2v2_spec(name: str, classes: int, layer_norm_first: bool) -> D2V2Spec:
    dim, prenet, depth, heads, mlp, patch, image = D2V2_VARIANTS[name]
    backbone = D2V2_BACKBONE if classes else D2V2_PRETRAINED_BACKBONE
    return D2V2Spec(backbone, dim, prenet, depth, heads, mlp, patch, image, 3, classes, layer_norm_first, 1e-6)


@pytest.mark.parametrize("layer_norm_first", [False, True])
@pytest.mark.parametrize("classes", [1000, 0])
@pytest.mark.parametrize("name", D2V2_VARIANTS)
def test_data2vec2_vision_shapes_equal_custom_model(name: str, classes: int, layer_norm_first: bool) -> None:
    spec = _d2v2_spec(name, classes, layer_norm_first)
    config = d2v2_config(spec)  # fine-tuned: the classifier; pretrained: the encoder without a pooler
    model_class = Data2Vec2VisionForImageClassification if spec.finetuned else Data2Vec2VisionModel
    expected = expected_shapes(model_class, Data2Vec2VisionConfig(**config))
    assert data2vec2_vision_shapes(config, spec.finetuned) == expected


@pytest.mark.parametrize("use_mean_pooling", [True, False])
@pytest.mark.parametrize("classification", [True, False])
def test_data2vec2_vision_shapes_follow_the_pooling_flag(classification: bool, use_mean_pooling: bool) -> None:
    """The flag adds or removes the bare model's pooler; the classifier always has one. The
    pretrained config (no id2label) in the classifier is the start of a fine-tune: 2 labels."""
    config = {**d2v2_config(_d2v2_spec("tiny", 0, False)), "use_mean_pooling": use_mean_pooling}
    model_class = Data2Vec2VisionForImageClassification if classification else Data2Vec2VisionModel
    expected = expected_shapes(model_class, Data2Vec2VisionConfig(**config))
    shapes = data2vec2_vision_shapes(config, classification)
    assert shapes == expected
    pooler = ("data2vec2." if classification else "") + "pooler.layernorm.weight"
    assert (pooler in shapes) == (classification or use_mean_pooling)


def test_shape_functions_refuse_layouts_they_do_not_cover() -> None:
    config = hf_config(BitSpec((1, 1, 1, 1), 32, 10), None)
    with pytest.raises(ValueError):
        target_shapes({**config, "layer_type": "bottleneck"})
    d2v = d2v1_config(D2V1Spec("", 64, 2, 4, 128, 16, 64, 3, 10, False))
    with pytest.raises(ValueError):
        data2vec_vision_shapes({**d2v, "use_shared_relative_position_bias": True}, True)
