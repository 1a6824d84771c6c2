"""data2vec 2.0 vision (fairseq `data2vec_multi` + `mae_image_classification`) in PyTorch, ORIGINAL names.

The module tree spells the keys of a fine-tuned `*_ft.pt` after its `model.`
prefix is stripped (fairseq `examples/data2vec/models/{data2vec2.py,
mae_image_classification.py, modalities/{base,images,modules}.py}`):

    modality_encoders.IMAGE.extra_tokens                       [1, 1, C]  (cls)
    modality_encoders.IMAGE.fixed_positional_encoder.positions [1, N, C]  (sin-cos; absent
                                                               with fixed_positions=False)
    modality_encoders.IMAGE.local_encoder.proj.{weight,bias}               (patch conv)
    modality_encoders.IMAGE.context_encoder.norm.{weight,bias}             (post-norm only)
    modality_encoders.IMAGE.context_encoder.blocks.P.*                     (prenet blocks)
    blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*       (shared blocks)
    norm.{weight,bias}                                                     (pre-norm only)
    fc_norm.{weight,bias}, head.{weight,bias}                              (no `model.` prefix)

Math: patch conv + fixed 2-D sin-cos positions (patches only) → prepend the cls
token → LayerNorm (post-norm models) → prenet blocks → shared blocks (post-norm
`AltBlock`s, full q/k/v bias, no layer scale, no relative position bias) → mean
of the patch tokens → `fc_norm` → `head`.

Taps: "patch_embed" is the input of the first block (B, N+1, C: cls + patches
with positions, after the embedding LayerNorm in post-norm models); "blocks.i"
numbers the prenet blocks first and then the shared blocks in one sequence
(ViT-B: blocks.0-1 are `context_encoder.blocks.0-1`, blocks.2-11 are
`blocks.0-9`); then "norm" (pre-norm models only), "pooled", "logits". The
pretrained encoder (`num_classes=0`, a `base_imagenet.pt` without `_ema` and
`decoder.*`) stops before "pooled": at "norm" in pre-norm mode, else at its
last block (post-norm blocks end in their own LayerNorm; there is no final one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from converters.rules import count_indexed
from reference import mae_positions
from reference.mae_positions import POSITIONS_ATOL  # stored vs rebuilt positions: fp16 rounding

# Data2VecMultiConfig.norm_eps default, kept by every released image config.
NORM_EPS = 1e-6
# MaeImageClassificationModel hard-codes nn.LayerNorm(embed_dim, eps=1e-6) for fc_norm.
FC_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Data2Vec2Config:
    """Shape of one data2vec 2.0 image model; `num_classes=0` is the pretrained encoder."""

    dim: int = 768
    depth: int = 10          # shared `blocks`
    prenet_depth: int = 2    # `modality_encoders.IMAGE.context_encoder.blocks`
    heads: int = 12
    mlp_hidden: int = 3072   # mlp_ratio 4
    patch: int = 16
    image: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    layer_norm_first: bool = False  # Data2VecMultiConfig default; every released image model
    norm_eps: float = NORM_EPS
    # D2vImageConfig.fixed_positions: True in every released model. False builds no positional
    # encoder at all (images.py), so no `positions` key is saved and nothing is added to the patches.
    fixed_positions: bool = True

    @property
    def grid(self) -> int:
        return self.image // self.patch

    @property
    def finetuned(self) -> bool:
        return self.num_classes > 0


VARIANTS: dict[str, dict[str, int]] = {
    "base": dict(dim=768, depth=10, prenet_depth=2, heads=12, mlp_hidden=3072, patch=16),
    "large": dict(dim=1024, depth=24, prenet_depth=0, heads=16, mlp_hidden=4096, patch=16),
    "huge": dict(dim=1280, depth=32, prenet_depth=0, heads=16, mlp_hidden=5120, patch=14),
}


def config_for(variant: str, **overrides) -> Data2Vec2Config:
    """The config of a named variant ("base", "large", "huge"), with any field overridden."""
    return replace(Data2Vec2Config(**VARIANTS[variant]), **overrides)


def infer_config(sd: dict[str, torch.Tensor], heads: int, image: int | None = None,
                 norm_eps: float = NORM_EPS) -> Data2Vec2Config:
    """Read widths, depths, patch, image size, classes and norm placement off the shapes.

    The head count leaves no trace in the shapes (the fused qkv is [3C, C]):
    pass it from the file's cfg (`num_heads`) or the variant table; likewise
    `norm_eps`, the cfg's `norm_eps` (fairseq builds every block and embedding
    LayerNorm with it; `fc_norm` keeps its hard-coded 1e-6). Keys are
    the `model.`-stripped names; the image side comes from the stored positions
    when present, else from `image` (the file's cfg `input_size`), else 224. A
    model without `context_encoder.norm` is pre-norm; one without stored
    positions was built with `fixed_positions=False` and adds none.
    """
    enc = "modality_encoders.IMAGE."
    conv = sd[enc + "local_encoder.proj.weight"]
    positions = sd.get(enc + "fixed_positional_encoder.positions")
    grid = round(positions.shape[1] ** 0.5) if positions is not None else (image or 224) // conv.shape[-1]
    return Data2Vec2Config(
        dim=conv.shape[0],
        depth=count_indexed(sd, "blocks."),
        prenet_depth=count_indexed(sd, enc + "context_encoder.blocks."),
        heads=heads,
        mlp_hidden=sd["blocks.0.mlp.fc1.weight"].shape[0],
        patch=conv.shape[-1],
        image=grid * conv.shape[-1],
        in_chans=conv.shape[1],
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        layer_norm_first=enc + "context_encoder.norm.weight" not in sd,
        norm_eps=norm_eps,
        fixed_positions=positions is not None,
    )


# ----------------------------------------------------------------------------- primitives


def sincos_positions(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table [1, grid*grid, dim] (reference/mae_positions.py), as a tensor."""
    return torch.from_numpy(mae_positions.sincos_positions(dim, grid))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Data2Vec2Config) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, C


