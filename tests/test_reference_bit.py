"""The BiT references agree with each other, with timm's npz loader and with the formulas.

Tiny configs (one unit per block, root width 32) keep this file fast; the math
is the full BiT math. Numerics are strict: JAX at "highest" matmul precision,
TF32 off in torch, fixed seeds.
"""

from __future__ import annotations

import zipfile
from functools import partial

import h5py
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from timm.models.resnetv2 import ResNetV2  # before any TensorFlow import: see reference/bit_tf.py

from checkpoints.synthetic import bit_arrays, keras_layers, write_bit_h5, write_bit_npz
from converters.families.bit import DEPTHS, BitSpec, npz_shapes, spec_from_arrays, tap_names, tree_name
from reference import bit_flax, bit_torch

jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

TINY = dict(depths=(1, 1, 1, 1), root_width=32, num_classes=10)
SIZES = [(64, 64), (65, 47)]  # even AND odd: fixed padding differs from TF "SAME" on both

# (atol, rtol) per tap. Measured fp32 CPU differences are ~4x below these; a padding,
# eps-form or pool-padding bug is O(1-10) and fails every tap from its origin on.
TOLERANCES = {"stem": (1e-4, 1e-5), "block": (1e-3, 1e-5), "norm": (1e-4, 1e-5),
              "pre_logits": (2e-5, 1e-5), "logits": (1e-5, 1e-5)}


def tolerance(tap: str) -> tuple[float, float]:
    return TOLERANCES["block" if tap.startswith("block") else tap]


def assert_taps_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                      taps: list[str], what: str) -> dict[str, float]:
    """Compare taps in model order; the message names the first failing tap and its errors."""
    errors = {}
    for tap in taps:
        a, e = np.asarray(actual[tap], np.float64), np.asarray(expected[tap], np.float64)
        assert a.shape == e.shape, f"{what}: tap {tap} shape {a.shape} != {e.shape}"
        diff = np.abs(a - e)
        max_abs, max_rel = diff.max(), diff.max() / max(np.abs(e).max(), 1e-30)
        atol, rtol = tolerance(tap)
        assert np.all(diff <= atol + rtol * np.abs(e)), (
            f"{what}: tap {tap} differs: max-abs {max_abs:.3g}, max-rel {max_rel:.3g} "
            f"(atol {atol}, rtol {rtol})")
        errors[tap] = float(max_abs)
    return errors


def tap_order(config: BitSpec) -> list[str]:
    return tap_names(config)


def nhwc(taps: dict) -> dict[str, np.ndarray]:
    """Torch taps (NCHW) as NHWC numpy arrays, to compare with Flax/TF."""
    out = {}
    for name, t in taps.items():
        t = t.detach().numpy()
        out[name] = t.transpose(0, 2, 3, 1) if t.ndim == 4 else t
    return out


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return bit_arrays(**TINY, seed=0)


@pytest.fixture(scope="module")
def flax_model(arrays):
    model, params = bit_flax.from_npz(arrays)
    apply = jax.jit(model.apply)
    return lambda x: {k: np.asarray(v) for k, v in apply({"params": params}, x)[1].items()}


def image(size: tuple[int, int], seed: int = 1) -> np.ndarray:
    """A batch of two NHWC images in BiT's [-1, 1] range."""
    return np.random.default_rng(seed).uniform(-1, 1, (2, *size, 3)).astype(np.float32)


def torch_taps(model: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return nhwc(model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))[1])


