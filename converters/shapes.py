"""Target state-dict shapes computed from the config dict, without torch or transformers.

`apply_rules` is strict against the exact state dict of the target class. Building
that class (even on the meta device) imports torch and transformers, ~10 s and
~0.9 GiB before a single byte is converted, so each family instead has a small
function that lists the same keys and shapes from the config it writes.
tests/test_shapes.py asserts that each equals the meta-device state dict of the
real class for tiny and full-size configs, so strictness is kept and proven.
"""

from __future__ import annotations

from typing import Any, Mapping

Shapes = dict[str, tuple[int, ...]]

# The most classes a converted head may have: a label table is built per class, in memory, before
# any weight is read (the largest published head, ImageNet-21k's, has 21843).
MAX_CLASSES = 2**17


# ---------------------------------------------------------------------------
# data2vec 1.0 vision: transformers `Data2VecVisionModel` / `Data2VecVisionForImageClassification`

_D2V_ASSUMED = {"use_mask_token": False, "use_absolute_position_embeddings": False,
                "use_relative_position_bias": True, "use_shared_relative_position_bias": False}


def data2vec_vision_shapes(config: Mapping[str, Any], classification: bool) -> Shapes:
    """State-dict shapes of `Data2VecVisionForImageClassification` (`classification`) or
    `Data2VecVisionModel` built from `config`, for the per-layer relative-bias layout."""
    if any(config.get(k, v) != v for k, v in _D2V_ASSUMED.items()):
        raise ValueError(f"data2vec_vision_shapes assumes {_D2V_ASSUMED}")
    dim, hidden, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    patch, window = config["patch_size"], config["image_size"] // config["patch_size"]
    base = "data2vec_vision." if classification else ""
    shapes: Shapes = {f"{base}embeddings.cls_token": (1, 1, dim),
                      f"{base}embeddings.patch_embeddings.projection.weight":
                          (dim, config["num_channels"], patch, patch),
                      f"{base}embeddings.patch_embeddings.projection.bias": (dim,)}
    for i in range(config["num_hidden_layers"]):
        layer = f"{base}encoder.layer.{i}."
        attn = layer + "attention.attention."
        shapes.update({
            layer + "lambda_1": (dim,), layer + "lambda_2": (dim,),
            attn + "query.weight": (dim, dim), attn + "query.bias": (dim,),
            attn + "key.weight": (dim, dim),  # no key bias
            attn + "value.weight": (dim, dim), attn + "value.bias": (dim,),
            # (2W-1)^2 relative offsets plus cls→token, token→cls and cls→cls
            attn + "relative_position_bias.relative_position_bias_table": ((2 * window - 1) ** 2 + 3, heads),
            layer + "attention.output.dense.weight": (dim, dim), layer + "attention.output.dense.bias": (dim,),
            layer + "intermediate.dense.weight": (hidden, dim), layer + "intermediate.dense.bias": (hidden,),
            layer + "output.dense.weight": (dim, hidden), layer + "output.dense.bias": (dim,),
            layer + "layernorm_before.weight": (dim,), layer + "layernorm_before.bias": (dim,),
            layer + "layernorm_after.weight": (dim,), layer + "layernorm_after.bias": (dim,),
        })
    mean_pooling = config.get("use_mean_pooling", True)
    if not mean_pooling:
        shapes[f"{base}layernorm.weight"] = shapes[f"{base}layernorm.bias"] = (dim,)
    if classification:
        if mean_pooling:  # the pooler's LayerNorm over the mean of the patch tokens
            shapes[f"{base}pooler.layernorm.weight"] = shapes[f"{base}pooler.layernorm.bias"] = (dim,)
        classes = len(config.get("id2label") or {})
        if classes:
            shapes["classifier.weight"] = (classes, dim)
            shapes["classifier.bias"] = (classes,)
    return shapes


# ---------------------------------------------------------------------------
# data2vec 2.0 vision: our custom `Data2Vec2VisionModel` / `Data2Vec2VisionForImageClassification`
# (reference/data2vec2_hf/modeling_data2vec2.py)

def _num_labels(config: Mapping[str, Any]) -> int:
    """`PretrainedConfig.num_labels`: len(id2label) when given, else `num_labels` (default 2)."""
    id2label = config.get("id2label")
    return len(id2label) if id2label is not None else config.get("num_labels", 2)


def _layer_norm(prefix: str, dim: int) -> Shapes:
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def data2vec2_vision_shapes(config: Mapping[str, Any], classification: bool) -> Shapes:
    """State-dict shapes of `Data2Vec2VisionForImageClassification` (`classification`) or
    `Data2Vec2VisionModel` built from `config`.

    The classifier always has the pooler and a classifier of `num_labels` rows;
    the bare model has the pooler only with `use_mean_pooling` (default True).
    """
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    patch, grid = config["patch_size"], config["image_size"] // config["patch_size"]
    pre_norm = config.get("layer_norm_first", False)
    base = "data2vec2." if classification else ""
    emb = base + "embeddings."
    shapes: Shapes = {emb + "cls_token": (1, 1, dim),
                      emb + "position_embeddings": (1, grid * grid, dim),  # patches only, no cls row
                      emb + "patch_embeddings.projection.weight": (dim, config["num_channels"], patch, patch),
                      emb + "patch_embeddings.projection.bias": (dim,),
                      **({} if pre_norm else _layer_norm(emb + "layernorm", dim))}
    for i in range(config["num_hidden_layers"]):  # prenet and shared blocks, one sequence
        layer = f"{base}encoder.layer.{i}."
        shapes.update({
            **_layer_norm(layer + "attention_norm", dim),
            layer + "attention.qkv.weight": (3 * dim, dim), layer + "attention.qkv.bias": (3 * dim,),
            layer + "attention.projection.weight": (dim, dim), layer + "attention.projection.bias": (dim,),
            **_layer_norm(layer + "mlp_norm", dim),
            layer + "mlp.fc1.weight": (hidden, dim), layer + "mlp.fc1.bias": (hidden,),
            layer + "mlp.fc2.weight": (dim, hidden), layer + "mlp.fc2.bias": (dim,),
        })
    if pre_norm:
        shapes.update(_layer_norm(base + "layernorm", dim))
    if classification or config.get("use_mean_pooling", True):  # LayerNorm of the mean patch token
        shapes.update(_layer_norm(base + "pooler.layernorm", dim))
    if classification:
        shapes["classifier.weight"] = (_num_labels(config), dim)
        shapes["classifier.bias"] = (_num_labels(config),)
    return shapes
