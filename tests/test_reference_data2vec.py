"""data2vec references: the 1.0 model against transformers and timm, the 2.0 model against
its transformers custom code, the Flax ports against torch, and the synthetic containers.

Tiny configs only (dim 64, 2-3 blocks, 64x64 images). The hand mappings below
check the MATH of each pair; the converter's own rule table is tested elsewhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoints import synthetic_data2vec as synth
from reference import data2vec1_torch as d2v1
from reference import data2vec2_torch as d2v2
from reference import mae_positions

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

TINY1 = d2v1.Data2Vec1Config(dim=64, depth=2, heads=4, mlp_hidden=256, patch=16, image=64, num_classes=10)
TINY2 = d2v2.Data2Vec2Config(dim=64, depth=2, prenet_depth=1, heads=4, mlp_hidden=256, patch=16, image=64,
                             num_classes=10)
HF_DIR = Path(d2v2.__file__).parent / "data2vec2_hf"


def pixels(seed: int = 0, batch: int = 2, image: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(seed))


def assert_tap(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0) -> float:
    """Compare one tap; the failure names the tap with its max-abs and max-rel error."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    max_abs, max_rel = err.max().item(), (err / want.abs().clamp_min(1e-12)).max().item()
    assert torch.all(err <= atol + rtol * want.abs()), f"{name}: max-abs {max_abs:.3g} max-rel {max_rel:.3g}"
    return max_abs


# ----------------------------------------------------------------------------- data2vec 1.0


def d2v1_to_transformers(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Hand mapping original 1.0 names (per-layer tables) → Data2VecVisionForImageClassification, or
    for a pretrained dict → Data2VecVisionModel (`norm` → `layernorm`; lm_head, mask_token dropped)."""
    finetuned = "head.weight" in sd
    p = "data2vec_vision." if finetuned else ""
    out = {p + "embeddings.cls_token": sd["cls_token"],
           p + "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           p + "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"]}
    if finetuned:
        out.update({p + "pooler.layernorm.weight": sd["fc_norm.weight"],
                    p + "pooler.layernorm.bias": sd["fc_norm.bias"],
                    "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]})
    else:
        out.update({"layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]})
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
               "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"{p}encoder.layer.{i}."
        for old, new in renames.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{new}.{leaf}"] = sd[f"{src}{old}.{leaf}"]
        q, k, v = sd[src + "attn.qkv.weight"].chunk(3)  # rows: q, k, v
        att = dst + "attention.attention."
        out.update({att + "query.weight": q, att + "key.weight": k, att + "value.weight": v,
                    att + "query.bias": sd[src + "attn.q_bias"], att + "value.bias": sd[src + "attn.v_bias"],
                    att + "relative_position_bias.relative_position_bias_table":
                        sd[src + "attn.relative_position_bias_table"],
                    dst + "lambda_1": sd[src + "gamma_1"], dst + "lambda_2": sd[src + "gamma_2"]})
    return out


def expand_shared_table(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """BEiT's "expand the shared relative position embedding to each transformer block"."""
    out = {k: v for k, v in sd.items() if not k.startswith("rel_pos_bias.")}
    for i in range(depth):
        out[f"blocks.{i}.attn.relative_position_bias_table"] = sd["rel_pos_bias.relative_position_bias_table"]
    return out


def test_relative_position_index_matches_the_documented_values() -> None:
    index = d2v1.relative_position_index((14, 14))
    assert index.shape == (197, 197)
    assert [index[1, 1], index[1, 2], index[2, 1], index[0, 1], index[1, 0], index[0, 0]] == \
        [364, 363, 365, 729, 730, 731]
    assert torch.equal(index, synth._rel_pos_index(14))


def test_d2v1_infer_config_reads_every_field_off_the_shapes() -> None:
    for shared in (False, True):
        for finetuned in (False, True):
            sd = synth.d2v1_state_dict(TINY1, seed=0, shared_rel_pos=shared, finetuned=finetuned)
            cfg = d2v1.infer_config(sd)
            want = replace(TINY1, per_layer_rel_pos=not shared, shared_rel_pos=shared,
                           num_classes=TINY1.num_classes if finetuned else 0,
                           mask_token=not finetuned, lm_head=not finetuned)
            assert cfg == want
            d2v1.from_original(sd)  # strict load of every variant
    assert d2v1.config_for("large").dim == 1024 and d2v1.config_for("large").depth == 24


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_d2v1_reference_equals_transformers_per_tap(attn_implementation: str) -> None:
    from transformers import Data2VecVisionConfig, Data2VecVisionForImageClassification

    torch.manual_seed(0)
    sd = synth.d2v1_state_dict(TINY1, seed=1, shared_rel_pos=False, finetuned=True)
    ref = d2v1.from_original(sd)
    config = Data2VecVisionConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=64,
        patch_size=16, num_labels=10, layer_norm_eps=1e-6, use_relative_position_bias=True,
        use_shared_relative_position_bias=False, use_absolute_position_embeddings=False,
        use_mean_pooling=True, layer_scale_init_value=0.1, attn_implementation=attn_implementation)
    hf = Data2VecVisionForImageClassification(config).eval()
    missing, unexpected = hf.load_state_dict(d2v1_to_transformers(sd, TINY1.depth), strict=False)
    assert not unexpected and all("relative_position_index" in k for k in missing), (missing, unexpected)

    x = pixels()
    with torch.no_grad():
        taps = ref(x)
        out = hf(x, output_hidden_states=True)
        pooled = hf.data2vec_vision(x).pooler_output
    assert_tap("patch_embed", out.hidden_states[0], taps["patch_embed"], atol=1e-6)
    for i in range(TINY1.depth):
        assert_tap(f"blocks.{i}", out.hidden_states[i + 1], taps[f"blocks.{i}"], atol=5e-6)
    assert_tap("pooled", pooled, taps["pooled"], atol=5e-6)
    assert_tap("logits", out.logits, taps["logits"], atol=5e-6)