# ---------------------------------------------------------------------------
# Flax vs PyTorch
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_flax_and_torch_agree_per_tap(arrays, flax_model, size):
    x = image(size)
    torch_model = bit_torch.from_npz(arrays)
    config = torch_model.config
    expected = flax_model(x)
    assert_taps_close(torch_taps(torch_model, x), expected, tap_order(config), f"torch vs flax @{size}")
    assert expected["stem"].shape[1:3] == ((size[0] - 1) // 2 // 2 + 1, (size[1] - 1) // 2 // 2 + 1)


def test_module_trees_are_the_npz_tree(arrays):
    """Both references' parameter names are the npz names; moving weights needs generic rules only."""
    names = {tree_name(k) for k in arrays}
    torch_model = bit_torch.BiT(spec_from_arrays(arrays))
    assert {k.replace(".", "/") for k in torch_model.state_dict()} == names
    model = bit_flax.BiT(bit_flax.spec_from_arrays(arrays))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    shapes = {"/".join(p.key for p in path): tuple(v.shape) for path, v in flat}
    assert shapes == {tree_name(k): v.shape for k, v in arrays.items()}


# ---------------------------------------------------------------------------
# The numerics that matter: zero-padded pool, WS eps inside the sqrt
# ---------------------------------------------------------------------------

def test_stem_pool_pads_with_zero_not_minus_inf(arrays):
    """On negative root-conv outputs a -inf-padded pool differs at the border; the stem must not."""
    model = bit_torch.from_npz(arrays)
    x = torch.from_numpy(image((64, 64)).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        root = model.root_block.standardized_conv2d(x)
        stem = model(x)[1]["stem"]
        zero_padded = F.max_pool2d(F.pad(root, (1, 1, 1, 1), value=0.0), 3, 2)
        minus_inf = F.max_pool2d(root, 3, 2, padding=1)
    assert torch.equal(stem, zero_padded)
    assert (stem - minus_inf).abs().max() > 0.1, "this input does not exercise the pool padding"
    negative = -np.ones((1, 5, 5, 1), np.float32)  # corner windows see the padding
    assert np.asarray(bit_flax.max_pool_zero_padded(negative))[0, 0, 0, 0] == 0.0
    assert bit_torch.max_pool_zero_padded(torch.from_numpy(negative).permute(0, 3, 1, 2))[0, 0, 0, 0] == 0.0


def ws_formula(kernel_hwio: np.ndarray, eps: float) -> np.ndarray:
    """w_hat = (w - mean) / sqrt(var + eps), per output filter over H, W, I, biased variance."""
    k = kernel_hwio.astype(np.float64)
    mean = k.mean(axis=(0, 1, 2), keepdims=True)
    return (k - mean) / np.sqrt(((k - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True) + eps)


def test_weight_standardization_eps_is_1e_10_inside_sqrt():
    """A filter with variance 2.5e-11 tells eps 1e-10 inside the sqrt from 1e-8 or eps outside."""
    tiny = np.array([0.0, 1e-5], np.float32).reshape(1, 1, 2, 1)  # HWIO, one filter
    normal = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype(np.float32)
    for kernel in (tiny, normal):
        expected = ws_formula(kernel, 1e-10)
        got_flax = np.asarray(bit_flax.standardize_weight(kernel))
        got_torch = bit_torch.standardize_weight(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        np.testing.assert_allclose(got_flax, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_torch.numpy().transpose(2, 3, 1, 0), expected, rtol=1e-5, atol=1e-6)
    got = np.asarray(bit_flax.standardize_weight(tiny)).ravel()
    np.testing.assert_allclose(got, [-5e-6 / np.sqrt(1.25e-10), 5e-6 / np.sqrt(1.25e-10)], rtol=1e-5)
    assert np.abs(got - ws_formula(tiny, 1e-8).ravel()).max() > 0.3  # timm/transformers' eps
    assert np.abs(got - np.array([-1.0, 1.0]) * 5e-6 / (5e-6 + 1e-10)).max() > 0.3  # eps outside


# ---------------------------------------------------------------------------
# timm's own npz loader on a synthetic file
# ---------------------------------------------------------------------------

def test_timm_npz_loader_agrees_with_flax(arrays, flax_model, tmp_path):
    """timm's `ResNetV2.load_pretrained` reads our npz; stem/stages/norm/logits match Flax.

    timm standardizes with eps 1e-8 (original 1e-10); the difference is far below the tolerances.
    """
    config = spec_from_arrays(arrays)
    path = tmp_path / "tiny-bit.npz"
    write_bit_npz(path, arrays)
    model = ResNetV2(layers=list(config.depths), channels=tuple(config.out(b) for b in range(1, 5)),
                     stem_chs=config.root_width, stem_type="fixed", num_classes=config.num_classes,
                     conv_layer=partial(StdConv2d, eps=1e-8)).eval()
    assert isinstance(model.head.fc, torch.nn.Conv2d)  # else timm silently skips the head
    model.load_pretrained(str(path))
    x = image((65, 47))
    with torch.no_grad():
        h = model.stem(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        taps = {"stem": h}
        for b, stage in enumerate(model.stages, 1):
            h = taps[f"block{b}.unit01"] = stage(h)
        taps["norm"] = model.norm(h)
        taps["logits"] = model.forward_head(taps["norm"])
    taps = nhwc(taps)
    assert_taps_close(taps, flax_model(x), [t for t in tap_names(config) if t != "pre_logits"],
                      "timm vs flax")


# ---------------------------------------------------------------------------
# Synthetic files: layouts, key counts, spellings
# ---------------------------------------------------------------------------

def test_npz_key_counts_and_parameter_totals():
    """153/306/459 keys for R50/R101/R152 and the published parameter totals."""
    for depth, keys in ((50, 153), (101, 306), (152, 459)):
        assert len(npz_shapes(BitSpec(DEPTHS[depth], 64, 1000))) == keys
    total = lambda shapes: sum(int(np.prod(s)) for s in shapes.values())
    assert total(npz_shapes(BitSpec(DEPTHS[50], 64, 1000))) == 25_549_352
    assert total(npz_shapes(BitSpec(DEPTHS[152], 256, 21843))) == 1_107_299_923
    assert total(npz_shapes(BitSpec(DEPTHS[101], 192, 21843))) == 516_015_123


def test_npz_writer_is_flat_uncompressed_float32(arrays, tmp_path):
    path = tmp_path / "file-without-suffix"
    write_bit_npz(path, arrays)
    with zipfile.ZipFile(path) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    with np.load(path, allow_pickle=False) as loaded:
        assert sorted(loaded.files) == sorted(arrays)
        assert all(loaded[k].dtype == np.float32 and np.array_equal(loaded[k], v) for k, v in arrays.items())
    assert all(k.startswith("resnet/") for k in arrays)
    assert arrays["resnet/head/conv2d/kernel"].shape == (1, 1, 1024, 10)
    assert np.abs(arrays["resnet/head/conv2d/kernel"]).max() > 0  # a nonzero head


def test_numbered_conv_spelling_normalises_to_the_same_model(arrays):
    numbered = bit_arrays(**TINY, seed=0, numbered_convs=True)
    convs = [k for k in numbered if "standardized_conv2d" in k]
    assert "resnet/root_block/standardized_conv2d/kernel" in numbered
    assert "resnet/block1/unit01/a/standardized_conv2d_1/kernel" in numbered
    assert len({k.split("/")[-2] for k in convs}) == len(convs) == 17  # every conv spelled uniquely
    assert spec_from_arrays(numbered) == spec_from_arrays(arrays)
    plain, renamed = bit_torch.state_dict_from_npz(arrays), bit_torch.state_dict_from_npz(numbered)
    assert plain.keys() == renamed.keys() and all(torch.equal(plain[k], renamed[k]) for k in plain)


def test_h5_writer_has_keras_layer_and_weight_order(arrays, tmp_path):
    path = tmp_path / "tiny-bit.h5"
    write_bit_h5(path, arrays)
    with h5py.File(path, "r") as f:
        layers = [n.decode() for n in f.attrs["layer_names"]]
        assert layers == ["root_block", "block1", "block2", "block3", "block4", "group_norm",
                          "re_lu_12", "global_average_pooling2d", "head/dense"]  # 3 ReLUs per unit before
        names = {layer: [n.decode() for n in f[layer].attrs["weight_names"]] for layer in layers}
        stored = [(n, f[layer][n][()]) for layer in layers for n in names[layer]]
    assert names["re_lu_12"] == [] and len(stored) == len(arrays) == 45
    unit = [n.removeprefix("resnet/block2/unit01/").removesuffix(":0") for n in names["block2"]]
    assert unit == ["a/group_norm/gamma", "a/group_norm/beta", "a/standardized_conv2d/kernel",
                    "b/group_norm/gamma", "b/group_norm/beta", "b/standardized_conv2d/kernel",
                    "c/group_norm/gamma", "c/group_norm/beta", "c/standardized_conv2d/kernel",
                    "a/proj/standardized_conv2d/kernel"]
    head_kernel, head_bias = stored[-2][1], stored[-1][1]
    assert head_kernel.shape == (1024, 10) and head_bias.shape == (10,)
    np.testing.assert_array_equal(head_kernel, arrays["resnet/head/conv2d/kernel"][0, 0])
    for name, value in stored[:-2]:
        np.testing.assert_array_equal(value, arrays[name.removesuffix(":0")])
    expected_order = [n for _, weights in keras_layers(arrays) for n, _ in weights]
    assert [n for n, _ in stored] == expected_order


def test_h5_writer_r50_layout():
    """Full R50x1 structure (shapes only matter): 153 weights, 16-unit order, proj last in unit01s."""
    layers = keras_layers({k: np.zeros(s, np.float32) for k, s in npz_shapes(BitSpec(DEPTHS[50], 64, 1000)).items()})
    assert [len(w) for _, w in layers] == [1, 3 * 9 + 1, 4 * 9 + 1, 6 * 9 + 1, 3 * 9 + 1, 2, 2]
    assert layers[1][1][9][0] == "resnet/block1/unit01/a/proj/standardized_conv2d/kernel:0"
    assert layers[1][1][9][1].shape == (1, 1, 64, 256)


# ---------------------------------------------------------------------------
# TensorFlow reference (optional extra)
# ---------------------------------------------------------------------------

@pytest.mark.tensorflow
def test_tf_reference_from_h5_order_agrees_with_flax(arrays, flax_model, tmp_path):
    """The TF model filled positionally from our `.h5` matches Flax on the npz, at an odd size."""
    pytest.importorskip("tensorflow")
    from reference import bit_tf

    path = tmp_path / "tiny-bit.h5"
    write_bit_h5(path, arrays)
    with h5py.File(path, "r") as f:
        layers = [n.decode() for n in f.attrs["layer_names"]]
        values = [f[layer][n.decode()][()] for layer in layers for n in f[layer].attrs["weight_names"]]
    model = bit_tf.BiTTF(spec_from_arrays(arrays))
    model.assign_keras_order(values)
    x = image((65, 47))
    taps = {k: v.numpy() for k, v in model(x)[1].items()}
    assert_taps_close(taps, flax_model(x), tap_order(model.config), "tf(h5) vs flax")
    kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(bit_tf.standardize_weight(model.tf, kernel).numpy(),
                               ws_formula(kernel, 1e-10), rtol=1e-5, atol=1e-6)
