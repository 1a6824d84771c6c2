"""data2vec 2.0 vision in JAX/Flax, on the CONVERTED weights of our transformers custom model.

The module tree spells `Data2Vec2VisionForImageClassification`'s names
(reference/data2vec2_hf: `data2vec2.embeddings.{cls_token, position_embeddings,
patch_embeddings.projection, layernorm}`, `data2vec2.encoder.layer.N.{attention_norm,
attention.qkv, attention.projection, mlp_norm, mlp.fc1, mlp.fc2}`,
`data2vec2.layernorm`, `data2vec2.pooler.layernorm`, `classifier`) and, without
the classifier and the `data2vec2.` prefix, `Data2Vec2VisionModel`'s (the
pretrained encoder, no pooler); weights come in through
data2vec1_flax.params_from_state_dict's generic rules. Same math and taps as
reference/data2vec2_torch.py: "patch_embed", "blocks.i" (prenet blocks first),
"norm" (pre-norm models only), then "pooled", "logits" (classifier only).
Every matmul and conv runs at precision HIGHEST.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from reference.data2vec1_flax import HIGHEST, PatchEmbeddings, dense, layer_norm, params_from_state_dict

__all__ = ["Config", "Data2Vec2Flax", "Data2Vec2FlaxModel", "params_from_state_dict"]


@dataclass(frozen=True)
class Config:
    """Shape of a data2vec 2.0 model; `depth` counts prenet and shared blocks together.

    `use_mean_pooling=False` is the pretrained encoder: no pooler by default.
    """

    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_hidden: int = 3072
    patch: int = 16
    image: int = 224
    num_classes: int = 1000  # 0: the pretrained encoder (no classifier)
    layer_norm_first: bool = False  # False (post-norm) in every released image model
    layer_norm_eps: float = 1e-6    # Data2VecMultiConfig.norm_eps
    pooler_layer_norm_eps: float = 1e-6  # fc_norm's hard-coded eps
    use_mean_pooling: bool = True


class Embeddings(nn.Module):
    """patches + stored sin-cos positions, cls prepended without one, LayerNorm if post-norm."""

    cfg: Config

    @nn.compact
    def __call__(self, pixels: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        grid = cfg.image // cfg.patch
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, cfg.dim))
        positions = self.param("position_embeddings", nn.initializers.zeros, (1, grid * grid, cfg.dim))
        x = PatchEmbeddings(cfg, name="patch_embeddings")(pixels) + positions            # B, N, C
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.dim)), x], axis=1)  # B, N+1, C
        return x if cfg.layer_norm_first else layer_norm(cfg, "layernorm")(x)


class Attention(nn.Module):
    """Fused qkv with bias on q, k and v; scores (q·Dh^-0.5)·kᵀ."""

    cfg: Config

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, n, c = x.shape
        h = self.cfg.heads
        qkv = dense(3 * c, "qkv")(x).reshape(b, n, 3, h, c // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                            # B, N, H, Dh
        scores = jnp.einsum("bqhd,bkhd->bhqk", q * (c // h) ** -0.5, k, precision=HIGHEST)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=HIGHEST).reshape(b, n, c)
        return dense(c, "projection")(out)


class Mlp(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.gelu(dense(self.cfg.mlp_hidden, "fc1")(x), approximate=False)  # exact erf GELU
        return dense(self.cfg.dim, "fc2")(x)


class Layer(nn.Module):
    """fairseq AltBlock; pre-norm keeps the original's dropped residual: 2·mlp(LN2(x + attn(LN1 x)))."""

    cfg: Config

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        attn_norm, mlp_norm = layer_norm(cfg, "attention_norm"), layer_norm(cfg, "mlp_norm")
        attn, mlp = Attention(cfg, name="attention"), Mlp(cfg, name="mlp")
        if cfg.layer_norm_first:
            x = x + attn(attn_norm(x))
            m = mlp(mlp_norm(x))
            return m + m
        x = attn_norm(x + attn(x))
        return mlp_norm(x + mlp(x))


class Encoder(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x: jnp.ndarray, taps: dict) -> jnp.ndarray:
        for i in range(self.cfg.depth):
            x = taps[f"blocks.{i}"] = Layer(self.cfg, name=f"layer_{i}")(x)
        return x


class Pooler(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        ln = nn.LayerNorm(epsilon=self.cfg.pooler_layer_norm_eps, name="layernorm")
        return ln(x[:, 1:].mean(axis=1))                                               # B, C (cls excluded)


class Data2Vec2FlaxModel(nn.Module):
    """`Data2Vec2VisionModel` in Flax; returns the taps dict (input NCHW).

    The final `layernorm` (tap "norm") exists only in pre-norm models: a
    post-norm encoder ends at its last block, already LayerNorm-ed. The pooler
    (tap "pooled") follows `add_pooling_layer`, by default `cfg.use_mean_pooling`.
    """

    cfg: Config
    add_pooling_layer: bool | None = None

    @nn.compact
    def __call__(self, pixels: jnp.ndarray) -> dict[str, jnp.ndarray]:
        pool = self.cfg.use_mean_pooling if self.add_pooling_layer is None else self.add_pooling_layer
        taps: dict[str, jnp.ndarray] = {}
        x = taps["patch_embed"] = Embeddings(self.cfg, name="embeddings")(pixels)
        x = Encoder(self.cfg, name="encoder")(x, taps)
        if self.cfg.layer_norm_first:
            x = taps["norm"] = layer_norm(self.cfg, "layernorm")(x)
        if pool:
            taps["pooled"] = Pooler(self.cfg, name="pooler")(x)
        return taps


class Data2Vec2Flax(nn.Module):
    """`Data2Vec2VisionForImageClassification` in Flax; returns the taps dict (input NCHW)."""

    cfg: Config

    @nn.compact
    def __call__(self, pixels: jnp.ndarray) -> dict[str, jnp.ndarray]:
        taps = Data2Vec2FlaxModel(self.cfg, add_pooling_layer=True, name="data2vec2")(pixels)
        taps["logits"] = dense(self.cfg.num_classes, "classifier")(taps["pooled"])
        return taps