def test_d2v1_shared_table_equals_it_copied_into_every_layer() -> None:
    shared = synth.d2v1_state_dict(TINY1, seed=2, shared_rel_pos=True, finetuned=True)
    shared = {k: v for k, v in shared.items() if not k.endswith("relative_position_index")}
    x = pixels(1)
    with torch.no_grad():
        a = d2v1.from_original(shared)(x)
        b = d2v1.from_original(expand_shared_table(shared, TINY1.depth))(x)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("shared", [False, True])
def test_timm_beit_on_the_original_deepspeed_file_agrees(tmp_path: Path, shared: bool) -> None:
    """timm's BEiT (LayerNorm eps 1e-6, like the original) loads the fp16 `module` through checkpoint_filter_fn."""
    from timm.models.beit import Beit, checkpoint_filter_fn

    sd = synth.d2v1_state_dict(TINY1, seed=3, shared_rel_pos=shared, finetuned=True)
    path = synth.write_d2v1_deepspeed(tmp_path / "mp_rank_00_model_states.pt", sd)
    container = torch.load(path, map_location="cpu", weights_only=False)  # our own fixture
    timm_model = Beit(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                      use_abs_pos_emb=False, use_rel_pos_bias=not shared, use_shared_rel_pos_bias=shared,
                      init_values=0.1, global_pool="avg").eval()
    filtered = {k: v.float() for k, v in checkpoint_filter_fn(container, timm_model).items()}
    timm_model.load_state_dict(filtered, strict=True)
    ref = d2v1.from_original(container["module"])

    x = pixels(2)
    with torch.no_grad():
        taps = ref(x)
        _, blocks = timm_model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)
        logits = timm_model(x)
    for i, (spatial, prefix) in enumerate(blocks):
        assert_tap(f"blocks.{i}", torch.cat([prefix, spatial], 1), taps[f"blocks.{i}"], atol=1e-5)
    assert_tap("logits", logits, taps["logits"], atol=1e-5)


# ----------------------------------------------------------------------------- data2vec 2.0


