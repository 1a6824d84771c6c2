"""data2vec 1.0 vision in JAX/Flax, on the CONVERTED transformers weights.

The module tree spells the state-dict names of `Data2VecVisionForImageClassification`
(`data2vec_vision.encoder.layer.N.attention.attention.query`, `lambda_1`,
`pooler.layernorm`, `classifier`, ...) and, without the classifier and the
`data2vec_vision.` prefix, of `Data2VecVisionModel` (the pretrained encoder:
`encoder.layer.N...`, `layernorm`), so `params_from_state_dict` is generic:
a numeric segment joins its parent (`layer.0` → `layer_0`), Linear/Conv
`weight` becomes a transposed `kernel`, LayerNorm `weight` becomes `scale`.
Same math and taps as reference/data2vec1_torch.py: "patch_embed",
"blocks.0" … "blocks.{L-1}", then "pooled", "logits" (classifier) or "norm"
(pretrained encoder). Every matmul and conv runs at precision HIGHEST.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reference.beit_positions import relative_position_index

HIGHEST = jax.lax.Precision.HIGHEST


@dataclass(frozen=True)
class Config:
    """Shape of a data2vec 1.0 model (per-layer relative position tables).

    `use_mean_pooling` is transformers' flag: True (fine-tuned) makes the final
    `layernorm` an identity and the pooler a LayerNorm of the mean patch token;
    False (pretrained) normalises every token in `layernorm` and pools the cls token.
    """

    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_hidden: int = 3072
    patch: int = 16
    image: int = 224
    num_classes: int = 1000  # 0: the pretrained encoder (no classifier)
    layer_norm_eps: float = 1e-6  # the original's eps; the hub configs say 1e-12
    use_mean_pooling: bool = True


# ----------------------------------------------------------------------------- weights

# torch layout → Flax layout by rank: Linear (out, in) → (in, out); Conv OIHW → HWIO.
_TO_FLAX = {2: lambda w: w.T, 4: lambda w: w.transpose(2, 3, 1, 0)}


def params_from_state_dict(sd: dict[str, np.ndarray]) -> dict:
    """transformers names/layouts → a Flax params tree (generic rules, no per-model table).

    `a.layer.3.b.weight` → params["a"]["layer_3"]["b"]["kernel"]; 2-D weights are
    transposed (out, in → in, out), 4-D conv weights go OIHW → HWIO, 1-D
    weights are LayerNorm scales; every other leaf keeps its name and layout.
    """
    params: dict = {}
    for name, value in sd.items():
        parts = name.split(".")
        path: list[str] = []
        for part in parts[:-1]:
            if part.isdigit():
                path[-1] = f"{path[-1]}_{part}"
            else:
                path.append(part)
        leaf, value = parts[-1], np.asarray(value, dtype=np.float32)
        if leaf == "weight":
            leaf, value = ("scale", value) if value.ndim == 1 else ("kernel", _TO_FLAX[value.ndim](value))
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value)
    return params


# ----------------------------------------------------------------------------- primitives


def dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, precision=HIGHEST, name=name)


def layer_norm(cfg: Config, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=name)


class PatchEmbeddings(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, pixels: jnp.ndarray) -> jnp.ndarray:
        p = self.cfg.patch
        x = nn.Conv(self.cfg.dim, (p, p), strides=(p, p), padding="VALID", precision=HIGHEST,
                    name="projection")(jnp.transpose(pixels, (0, 2, 3, 1)))          # B, h, w, C
        return x.reshape(x.shape[0], -1, x.shape[-1])                               # B, N, C (row-major)


class Embeddings(nn.Module):
    """Patch embeddings with the cls token prepended; no absolute position embedding."""

    cfg: Config

    @nn.compact
    def __call__(self, pixels: jnp.ndarray) -> jnp.ndarray:
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.cfg.dim))
        x = PatchEmbeddings(self.cfg, name="patch_embeddings")(pixels)
        return jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[2])), x], axis=1)  # B, N+1, C


class RelativePositionBias(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self) -> jnp.ndarray:
        side = self.cfg.image // self.cfg.patch
        table = self.param("relative_position_bias_table", nn.initializers.zeros,
                           ((2 * side - 1) ** 2 + 3, self.cfg.heads))
        return jnp.transpose(table[relative_position_index((side, side))], (2, 0, 1))      # H, N+1, N+1


class SelfAttention(nn.Module):
    """query and value with bias, key without (the original's k bias is a constant zero)."""

    cfg: Config

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, n, c = x.shape
        h = self.cfg.heads
        q, k, v = (dense(c, name, use_bias=name != "key")(x).reshape(b, n, h, c // h)
                   for name in ("query", "key", "value"))                           # B, N, H, Dh
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) / np.sqrt(c // h)
        scores = scores + RelativePositionBias(self.cfg, name="relative_position_bias")()
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=HIGHEST).reshape(b, n, c)


class Dense(nn.Module):
    """A module holding one `dense` (transformers' `*.output.dense`, `intermediate.dense`)."""

    features: int
    gelu: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = dense(self.features, "dense")(x)
        return nn.gelu(x, approximate=False) if self.gelu else x  # exact erf GELU


class Attention(nn.Module):
    """`attention.attention` (self-attention) followed by `attention.output.dense`."""

    cfg: Config

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return Dense(self.cfg.dim, name="output")(SelfAttention(self.cfg, name="attention")(x))


# ----------------------------------------------------------------------------- block


class Layer(nn.Module):
    """Pre-norm block with layer scale; `lambda_1/2` are the original `gamma_1/2`."""

    cfg: Config

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        lambda_1 = self.param("lambda_1", nn.initializers.constant(0.1), (cfg.dim,))
        lambda_2 = self.param("lambda_2", nn.initializers.constant(0.1), (cfg.dim,))
        x = x + lambda_1 * Attention(cfg, name="attention")(layer_norm(cfg, "layernorm_before")(x))
        h = Dense(cfg.mlp_hidden, gelu=True, name="intermediate")(layer_norm(cfg, "layernorm_after")(x))
        return x + lambda_2 * Dense(cfg.dim, name="output")(h)


# ----------------------------------------------------------------------------- model


class Encoder(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x: jnp.ndarray, taps: dict) -> jnp.ndarray:
        for i in range(self.cfg.depth):
            x = taps[f"blocks.{i}"] = Layer(self.cfg, name=f"layer_{i}")(x)
        return x


class Pooler(nn.Module):
    """LayerNorm of the mean patch token (mean pooling), else the cls token as it is."""

    cfg: Config

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if not self.cfg.use_mean_pooling:
            return x[:, 0]                                                          # B, C
        return layer_norm(self.cfg, "layernorm")(x[:, 1:].mean(axis=1))             # B, C (cls excluded)


class Data2Vec1FlaxModel(nn.Module):
    """`Data2VecVisionModel` in Flax; returns the taps dict (input NCHW).

    The final `layernorm` (tap "norm") exists only without mean pooling, as
    transformers makes it an identity otherwise; the pooler (tap "pooled") only
    with `add_pooling_layer`, off by default as in transformers (AutoModel).
    """

    cfg: Config
    add_pooling_layer: bool = False

    @nn.compact
    def __call__(self, pixels: jnp.ndarray) -> dict[str, jnp.ndarray]:
        taps: dict[str, jnp.ndarray] = {}
        x = taps["patch_embed"] = Embeddings(self.cfg, name="embeddings")(pixels)
        x = Encoder(self.cfg, name="encoder")(x, taps)
        if not self.cfg.use_mean_pooling:
            x = taps["norm"] = layer_norm(self.cfg, "layernorm")(x)
        if self.add_pooling_layer:
            taps["pooled"] = Pooler(self.cfg, name="pooler")(x)
        return taps


class Data2Vec1Flax(nn.Module):
    """`Data2VecVisionForImageClassification` in Flax; returns the taps dict (input NCHW)."""

    cfg: Config

    @nn.compact
    def __call__(self, pixels: jnp.ndarray) -> dict[str, jnp.ndarray]:
        taps = Data2Vec1FlaxModel(self.cfg, add_pooling_layer=True, name="data2vec_vision")(pixels)
        taps["logits"] = dense(self.cfg.num_classes, "classifier")(taps["pooled"])
        return taps