class FixedPositionalEncoder(nn.Module):
    """Holds the stored table (an nn.Parameter with requires_grad=False in fairseq)."""

    def __init__(self, cfg: Data2Vec2Config) -> None:
        super().__init__()
        self.positions = nn.Parameter(sincos_positions(cfg.dim, cfg.grid), requires_grad=False)


class AltAttention(nn.Module):
    """Fused qkv WITH bias on q, k and v; q scaled by Dh^-0.5; softmax in float32."""

    def __init__(self, cfg: Data2Vec2Config) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.scale = (cfg.dim // cfg.heads) ** -0.5
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=True)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)                       # B, H, N, N
        attn = attn.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))       # B, N, C


class Mlp(nn.Module):
    def __init__(self, cfg: Data2Vec2Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # timm Mlp with nn.GELU: exact erf GELU


# ----------------------------------------------------------------------------- block


class AltBlock(nn.Module):
    """fairseq `AltBlock`. Post-norm: x = LN1(x + attn(x)); x = LN2(x + mlp(x)).

    Pre-norm (layer_norm_first=True) follows the source line for line:
    `r = x = mlp(norm2(x)); x = r + x`, so the block returns 2·mlp(LN2(x + attn(LN1 x)))
    and the residual stream is NOT carried past the MLP. No released image
    model uses this mode; it is reproduced, not corrected.
    """

    def __init__(self, cfg: Data2Vec2Config) -> None:
        super().__init__()
        self.layer_norm_first = cfg.layer_norm_first
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = AltAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.attn(self.norm1(x))
            r = x = self.mlp(self.norm2(x))
            return r + x
        r = x = self.norm1(x + self.attn(x))
        return self.norm2(r + self.mlp(x))


class BlockEncoder(nn.Module):
    """The prenet (`context_encoder`): embedding LayerNorm (post-norm models only) + blocks."""

    def __init__(self, cfg: Data2Vec2Config) -> None:
        super().__init__()
        self.norm = None if cfg.layer_norm_first else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(AltBlock(cfg) for _ in range(cfg.prenet_depth))


class ImageEncoder(nn.Module):
    def __init__(self, cfg: Data2Vec2Config) -> None:
        super().__init__()
        self.extra_tokens = nn.Parameter(torch.zeros(1, 1, cfg.dim))  # num_extra_tokens=1: cls
        self.fixed_positional_encoder = FixedPositionalEncoder(cfg) if cfg.fixed_positions else None
        self.local_encoder = PatchEmbed(cfg)
        self.context_encoder = BlockEncoder(cfg)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.local_encoder(pixels)                                             # B, N, C
        if self.fixed_positional_encoder is not None:
            x = x + self.fixed_positional_encoder.positions
        x = torch.cat([self.extra_tokens.expand(x.shape[0], -1, -1), x], 1)      # B, N+1, C
        norm = self.context_encoder.norm
        return norm(x) if norm is not None else x


# ----------------------------------------------------------------------------- model


class Data2Vec2(nn.Module):
    """data2vec 2.0 image classifier (or the pretrained encoder when num_classes=0)."""

    def __init__(self, cfg: Data2Vec2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.modality_encoders = nn.ModuleDict({"IMAGE": ImageEncoder(cfg)})
        self.blocks = nn.ModuleList(AltBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.layer_norm_first else None
        if cfg.finetuned:
            self.fc_norm = nn.LayerNorm(cfg.dim, eps=FC_NORM_EPS)
            self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        image = self.modality_encoders["IMAGE"]
        x = image.embed(pixels)
        out: dict[str, torch.Tensor] = {"patch_embed": x}
        blocks = list(image.context_encoder.blocks) + list(self.blocks)
        for i, block in enumerate(blocks):
            x = out[f"blocks.{i}"] = block(x)
        if self.norm is not None:
            x = out["norm"] = self.norm(x)
        if self.cfg.finetuned:
            out["pooled"] = self.fc_norm(x[:, 1:].mean(1))  # MEAN_POOLING over patches only
            out["logits"] = self.head(out["pooled"])
        return out


def strip_model_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`model.X` → `X` (the wrapped Data2VecMultiModel of *_ft.pt); `fc_norm`/`head` stay as they are."""
    return {k.removeprefix("model."): v for k, v in sd.items()}


def from_original(sd: dict[str, torch.Tensor], heads: int, image: int | None = None,
                  norm_eps: float = NORM_EPS) -> Data2Vec2:
    """Build the model from a `model.`-stripped state dict and load it strictly (float32).

    `heads`, `image` and `norm_eps` are what only the file's cfg knows (see `infer_config`).

    The stored sin-cos positions are compared with the rebuilt table and kept
    (they are what the original model added; fp16 training rounds them); a
    table further than POSITIONS_ATOL from the formula raises `ValueError`. A
    state dict without positions comes from a `fixed_positions=False` model,
    which adds none: it is not given a rebuilt table.
    """
    model = Data2Vec2(infer_config(sd, heads, image, norm_eps)).eval()
    weights = {k: v.float() for k, v in sd.items()}
    name = "modality_encoders.IMAGE.fixed_positional_encoder.positions"
    if name in weights:
        stored, rebuilt = weights[name], sincos_positions(model.cfg.dim, model.cfg.grid)
        if stored.shape != rebuilt.shape or (stored - rebuilt).abs().max() > POSITIONS_ATOL:
            raise ValueError(f"{name} is not the 2-D sin-cos table for a {model.cfg.grid}x{model.cfg.grid} grid")
    model.load_state_dict(weights, strict=True)
    return model
