"""data2vec-vision → transformers: 1.0 (BEiT-based code) and 2.0 (fairseq `data2vec_multi`).

Sources (shared/FORMATS.md):
- 1.0 pretrained `checkpoint-799.pth`: weights under `model` (student), the
  teacher under `model_ema`, optimizer/scaler state, an argparse `args`;
- 1.0 fine-tuned DeepSpeed `mp_rank_00_model_states.pt`: weights under
  `module` (fp16), DeepSpeed's optimizer and bookkeeping beside them;
- 2.0 fine-tuned fairseq `*_ft.pt`: `model` holds `model.<Data2VecMultiModel>`
  plus `fc_norm`/`head`; `cfg` holds the backbone's hyper-parameters;
- 2.0 pretrained fairseq `*_imagenet.pt`: `model` holds the `Data2VecMultiModel`
  itself (no `model.` inside), with its `_ema` teacher and
  `modality_encoders.IMAGE.decoder.*`.

Targets: `Data2VecVisionForImageClassification` (1.0 fine-tuned),
`Data2VecVisionModel` (1.0 pretrained), and our custom
`Data2Vec2VisionForImageClassification` (2.0 fine-tuned) /
`Data2Vec2VisionModel` (2.0 pretrained, no pooler), shipped as code in the
folder and loaded with `trust_remote_code=True`. Everything about the variant is read
from the shapes, except the 2.0 head count, which only the file's cfg knows.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from converters.errors import InputError
from converters.family import Conversion
from converters.rules import Broadcast, Drop, Rename, Rule, SplitRows, apply_rules, count_indexed
from converters.shapes import MAX_CLASSES, data2vec2_vision_shapes, data2vec_vision_shapes
from converters.tensors import Checkpoint, LazyTensor, plausible_dims, shape_text, shown
from reference.beit_positions import table_window

CROP_PCT = 0.875  # both originals: resize the shorter side to int(crop / 0.875), centre-crop `crop`
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)  # data2vec 1.0 fine-tuning (no --imagenet_default_mean_and_std)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # data2vec 2.0
LN_EPS = 1e-6  # every LayerNorm of both originals; transformers' Data2VecVision default is 1e-12
DERIVED = "derived: rebuilt from the window size (never written)"

# Top-level container entries that are not model weights: (prefix, why). Checked before the rules.
CONTAINER_DROPS: tuple[tuple[str, str], ...] = (
    ("model_ema.", "EMA teacher of pretraining (the student under 'model' is the released model)"),
    ("optimizer.", "optimizer state"),
    ("scaler.", "fp16 loss-scaler state"),
    ("lr_scheduler.", "learning-rate scheduler state"),
    ("criterion.", "fairseq criterion state"),
    ("optimizer_history.", "fairseq optimizer history"),
    ("last_optimizer_state.", "fairseq optimizer state"),
    ("extra_state.", "fairseq training state"),
    ("task_state.", "fairseq task state"),
)

ARCHS: dict[tuple[int, int, int, int], str] = {  # (dim, blocks, heads, patch) → published name
    (768, 12, 12, 16): "ViT-B/16", (1024, 24, 16, 16): "ViT-L/16", (1280, 32, 16, 14): "ViT-H/14",
}
# 2.0 heads by width, used only when the file carries no cfg (the shapes cannot tell).
D2V2_HEADS_BY_DIM = {768: 12, 1024: 16, 1280: 16}
# Patches per side of the grid (1.0: the relative-position window). The published models use 14
# (224 px) to 24 (384 px); the 1.0 index rebuilt for a window of W is (W*W+1)^2 int64, 134 MB at 64,
# and it grows as W^4, so a file declaring a larger grid is refused before anything is built.
MAX_GRID = 64
MAX_WIDTH = 2**16  # any dimension a variant is read from; ViT-H has 1280 channels and 5120 hidden
# A LayerNorm eps guards a division (1e-12 to 1e-5 in practice); anything past this is not one.
MAX_NORM_EPS = 0.1


def _variant_name(arch: str, num_classes: int) -> str:
    """"ViT-B/16 fine-tuned (1000 classes)" or "ViT-B/16 pretrained"."""
    return f"{arch} {f'fine-tuned ({num_classes} classes)' if num_classes else 'pretrained'}"


def _arch(dim: int, blocks: int, heads: int, patch: int) -> str:
    return ARCHS.get((dim, blocks, heads, patch), f"ViT-d{dim}-L{blocks}-H{heads}/{patch}")


def _shape(tensors: Mapping[str, LazyTensor], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise InputError(None, f"missing keys: {key}")
    return tuple(tensors[key].shape)


def _dims(tensors: Mapping[str, LazyTensor], key: str, rank: int, high: int = MAX_WIDTH) -> tuple[int, ...]:
    """The shape of `key`, in `rank` dimensions each from 1 to `high`, else `InputError`."""
    return plausible_dims(key, _shape(tensors, key), rank, high)


def _check_heads(heads: int, dim: int, source: str) -> int:
    """`heads` if it splits the width `dim` evenly, else `InputError` naming `source`."""
    if heads <= 0 or dim % heads:
        raise InputError(None, f"{source} gives {shown(heads)} attention heads, which do not split the "
                               f"width {dim} evenly")
    return heads


def _check_grid(grid: int, source: str) -> int:
    """`grid` (patches per side) if within `MAX_GRID`, else `InputError` naming `source`."""
    if grid > MAX_GRID:
        raise InputError(None, f"{source} is for a {grid}x{grid} grid of patches; at most "
                               f"{MAX_GRID} per side are supported")
    return grid


def _conv_shape(tensors: Mapping[str, LazyTensor], key: str) -> tuple[int, ...]:
    """The patch embedding's [dim, channels, patch, patch], refused in any other rank."""
    shape = _shape(tensors, key)
    if len(shape) != 4:
        raise InputError(None, f"{key} has shape {shape_text(shape)}; expected [dim, channels, patch, patch]")
    return plausible_dims(key, shape, 4, MAX_WIDTH)