BLOCK_RENAMES = {"norm1": "attention_norm", "attn.qkv": "attention.qkv", "attn.proj": "attention.projection",
                 "norm2": "mlp_norm", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def d2v2_to_custom(sd: dict[str, torch.Tensor], prenet_depth: int) -> dict[str, torch.Tensor]:
    """The documented rename, fairseq `model.`-stripped names → Data2Vec2VisionForImageClassification."""
    enc, emb = "modality_encoders.IMAGE.", "data2vec2.embeddings."
    fixed = {enc + "extra_tokens": emb + "cls_token",
             enc + "fixed_positional_encoder.positions": emb + "position_embeddings",
             enc + "local_encoder.proj.weight": emb + "patch_embeddings.projection.weight",
             enc + "local_encoder.proj.bias": emb + "patch_embeddings.projection.bias",
             enc + "context_encoder.norm.weight": emb + "layernorm.weight",
             enc + "context_encoder.norm.bias": emb + "layernorm.bias",
             "norm.weight": "data2vec2.layernorm.weight", "norm.bias": "data2vec2.layernorm.bias",
             "fc_norm.weight": "data2vec2.pooler.layernorm.weight",
             "fc_norm.bias": "data2vec2.pooler.layernorm.bias",
             "head.weight": "classifier.weight", "head.bias": "classifier.bias"}
    out = {}
    for name, tensor in sd.items():
        if name in fixed:
            out[fixed[name]] = tensor
            continue
        head, index, rest = name.removeprefix(enc + "context_encoder.").split(".", 2)
        layer = int(index) + (prenet_depth if not name.startswith(enc) else 0)
        stem, leaf = rest.rsplit(".", 1)
        out[f"data2vec2.encoder.layer.{layer}.{BLOCK_RENAMES[stem]}.{leaf}"] = tensor
    return out


def custom_model(cfg: d2v2.Data2Vec2Config):
    from reference.data2vec2_hf import Data2Vec2VisionConfig, Data2Vec2VisionForImageClassification

    config = Data2Vec2VisionConfig(
        hidden_size=cfg.dim, num_hidden_layers=cfg.prenet_depth + cfg.depth, num_prenet_layers=cfg.prenet_depth,
        num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_hidden, image_size=cfg.image,
        patch_size=cfg.patch, layer_norm_first=cfg.layer_norm_first, num_labels=cfg.num_classes)
    return Data2Vec2VisionForImageClassification(config).eval()


def _mae_sincos(dim: int, grid: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed as written there (float32 grid, einsum, float64 omega):
    first half the column, second the row; an oracle independent of the project's table."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    halves = []
    for pos in (cols, rows):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        halves.append(np.concatenate([np.sin(out), np.cos(out)], axis=1))
    return np.concatenate(halves, axis=1)


def test_sincos_positions_match_the_mae_formula() -> None:
    for dim, grid in ((64, 4), (768, 14)):
        want = torch.from_numpy(_mae_sincos(dim, grid)).float()[None]
        assert_tap("positions", d2v2.sincos_positions(dim, grid), want, atol=1e-7)


def test_numpy_sincos_positions_equal_the_torch_tables() -> None:
    """The converter's check (numpy, no torch import) rebuilds the torch references' table, and
    keeps their tolerance: both float64 formulas round to the same float32 values."""
    from reference.data2vec2_hf.modeling_data2vec2 import sincos_positions as hf_sincos_positions

    assert d2v2.POSITIONS_ATOL == mae_positions.POSITIONS_ATOL == 5e-4
    for dim, grid in ((64, 4), (768, 14), (1280, 16)):
        table = torch.from_numpy(mae_positions.sincos_positions(dim, grid))
        assert table.dtype == torch.float32
        assert_tap(f"positions {dim}x{grid}", table, d2v2.sincos_positions(dim, grid), atol=1e-7)
        assert_tap(f"positions {dim}x{grid} (custom code)", table, hf_sincos_positions(dim, grid), atol=1e-7)


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_d2v2_reference_equals_custom_transformers_model(layer_norm_first: bool) -> None:
    cfg = replace(TINY2, layer_norm_first=layer_norm_first)
    sd = d2v2.strip_model_prefix(synth.d2v2_state_dict(cfg, seed=4, finetuned=True))
    ref = d2v2.from_original(sd, heads=cfg.heads)
    assert ref.cfg == cfg
    hf = custom_model(cfg)
    hf.load_state_dict(d2v2_to_custom(sd, cfg.prenet_depth), strict=True)

    x = pixels(3)
    with torch.no_grad():
        taps = ref(x)
        out = hf(x, output_hidden_states=True)
    assert_tap("patch_embed", out.hidden_states[0], taps["patch_embed"], atol=1e-6)
    for i in range(cfg.prenet_depth + cfg.depth):
        assert_tap(f"blocks.{i}", out.hidden_states[i + 1], taps[f"blocks.{i}"], atol=1e-5)
    assert_tap("pooled", out.pooler_output, taps["pooled"], atol=1e-5)
    assert_tap("logits", out.logits, taps["logits"], atol=1e-5)


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_d2v2_headless_custom_model_equals_the_pretrained_reference(layer_norm_first: bool) -> None:
    """`use_mean_pooling=False`: the classifier's backbone without its pooler, on the pretrained taps."""
    from reference.data2vec2_hf import Data2Vec2VisionConfig, Data2Vec2VisionModel

    cfg = replace(TINY2, num_classes=0, layer_norm_first=layer_norm_first)
    sd = {k: v for k, v in synth.d2v2_state_dict(cfg, seed=12, finetuned=False).items()
          if k != "_ema" and ".decoder." not in k}
    ref = d2v2.from_original(sd, heads=cfg.heads)
    assert ref.cfg == cfg
    config = Data2Vec2VisionConfig(
        hidden_size=cfg.dim, num_hidden_layers=cfg.prenet_depth + cfg.depth, num_prenet_layers=cfg.prenet_depth,
        num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_hidden, image_size=cfg.image,
        patch_size=cfg.patch, layer_norm_first=cfg.layer_norm_first, use_mean_pooling=False)
    hf = Data2Vec2VisionModel(config).eval()
    hf.load_state_dict({k.removeprefix("data2vec2."): v for k, v in d2v2_to_custom(sd, cfg.prenet_depth).items()},
                       strict=True)
    assert hf.pooler is None

    x = pixels(3)
    with torch.no_grad():
        taps = ref(x)
        out = hf(x, output_hidden_states=True)
    assert "pooled" not in taps and out.pooler_output is None
    assert_tap("patch_embed", out.hidden_states[0], taps["patch_embed"], atol=1e-6)
    for i in range(cfg.prenet_depth + cfg.depth):
        assert_tap(f"blocks.{i}", out.hidden_states[i + 1], taps[f"blocks.{i}"], atol=1e-5)
    last = "norm" if layer_norm_first else f"blocks.{cfg.prenet_depth + cfg.depth - 1}"
    assert list(taps)[-1] == last
    assert_tap(last, out.last_hidden_state, taps[last], atol=1e-5)


def test_d2v2_positions_are_checked_against_the_formula() -> None:
    sd = d2v2.strip_model_prefix(synth.d2v2_state_dict(TINY2, seed=5))
    name = "modality_encoders.IMAGE.fixed_positional_encoder.positions"
    with pytest.raises(ValueError, match="sin-cos"):
        d2v2.from_original({**sd, name: sd[name].flip(1)}, heads=4)


def test_d2v2_without_stored_positions_adds_none() -> None:
    """fairseq saves `positions` whenever it adds them (a requires_grad=False Parameter); a dict
    without them is a `fixed_positions=False` model, whose patches get no position at all."""
    enc = "modality_encoders.IMAGE."
    sd = {k: v for k, v in d2v2.strip_model_prefix(synth.d2v2_state_dict(TINY2, seed=5)).items()
          if k != enc + "fixed_positional_encoder.positions"}
    model = d2v2.from_original(sd, heads=4, image=64)
    x = pixels(12)
    with torch.no_grad():
        got = model(x)["patch_embed"]
        patches = F.conv2d(x, sd[enc + "local_encoder.proj.weight"], sd[enc + "local_encoder.proj.bias"], stride=16)
        tokens = torch.cat([sd[enc + "extra_tokens"].expand(2, -1, -1), patches.flatten(2).transpose(1, 2)], 1)
        want = F.layer_norm(tokens, (64,), sd[enc + "context_encoder.norm.weight"],
                            sd[enc + "context_encoder.norm.bias"], eps=1e-6)
    assert_tap("patch_embed", got, want, atol=1e-6)
    assert not model.cfg.fixed_positions and model.modality_encoders["IMAGE"].fixed_positional_encoder is None


def test_custom_code_reloads_with_trust_remote_code(tmp_path: Path) -> None:
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    model = custom_model(TINY2)
    model.save_pretrained(tmp_path)
    for name in ("configuration_data2vec2.py", "modeling_data2vec2.py"):
        shutil.copy(HF_DIR / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_data2vec2.Data2Vec2VisionConfig",
        "AutoModelForImageClassification": "modeling_data2vec2.Data2Vec2VisionForImageClassification"}
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded = AutoModelForImageClassification.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "Data2Vec2VisionForImageClassification"
    assert loaded.config.model_type == "data2vec2-vision"
    x = pixels(4)
    with torch.no_grad():
        want, got = model(x, output_hidden_states=True), loaded(x, output_hidden_states=True)
    assert torch.equal(want.logits, got.logits)
    assert len(got.hidden_states) == 1 + TINY2.prenet_depth + TINY2.depth


# ----------------------------------------------------------------------------- Flax ports


def _flax_compare(flax_module, model, torch_taps: dict[str, torch.Tensor], hf_sd: dict[str, torch.Tensor],
                  x: torch.Tensor) -> None:
    import jax

    params = flax_module.params_from_state_dict({k: v.numpy() for k, v in hf_sd.items()})
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), x.numpy())["params"]
    shapes = lambda tree: {jax.tree_util.keystr(p): v.shape for p, v in  # noqa: E731
                           jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert shapes(params) == shapes(expected)  # strict: no missing, no unexpected, same shapes
    got = model.apply({"params": params}, x.numpy())
    assert set(got) == set(torch_taps), (sorted(got), sorted(torch_taps))
    for name, want in torch_taps.items():
        assert_tap(f"flax {name}", torch.from_numpy(np.array(got[name])), want, atol=1e-4)


def flax_config(flax_module, cfg, **overrides):
    """The Flax port's Config for the torch reference config `cfg` (a 2.0 model counts its prenet
    blocks in `depth`), so each test states the tiny shape once, in TINY1 / TINY2."""
    depth = getattr(cfg, "prenet_depth", 0) + cfg.depth
    shape = dict(dim=cfg.dim, depth=depth, heads=cfg.heads, mlp_hidden=cfg.mlp_hidden, patch=cfg.patch, image=cfg.image,
                 num_classes=cfg.num_classes)
    return flax_module.Config(**shape | overrides)


def test_d2v1_flax_equals_torch() -> None:
    flax_d2v1 = pytest.importorskip("reference.data2vec1_flax")
    sd = synth.d2v1_state_dict(TINY1, seed=6, shared_rel_pos=False, finetuned=True)
    x = pixels(5)
    with torch.no_grad():
        taps = d2v1.from_original(sd)(x)
    model = flax_d2v1.Data2Vec1Flax(flax_config(flax_d2v1, TINY1))
    _flax_compare(flax_d2v1, model, taps, d2v1_to_transformers(sd, TINY1.depth), x)


def test_d2v1_flax_encoder_equals_torch_pretrained() -> None:
    """The bare Flax encoder (`Data2VecVisionModel`: no pooler, `layernorm` on every token) ends at "norm"."""
    flax_d2v1 = pytest.importorskip("reference.data2vec1_flax")
    sd = synth.d2v1_state_dict(TINY1, seed=13, shared_rel_pos=False, finetuned=False)
    x = pixels(9)
    with torch.no_grad():
        taps = d2v1.from_original(sd)(x)
    assert list(taps)[-1] == "norm"
    model = flax_d2v1.Data2Vec1FlaxModel(flax_config(flax_d2v1, TINY1, num_classes=0,
                                                                     use_mean_pooling=False))
    _flax_compare(flax_d2v1, model, taps, d2v1_to_transformers(sd, TINY1.depth), x)


def test_d2v1_flax_pooler_pools_as_transformers() -> None:
    """`add_pooling_layer`: the cls token without mean pooling, LayerNorm of the mean patch token with it."""
    from transformers import Data2VecVisionConfig, Data2VecVisionModel

    flax_d2v1 = pytest.importorskip("reference.data2vec1_flax")
    x = pixels(10)
    for mean_pooling in (False, True):
        sd = synth.d2v1_state_dict(TINY1, seed=14, shared_rel_pos=False, finetuned=mean_pooling)
        hf_sd = {k.removeprefix("data2vec_vision."): v for k, v in d2v1_to_transformers(sd, TINY1.depth).items()
                 if not k.startswith("classifier.")}
        config = Data2VecVisionConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=64,
            patch_size=16, layer_norm_eps=1e-6, use_relative_position_bias=True,
            use_absolute_position_embeddings=False, use_mean_pooling=mean_pooling, layer_scale_init_value=0.1)
        hf = Data2VecVisionModel(config, add_pooling_layer=True).eval()
        missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
        assert not unexpected and all("relative_position_index" in k for k in missing), (missing, unexpected)
        with torch.no_grad():
            out = hf(x, output_hidden_states=True)
        want = {"patch_embed": out.hidden_states[0],
                **{f"blocks.{i}": out.hidden_states[i + 1] for i in range(TINY1.depth)},
                **({} if mean_pooling else {"norm": out.last_hidden_state}), "pooled": out.pooler_output}
        model = flax_d2v1.Data2Vec1FlaxModel(flax_config(flax_d2v1, TINY1, num_classes=1000,
                                                                         use_mean_pooling=mean_pooling),
                                             add_pooling_layer=True)
        _flax_compare(flax_d2v1, model, want, hf_sd, x)


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_d2v2_flax_encoder_equals_torch_pretrained(layer_norm_first: bool) -> None:
    """The bare Flax encoder (`Data2Vec2VisionModel`, no pooler) ends at "norm" (pre-norm) or its last block."""
    flax_d2v2 = pytest.importorskip("reference.data2vec2_flax")
    cfg = replace(TINY2, num_classes=0, layer_norm_first=layer_norm_first)
    sd = {k: v for k, v in synth.d2v2_state_dict(cfg, seed=15, finetuned=False).items()
          if k != "_ema" and ".decoder." not in k}
    x = pixels(11)
    with torch.no_grad():
        taps = d2v2.from_original(sd, heads=4)(x)
    assert list(taps)[-1] == ("norm" if layer_norm_first else f"blocks.{cfg.prenet_depth + cfg.depth - 1}")
    model = flax_d2v2.Data2Vec2FlaxModel(flax_config(flax_d2v2, cfg, layer_norm_first=layer_norm_first,
                                                                     use_mean_pooling=False))
    hf_sd = {k.removeprefix("data2vec2."): v for k, v in d2v2_to_custom(sd, cfg.prenet_depth).items()}
    _flax_compare(flax_d2v2, model, taps, hf_sd, x)


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_d2v2_flax_equals_torch(layer_norm_first: bool) -> None:
    flax_d2v2 = pytest.importorskip("reference.data2vec2_flax")
    cfg = replace(TINY2, layer_norm_first=layer_norm_first)
    sd = d2v2.strip_model_prefix(synth.d2v2_state_dict(cfg, seed=7))
    x = pixels(6)
    with torch.no_grad():
        taps = d2v2.from_original(sd, heads=4)(x)
    model = flax_d2v2.Data2Vec2Flax(flax_config(flax_d2v2, cfg, layer_norm_first=layer_norm_first))
    _flax_compare(flax_d2v2, model, taps, d2v2_to_custom(sd, cfg.prenet_depth), x)


