"""Synthetic data2vec checkpoints in the EXACT original containers (our own test fixtures).

Keys, shapes, dtypes and container layout follow shared/research/data2vec.md:
- data2vec 1.0 pretrained `checkpoint-799.pth`: `{model, optimizer, epoch,
  scaler, args: argparse.Namespace, model_ema}` (beit/utils.py::save_model);
- data2vec 1.0 fine-tuned DeepSpeed `mp_rank_00_model_states.pt`: weights
  under `module` in fp16 plus DeepSpeed's bookkeeping and the client state;
- data2vec 2.0 fairseq `.pt`: `{args: None, cfg: nested plain dicts, model,
  criterion, optimizer_history, task_state, extra_state, last_optimizer_state}`.

The key lists are written out here from the original code's module order,
independently of `reference/`, so a naming slip in either shows up as a
failed strict load. Values are random but realistic: layer-scale gammas near
0.1, non-zero relative position tables, q/v biases, LayerNorm weights near 1,
and the stored `relative_position_index` buffers the original files carry.
Every writer uses plain `torch.save`.

`config` arguments are read by attribute: `dim, depth, heads, mlp_hidden,
patch, image, in_chans, num_classes` (data2vec 1.0) and additionally
`prenet_depth, layer_norm_first` (2.0) — the reference configs fit.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reference.mae_positions import sincos_positions

Shapes = list[tuple[str, tuple[int, ...]]]


# ----------------------------------------------------------------------------- helpers


def _rel_pos_index(side: int) -> torch.Tensor:
    """BEiT's [N+1, N+1] relative position index for a side×side window (written out independently)."""
    h, w = np.divmod(np.arange(side * side), side)
    rows = (2 * side - 1) ** 2 + 3
    index = np.empty((side * side + 1,) * 2, dtype=np.int64)
    index[1:, 1:] = (h[:, None] - h[None, :] + side - 1) * (2 * side - 1) + (w[:, None] - w[None, :] + side - 1)
    index[0, :], index[:, 0], index[0, 0] = rows - 3, rows - 2, rows - 1
    return torch.from_numpy(index)