def _pair(source: str, target: str) -> list[Rename]:
    """`source.{weight,bias}` → `target.{weight,bias}` (explicit leaves: anything else is unknown)."""
    return [Rename(f"{source}.{leaf}", f"{target}.{leaf}") for leaf in ("weight", "bias")]


def drop_subtrees(tensors: Mapping[str, LazyTensor], drops: Sequence[tuple[str, str]]
                  ) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """Split off every key under one of the `(prefix, why)` subtrees; returns (kept, dropped)."""
    kept: dict[str, LazyTensor] = {}
    dropped: dict[str, str] = {}
    for key, tensor in tensors.items():
        why = next((w for prefix, w in drops if key.startswith(prefix)), None)
        if why is None:
            kept[key] = tensor
        else:
            dropped[key] = why
    return kept, dropped


def _half_note(tensors: Mapping[str, LazyTensor]) -> list[str]:
    halves = sum(np.dtype(t.dtype) == np.float16 for t in tensors.values())
    if not halves:
        return []
    return [f"{halves} tensors are stored as float16 (fp16 training); they are widened to float32 "
            "exactly, and the parity source reads the same widened values."]


def dropped_notes(dropped: Mapping[str, str], shown: int = 4) -> list[str]:
    """One line per drop reason: how many keys, and the first few by name."""
    by_reason: dict[str, list[str]] = {}
    for key, why in dropped.items():
        by_reason.setdefault(why, []).append(key)
    return [f"Dropped by rule ({why}): {len(keys)} key{'s' if len(keys) > 1 else ''}: "
            f"{', '.join(keys[:shown])}{', ...' if len(keys) > shown else ''}"
            for why, keys in by_reason.items()]


def preprocessor_config(image: int, mean: Sequence[float], std: Sequence[float]) -> dict:
    """The ORIGINAL eval pipeline: shorter side int(image/0.875) bicubic, centre crop image×image.

    (The hub's published data2vec-vision preprocessor squashes to 224×224 with
    no crop: a different pipeline; `parityport eval --protocol hub` measures it.)
    """
    return {
        "image_processor_type": "BeitImageProcessor",
        "do_resize": True, "size": {"shortest_edge": int(image / CROP_PCT)}, "resample": 3,  # PIL bicubic
        "do_center_crop": True, "crop_size": {"height": image, "width": image},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
        "do_reduce_labels": False,
    }


def _labels(num_classes: int) -> dict:
    from checkpoints.labels import imagenet_id2label

    labels = imagenet_id2label(num_classes) or {i: f"LABEL_{i}" for i in range(num_classes)}
    return {"id2label": {str(i): v for i, v in labels.items()}, "label2id": {v: i for i, v in labels.items()}}