# ----------------------------------------------------------------------------- synthetic containers


def test_d2v1_pretrained_container(tmp_path: Path) -> None:
    sd = synth.d2v1_state_dict(TINY1, seed=8, shared_rel_pos=True, finetuned=False)
    path = synth.write_d2v1_pretrained(tmp_path / "checkpoint-799.pth", sd)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own fixture
    assert list(ckpt) == ["model", "optimizer", "epoch", "scaler", "args", "model_ema"]
    assert isinstance(ckpt["args"], argparse.Namespace)
    assert set(ckpt["model_ema"]) == set(ckpt["model"])
    assert {"mask_token", "lm_head.weight", "norm.weight", "rel_pos_bias.relative_position_bias_table",
            "rel_pos_bias.relative_position_index"} <= set(ckpt["model"])
    assert ckpt["model"]["rel_pos_bias.relative_position_index"].dtype == torch.int64
    with pytest.raises(Exception):
        torch.load(path, map_location="cpu", weights_only=True)
    taps = d2v1.from_original(ckpt["model"])(pixels(7))
    assert set(taps) == {"patch_embed", "blocks.0", "blocks.1", "norm"}


def test_d2v1_deepspeed_container(tmp_path: Path) -> None:
    sd = synth.d2v1_state_dict(TINY1, seed=9, shared_rel_pos=False, finetuned=True)
    path = synth.write_d2v1_deepspeed(tmp_path / "mp_rank_00_model_states.pt", sd)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own fixture
    assert {"module", "buffer_names", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps",
            "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
            "epoch"} == set(ckpt)
    module = ckpt["module"]
    assert module["blocks.0.attn.qkv.weight"].dtype == torch.float16
    assert module["blocks.0.attn.relative_position_index"].dtype == torch.int64
    assert "blocks.0.attn.k_bias" not in module and "blocks.0.attn.qkv.bias" not in module
    assert ckpt["buffer_names"] == [f"blocks.{i}.attn.relative_position_index" for i in range(TINY1.depth)]


