"""data2vec 1.0 vision (the BEiT-based code) in PyTorch, in the ORIGINAL checkpoint names.

The module tree spells the state-dict keys of `beit/modeling_finetune.py` and
`beit/modeling_cyclical.py` (facebookresearch/data2vec_vision): `cls_token`,
`patch_embed.proj`, `blocks.N.{norm1, attn.qkv, attn.q_bias, attn.v_bias,
attn.relative_position_bias_table, attn.proj, norm2, mlp.fc1, mlp.fc2, gamma_1,
gamma_2}`, a shared `rel_pos_bias.relative_position_bias_table`, `fc_norm` and
`head` (fine-tuned) or `norm`, `lm_head`, `mask_token` (pretrained). The
relative position index and the zero k bias are derived, never parameters.

Math (fine-tuned classifier): patch embed + cls token (no absolute position
embedding) → pre-norm blocks with layer scale and a relative position bias →
mean of the patch tokens → `fc_norm` → `head`. Every LayerNorm uses eps 1e-6.

`forward` returns the taps "patch_embed" (B, N+1, C), "blocks.0" …
"blocks.{L-1}", then "pooled" and "logits" (fine-tuned) or "norm" (pretrained).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from converters.rules import count_indexed
from reference import beit_positions

# beit/modeling_finetune.py builds every norm as partial(nn.LayerNorm, eps=1e-6);
# transformers' Data2VecVision default (and the hub configs) say 1e-12.
LN_EPS = 1e-6


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Data2Vec1Config:
    """Shape of one data2vec 1.0 ViT; `num_classes=0` is the pretrained (no head) model."""

    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_hidden: int = 3072
    patch: int = 16
    image: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    per_layer_rel_pos: bool = True   # blocks.N.attn.relative_position_bias_table
    shared_rel_pos: bool = False     # rel_pos_bias.relative_position_bias_table
    mask_token: bool = False         # pretrained only; ignored by forward
    lm_head: bool = False            # pretrained only; ignored by forward

    @property
    def window(self) -> tuple[int, int]:
        return (self.image // self.patch, self.image // self.patch)

    @property
    def finetuned(self) -> bool:
        return self.num_classes > 0


VARIANTS: dict[str, dict[str, int]] = {
    "base": dict(dim=768, depth=12, heads=12, mlp_hidden=3072),
    "large": dict(dim=1024, depth=24, heads=16, mlp_hidden=4096),
}


def config_for(variant: str, **overrides) -> Data2Vec1Config:
    """The config of a named variant ("base", "large"), with any field overridden."""
    return replace(Data2Vec1Config(**VARIANTS[variant]), **overrides)


def _table_window(rows: int) -> int:
    window = beit_positions.table_window(rows)
    if window is None:
        raise ValueError(f"relative position table with {rows} rows is not (2W-1)^2+3")
    return window


def infer_config(sd: dict[str, torch.Tensor]) -> Data2Vec1Config:
    """Read depth, width, heads, patch, image size, classes and rel-pos kind off the shapes.

    Heads and the window come from a relative position table (per-layer or
    shared; every data2vec 1.0 model has one), the image size is window × patch.
    A state dict with `head.weight` is a fine-tuned classifier; one without is
    the pretrained model (`norm`, optional `lm_head` and `mask_token`).
    """
    per_layer = "blocks.0.attn.relative_position_bias_table" in sd
    shared = "rel_pos_bias.relative_position_bias_table" in sd
    table = sd["blocks.0.attn.relative_position_bias_table" if per_layer
               else "rel_pos_bias.relative_position_bias_table"]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    return Data2Vec1Config(
        dim=sd["cls_token"].shape[-1],
        depth=count_indexed(sd, "blocks."),
        heads=table.shape[1],
        mlp_hidden=sd["blocks.0.mlp.fc1.weight"].shape[0],
        patch=patch,
        image=_table_window(table.shape[0]) * patch,
        in_chans=sd["patch_embed.proj.weight"].shape[1],
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        per_layer_rel_pos=per_layer,
        shared_rel_pos=shared,
        mask_token="mask_token" in sd,
        lm_head="lm_head.weight" in sd,
    )


# ----------------------------------------------------------------------------- primitives


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """BEiT's [N+1, N+1] index (reference/beit_positions.py) as a torch long tensor."""
    return torch.from_numpy(beit_positions.relative_position_index(window))


