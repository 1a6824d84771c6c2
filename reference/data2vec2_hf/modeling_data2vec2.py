"""data2vec 2.0 vision image classifier (transformers custom code, loaded with trust_remote_code=True).

transformers has no class for data2vec 2.0 vision: its blocks are post-norm,
it normalises the embeddings, adds fixed sin-cos positions to the patches only
and has a k bias, none of which `Data2VecVision` can express. Names follow
transformers' habits; the converter renames fairseq's `*_ft.pt` keys as:

    model.modality_encoders.IMAGE.extra_tokens            → data2vec2.embeddings.cls_token
    model.modality_encoders.IMAGE.fixed_positional_encoder.positions
                                                          → data2vec2.embeddings.position_embeddings
    model.modality_encoders.IMAGE.local_encoder.proj.*    → data2vec2.embeddings.patch_embeddings.projection.*
    model.modality_encoders.IMAGE.context_encoder.norm.*  → data2vec2.embeddings.layernorm.*
    model.modality_encoders.IMAGE.context_encoder.blocks.{j}.X → data2vec2.encoder.layer.{j}.X'
    model.blocks.{i}.X                                    → data2vec2.encoder.layer.{P+i}.X'  (P prenet blocks)
        X → X':  norm1 → attention_norm, attn.qkv → attention.qkv, attn.proj → attention.projection,
                 norm2 → mlp_norm, mlp.fc1 → mlp.fc1, mlp.fc2 → mlp.fc2
    model.norm.*  (pre-norm models only)                  → data2vec2.layernorm.*
    fc_norm.*                                             → data2vec2.pooler.layernorm.*
    head.*                                                → classifier.*

The position table is stored, not rebuilt: fp16 training leaves the file's
table rounded, and parity needs the values the original model added.

A pretrained `base_imagenet.pt` (fairseq's `Data2VecMultiModel` itself,
without `fc_norm`/`head`) becomes a headless `Data2Vec2VisionModel`
(`use_mean_pooling=False`): the same renames without the `data2vec2.` prefix
and with `model.` in place of `model.model.`; its `_ema` teacher and
`modality_encoders.IMAGE.decoder.*` are pretraining-only and not kept.

`output_hidden_states=True` returns (embedding output = the first block's
input, then every block's output), i.e. the taps "patch_embed", "blocks.0" …;
`last_hidden_state` after `layernorm` is the tap "norm" (pre-norm models
only: a post-norm encoder ends at its last block, whose output is already
LayerNorm-ed); `pooler_output` is the tap "pooled" (None without a pooler).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

try:  # transformers >= 5 guards initialisation of already-loaded tensors
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    init = nn.init

from .configuration_data2vec2 import Data2Vec2VisionConfig


def sincos_positions(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table [1, grid*grid, dim]: first half encodes the column, second the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()[None]


@dataclass
class Data2Vec2VisionImageClassifierOutput(ImageClassifierOutput):
    """ImageClassifierOutput plus the pooled features (LayerNorm of the mean patch token)."""

    pooler_output: torch.FloatTensor | None = None


class Data2Vec2VisionPatchEmbeddings(nn.Module):
    def __init__(self, config: Data2Vec2VisionConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size,
                                    kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # B, N, C


class Data2Vec2VisionEmbeddings(nn.Module):
    """patches + positions, cls prepended without a position, then LayerNorm (post-norm models)."""

    def __init__(self, config: Data2Vec2VisionConfig) -> None:
        super().__init__()
        grid = config.image_size // config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid, config.hidden_size),
                                                requires_grad=False)
        self.patch_embeddings = Data2Vec2VisionPatchEmbeddings(config)
        self.layernorm = (None if config.layer_norm_first
                          else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(pixel_values) + self.position_embeddings          # B, N, C
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)      # B, N+1, C
        return self.layernorm(x) if self.layernorm is not None else x


class Data2Vec2VisionAttention(nn.Module):
    """Fused qkv with bias on q, k and v; scores (q·Dh^-0.5)·kᵀ; softmax in float32."""

    def __init__(self, config: Data2Vec2VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.scale = (config.hidden_size // config.num_attention_heads) ** -0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.projection = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        scores = (q * self.scale) @ k.transpose(-2, -1)                               # B, H, N, N
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return self.projection((probs @ v).transpose(1, 2).reshape(b, n, c))          # B, N, C


class Data2Vec2VisionMLP(nn.Module):
    def __init__(self, config: Data2Vec2VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]  # "gelu": exact erf GELU, as nn.GELU()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Data2Vec2VisionLayer(nn.Module):
    """fairseq AltBlock. Post-norm: x = LN(x + attn(x)); x = LN(x + mlp(x)).

    Pre-norm reproduces the original line for line, including its dropped
    residual: the block returns 2·mlp(LN2(x + attn(LN1 x))).
    """

    def __init__(self, config: Data2Vec2VisionConfig) -> None:
        super().__init__()
        self.layer_norm_first = config.layer_norm_first
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Data2Vec2VisionAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Data2Vec2VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.attention(self.attention_norm(x))
            mlp = self.mlp(self.mlp_norm(x))
            return mlp + mlp
        x = self.attention_norm(x + self.attention(x))
        return self.mlp_norm(x + self.mlp(x))


class Data2Vec2VisionEncoder(nn.Module):
    def __init__(self, config: Data2Vec2VisionConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Data2Vec2VisionLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, output_hidden_states: bool) -> tuple[torch.Tensor, tuple | None]:
        hidden = (x,) if output_hidden_states else None
        for layer in self.layer:
            x = layer(x)
            hidden = hidden + (x,) if output_hidden_states else None
        return x, hidden


class Data2Vec2VisionPooler(nn.Module):
    """Mean of the patch tokens (cls excluded), then LayerNorm (fairseq `fc_norm`)."""

    def __init__(self, config: Data2Vec2VisionConfig) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.pooler_layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layernorm(x[:, 1:].mean(dim=1))  # B, C


class Data2Vec2VisionPreTrainedModel(PreTrainedModel):
    config_class = Data2Vec2VisionConfig
    base_model_prefix = "data2vec2"
    main_input_name = "pixel_values"
    _no_split_modules = ["Data2Vec2VisionLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Data2Vec2VisionEmbeddings):
            init.trunc_normal_(module.cls_token, std=self.config.initializer_range)
            grid = self.config.image_size // self.config.patch_size
            table = sincos_positions(self.config.hidden_size, grid)
            if hasattr(init, "copy_"):
                init.copy_(module.position_embeddings, table)
            else:  # pragma: no cover - older transformers
                with torch.no_grad():
                    module.position_embeddings.copy_(table)


class Data2Vec2VisionModel(Data2Vec2VisionPreTrainedModel):
    """Embeddings → blocks → final LayerNorm (pre-norm models only) → mean-pool + LayerNorm.

    `add_pooling_layer` defaults to `config.use_mean_pooling`; the pretrained
    encoder (`use_mean_pooling=False`) has no pooler and `pooler_output` is None.
    """

    def __init__(self, config: Data2Vec2VisionConfig, add_pooling_layer: bool | None = None) -> None:
        super().__init__(config)
        if add_pooling_layer is None:
            add_pooling_layer = getattr(config, "use_mean_pooling", True)
        self.embeddings = Data2Vec2VisionEmbeddings(config)
        self.encoder = Data2Vec2VisionEncoder(config)
        self.layernorm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                          if config.layer_norm_first else None)
        self.pooler = Data2Vec2VisionPooler(config) if add_pooling_layer else None
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> BaseModelOutputWithPooling | tuple:
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        x, hidden = self.encoder(self.embeddings(pixel_values), bool(output_hidden_states))
        if self.layernorm is not None:
            x = self.layernorm(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled,
                                         hidden_states=hidden)
        return out if return_dict is not False else out.to_tuple()


class Data2Vec2VisionForImageClassification(Data2Vec2VisionPreTrainedModel):
    """logits = classifier(pooler_output); fairseq's `head(fc_norm(mean of patches))`.

    Always built with the pooler, so a pretrained encoder's folder loads here
    as the start of fine-tuning (pooler and classifier newly initialised).
    """

    def __init__(self, config: Data2Vec2VisionConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.data2vec2 = Data2Vec2VisionModel(config, add_pooling_layer=True)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> Data2Vec2VisionImageClassifierOutput | tuple:
        base = self.data2vec2(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(base.pooler_output)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        out = Data2Vec2VisionImageClassifierOutput(loss=loss, logits=logits, hidden_states=base.hidden_states,
                                                   pooler_output=base.pooler_output)
        return out if return_dict is not False else out.to_tuple()
