"""BiT end to end: original-layout file → `parityport convert` → transformers folder → parity."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from checkpoints.synthetic import DEPTHS, TINY_BIT, bit_arrays, write_bit_h5, write_bit_npz
from parityport.cli import main



@pytest.fixture(scope="module")
def tiny_folder(tiny_npz, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "tiny"
    assert main(["convert", str(tiny_npz), "--out", str(out)]) == 0
    return out


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def logits_taps(report: dict, role: str = "target"):
    return [(run["input"], t) for run in report["runs"] if run["role"] == role
            for t in run["taps"] if t["tap"] == "logits"]


def test_tiny_converts_and_every_tap_agrees(tiny_folder):
    report = json.loads((tiny_folder / "parity.json").read_text())
    assert report["passed"] and report["first_diverging_tap"] is None
    inputs = {run["input"] for run in report["runs"]}
    assert inputs == {"noise 224x224", "photo 224x224", "noise 161x193"}  # even AND odd size
    for name, tap in logits_taps(report):
        assert tap["max_abs"] <= 1e-4, f"{name}: max|dlogit| {tap['max_abs']:.2e}"
    for run in report["runs"]:
        for tap in run["taps"]:
            assert tap["max_abs"] <= tap["limit"], f"{run['side']} {run['input']} {tap['tap']}: " \
                                                   f"max-abs {tap['max_abs']:.2e} max-rel {tap['max_rel']:.2e}"
    assert {run["side"] for run in report["runs"] if run["role"] == "peer"} == {"timm ResNetV2 (timm's npz loader)"}
    taps = [t["tap"] for t in report["runs"][0]["taps"]]
    assert taps[:3] == ["stem", "block1.unit01", "block1.unit02"] and taps[-3:] == ["norm", "pre_logits", "logits"]
    for name in ("config.json", "preprocessor_config.json", "model.safetensors", "parity.md", "parity.png", "SHA256SUMS"):
        assert (tiny_folder / name).is_file(), name


def test_folder_loads_in_transformers_and_matches_flax(tiny_folder, tiny_npz):
    import jax
    from transformers import AutoModelForImageClassification

    from reference.bit_flax import from_npz

    jax.config.update("jax_default_matmul_precision", "highest")
    model = AutoModelForImageClassification.from_pretrained(tiny_folder).eval()
    arrays = dict(np.load(tiny_npz))
    flax_model, params = from_npz(arrays)
    for h, w in ((64, 64), (65, 47)):
        x = np.random.default_rng(h).uniform(-1, 1, (2, h, w, 3)).astype(np.float32)
        want = np.asarray(flax_model.apply({"params": params}, x)[0])
        with torch.no_grad():
            got = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
        assert np.abs(got - want).max() <= 1e-4, f"{h}x{w}: {np.abs(got - want).max():.2e}"


def test_config_is_the_exact_bit_config(tiny_folder):
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["layer_type"] == "preactivation"
    assert config["global_padding"] is None and config["embedding_dynamic_padding"] is False
    assert config["embedding_size"] == 32 and config["hidden_sizes"] == [128, 256, 512, 1024]
    assert config["depths"] == [2, 1, 1, 1] and config["width_factor"] == 1
    pre = json.loads((tiny_folder / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 480, "width": 480} and pre["do_center_crop"] is False
    assert pre["image_mean"] == [0.5] * 3 and pre["image_std"] == [0.5] * 3


def test_metadata_records_provenance(tiny_folder, tiny_npz):
    import hashlib

    with safe_open(tiny_folder / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert meta["source_sha256"] == hashlib.sha256(tiny_npz.read_bytes()).hexdigest()
    assert meta["source_format"] == "npz" and meta["converter"] == "parityport" and meta["variant"] == "R17x0.5"


@pytest.fixture(scope="module")
def h5_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("h5")
    write_bit_h5(root / "tiny.h5", bit_arrays(**TINY_BIT, seed=1))
    out = root / "from_h5"
    assert main(["convert", str(root / "tiny.h5"), "--out", str(out)]) == 0
    return out


def test_h5_in_tf2_layout_gives_the_same_tensors(tiny_folder, h5_folder):
    a, b = load_tensors(tiny_folder), load_tensors(h5_folder)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.tensorflow
def test_h5_parity_runs_the_tf_reference_filled_by_position(h5_folder):
    """An .h5 has no timm loader: its peer is the TF2 reference filled in the file's own order."""
    pytest.importorskip("tensorflow")
    report = json.loads((h5_folder / "parity.json").read_text())
    assert not [n for n in report["notes"] if n.startswith("peer not run")], report["notes"]
    peers = [run for run in report["runs"] if run["role"] == "peer"]
    assert {run["side"] for run in peers} == {"tensorflow reference (h5 weights by position)"}
    assert {run["input"] for run in peers} == {"noise 224x224", "photo 224x224", "noise 161x193"}
    for name, tap in logits_taps(report, "peer"):
        assert tap["max_abs"] <= 1e-4, f"{name}: max|dlogit| {tap['max_abs']:.2e}"
    for run in peers:
        for tap in run["taps"]:
            assert tap["max_abs"] <= tap["limit"], f"{run['input']} {tap['tap']}: max-abs {tap['max_abs']:.2e} " \
                                                   f"max-rel {tap['max_rel']:.2e}"