# =============================================================================
# data2vec 1.0 (BEiT-based)

D2V1_ENTRIES = ("model.", "module.", "")  # beit save_model, DeepSpeed, a bare state dict
_D2V1_SIGNATURE = re.compile(r"^(model\.|module\.)?blocks\.\d+\.attn\.(q_bias|v_bias)$")  # 2.0 has a fused qkv bias

# Inside a block: original → transformers (weight and bias each).
D2V1_BLOCK_PAIRS = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                    ("attn.proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                    ("mlp.fc2", "output.dense"))


@dataclass(frozen=True)
class D2V1Spec:
    """A data2vec 1.0 file's variant, as read from the shapes."""

    prefix: str          # the container entry holding the weights: "module.", "model." or ""
    dim: int
    depth: int
    heads: int
    mlp_hidden: int
    patch: int
    image: int
    in_chans: int
    num_classes: int     # 0: the pretrained encoder
    shared_rel_pos: bool

    @property
    def finetuned(self) -> bool:
        return self.num_classes > 0

    @property
    def window(self) -> int:
        return self.image // self.patch

    @property
    def name(self) -> str:
        return _variant_name(_arch(self.dim, self.depth, self.heads, self.patch), self.num_classes)


def is_data2vec1(checkpoint: Checkpoint) -> bool:
    """BEiT-style separate q/v biases (`blocks.N.attn.q_bias`) at the top or under model/module."""
    return any(_D2V1_SIGNATURE.match(k) for k in checkpoint.tensors)


def _d2v1_prefix(tensors: Mapping[str, LazyTensor]) -> str:
    for prefix in D2V1_ENTRIES:
        if any(k.startswith(prefix + "blocks.") for k in tensors):
            return prefix
    raise InputError(None, "no data2vec 1.0 blocks under model, module or the top level")


def _d2v1_window(rows: int, key: str) -> int:
    """Window side W from a relative position table of (2W-1)^2 + 3 rows, at most `MAX_GRID`."""
    window = table_window(rows)
    if window is None:
        raise InputError(None, f"{key}: {rows} rows is not a (2W-1)^2+3 relative position table")
    return _check_grid(window, key)


def infer_d2v1(tensors: Mapping[str, LazyTensor]) -> D2V1Spec:
    """Width, depth, heads, window, classes and the rel-pos kind from the shapes."""
    p = _d2v1_prefix(tensors)
    per_layer, shared = (f"{p}blocks.0.attn.relative_position_bias_table",
                         f"{p}rel_pos_bias.relative_position_bias_table")
    if per_layer in tensors and shared in tensors:
        raise InputError(None, f"both {shared} and per-layer tables: unsupported combination")
    table = per_layer if per_layer in tensors else shared
    if len(_shape(tensors, table)) != 2:
        raise InputError(None, f"{table} has shape {shape_text(_shape(tensors, table))}; expected [rows, heads]")
    rows, heads = plausible_dims(table, _shape(tensors, table), 2, MAX_WIDTH, low=0)  # 0 heads: said below
    conv = _conv_shape(tensors, f"{p}patch_embed.proj.weight")
    dim = _dims(tensors, f"{p}cls_token", 3)[-1]
    return D2V1Spec(
        prefix=p, dim=dim, depth=count_indexed(tensors, f"{p}blocks."), heads=_check_heads(heads, dim, table),
        mlp_hidden=_dims(tensors, f"{p}blocks.0.mlp.fc1.weight", 2)[0], patch=conv[-1],
        image=_d2v1_window(rows, table) * conv[-1], in_chans=conv[1],
        num_classes=_dims(tensors, f"{p}head.weight", 2, MAX_CLASSES)[0] if f"{p}head.weight" in tensors else 0,
        shared_rel_pos=table == shared)


def d2v1_rules(spec: D2V1Spec) -> list[Rule]:
    """Original names → `Data2VecVisionForImageClassification` (fine-tuned) / `Data2VecVisionModel` names."""
    s = spec.prefix
    t = "data2vec_vision." if spec.finetuned else ""
    block, layer = f"{s}blocks.{{i}}.", f"{t}encoder.layer.{{i}}."
    attn = layer + "attention.attention."
    table = "relative_position_bias.relative_position_bias_table"
    rules: list[Rule] = [
        Rename(f"{s}cls_token", f"{t}embeddings.cls_token"),
        *_pair(f"{s}patch_embed.proj", f"{t}embeddings.patch_embeddings.projection"),
        *[r for old, new in D2V1_BLOCK_PAIRS for r in _pair(block + old, layer + new)],
        Rename(block + "attn.qkv.weight", tuple(f"{attn}{n}.weight" for n in ("query", "key", "value")),
               SplitRows(3)),
        Rename(block + "attn.q_bias", attn + "query.bias"),  # no key bias: the original's is a constant zero
        Rename(block + "attn.v_bias", attn + "value.bias"),
        Rename(block + "gamma_1", layer + "lambda_1"),
        Rename(block + "gamma_2", layer + "lambda_2"),
        Rename(block + "attn.relative_position_bias_table", attn + table),
        Drop(block + "attn.relative_position_index", DERIVED),
        Drop(f"{s}rel_pos_bias.relative_position_index", DERIVED),
    ]
    if spec.shared_rel_pos:  # one shared table = the same table in every layer (BEiT's own expansion)
        targets = tuple(f"{t}encoder.layer.{i}.attention.attention.{table}" for i in range(spec.depth))
        rules.append(Rename(f"{s}rel_pos_bias.relative_position_bias_table", targets, Broadcast(spec.depth)))
    if spec.finetuned:
        return rules + [*_pair(f"{s}fc_norm", f"{t}pooler.layernorm"), *_pair(f"{s}head", "classifier")]
    return rules + [*_pair(f"{s}norm", "layernorm"),
                    Drop(f"{s}lm_head.weight", "masked-prediction head of pretraining"),
                    Drop(f"{s}lm_head.bias", "masked-prediction head of pretraining"),
                    Drop(f"{s}mask_token", "mask embedding of pretraining")]


def d2v1_config(spec: D2V1Spec) -> dict:
    """The exact `Data2VecVisionConfig`: original eps, per-layer tables, mean pooling when fine-tuned."""
    config = {
        "model_type": "data2vec-vision",
        "architectures": ["Data2VecVisionForImageClassification" if spec.finetuned else "Data2VecVisionModel"],
        "hidden_size": spec.dim, "num_hidden_layers": spec.depth, "num_attention_heads": spec.heads,
        "intermediate_size": spec.mlp_hidden, "hidden_act": "gelu",  # exact erf GELU, as nn.GELU()
        "image_size": spec.image, "patch_size": spec.patch, "num_channels": spec.in_chans,
        "layer_norm_eps": LN_EPS,
        "use_mask_token": False, "use_absolute_position_embeddings": False,
        "use_relative_position_bias": True, "use_shared_relative_position_bias": False,
        # fine-tuned: norm = Identity, pooler = fc_norm(mean of patches); pretrained: norm on every token
        "use_mean_pooling": spec.finetuned,
        "layer_scale_init_value": 0.1, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
    }
    return {**config, **(_labels(spec.num_classes) if spec.finetuned else {})}


def _check_d2v1_indices(tensors: Mapping[str, LazyTensor], spec: D2V1Spec) -> None:
    """A stored relative_position_index must be the one rebuilt for the window (it is then dropped);
    its shape is checked before it is read."""
    from reference.beit_positions import relative_position_index

    stored = {k: t for k, t in tensors.items() if k.endswith("relative_position_index")}
    side = spec.window * spec.window + 1  # patches and the cls token
    for key, tensor in stored.items():
        if tuple(tensor.shape) != (side, side):
            raise InputError(None, f"{key} has shape {list(tensor.shape)}; a {spec.window}x{spec.window} "
                                   f"window needs [{side}, {side}]")
    want = relative_position_index((spec.window, spec.window)) if stored else None
    for key, tensor in stored.items():
        if not np.array_equal(tensor.load(), want):
            raise InputError(None, f"{key} differs from the index rebuilt for a "
                                   f"{spec.window}x{spec.window} window")


def convert_data2vec1(checkpoint: Checkpoint) -> Conversion:
    """Map a data2vec 1.0 checkpoint onto transformers' Data2VecVision, strictly and lazily."""
    path = str(checkpoint.path)
    tensors, dropped = drop_subtrees(checkpoint.tensors, CONTAINER_DROPS)
    try:
        spec = infer_d2v1(tensors)
        _check_d2v1_indices(tensors, spec)
    except InputError as e:
        raise InputError(path, e.problem) from None
    config = d2v1_config(spec)
    expected = data2vec_vision_shapes(config, spec.finetuned)  # == the transformers class's (tests/test_shapes.py)
    mapped = apply_rules(tensors, d2v1_rules(spec), expected, path=path)
    notes = [
        *_half_note(tensors),
        f"layer_norm_eps is {LN_EPS:g} as in the original; the hub's data2vec-vision configs say 1e-12, "
        "a small real difference in every LayerNorm.",
        ("A shared relative position table was copied into every layer." if spec.shared_rel_pos
         else "Per-layer relative position tables."),
    ]
    if not spec.finetuned:
        notes.append("Pretrained encoder: written as Data2VecVisionModel (load with AutoModel); "
                     "lm_head and mask_token are pretraining-only and dropped.")
    dropped.update(mapped.dropped)
    return Conversion("data2vec1", spec.name, mapped.tensors, config,
                      preprocessor_config(spec.image, INCEPTION_MEAN, INCEPTION_STD),
                      dropped, notes + dropped_notes(dropped))


def d2v1_source_weights(checkpoint: Checkpoint) -> dict[str, LazyTensor]:
    """The weights entry in the ORIGINAL names, container prefix removed (index buffers kept)."""
    tensors, _ = drop_subtrees(checkpoint.tensors, CONTAINER_DROPS)
    prefix = _d2v1_prefix(tensors)
    return {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}


# =============================================================================
# data2vec 2.0 (fairseq data2vec_multi + mae_image_classification)

D2V2_BACKBONE, D2V2_HEAD = "model.model.", "model."  # *_ft.pt: model.<Data2VecMultiModel>, model.fc_norm/head
D2V2_PRETRAINED_BACKBONE = "model."  # pretrained .pt: the container's `model` IS the Data2VecMultiModel
IMAGE = "modality_encoders.IMAGE."
HF_CODE = ("configuration_data2vec2.py", "modeling_data2vec2.py")
AUTO_MAP = {
    "AutoConfig": "configuration_data2vec2.Data2Vec2VisionConfig",
    "AutoModel": "modeling_data2vec2.Data2Vec2VisionModel",
    "AutoModelForImageClassification": "modeling_data2vec2.Data2Vec2VisionForImageClassification",
}
# Inside an AltBlock: fairseq → custom model (weight and bias each).
D2V2_BLOCK_PAIRS = (("norm1", "attention_norm"), ("attn.qkv", "attention.qkv"),
                    ("attn.proj", "attention.projection"), ("norm2", "mlp_norm"),
                    ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
POSITIONS_NOTE = ("The stored sin-cos position table is written as it is (not rebuilt): fp16 training "
                  "leaves it rounded by up to 2.4e-4, and the original model adds the stored values.")


@dataclass(frozen=True)
class D2V2Spec:
    """A data2vec 2.0 variant: shapes plus what only the cfg knows (heads, eps)."""

    backbone: str         # where the Data2VecMultiModel keys start: "model.model." (_ft) or "model."
    dim: int
    prenet_depth: int
    depth: int            # shared `blocks`
    heads: int
    mlp_hidden: int
    patch: int
    image: int
    in_chans: int
    num_classes: int      # 0: the pretrained encoder
    layer_norm_first: bool
    norm_eps: float

    @property
    def finetuned(self) -> bool:
        return self.num_classes > 0

    @property
    def name(self) -> str:
        return _variant_name(_arch(self.dim, self.prenet_depth + self.depth, self.heads, self.patch),
                             self.num_classes)


def is_data2vec2(checkpoint: Checkpoint) -> bool:
    """fairseq's `modality_encoders.IMAGE.*` keys anywhere in the file."""
    return any(k.startswith(IMAGE) or f".{IMAGE}" in k for k in checkpoint.tensors)


def _cfg_models(meta: Mapping[str, Any]) -> tuple[dict, dict]:
    """(classifier cfg, backbone cfg) from fairseq's `cfg` (or a legacy flat `args`)."""
    cfg = meta.get("cfg") if isinstance(meta.get("cfg"), dict) else {}
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    if not model and isinstance(meta.get("args"), dict):
        model = meta["args"]
    pretrained = model.get("pretrained_model_args")
    backbone = pretrained.get("model") if isinstance(pretrained, dict) else None
    return model, backbone if isinstance(backbone, dict) else model


def _cfg_value(cfg: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str,
               name: str | None = None) -> Any:
    """`cfg[key]` (None when absent or null), refused with `InputError` naming the field (`name`,
    else `key`) unless it is of `kind`; a bool is never taken for a number."""
    value = cfg.get(key)
    if value is None or (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
        return value
    raise InputError(None, f"cfg field {name or key!r} is {shown(value)}; expected {what}")


def _d2v2_heads(backbone: Mapping[str, Any], dim: int, notes: list[str]) -> int:
    heads = _cfg_value(backbone, "num_heads", int, "an integer")
    if heads is not None:
        return _check_heads(heads, dim, "cfg field 'num_heads'")
    if dim in D2V2_HEADS_BY_DIM:
        notes.append(f"The file's cfg has no num_heads; {D2V2_HEADS_BY_DIM[dim]} heads taken from the "
                     f"published variant of width {dim}.")
        return D2V2_HEADS_BY_DIM[dim]
    raise InputError(None, f"cfg.model has no num_heads and width {dim} is not a published variant "
                           "(the head count cannot be read from the shapes)")


def _check_d2v2_cfg(model: Mapping[str, Any], backbone: Mapping[str, Any], spec: D2V2Spec) -> None:
    """The cfg must describe what the shapes say, and a mean-pooling classifier."""
    mode = model.get("prediction_mode", "MEAN_POOLING")
    if mode not in ("MEAN_POOLING", None):
        raise InputError(None, f"cfg.model.prediction_mode is {shown(mode)}; only MEAN_POOLING converts")
    first = _cfg_value(backbone, "layer_norm_first", bool, "true or false")
    if first is not None and first != spec.layer_norm_first:
        raise InputError(None, f"cfg says layer_norm_first={first} but the keys say {spec.layer_norm_first} "
                               f"({IMAGE}context_encoder.norm is {'absent' if spec.layer_norm_first else 'present'})")
    modalities = _cfg_value(backbone, "modalities", dict, "a mapping") or {}
    image = _cfg_value(modalities, "image", dict, "a mapping", "modalities.image") or {}
    prenet = _cfg_value(image, "prenet_depth", int, "an integer", "modalities.image.prenet_depth")
    if prenet is not None and prenet != spec.prenet_depth:
        raise InputError(None, f"cfg says prenet_depth={shown(prenet)} but the file has {spec.prenet_depth} "
                               "context_encoder blocks")


def _d2v2_eps(model: Mapping[str, Any], backbone: Mapping[str, Any]) -> float:
    """The cfg's LayerNorm eps (classifier cfg first), `LN_EPS` when neither gives one."""
    eps = (_cfg_value(model, "norm_eps", (int, float), "a positive number")
           or _cfg_value(backbone, "norm_eps", (int, float), "a positive number") or LN_EPS)
    if not 0 < eps:
        raise InputError(None, f"cfg field 'norm_eps' is {shown(eps)}; expected a positive number")
    if eps > MAX_NORM_EPS:  # compared as it is: an int of 400 digits has no float
        raise InputError(None, f"cfg field 'norm_eps' is {shown(eps)}; a LayerNorm eps is at most {MAX_NORM_EPS}")
    return float(eps)


def _d2v2_grid(shape: tuple[int, ...], dim: int, key: str) -> int:
    """Patches per side from the stored position table's shape [1, G*G, dim], before it is read."""
    grid = int(round(shape[1] ** 0.5)) if len(shape) == 3 else 0
    if len(shape) != 3 or shape[0] != 1 or shape[2] != dim or not grid or grid * grid != shape[1]:
        raise InputError(None, f"{key} has shape {shape_text(shape)}; expected [1, G*G, {dim}] for a GxG grid "
                               "of patches")
    return _check_grid(grid, key)


def d2v2_backbone(tensors: Mapping[str, LazyTensor]) -> str:
    """Where the Data2VecMultiModel keys start: under `model.model.` (a `*_ft.pt` classifier, whose
    `model.fc_norm`/`model.head` sit beside it) or directly under `model.` (a pretrained file)."""
    if f"{D2V2_HEAD}head.weight" in tensors or any(k.startswith(D2V2_BACKBONE) for k in tensors):
        return D2V2_BACKBONE
    if any(k.startswith(D2V2_PRETRAINED_BACKBONE + IMAGE) for k in tensors):
        return D2V2_PRETRAINED_BACKBONE
    raise InputError(None, f"no data2vec 2.0 weights under {D2V2_BACKBONE} or {D2V2_PRETRAINED_BACKBONE}")


def d2v2_subtree_drops(backbone: str) -> tuple[tuple[str, str], ...]:
    """Pretraining leftovers inside the weights: always in pretrained files, absent from the released
    `_ft` files (dropped if present)."""
    return ((backbone + "_ema.", "EMA teacher of pretraining"),
            (backbone + IMAGE + "decoder.", "pretraining decoder"))


def infer_d2v2(tensors: Mapping[str, LazyTensor], meta: Mapping[str, Any], notes: list[str]) -> D2V2Spec:
    """Widths, depths, grid and classes from the shapes; heads, eps and norm placement checked against cfg.

    A file without `model.model.` keys is the pretrained encoder (0 classes).
    """
    b = d2v2_backbone(tensors)
    e = b + IMAGE
    finetuned = b == D2V2_BACKBONE
    conv = _conv_shape(tensors, e + "local_encoder.proj.weight")
    grid = _d2v2_grid(_shape(tensors, e + "fixed_positional_encoder.positions"), conv[0],
                      e + "fixed_positional_encoder.positions")
    model, backbone = _cfg_models(meta)
    spec = D2V2Spec(
        backbone=b, dim=conv[0], prenet_depth=count_indexed(tensors, e + "context_encoder.blocks."),
        depth=count_indexed(tensors, b + "blocks."), heads=_d2v2_heads(backbone, conv[0], notes),
        mlp_hidden=_dims(tensors, b + "blocks.0.mlp.fc1.weight", 2)[0], patch=conv[-1],
        image=grid * conv[-1], in_chans=conv[1],
        num_classes=_dims(tensors, f"{D2V2_HEAD}head.weight", 2, MAX_CLASSES)[0] if finetuned else 0,
        layer_norm_first=e + "context_encoder.norm.weight" not in tensors,
        norm_eps=_d2v2_eps(model, backbone))
    _check_d2v2_cfg(model, backbone, spec)
    return spec


def d2v2_rules(spec: D2V2Spec) -> list[Rule]:
    """fairseq names → `Data2Vec2VisionForImageClassification` (`*_ft.pt`) / `Data2Vec2VisionModel`
    (pretrained: no `data2vec2.` prefix, no pooler or classifier) names.

    Prenet blocks (`context_encoder.blocks.j`) become layers 0..P-1, spelled
    out per j so that a missing layer is traced back to the right source key;
    the shared `blocks.i` become layers P+i through the offset template `{i+P}`.
    """
    b, e, p = spec.backbone, spec.backbone + IMAGE, spec.prenet_depth
    t = "data2vec2." if spec.finetuned else ""
    emb = t + "embeddings."
    blocks = [*[(f"{e}context_encoder.blocks.{j}.", f"{t}encoder.layer.{j}.") for j in range(p)],
              (b + "blocks.{i}.", f"{t}encoder.layer.{{i+{p}}}.")]
    head = [*_pair(D2V2_HEAD + "fc_norm", "data2vec2.pooler.layernorm"), *_pair(D2V2_HEAD + "head", "classifier")]
    return [
        Rename(e + "extra_tokens", emb + "cls_token"),
        Rename(e + "fixed_positional_encoder.positions", emb + "position_embeddings"),
        *_pair(e + "local_encoder.proj", emb + "patch_embeddings.projection"),
        *_pair(e + "context_encoder.norm", emb + "layernorm"),
        *[r for src, dst in blocks for old, new in D2V2_BLOCK_PAIRS for r in _pair(src + old, dst + new)],
        *_pair(b + "norm", t + "layernorm"),
        *(head if spec.finetuned else []),
    ]


def d2v2_config(spec: D2V2Spec) -> dict:
    """The custom `Data2Vec2VisionConfig`, with `auto_map` so transformers finds the shipped code.

    Both kinds map AutoModel and AutoModelForImageClassification: a pretrained
    folder loads in the latter as the start of fine-tuning (new pooler and head).
    """
    architecture = "Data2Vec2VisionForImageClassification" if spec.finetuned else "Data2Vec2VisionModel"
    config = {
        "model_type": "data2vec2-vision", "architectures": [architecture],
        "auto_map": AUTO_MAP,
        "hidden_size": spec.dim, "num_hidden_layers": spec.prenet_depth + spec.depth,
        "num_prenet_layers": spec.prenet_depth, "num_attention_heads": spec.heads,
        "intermediate_size": spec.mlp_hidden, "image_size": spec.image, "patch_size": spec.patch,
        "num_channels": spec.in_chans, "layer_norm_first": spec.layer_norm_first,
        "layer_norm_eps": spec.norm_eps, "pooler_layer_norm_eps": LN_EPS,  # fc_norm: hard-coded 1e-6
        "hidden_act": "gelu",
        "use_mean_pooling": spec.finetuned,  # pretrained: no pooler, the encoder ends at its last block / norm
    }
    return {**config, **(_labels(spec.num_classes) if spec.finetuned else {})}


def hf_code_files() -> dict[str, bytes]:
    """The custom model's code, shipped next to config.json (name → bytes).

    The package is located, not imported: importing it would import torch and transformers.
    """
    spec = importlib.util.find_spec("reference.data2vec2_hf")
    folder = Path(next(iter(spec.submodule_search_locations))).resolve()
    return {name: (folder / name).read_bytes() for name in HF_CODE}


def _check_positions(tensors: Mapping[str, LazyTensor], spec: D2V2Spec) -> None:
    """The stored table must be the 2-D sin-cos table of the grid (up to fp16 rounding); its shape
    was checked by `infer_d2v2`, so the table built here is no larger than the stored one."""
    from reference.mae_positions import POSITIONS_ATOL, sincos_positions

    key = spec.backbone + IMAGE + "fixed_positional_encoder.positions"
    want = sincos_positions(spec.dim, spec.image // spec.patch)
    if tuple(tensors[key].shape) != want.shape or \
            np.abs(tensors[key].load().astype(np.float32) - want).max() > POSITIONS_ATOL:
        raise InputError(None, f"{key} is not the 2-D sin-cos table of a "
                               f"{spec.image // spec.patch}x{spec.image // spec.patch} grid")


def convert_data2vec2(checkpoint: Checkpoint) -> Conversion:
    """Map a data2vec 2.0 `*_ft.pt` (classifier) or pretrained `.pt` (encoder) onto our custom
    transformers model, strictly and lazily."""
    path = str(checkpoint.path)
    try:
        drops = CONTAINER_DROPS + d2v2_subtree_drops(d2v2_backbone(checkpoint.tensors))
        tensors, dropped = drop_subtrees(checkpoint.tensors, drops)
        notes = _half_note(tensors)
        spec = infer_d2v2(tensors, checkpoint.meta, notes)
        _check_positions(tensors, spec)
    except InputError as e:
        raise InputError(path, e.problem) from None
    config = d2v2_config(spec)
    expected = data2vec2_vision_shapes(config, spec.finetuned)  # == the custom classes' (tests/test_shapes.py)
    mapped = apply_rules(tensors, d2v2_rules(spec), expected, path=path)
    notes += [POSITIONS_NOTE,
              "transformers has no data2vec 2.0 class: the folder ships configuration_data2vec2.py and "
              "modeling_data2vec2.py; load with trust_remote_code=True."]
    if not spec.finetuned:
        end = "norm" if spec.layer_norm_first else f"blocks.{spec.prenet_depth + spec.depth - 1}"
        notes.append(f"Pretrained encoder: written as Data2Vec2VisionModel with no pooler (load with AutoModel, "
                     f"trust_remote_code=True); it ends at tap \"{end}\". The EMA teacher (_ema) and the "
                     "decoder are pretraining-only and dropped.")
    dropped.update(mapped.dropped)
    return Conversion("data2vec2", spec.name, mapped.tensors, config,
                      preprocessor_config(spec.image, IMAGENET_MEAN, IMAGENET_STD),
                      dropped, notes + dropped_notes(dropped), hf_code_files())


def d2v2_source_weights(checkpoint: Checkpoint) -> dict[str, LazyTensor]:
    """The weights in fairseq names with the container's `model.` stripped once (classifier:
    `model.blocks.0…`, `fc_norm.weight`; pretrained: `blocks.0…`), pretraining leftovers
    removed — what `reference.data2vec2_torch` reads after its own `strip_model_prefix`."""
    drops = CONTAINER_DROPS + d2v2_subtree_drops(d2v2_backbone(checkpoint.tensors))
    tensors, _ = drop_subtrees(checkpoint.tensors, drops)
    return {k[len(D2V2_HEAD):]: t for k, t in tensors.items() if k.startswith(D2V2_HEAD)}
