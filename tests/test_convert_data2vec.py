"""data2vec-vision end to end: original-layout files → `parityport convert` → transformers folder → parity.

Tiny configs in the fast suite (dim 64, 2-3 blocks, 4 heads, 64x64 images,
patch 16); the published sizes behind `slow`. Budgets from the issue: max
|Δlogit| ≤ 5e-6 for 1.0 and ≤ 1e-5 for 2.0 (fp32), the Flax ports ≤ 1e-4.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from checkpoints import synthetic_data2vec as synth
from parityport.cli import main
from reference import data2vec1_torch as d2v1
from reference import data2vec2_torch as d2v2

TINY1 = d2v1.Data2Vec1Config(dim=64, depth=2, heads=4, mlp_hidden=256, patch=16, image=64, num_classes=10)
TINY2 = d2v2.Data2Vec2Config(dim=64, depth=2, prenet_depth=1, heads=4, mlp_hidden=256, patch=16, image=64,
                             num_classes=10)
D2V1_LOGITS, D2V2_LOGITS, FLAX = 5e-6, 1e-5, 1e-4


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def report_of(folder: Path) -> dict:
    return json.loads((folder / "parity.json").read_text())


def runs(report: dict, role: str) -> list[dict]:
    return [r for r in report["runs"] if r["role"] == role]


def assert_taps(report: dict, budgets: dict[str, float], role: str = "target") -> dict[str, float]:
    """Every tap of every `role` run within its report limit, and the named taps within `budgets`.

    Returns the worst max-abs per tap (over inputs) for the failure messages and the record.
    """
    worst: dict[str, float] = {}
    assert runs(report, role), f"no {role} runs"
    for run in runs(report, role):
        for tap in run["taps"]:
            where = f"{run['side']} {run['input']} {tap['tap']}: max-abs {tap['max_abs']:.2e} " \
                    f"max-rel {tap['max_rel']:.2e}"
            assert tap["max_abs"] <= tap["limit"], where
            assert tap["max_abs"] <= budgets.get(tap["tap"], float("inf")), where
            worst[tap["tap"]] = max(worst.get(tap["tap"], 0.0), tap["max_abs"])
    return worst


FLAX_PEER = "flax port (converted weights)"


def assert_flax_peer(report: dict, taps: list[str]) -> dict[str, float]:
    """The Flax peer ran on every input the target ran on, with exactly `taps` in forward order,
    each within its report limit (parity/compare.py) and the Flax budget.

    Returns the worst max-abs per tap (over inputs) for the failure messages and the record.
    """
    flax = [r for r in runs(report, "peer") if r["side"] == FLAX_PEER]
    assert flax and {r["input"] for r in flax} == {r["input"] for r in runs(report, "target")}, report["notes"]
    worst: dict[str, float] = {}
    for run in flax:
        assert [t["tap"] for t in run["taps"]] == taps, run["input"]
        for tap in run["taps"]:
            where = f"flax {run['input']} {tap['tap']}: max-abs {tap['max_abs']:.2e} max-rel {tap['max_rel']:.2e}"
            assert tap["max_abs"] <= min(tap["limit"], FLAX), where
            worst[tap["tap"]] = max(worst.get(tap["tap"], 0.0), tap["max_abs"])
        assert run["passed"] and run["first_diverging_tap"] is None, run["input"]
    return worst


def convert(src: Path, out: Path, *flags: str) -> Path:
    assert main(["convert", str(src), "--out", str(out), *flags]) == 0
    return out


# ----------------------------------------------------------------------------- data2vec 1.0 fine-tuned


@pytest.fixture(scope="module", params=["shared", "per-layer"])
def d2v1_ft(request, tmp_path_factory) -> tuple[Path, Path, dict]:
    """A DeepSpeed `mp_rank_00_model_states.pt` (fp16 `module`, argparse-free DeepSpeed state beside it)."""
    root = tmp_path_factory.mktemp(f"d2v1-{request.param}")
    sd = synth.d2v1_state_dict(TINY1, seed=1, shared_rel_pos=request.param == "shared", finetuned=True)
    src = synth.write_d2v1_deepspeed(root / "mp_rank_00_model_states.pt", sd)
    return src, convert(src, root / "out"), sd


def test_d2v1_finetuned_converts_with_no_flags_and_every_tap_agrees(d2v1_ft):
    _, folder, _ = d2v1_ft
    report = report_of(folder)
    assert report["passed"] and report["family"] == "data2vec1"
    assert {r["input"] for r in report["runs"]} == {"noise 64x64", "photo 64x64"}
    taps = [t["tap"] for t in report["runs"][0]["taps"]]
    assert taps == ["patch_embed", "blocks.0", "blocks.1", "pooled", "logits"]
    assert_taps(report, {"pooled": D2V1_LOGITS, "logits": D2V1_LOGITS})
    peers = {r["side"] for r in runs(report, "peer")}
    assert peers == {"timm Beit (timm's checkpoint_filter_fn)", "flax port (converted weights)"}
    assert_taps(report, {tap: FLAX for tap in taps}, role="peer")


def test_d2v1_config_notes_and_weights(d2v1_ft):
    _, folder, sd = d2v1_ft
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Data2VecVisionForImageClassification"]
    assert config["layer_norm_eps"] == 1e-6 and config["use_mean_pooling"] is True
    assert config["use_relative_position_bias"] is True and config["use_shared_relative_position_bias"] is False
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 4)
    notes = " ".join(report_of(folder)["notes"])
    assert "1e-12" in notes and "float16" in notes
    side = json.loads((folder / "preprocessor_config.json").read_text())["size"]["shortest_edge"]
    assert f"shorter side to {side} bicubic, centre crop {TINY1.image}, mean 0.5 std 0.5." in (folder / "README.md").read_text()
    weights = load_tensors(folder)
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert not any("relative_position_index" in k or "key.bias" in k for k in weights)
    table = "data2vec_vision.encoder.layer.{}.attention.attention.relative_position_bias.relative_position_bias_table"
    for i in range(TINY1.depth):
        want = sd.get("rel_pos_bias.relative_position_bias_table",
                      sd.get(f"blocks.{i}.attn.relative_position_bias_table"))
        assert torch.equal(weights[table.format(i)], want.half().float())
    q, k, v = sd["blocks.1.attn.qkv.weight"].half().float().chunk(3)
    att = "data2vec_vision.encoder.layer.1.attention.attention."
    assert torch.equal(weights[att + "key.weight"], k) and torch.equal(weights[att + "value.weight"], v)


def test_d2v1_folder_loads_in_transformers_and_matches_the_reference(d2v1_ft):
    from transformers import AutoModelForImageClassification

    src, folder, sd = d2v1_ft
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    reference = d2v1.from_original({k: v.half() if v.is_floating_point() else v for k, v in sd.items()})
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        err = (model(x).logits - reference(x)["logits"]).abs().max().item()
    assert err <= D2V1_LOGITS, f"logits: max-abs {err:.2e}"


# ----------------------------------------------------------------------------- data2vec 1.0 pretrained


@pytest.fixture(scope="module")
def d2v1_pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """`checkpoint-799.pth`: {model, optimizer, epoch, scaler, args: Namespace, model_ema}, shared table."""
    root = tmp_path_factory.mktemp("d2v1-pre")
    sd = synth.d2v1_state_dict(TINY1, seed=2, shared_rel_pos=True, finetuned=False)
    src = synth.write_d2v1_pretrained(root / "checkpoint-799.pth", sd)
    return src, convert(src, root / "out")


def test_d2v1_pretrained_is_a_data2vec_vision_model_with_pretraining_keys_dropped(d2v1_pretrained):
    from transformers import AutoModel

    _, folder = d2v1_pretrained
    report = report_of(folder)
    assert report["passed"]
    taps = [t["tap"] for t in report["runs"][0]["taps"]]
    assert taps == ["patch_embed", "blocks.0", "blocks.1", "norm"]
    assert_taps(report, {"norm": D2V1_LOGITS})
    assert {r["side"] for r in runs(report, "peer")} == {"timm Beit (timm's checkpoint_filter_fn)", FLAX_PEER}
    assert_taps(report, {"norm": FLAX}, role="peer")
    assert_flax_peer(report, taps)
    assert not any(n.startswith("peer not run") for n in report["notes"]), report["notes"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Data2VecVisionModel"] and config["use_mean_pooling"] is False
    notes = report["notes"]
    for key in ("model.lm_head.weight", "model.lm_head.bias", "model.mask_token",
                "model.rel_pos_bias.relative_position_index", "model_ema.cls_token", "optimizer.state.0.exp_avg"):
        assert any(key in n for n in notes if n.startswith("Dropped by rule")), key
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert type(model).__name__ == "Data2VecVisionModel"
    assert not info["missing_keys"] and not info["unexpected_keys"], info


# ----------------------------------------------------------------------------- data2vec 2.0


@pytest.fixture(scope="module", params=[False, True], ids=["post-norm", "pre-norm"])
def d2v2_ft(request, tmp_path_factory) -> tuple[Path, Path, d2v2.Data2Vec2Config]:
    """A fairseq `*_ft.pt` (plain-dict cfg); the pretraining leftovers are kept to exercise the drops."""
    root = tmp_path_factory.mktemp("d2v2")
    cfg = replace(TINY2, layer_norm_first=request.param)
    sd = synth.d2v2_state_dict(cfg, seed=3, finetuned=True, pretraining_leftovers=True)
    src = synth.write_d2v2_fairseq(root / "base_imagenet_ft.pt", sd, synth.d2v2_cfg(cfg))
    return src, convert(src, root / "out"), cfg


def test_d2v2_converts_loads_with_trust_remote_code_and_every_tap_agrees(d2v2_ft):
    from transformers import AutoModelForImageClassification

    _, folder, cfg = d2v2_ft
    report = report_of(folder)
    assert report["passed"] and report["family"] == "data2vec2"
    taps = [t["tap"] for t in report["runs"][0]["taps"]]
    norm = ["norm"] if cfg.layer_norm_first else []
    assert taps == ["patch_embed", "blocks.0", "blocks.1", "blocks.2", *norm, "pooled", "logits"]
    assert_taps(report, {"pooled": D2V2_LOGITS, "logits": D2V2_LOGITS})
    assert {r["side"] for r in runs(report, "peer")} == {"flax port (converted weights)"}
    assert_taps(report, {tap: FLAX for tap in taps}, role="peer")

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "data2vec2-vision" and "AutoModelForImageClassification" in config["auto_map"]
    assert (config["num_hidden_layers"], config["num_prenet_layers"], config["layer_norm_eps"]) == (3, 1, 1e-6)
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == "Data2Vec2VisionForImageClassification"
    dropped = " ".join(n for n in report["notes"] if n.startswith("Dropped by rule"))
    assert "model.model._ema." in dropped and "model.model.modality_encoders.IMAGE.decoder." in dropped


def test_d2v2_prenet_blocks_come_first_through_the_offset_rule(d2v2_ft):
    src, folder, _ = d2v2_ft
    from converters.readers.detect import open_checkpoint

    original = open_checkpoint(src).tensors
    weights = load_tensors(folder)
    pairs = [("model.model.modality_encoders.IMAGE.context_encoder.blocks.0.attn.qkv.bias", 0),
             ("model.model.blocks.0.attn.qkv.bias", 1), ("model.model.blocks.1.attn.qkv.bias", 2)]
    for key, layer in pairs:
        got = weights[f"data2vec2.encoder.layer.{layer}.attention.qkv.bias"].numpy()
        assert np.array_equal(got, original[key].load()), key


def test_d2v2_stored_positions_are_needed_for_parity(d2v2_ft):
    """The decision to keep the stored (fp16-rounded) table: the rebuilt one moves logits past 1e-5."""
    from transformers import AutoModelForImageClassification

    _, folder, cfg = d2v2_ft
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    positions = model.data2vec2.embeddings.position_embeddings
    rebuilt = d2v2.sincos_positions(cfg.dim, cfg.grid)
    assert 0 < (positions - rebuilt).abs().max().item() <= d2v2.POSITIONS_ATOL
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        stored = model(x).logits
        positions.copy_(rebuilt)
        moved = (model(x).logits - stored).abs().max().item()
    assert moved > D2V2_LOGITS, f"rebuilding the table moved logits by only {moved:.2e}"



def test_d2v2_cfg_norm_eps_is_the_eps_of_both_sides(tmp_path):
    """fairseq builds every block and embedding LayerNorm with the cfg's norm_eps: the folder and the
    parity source both use it (fc_norm stays at its hard-coded 1e-6)."""
    src = _d2v2_file(tmp_path, lambda sd: None, _backbone_cfg(lambda m: m.update(norm_eps=1e-5)))
    folder = convert(src, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert (config["layer_norm_eps"], config["pooler_layer_norm_eps"]) == (1e-5, 1e-6)
    report = report_of(folder)
    assert report["passed"] and report["first_diverging_tap"] is None
    assert_taps(report, {"pooled": D2V2_LOGITS, "logits": D2V2_LOGITS})
    weights = d2v2.strip_model_prefix(synth.d2v2_state_dict(TINY2, seed=3, finetuned=True))
    model = d2v2.from_original(weights, heads=TINY2.heads, norm_eps=1e-5)
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5, 1e-6}
    assert model.fc_norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-5

@pytest.fixture(scope="module", params=[False, True], ids=["post-norm", "pre-norm"])
def d2v2_pretrained(request, tmp_path_factory) -> tuple[Path, Path, d2v2.Data2Vec2Config, dict]:
    """A fairseq pretrained `base_imagenet.pt`: Data2VecMultiModel keys under `model`, `_ema`, decoder."""
    root = tmp_path_factory.mktemp("d2v2-pre")
    cfg = replace(TINY2, num_classes=0, layer_norm_first=request.param)
    sd = synth.d2v2_state_dict(cfg, seed=8, finetuned=False)
    src = synth.write_d2v2_fairseq(root / "base_imagenet.pt", sd, synth.d2v2_cfg(cfg, finetuned=False))
    return src, convert(src, root / "out"), cfg, sd


def test_d2v2_pretrained_is_a_headless_encoder_with_pretraining_keys_dropped(d2v2_pretrained):
    """Post-norm encoders end at their last block (already LayerNorm-ed), pre-norm ones at "norm"."""
    _, folder, cfg, _ = d2v2_pretrained
    report = report_of(folder)
    assert report["passed"] and report["family"] == "data2vec2"
    assert report["variant"] == "ViT-d64-L3-H4/16 pretrained"
    taps = [t["tap"] for t in report["runs"][0]["taps"]]
    end = ["norm"] if cfg.layer_norm_first else []
    assert taps == ["patch_embed", "blocks.0", "blocks.1", "blocks.2", *end]
    assert_taps(report, {tap: D2V2_LOGITS for tap in taps})
    assert {r["side"] for r in runs(report, "peer")} == {FLAX_PEER}, report["notes"]
    assert_flax_peer(report, taps)

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Data2Vec2VisionModel"] and config["use_mean_pooling"] is False
    assert config["auto_map"]["AutoModel"] == "modeling_data2vec2.Data2Vec2VisionModel"
    assert "AutoModelForImageClassification" in config["auto_map"] and "id2label" not in config
    weights = load_tensors(folder)
    assert not any(k.startswith(("data2vec2.", "pooler.", "classifier.")) for k in weights)
    assert ("layernorm.weight" in weights) == cfg.layer_norm_first
    dropped = [n for n in report["notes"] if n.startswith("Dropped by rule")]
    assert any("(EMA teacher of pretraining)" in n and "model._ema." in n for n in dropped)
    assert any("(pretraining decoder)" in n and "model.modality_encoders.IMAGE.decoder." in n for n in dropped)


def test_d2v2_pretrained_loads_with_automodel_and_matches_the_reference(d2v2_pretrained):
    from transformers import AutoModel

    _, folder, cfg, sd = d2v2_pretrained
    model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert type(model).__name__ == "Data2Vec2VisionModel" and model.pooler is None
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    weights = {k: v for k, v in sd.items() if k != "_ema" and ".decoder." not in k}
    reference = d2v2.from_original(weights, heads=cfg.heads)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out, taps = model.eval()(x, output_hidden_states=True), reference(x)
    last = "norm" if cfg.layer_norm_first else f"blocks.{cfg.prenet_depth + cfg.depth - 1}"
    assert list(taps)[-1] == last and "pooled" not in taps
    err = (out.last_hidden_state - taps[last]).abs().max().item()
    assert err <= D2V2_LOGITS, f"{last}: max-abs {err:.2e}"
    assert out.pooler_output is None and len(out.hidden_states) == 4


def test_d2v2_pretrained_folder_starts_a_finetune_in_the_classifier(d2v2_pretrained):
    """AutoModelForImageClassification on a pretrained folder: encoder loaded, only pooler and head new."""
    from transformers import AutoModelForImageClassification

    _, folder, _, _ = d2v2_pretrained
    model, info = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, num_labels=5,
                                                                  output_loading_info=True)
    assert type(model).__name__ == "Data2Vec2VisionForImageClassification"
    assert set(info["missing_keys"]) == {"data2vec2.pooler.layernorm.weight", "data2vec2.pooler.layernorm.bias",
                                         "classifier.weight", "classifier.bias"}, info
    assert not info["unexpected_keys"]


def test_folder_with_altered_custom_code_is_refused(d2v2_ft, tmp_path, capsys):
    import shutil

    src, folder, _ = d2v2_ft
    altered = tmp_path / "altered"
    shutil.copytree(folder, altered)
    with open(altered / "modeling_data2vec2.py", "a") as f:
        f.write("\nprint('side effect')\n")
    assert main(["parity", str(src), str(altered)]) == 2
    assert "refusing to run it with trust_remote_code" in capsys.readouterr().err


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("version", ["data2vec1", "data2vec2"])
def test_preprocessor_is_the_original_eval_pipeline(tmp_path, version):
    """shorter side 256 bicubic + centre crop 224 (torchvision, as the original code), normalised."""
    from PIL import Image
    from torchvision import transforms as T
    from transformers import AutoImageProcessor

    from converters import data2vec
    from parity.inputs import photo_path

    mean, std = ((data2vec.INCEPTION_MEAN, data2vec.INCEPTION_STD) if version == "data2vec1"
                 else (data2vec.IMAGENET_MEAN, data2vec.IMAGENET_STD))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(data2vec.preprocessor_config(224, mean, std)))
    image = Image.open(photo_path()).convert("RGB")
    got = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="np")["pixel_values"][0]
    original = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                          T.ToTensor(), T.Normalize(mean, std)])
    want = original(image).numpy()
    assert got.shape == want.shape == (3, 224, 224)
    assert np.abs(got - want).max() <= 1e-5


# ----------------------------------------------------------------------------- bad input


def _d2v1_file(tmp_path: Path, mutate) -> Path:
    sd = synth.d2v1_state_dict(TINY1, seed=1, shared_rel_pos=False, finetuned=True)
    mutate(sd)
    return synth.write_d2v1_deepspeed(tmp_path / "bad.pt", sd)


def _d2v2_file(tmp_path: Path, mutate, cfg_mutate=lambda c: None) -> Path:
    sd = synth.d2v2_state_dict(TINY2, seed=3, finetuned=True)
    cfg = synth.d2v2_cfg(TINY2)
    mutate(sd)
    cfg_mutate(cfg)
    return synth.write_d2v2_fairseq(tmp_path / "bad_ft.pt", sd, cfg)


def _d2v2_pretrained_file(tmp_path: Path, mutate) -> Path:
    config = replace(TINY2, num_classes=0)
    sd = synth.d2v2_state_dict(config, seed=3, finetuned=False)
    mutate(sd)
    return synth.write_d2v2_fairseq(tmp_path / "base_imagenet.pt", sd, synth.d2v2_cfg(config, finetuned=False))


POSITIONS = "modality_encoders.IMAGE.fixed_positional_encoder.positions"


def _set_tables(sd: dict, rows: int, heads: int) -> None:
    """Every per-layer relative position table [rows, heads] (expanded: the values do not matter),
    and the stored indices dropped."""
    for key in [k for k in sd if k.endswith("relative_position_index")]:
        del sd[key]
    for key in [k for k in sd if k.endswith("relative_position_bias_table")]:
        sd[key] = torch.zeros(1).expand(rows, heads)


def _backbone_cfg(edit):
    return lambda c: edit(c["model"]["pretrained_model_args"]["model"])


BAD = [
    ("missing key", lambda p: _d2v1_file(p, lambda sd: sd.pop("blocks.1.mlp.fc2.bias")),
     "missing keys: module.blocks.1.mlp.fc2.bias"),
    ("unknown key", lambda p: _d2v1_file(p, lambda sd: sd.__setitem__("blocks.0.attn.k_bias", torch.zeros(64))),
     "no rule for module.blocks.0.attn.k_bias"),
    ("wrong shape", lambda p: _d2v1_file(p, lambda sd: sd.__setitem__("blocks.1.mlp.fc1.weight", torch.zeros(128, 64))),
     "module.blocks.1.mlp.fc1.weight [128, 64] converts to data2vec_vision.encoder.layer.1.intermediate.dense.weight "
     "of shape [128, 64], expected [256, 64]"),
    ("wrong index", lambda p: _d2v1_file(p, lambda sd: sd["blocks.0.attn.relative_position_index"].fill_(0)),
     "module.blocks.0.attn.relative_position_index differs from the index rebuilt for a 4x4 window"),
    ("index of the wrong shape", lambda p: _d2v1_file(p, lambda sd: sd.__setitem__(
        "blocks.0.attn.relative_position_index", torch.zeros(1, dtype=torch.int64).expand(100, 100))),
     "module.blocks.0.attn.relative_position_index has shape [100, 100]; a 4x4 window needs [17, 17]"),
    ("window too large", lambda p: _d2v1_file(p, lambda sd: _set_tables(sd, 129 ** 2 + 3, 4)),
     "module.blocks.0.attn.relative_position_bias_table is for a 65x65 grid of patches; "
     "at most 64 per side are supported"),
    ("heads not dividing the width", lambda p: _d2v1_file(p, lambda sd: _set_tables(sd, 52, 5)),
     "module.blocks.0.attn.relative_position_bias_table gives 5 attention heads, which do not split "
     "the width 64 evenly"),
    ("no heads", lambda p: _d2v1_file(p, lambda sd: _set_tables(sd, 52, 0)),
     "module.blocks.0.attn.relative_position_bias_table gives 0 attention heads, which do not split "
     "the width 64 evenly"),
    ("2.0 missing key", lambda p: _d2v2_file(p, lambda sd: sd.pop("model.blocks.1.attn.proj.weight")),
     "missing keys: model.model.blocks.1.attn.proj.weight"),
    ("2.0 unknown key", lambda p: _d2v2_file(p, lambda sd: sd.__setitem__("model.blocks.0.attn.k_norm.weight",
                                                                           torch.ones(64))),
     "no rule for model.model.blocks.0.attn.k_norm.weight"),
    ("2.0 no heads in cfg", lambda p: _d2v2_file(
        p, lambda sd: None, lambda c: c["model"]["pretrained_model_args"]["model"].pop("num_heads")),
     "cfg.model has no num_heads and width 64 is not a published variant (the head count cannot be read "
     "from the shapes)"),
    ("2.0 heads 0", lambda p: _d2v2_file(p, lambda sd: None, _backbone_cfg(lambda m: m.update(num_heads=0))),
     "cfg field 'num_heads' gives 0 attention heads, which do not split the width 64 evenly"),
    ("2.0 heads 5", lambda p: _d2v2_file(p, lambda sd: None, _backbone_cfg(lambda m: m.update(num_heads=5))),
     "cfg field 'num_heads' gives 5 attention heads, which do not split the width 64 evenly"),
    ("2.0 heads a str", lambda p: _d2v2_file(p, lambda sd: None, _backbone_cfg(lambda m: m.update(num_heads="4"))),
     "cfg field 'num_heads' is '4'; expected an integer"),
    ("2.0 modalities a str", lambda p: _d2v2_file(
        p, lambda sd: None, _backbone_cfg(lambda m: m.update(modalities="image"))),
     "cfg field 'modalities' is 'image'; expected a mapping"),
    ("2.0 prenet_depth a str", lambda p: _d2v2_file(
        p, lambda sd: None, _backbone_cfg(lambda m: m["modalities"]["image"].update(prenet_depth="1"))),
     "cfg field 'modalities.image.prenet_depth' is '1'; expected an integer"),
    ("2.0 norm_eps a list", lambda p: _d2v2_file(
        p, lambda sd: None, _backbone_cfg(lambda m: m.update(norm_eps=[1e-6]))),
     "cfg field 'norm_eps' is [1e-06]; expected a positive number"),
    ("2.0 norm_eps a str", lambda p: _d2v2_file(
        p, lambda sd: None, _backbone_cfg(lambda m: m.update(norm_eps="1e-6 "))),
     "cfg field 'norm_eps' is '1e-6 '; expected a positive number"),
    ("2.0 norm_eps negative", lambda p: _d2v2_file(
        p, lambda sd: None, _backbone_cfg(lambda m: m.update(norm_eps=-1e-6))),
     "cfg field 'norm_eps' is -1e-06; expected a positive number"),
    ("2.0 layer_norm_first a str", lambda p: _d2v2_file(
        p, lambda sd: None, _backbone_cfg(lambda m: m.update(layer_norm_first="false"))),
     "cfg field 'layer_norm_first' is 'false'; expected true or false"),
    ("2.0 positions not a square grid", lambda p: _d2v2_file(
        p, lambda sd: sd.__setitem__(f"model.{POSITIONS}", torch.zeros(1).expand(1, 17, 64))),
     f"model.model.{POSITIONS} has shape [1, 17, 64]; expected [1, G*G, 64] for a GxG grid of patches"),
    ("2.0 grid too large", lambda p: _d2v2_file(
        p, lambda sd: sd.__setitem__(f"model.{POSITIONS}", torch.zeros(1).expand(1, 65 * 65, 64))),
     f"model.model.{POSITIONS} is for a 65x65 grid of patches; at most 64 per side are supported"),
    ("2.0 pretrained missing key", lambda p: _d2v2_pretrained_file(p, lambda sd: sd.pop("blocks.1.mlp.fc1.bias")),
     "missing keys: model.blocks.1.mlp.fc1.bias"),
    ("2.0 pretrained unknown key", lambda p: _d2v2_pretrained_file(
        p, lambda sd: sd.__setitem__("modality_encoders.IMAGE.alibi_scale", torch.ones(1))),
     "no rule for model.modality_encoders.IMAGE.alibi_scale"),
]


@pytest.mark.parametrize("make, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_exit_2_with_one_line_naming_the_file_and_key(tmp_path, capsys, make, message):
    src = make(tmp_path)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"parityport: error: {src}: {message}"
    assert not out.exists()


# ----------------------------------------------------------------------------- published sizes


@pytest.mark.slow
@pytest.mark.parametrize("variant, shared", [("base", False), ("base", True), ("large", False)])
def test_d2v1_published_sizes(tmp_path, variant, shared):
    config = d2v1.config_for(variant, num_classes=1000)
    sd = synth.d2v1_state_dict(config, seed=0, shared_rel_pos=shared, finetuned=True)
    src = synth.write_d2v1_deepspeed(tmp_path / "mp_rank_00_model_states.pt", sd)
    del sd
    report = report_of(convert(src, tmp_path / "out"))
    assert report["passed"] and report["variant"].startswith({"base": "ViT-B/16", "large": "ViT-L/16"}[variant])
    assert_taps(report, {"pooled": D2V1_LOGITS, "logits": D2V1_LOGITS})
    assert_taps(report, {"logits": FLAX}, role="peer")


@pytest.mark.slow
def test_d2v2_base_published_size(tmp_path):
    config = d2v2.config_for("base", num_classes=1000)
    src = synth.write_d2v2_fairseq(tmp_path / "base_imagenet_ft.pt", synth.d2v2_state_dict(config, seed=0),
                                   synth.d2v2_cfg(config))
    report = report_of(convert(src, tmp_path / "out"))
    assert report["passed"] and report["variant"] == "ViT-B/16 fine-tuned (1000 classes)"
    assert_taps(report, {"pooled": D2V2_LOGITS, "logits": D2V2_LOGITS})
    assert_taps(report, {"logits": FLAX}, role="peer")


@pytest.mark.slow
def test_catalog_default_runs_offline_on_a_synthetic_stand_in(tmp_path, monkeypatch, capsys):
    """`make convert-data2vec` with no network: the whole pipeline on a base file in the exact layout."""
    monkeypatch.setenv("PARITYPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PARITYPORT_BASE_URL", "http://127.0.0.1:9/")  # nothing listens there
    out = tmp_path / "out" / "data2vec-vision-base-ft1k"
    assert main(["convert", "data2vec-vision-base-ft1k", "--out", str(out), "--synthetic-if-offline"]) == 0
    err = capsys.readouterr().err
    assert "NOT the real weights" in err
    assert err.strip().endswith(f"wrote {out} (parity passed; SYNTHETIC weights (random values), not the published checkpoint)")
    report = report_of(out)
    assert report["passed"] and report["notes"][0].startswith("SYNTHETIC source")
    assert_taps(report, {"logits": D2V1_LOGITS})