def _fill(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A realistic random value for one parameter, chosen by its name."""
    def randn(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    leaf = name.rsplit(".", 1)[-1]
    if leaf.startswith("gamma_"):
        return 0.1 + randn(0.02)                       # layer scale, init 0.1 in fine-tuning
    if "relative_position_bias_table" in name:
        return randn(0.5)                              # learned, clearly non-zero
    if leaf in ("q_bias", "v_bias"):
        return randn(0.1)
    if "norm" in name and leaf == "weight":
        return 1.0 + randn(0.1)
    if leaf == "bias" or leaf.endswith("_token") or leaf == "extra_tokens":
        return randn(0.05)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return randn(fan_in ** -0.5)                       # keeps activations O(1) through the blocks


def _materialise(shapes: Shapes, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: _fill(name, shape, gen) for name, shape in shapes}


# ----------------------------------------------------------------------------- data2vec 1.0


def _d2v1_block(i: int, c: Any, per_layer_table: bool) -> Shapes:
    d, rows = c.dim, (2 * (c.image // c.patch) - 1) ** 2 + 3
    p = f"blocks.{i}."
    attn = [(p + "attn.q_bias", (d,)), (p + "attn.v_bias", (d,))]
    if per_layer_table:
        attn.append((p + "attn.relative_position_bias_table", (rows, c.heads)))
    return [(p + "gamma_1", (d,)), (p + "gamma_2", (d,)),
            (p + "norm1.weight", (d,)), (p + "norm1.bias", (d,)),
            *attn,
            (p + "attn.qkv.weight", (3 * d, d)),
            (p + "attn.proj.weight", (d, d)), (p + "attn.proj.bias", (d,)),
            (p + "norm2.weight", (d,)), (p + "norm2.bias", (d,)),
            (p + "mlp.fc1.weight", (c.mlp_hidden, d)), (p + "mlp.fc1.bias", (c.mlp_hidden,)),
            (p + "mlp.fc2.weight", (d, c.mlp_hidden)), (p + "mlp.fc2.bias", (d,))]


def d2v1_state_dict(config: Any, seed: int, shared_rel_pos: bool, finetuned: bool) -> dict[str, torch.Tensor]:
    """A data2vec 1.0 state dict in original names and module order, float32.

    `shared_rel_pos` puts one `rel_pos_bias.relative_position_bias_table` at the
    top, otherwise every block has its own table. Fine-tuned adds `fc_norm` and
    `head` (config.num_classes rows); pretrained adds `mask_token`, `norm` and
    `lm_head`. The int64 `relative_position_index` buffers sit next to their
    tables, as in the original files.
    """
    c, d = config, config.dim
    side = c.image // c.patch
    rows = (2 * side - 1) ** 2 + 3
    shapes: Shapes = [("cls_token", (1, 1, d))]
    if not finetuned:
        shapes.append(("mask_token", (1, 1, d)))
    shapes += [("patch_embed.proj.weight", (d, c.in_chans, c.patch, c.patch)), ("patch_embed.proj.bias", (d,))]
    if shared_rel_pos:
        shapes.append(("rel_pos_bias.relative_position_bias_table", (rows, c.heads)))
    for i in range(c.depth):
        shapes += _d2v1_block(i, c, per_layer_table=not shared_rel_pos)
    if finetuned:
        shapes += [("fc_norm.weight", (d,)), ("fc_norm.bias", (d,)),
                   ("head.weight", (c.num_classes, d)), ("head.bias", (c.num_classes,))]
    else:
        shapes += [("norm.weight", (d,)), ("norm.bias", (d,)),
                   ("lm_head.weight", (d, d)), ("lm_head.bias", (d,))]
    sd: dict[str, torch.Tensor] = {}
    for name, tensor in _materialise(shapes, seed).items():
        sd[name] = tensor
        if name.endswith("relative_position_bias_table"):
            sd[name.replace("_bias_table", "_index")] = _rel_pos_index(side)
    return sd


def write_d2v1_pretrained(path: str | Path, sd: dict[str, torch.Tensor]) -> Path:
    """`checkpoint-799.pth` as beit/utils.py::save_model writes it with the torch-amp scaler.

    `{model, optimizer, epoch, scaler, args, model_ema}`; `args` is an
    argparse.Namespace (so weights_only loading refuses the file), `model_ema`
    is the teacher (same keys, slightly different values).
    """
    floats = [k for k, v in sd.items() if v.is_floating_point()]
    teacher = {k: (v + 0.01 * torch.randn_like(v)) if v.is_floating_point() else v.clone() for k, v in sd.items()}
    container = {
        "model": sd,
        "optimizer": {
            "state": {i: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(sd[k]),
                          "exp_avg_sq": torch.zeros_like(sd[k])} for i, k in enumerate(floats[:2])},
            "param_groups": [{"lr": 1.5e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05,
                              "amsgrad": False, "lr_scale": 1.0, "params": list(range(len(floats)))}],
        },
        "epoch": 799,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                   "growth_interval": 2000, "_growth_tracker": 0},
        "args": argparse.Namespace(model="beit_base_patch16_224", batch_size=128, epochs=800,
                                   input_size=224, layer_scale_init_value=1e-4, rel_pos_bias=True,
                                   abs_pos_emb=False, imagenet_default_mean_and_std=True,
                                   output_dir="/checkpoint/data2vec_vision/base_800"),
        "model_ema": teacher,
    }
    torch.save(container, path)
    return Path(path)


def write_d2v1_deepspeed(path: str | Path, sd: dict[str, torch.Tensor]) -> Path:
    """A fine-tuned `mp_rank_00_model_states.pt`: DeepSpeed engine state + client state `epoch`.

    Weights go under `module` cast to fp16 (DeepSpeed fp16 halves the model;
    int64 index buffers stay int64); then `buffer_names`, the FP16_Optimizer
    state, `lr_scheduler`, `csr_tensor_module_names` (a set), step counters,
    world sizes, `ds_config`, `ds_version`, and `epoch` from the client state.
    """
    module = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    container = {
        "module": module,
        "buffer_names": [k for k in sd if k.endswith("relative_position_index")],
        "optimizer": {"dynamic_loss_scale": True, "cur_scale": 128.0, "cur_iter": 125100,
                      "last_overflow_iter": 124990, "scale_factor": 2.0, "scale_window": 128,
                      "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-6, "params": [0]}]},
                      "fp32_groups_flat": [torch.zeros(8)], "clip_grad": 0.0},
        "lr_scheduler": None,
        "csr_tensor_module_names": set(),
        "skipped_steps": 12,
        "global_steps": 125100,
        "global_samples": 128110080,
        "dp_world_size": 64,
        "mp_world_size": 1,
        "ds_config": {"train_batch_size": 1024, "train_micro_batch_size_per_gpu": 16,
                      "steps_per_print": 1000, "fp16": {"enabled": True, "loss_scale": 0,
                                                        "initial_scale_power": 7, "loss_scale_window": 128}},
        "ds_version": "0.4.0",
        "epoch": 99,
    }
    torch.save(container, path)
    return Path(path)


# ----------------------------------------------------------------------------- data2vec 2.0


def _d2v2_block(p: str, c: Any) -> Shapes:
    d, h = c.dim, c.mlp_hidden
    return [(p + "norm1.weight", (d,)), (p + "norm1.bias", (d,)),
            (p + "attn.qkv.weight", (3 * d, d)), (p + "attn.qkv.bias", (3 * d,)),
            (p + "attn.proj.weight", (d, d)), (p + "attn.proj.bias", (d,)),
            (p + "norm2.weight", (d,)), (p + "norm2.bias", (d,)),
            (p + "mlp.fc1.weight", (h, d)), (p + "mlp.fc1.bias", (h,)),
            (p + "mlp.fc2.weight", (d, h)), (p + "mlp.fc2.bias", (d,))]


def d2v2_state_dict(config: Any, seed: int, finetuned: bool = True,
                    pretraining_leftovers: bool = False) -> dict[str, Any]:
    """A data2vec 2.0 `model` entry in fairseq names and module order, float32.

    Fine-tuned (`*_ft.pt`): the Data2VecMultiModel keys under `model.`, then
    `fc_norm`/`head`. Pretrained: the same keys without prefix, plus the
    `modality_encoders.IMAGE.decoder.*` convs and `_ema` (a nested dict of the
    teacher's block tensors). `pretraining_leftovers=True` keeps decoder and
    `_ema` in a fine-tuned dict too (the released `_ft` files drop them; the
    flag exercises a converter's drop rules). Positions are the sin-cos table
    rounded through fp16, as common.fp16 training stores it.
    """
    c, d = config, config.dim
    grid = c.image // c.patch
    enc = "modality_encoders.IMAGE."
    shapes: Shapes = [(enc + "extra_tokens", (1, 1, d)),
                      (enc + "local_encoder.proj.weight", (d, c.in_chans, c.patch, c.patch)),
                      (enc + "local_encoder.proj.bias", (d,))]
    for j in range(c.prenet_depth):
        shapes += _d2v2_block(f"{enc}context_encoder.blocks.{j}.", c)
    if not c.layer_norm_first:
        shapes += [(enc + "context_encoder.norm.weight", (d,)), (enc + "context_encoder.norm.bias", (d,))]
    leftovers = pretraining_leftovers or not finetuned
    if leftovers:  # Decoder2d: grouped conv blocks (LayerNorm without affine) + proj
        shapes += [(enc + "decoder.blocks.0.0.weight", (d, d // 16, 3, 3)), (enc + "decoder.blocks.0.0.bias", (d,)),
                   (enc + "decoder.proj.weight", (d, d)), (enc + "decoder.proj.bias", (d,))]
    for i in range(c.depth):
        shapes += _d2v2_block(f"blocks.{i}.", c)
    if c.layer_norm_first:
        shapes += [("norm.weight", (d,)), ("norm.bias", (d,))]
    body = _materialise(shapes, seed)
    positions = torch.from_numpy(sincos_positions(d, grid)[0]).half().float()[None]  # fp16-trained, as stored
    sd: dict[str, Any] = {enc + "extra_tokens": body.pop(enc + "extra_tokens"),
                          enc + "fixed_positional_encoder.positions": positions, **body}
    if leftovers:
        sd["_ema"] = {k[len("blocks."):]: v + 0.01 for k, v in body.items() if k.startswith("blocks.")}
    if not finetuned:
        return sd
    sd = {"model." + k: v for k, v in sd.items()}
    head = _materialise([("fc_norm.weight", (d,)), ("fc_norm.bias", (d,)),
                         ("head.weight", (c.num_classes, d)), ("head.bias", (c.num_classes,))], seed + 1)
    return {**sd, **head}


def d2v2_cfg(config: Any, finetuned: bool = True) -> dict[str, Any]:
    """The `cfg` entry as plain nested dicts (OmegaConf.to_container, enums as strings).

    Pretrained: `cfg["model"]` is the `data2vec_multi` config. Fine-tuned:
    `cfg["model"]` is the `mae_image_classification` config and the backbone's
    config sits at `cfg["model"]["pretrained_model_args"]["model"]` (where
    `layer_norm_first`, `num_heads`, `depth`, `modalities.image.prenet_depth` live).
    """
    multi = {"_name": "data2vec_multi", "depth": config.depth, "num_heads": config.heads,
             "embed_dim": config.dim, "mlp_ratio": config.mlp_hidden / config.dim,
             "norm_eps": 1e-6, "norm_affine": True, "layer_norm_first": config.layer_norm_first,
             "encoder_dropout": 0.0, "post_mlp_drop": 0.0, "attention_dropout": 0.0,
             "average_top_k_layers": config.depth, "clone_batch": 16, "ema_encoder_only": True,
             "supported_modality": "IMAGE",
             "modalities": {"_name": None, "image": {
                 "type": "IMAGE", "prenet_depth": config.prenet_depth, "patch_size": config.patch,
                 "input_size": config.image, "in_chans": config.in_chans, "embed_dim": config.dim,
                 "num_extra_tokens": 1, "init_extra_token_zero": False, "use_alibi_encoder": False,
                 "fixed_positions": True, "decoder": {"decoder_dim": config.dim, "decoder_groups": 16,
                                                      "decoder_kernel": 3, "decoder_layers": 1}}}}
    common = {"_name": None, "fp16": True, "log_interval": 200, "seed": 1, "user_dir": None}
    pretrain = {"_name": None, "common": common, "model": multi,
                "task": {"_name": "mae_image_pretraining", "data": "/datasets/imagenet", "input_size": config.image},
                "criterion": {"_name": "model", "log_keys": ["ema_decay", "target_var", "pred_var"]},
                "optimization": {"_name": None, "max_update": 375300, "lr": [0.001]}}
    if not finetuned:
        return pretrain
    return {"_name": None, "common": common,
            "task": {"_name": "mae_image_classification", "data": "/datasets/imagenet"},
            "criterion": {"_name": "model", "log_keys": ["correct"]},
            "optimization": {"_name": None, "max_update": 250200, "lr": [0.001]},
            "model": {"_name": "mae_image_classification", "model_path": "/checkpoint/base_imagenet.pt",
                      "no_pretrained_weights": False, "linear_classifier": False,
                      "num_classes": config.num_classes, "drop_path_rate": 0.1, "layer_decay": 0.65,
                      "norm_eps": None, "remove_alibi": False, "use_fc_norm": True,
                      "prediction_mode": "MEAN_POOLING", "pretrained_model_args": pretrain}}


def write_d2v2_fairseq(path: str | Path, sd: dict[str, Any], cfg: dict[str, Any]) -> Path:
    """A fairseq checkpoint as `trainer.state_dict()` + `checkpoint_utils.torch_persistent_save` write it."""
    container = {
        "args": None,
        "cfg": cfg,
        "model": sd,
        "criterion": {},
        "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 250200}],
        "task_state": {},
        "extra_state": {"metrics": {}, "previous_training_time": 123456.7,
                        "train_iterator": {"version": 2, "epoch": 100, "iterations_in_epoch": 0,
                                           "shuffle": True}},
        "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-6, "params": [0]}],
                                 "loss_scale": 128.0},
    }
    torch.save(container, path)
    return Path(path)