def test_numbered_conv_spelling_is_normalised(tmp_path, tiny_folder):
    write_bit_npz(tmp_path / "n.npz", bit_arrays(**TINY_BIT, seed=1, numbered_convs=True))
    assert main(["convert", str(tmp_path / "n.npz"), "--out", str(tmp_path / "n"), "--no-parity"]) == 0
    a, b = load_tensors(tiny_folder), load_tensors(tmp_path / "n")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype, stored", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_precision_outputs_carry_their_measured_error(tiny_npz, tmp_path, dtype, stored):
    out = tmp_path / dtype
    assert main(["convert", str(tiny_npz), "--out", str(out), "--dtype", dtype]) == 0
    assert all(t.dtype == stored for t in load_tensors(out).values())
    report = json.loads((out / "parity.json").read_text())
    # judged: the float32 conversion it was rounded from, and the rounding itself, exactly
    assert {r["dtype"] for r in report["runs"] if r["role"] == "target"} == {"float32"}
    assert report["checks"] == {f"every stored {dtype} tensor equals the float32 conversion rounded to "
                                f"{dtype} (54 tensors, bit for bit)": True}
    # measured: the model as stored, on every input
    measured = [r for r in report["runs"] if r["role"] == "measured"]
    assert {r["dtype"] for r in measured} == {dtype} and len(measured) == 3
    errors = [t["max_abs"] for r in measured for t in r["taps"] if t["tap"] == "logits"]
    assert all(0 < e < float("inf") for e in errors)  # measured, not zero: weights were rounded
    assert f"| measured | noise 224x224 | {dtype} |" in (out / "parity.md").read_text()


def test_a_stored_tensor_that_is_not_the_rounded_value_is_caught(tiny_npz, tmp_path):
    from safetensors.torch import load_file, save_file

    from parity.families import rounding_mismatches

    full, half = tmp_path / "full", tmp_path / "half"
    assert main(["convert", str(tiny_npz), "--out", str(full), "--no-parity"]) == 0
    assert main(["convert", str(tiny_npz), "--out", str(half), "--no-parity", "--dtype", "bfloat16"]) == 0
    assert rounding_mismatches(full, half, "bfloat16") == []
    weights = load_file(half / "model.safetensors")
    weights["bit.norm.bias"][0] += 1  # one value off by far more than rounding
    save_file(weights, half / "model.safetensors", metadata={"format": "pt"})
    assert rounding_mismatches(full, half, "bfloat16") == ["bit.norm.bias"]


def test_planted_tf_same_padding_is_caught_at_the_stem(tiny_folder, tiny_npz, tmp_path, capsys):
    import shutil

    broken = tmp_path / "same"
    shutil.copytree(tiny_folder, broken)
    config = json.loads((broken / "config.json").read_text())
    config.update(global_padding="SAME", embedding_dynamic_padding=True)
    (broken / "config.json").write_text(json.dumps(config))
    assert main(["parity", str(tiny_npz), str(broken)]) == 1
    assert "first diverging tap: stem)" in capsys.readouterr().err