@pytest.mark.parametrize("finetuned", [True, False])
def test_d2v2_fairseq_container(tmp_path: Path, finetuned: bool) -> None:
    sd = synth.d2v2_state_dict(TINY2, seed=10, finetuned=finetuned)
    cfg = synth.d2v2_cfg(TINY2, finetuned=finetuned)
    path = synth.write_d2v2_fairseq(tmp_path / "base_imagenet_ft.pt", sd, cfg)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own fixture
    assert list(ckpt) == ["args", "cfg", "model", "criterion", "optimizer_history", "task_state",
                          "extra_state", "last_optimizer_state"]
    backbone = ckpt["cfg"]["model"]["pretrained_model_args"]["model"] if finetuned else ckpt["cfg"]["model"]
    assert backbone["layer_norm_first"] is False and backbone["modalities"]["image"]["prenet_depth"] == 1
    model = ckpt["model"]
    if finetuned:
        assert all(k.startswith("model.") or k.split(".")[0] in ("fc_norm", "head") for k in model)
        assert not any("_ema" in k or ".decoder." in k for k in model)
        model = d2v2.strip_model_prefix(model)
    else:
        assert isinstance(model["_ema"], dict) and any(".decoder." in k for k in model)
        model = {k: v for k, v in model.items() if k != "_ema" and ".decoder." not in k}
    taps = d2v2.from_original(model, heads=backbone["num_heads"])(pixels(8))
    assert ("logits" in taps) == finetuned


def test_d2v2_leftovers_can_be_requested_in_a_finetuned_dict() -> None:
    sd = synth.d2v2_state_dict(TINY2, seed=11, finetuned=True, pretraining_leftovers=True)
    assert isinstance(sd["model._ema"], dict)
    assert any(k.startswith("model.modality_encoders.IMAGE.decoder.") for k in sd)