def gather_rel_pos_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table [rows, H] gathered by index [N+1, N+1] → bias [H, N+1, N+1]."""
    n = index.shape[0]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


class RelativePositionBias(nn.Module):
    """The shared table (`rel_pos_bias.relative_position_bias_table`) of the pretrained model."""

    def __init__(self, window: tuple[int, int], heads: int) -> None:
        super().__init__()
        rows = (2 * window[0] - 1) * (2 * window[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def forward(self) -> torch.Tensor:
        return gather_rel_pos_bias(self.relative_position_bias_table, self.relative_position_index)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Data2Vec1Config) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, C (row-major over h, w)


class Attention(nn.Module):
    """qkv without bias + separate q and v biases (the k bias is a constant zero)."""

    def __init__(self, cfg: Data2Vec1Config) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.scale = (cfg.dim // cfg.heads) ** -0.5  # qk_scale=None in the original
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.dim))
        self.v_bias = nn.Parameter(torch.zeros(cfg.dim))
        if cfg.per_layer_rel_pos:
            rows = (2 * cfg.window[0] - 1) * (2 * cfg.window[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, cfg.heads))
            self.register_buffer("relative_position_index", relative_position_index(cfg.window),
                                 persistent=False)
        else:
            self.relative_position_bias_table = None
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, shared_bias: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                      # each B, H, N, Dh
        attn = (q * self.scale) @ k.transpose(-2, -1)              # B, H, N, N
        if self.relative_position_bias_table is not None:
            attn = attn + gather_rel_pos_bias(self.relative_position_bias_table,
                                              self.relative_position_index)
        if shared_bias is not None:
            attn = attn + shared_bias
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))  # B, N, C


class Mlp(nn.Module):
    def __init__(self, cfg: Data2Vec1Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # nn.GELU(): exact erf GELU


# ----------------------------------------------------------------------------- block


class Block(nn.Module):
    """Pre-norm block with layer scale: x + γ1·attn(LN1 x), then x + γ2·mlp(LN2 x)."""

    def __init__(self, cfg: Data2Vec1Config) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=LN_EPS)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=LN_EPS)
        self.mlp = Mlp(cfg)
        self.gamma_1 = nn.Parameter(torch.full((cfg.dim,), 0.1))
        self.gamma_2 = nn.Parameter(torch.full((cfg.dim,), 0.1))

    def forward(self, x: torch.Tensor, shared_bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.gamma_1 * self.attn(self.norm1(x), shared_bias)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- model


class Data2Vec1(nn.Module):
    """data2vec 1.0 ViT: the fine-tuned classifier, or the pretrained encoder when num_classes=0."""

    def __init__(self, cfg: Data2Vec1Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        if cfg.mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))  # masked pretraining only
        self.patch_embed = PatchEmbed(cfg)
        self.rel_pos_bias = RelativePositionBias(cfg.window, cfg.heads) if cfg.shared_rel_pos else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        if cfg.finetuned:  # use_mean_pooling=True: norm is Identity, fc_norm after the mean
            self.fc_norm = nn.LayerNorm(cfg.dim, eps=LN_EPS)
            self.head = nn.Linear(cfg.dim, cfg.num_classes)
        else:
            self.norm = nn.LayerNorm(cfg.dim, eps=LN_EPS)
            if cfg.lm_head:
                self.lm_head = nn.Linear(cfg.dim, cfg.dim)  # masked-token prediction only

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        x = self.patch_embed(pixels)                                        # B, N, C
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)    # B, N+1, C
        out["patch_embed"] = x
        shared = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for i, block in enumerate(self.blocks):
            x = out[f"blocks.{i}"] = block(x, shared)
        if not self.cfg.finetuned:
            out["norm"] = self.norm(x)
            return out
        out["pooled"] = self.fc_norm(x[:, 1:].mean(1))                      # B, C (cls excluded)
        out["logits"] = self.head(out["pooled"])
        return out


def from_original(sd: dict[str, torch.Tensor]) -> Data2Vec1:
    """Build the model from an original state dict (the `model` or `module` entry) and load it strictly.

    `*.relative_position_index` entries are derived: each is checked against the
    rebuilt index and then dropped. Tensors are cast to float32 (DeepSpeed
    files hold fp16). Raises `ValueError` on a stored index that disagrees.
    """
    model = Data2Vec1(infer_config(sd)).eval()
    weights = {}
    for name, tensor in sd.items():
        if name.endswith("relative_position_index"):
            if not torch.equal(tensor.long(), relative_position_index(model.cfg.window)):
                raise ValueError(f"{name} differs from the index rebuilt for window {model.cfg.window}")
            continue
        weights[name] = tensor.float()
    model.load_state_dict(weights, strict=True)
    return model