def test_parity_of_a_folder_holding_another_model_is_bad_input(tiny_folder, tmp_path, capsys):
    other = tmp_path / "wider.npz"
    write_bit_npz(other, bit_arrays(**{**TINY_BIT, "num_classes": 7}, seed=1))
    assert main(["parity", str(other), str(tiny_folder)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"parityport: error: {tiny_folder}: does not hold the model {other} converts to (bit R17x0.5; "
        "the folder's model_type: bit): 0 tensors missing, 0 unexpected, 2 of other shapes "
        "(e.g. classifier.1.bias is [10], not [7])")


def test_planted_minus_inf_pool_padding_is_caught_at_the_stem(tiny_folder, tiny_npz):
    from transformers import AutoModelForImageClassification

    from converters import bit
    from converters.readers.detect import open_checkpoint
    from converters.families.bit import tap_modules
    from parity import bit as sides
    from parity.engine import run_parity
    from parity.inputs import standard_inputs

    model = AutoModelForImageClassification.from_pretrained(tiny_folder).eval()
    model.bit.embedder.pad = torch.nn.Identity()
    model.bit.embedder.pooler = torch.nn.MaxPool2d(3, 2, padding=1)  # pads with -inf: the classic bug
    target = sides.torch_side(model, tap_modules("transformers", (2, 1, 1, 1)), "broken", "target")
    arrays = bit.source_arrays(open_checkpoint(tiny_npz))
    report = run_parity(sides.flax_source(arrays), [(target, "float32")],
                        standard_inputs([(64, 64)], sides.MEAN, sides.STD), family="bit", variant="tiny")
    assert not report.passed and report.first_divergence == "stem"


def test_rerun_is_a_no_op_and_force_replaces(tiny_npz, tiny_folder, tmp_path, capsys):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_folder, folder)  # the module's folder stays as it was for the other tests
    weights = folder / "model.safetensors"
    before = weights.stat()
    assert main(["convert", str(tiny_npz), "--out", str(folder)]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    weights_sum = [line for line in (folder / "SHA256SUMS").read_text().splitlines() if "model.safetensors" in line]
    assert main(["convert", str(tiny_npz), "--out", str(folder), "--force"]) == 0
    assert "nothing to do" not in capsys.readouterr().err
    assert weights.stat().st_ino != before.st_ino, "--force wrote no new weights"
    assert weights_sum[0] in (folder / "SHA256SUMS").read_text()  # the same source converts to the same bytes
    assert json.loads((folder / "parity.json").read_text())["passed"] is True


def test_existing_folder_of_another_source_needs_force(tiny_folder, tmp_path, capsys):
    write_bit_npz(tmp_path / "other.npz", bit_arrays(**TINY_BIT, seed=2))
    assert main(["convert", str(tmp_path / "other.npz"), "--out", str(tiny_folder)]) == 2
    assert capsys.readouterr().err.strip() == f"parityport: error: {tiny_folder}: exists; pass --force to replace it"


def test_force_never_replaces_a_folder_parityport_did_not_write(tiny_npz, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    for force in ([], ["--force"]):
        assert main(["convert", str(tiny_npz), "--out", str(mine), "--no-parity", *force]) == 2
        assert capsys.readouterr().err.strip() == (
            f"parityport: error: {mine}: exists and is not a folder parityport wrote (no model.safetensors of its "
            "own), so it is never replaced, even with --force; choose another --out")
        assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", str(tiny_npz), "--out", str(empty), "--no-parity"]) == 0
    assert (empty / "model.safetensors").is_file()


def test_the_current_folder_is_no_output(tiny_npz, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path)):
        assert main(["convert", str(tiny_npz), "--out", out, "--no-parity", "--force"]) == 2
        assert capsys.readouterr().err.strip() == (f"parityport: error: {out}: is the current folder or contains it, "
                                                   "which cannot be replaced; give a new folder's path")


# ---------------------------------------------------------------------------
# Bad input: exit 2, one line naming the file and the problem, no output folder

def _bad(tmp_path, mutate) -> Path:
    arrays = bit_arrays(**TINY_BIT, seed=1)
    mutate(arrays)
    path = tmp_path / "bad.npz"
    write_bit_npz(path, arrays)
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.pop("resnet/block2/unit01/b/group_norm/beta"), "missing keys: resnet/block2/unit01/b/group_norm/beta"),
    (lambda a: a.__setitem__("resnet/extra/thing", np.zeros(3, np.float32)), "no rule for resnet/extra/thing"),
    (lambda a: a.__setitem__("resnet/block1/unit02/b/standardized_conv2d/kernel", np.zeros((3, 3, 32, 16), np.float32)),
     "resnet/block1/unit02/b/standardized_conv2d/kernel [3, 3, 32, 16] converts to "
     "bit.encoder.stages.0.layers.1.conv2.weight of shape [16, 32, 3, 3], expected [32, 32, 3, 3]"),
])
def test_bad_keys_and_shapes(tmp_path, capsys, mutate, message):
    src = _bad(tmp_path, mutate)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"parityport: error: {src}: {message}"
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("dtype", ["uint16", "complex64"])
def test_a_dtype_that_does_not_convert_is_named(tmp_path, capsys, dtype):
    arrays = bit_arrays(**TINY_BIT, seed=1)
    gamma = "resnet/block1/unit01/a/group_norm/gamma"
    src, out = tmp_path / "bad.npz", tmp_path / "out"
    with open(src, "wb") as f:  # write_bit_npz writes float32 only
        np.savez(f, **{k: v.astype(dtype if k == gamma else np.float32) for k, v in arrays.items()})
    assert main(["convert", str(src), "--out", str(out), "--no-parity"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"parityport: error: {src}: {gamma} (converted to bit.encoder.stages.0.layers.0.norm1.weight) "
        f"has dtype {dtype}, which does not convert "
        "(float, signed integer, uint8 or bool only)")
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_wrong_format_and_truncated_file(tmp_path, tiny_npz, capsys):
    text = tmp_path / "notes.npz"
    text.write_text("hello, not a checkpoint\n")
    assert main(["convert", str(text), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"parityport: error: {text}: not a recognised checkpoint")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(tiny_npz.read_bytes()[: tiny_npz.stat().st_size // 2])
    assert main(["convert", str(cut), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"parityport: error: {cut}: ")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()



def test_debug_adds_the_traceback_and_keeps_the_exit_codes(tmp_path, tiny_npz, capsys):
    """--debug shows where an error came from; bad input still exits 2 and a failed check 1."""
    missing = tmp_path / "missing.npz"
    assert main(["--debug", "convert", str(missing), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1] == f"parityport: error: {missing}: no such file, and not a catalog name (parityport catalog lists them)"
    assert main(["--debug", "eval", "--model", str(missing), "--data", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and err[-1].startswith("parityport eval: error: ")
    unverified = tmp_path / "unverified"
    assert main(["convert", str(tiny_npz), "--out", str(unverified), "--no-parity"]) == 0
    capsys.readouterr()
    assert main(["--debug", "verify", str(unverified)]) == 2  # no parity record: nothing to verify against
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1].startswith(f"parityport: error: {unverified}: cannot be verified: parity.json: missing")
    (unverified / "parity.json").write_text('{"passed": false, "failure": "logits"}')
    assert main(["--debug", "verify", str(unverified)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1].startswith(f"parityport: {unverified}: verification FAILED: parity.json: parity FAILED (logits)")

def test_broken_h5_with_wrong_root_width_is_named(tmp_path, capsys):
    arrays = bit_arrays(**TINY_BIT, seed=1)
    arrays["resnet/root_block/standardized_conv2d/kernel"] = np.zeros((7, 7, 3, 64), np.float32)
    write_bit_h5(tmp_path / "broken.h5", arrays)
    assert main(["convert", str(tmp_path / "broken.h5"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"parityport: error: {tmp_path / 'broken.h5'}: root kernel has 64 output channels but "
                   "block1/unit01 expects 32: inconsistent file (the published BiT-S-R50x3.h5 and "
                   "BiT-S-R101x1.h5 are broken this way; use the .npz)")


def test_output_may_not_contain_the_input(tmp_path, tiny_npz, capsys):
    import shutil

    shutil.copy(tiny_npz, tmp_path / "in.npz")
    assert main(["convert", str(tmp_path / "in.npz"), "--out", str(tmp_path), "--force"]) == 2
    assert "may not be, contain or be inside the input" in capsys.readouterr().err
    assert (tmp_path / "in.npz").exists()


def test_catalog_name_offline_says_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARITYPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PARITYPORT_BASE_URL", "http://127.0.0.1:9/")  # nothing listens there
    assert main(["convert", "BiT-M-R50x1-ILSVRC2012", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "cache" / "BiT-M-R50x1-ILSVRC2012.npz") in err and "could not be downloaded" in err


# ---------------------------------------------------------------------------
# Published sizes: R50x1 in the fast suite, the larger ones behind `slow`

@pytest.mark.parametrize("depth, width", [
    (50, 1),
    pytest.param(101, 1, marks=pytest.mark.slow),
    pytest.param(50, 3, marks=pytest.mark.slow),
])
def test_published_layouts_convert_with_no_flags(tmp_path, depth, width):
    src = tmp_path / f"BiT-M-R{depth}x{width}-ILSVRC2012.npz"
    write_bit_npz(src, bit_arrays(DEPTHS[depth], width, 1000, seed=0))
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["variant"] == f"R{depth}x{width}"
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"]["0"] == "tench, Tinca tinca" and len(config["id2label"]) == 1000
    for name, tap in logits_taps(report) + logits_taps(report, "peer"):
        assert tap["max_abs"] <= 1e-4, f"{name}: max|dlogit| {tap['max_abs']:.2e}"
