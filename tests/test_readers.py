"""Readers on well-formed files: exact values, original names and order, lazy loading."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from converters.errors import InputError
from converters.readers.detect import open_checkpoint
from converters.readers.keras_h5 import read_keras_h5
from converters.readers.npz import read_npz
from converters.readers.torch_pickle import read_torch

RNG = np.random.default_rng(0)


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == np.ascontiguousarray(b).tobytes()


def write_keras_h5(path: Path, layers: list[tuple[str, list[tuple[str, np.ndarray]]]],
                   full_model: bool = False) -> None:
    """Keras 2 `save_weights` layout (or `model_weights` of a full-model save)."""
    with h5py.File(path, "w") as h5:
        root = h5.create_group("model_weights") if full_model else h5
        if full_model:
            h5.attrs["model_config"] = b'{"class_name": "Functional"}'
        root.attrs["layer_names"] = np.array([n.encode() for n, _ in layers])
        root.attrs["backend"] = b"tensorflow"
        root.attrs["keras_version"] = b"2.4.0"
        for name, weights in layers:
            group = root.create_group(name)
            group.attrs["weight_names"] = np.asarray([w.encode() for w, _ in weights])
            for weight, array in weights:
                group.create_dataset(weight, data=array)


def torch_values(obj, name: str):
    """Follow a dotted path whose keys may themselves contain dots (state_dict keys)."""
    while not isinstance(obj, torch.Tensor):
        keys = range(len(obj)) if isinstance(obj, (list, tuple)) else obj.keys()
        key = max((k for k in keys if name == str(k) or name.startswith(f"{k}.")),
                  key=lambda k: len(str(k)))
        obj, name = obj[key], name[len(str(key)) + 1:]
    return obj


def torch_paths(obj, prefix: str = "") -> set[str]:
    """The dotted path of every tensor in a saved object (dict keys, list and tuple positions)."""
    if isinstance(obj, torch.Tensor):
        return {prefix}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return set()
    return set().union(*(torch_paths(value, f"{prefix}.{key}" if prefix else str(key)) for key, value in items))


def assert_torch_equal(checkpoint, original) -> None:
    """Every tensor saved is read (none dropped, none added), each with the saved values."""
    assert set(checkpoint.tensors) == torch_paths(original)
    for name, lazy in checkpoint.tensors.items():
        ref = torch_values(original, name).detach()
        expected = ref.float().numpy() if ref.dtype == torch.bfloat16 else ref.numpy()
        _same(lazy.load(), expected)


# ---------------------------------------------------------------- npz


def test_npz_round_trip_dtypes_and_fortran(tmp_path: Path) -> None:
    arrays = {
        "resnet/root_block/standardized_conv2d/kernel": RNG.standard_normal((7, 7, 3, 8)).astype(np.float32),
        "resnet/head/conv2d/bias": RNG.standard_normal(10).astype(np.float16),
        "fortran": np.asfortranarray(RNG.standard_normal((3, 5))),
        "ints": np.arange(12, dtype=np.int64).reshape(3, 4),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "big_endian": np.arange(5, dtype=">f4"),
    }
    np.savez(tmp_path / "w.npz", **arrays)
    checkpoint = read_npz(tmp_path / "w.npz")
    assert checkpoint.format == "npz" and list(checkpoint.tensors) == list(arrays)
    assert checkpoint.meta["compressed_members"] == []
    for name, array in arrays.items():
        loaded = checkpoint.tensors[name].load()
        assert loaded.flags.c_contiguous
        np.testing.assert_array_equal(loaded, array)
        assert loaded.dtype == array.dtype.newbyteorder("<")


def test_npz_compressed_is_flagged_and_exact(tmp_path: Path) -> None:
    arrays = {"a": RNG.standard_normal((4, 4)).astype(np.float32), "b": np.arange(3)}
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    checkpoint = read_npz(tmp_path / "c.npz")
    assert sorted(checkpoint.meta["compressed_members"]) == ["a", "b"]
    for name, array in arrays.items():
        _same(checkpoint.tensors[name].load(), array)


def test_npz_is_lazy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.savez(tmp_path / "w.npz", a=np.ones(3, np.float32))
    import converters.readers.npz as npz

    calls = []
    real = npz._load
    monkeypatch.setattr(npz, "_load", lambda *a: calls.append(a) or real(*a))
    checkpoint = read_npz(tmp_path / "w.npz")
    assert calls == [] and checkpoint.tensors["a"].shape == (3,)
    _same(checkpoint.tensors["a"].load(), np.ones(3, np.float32))
    assert len(calls) == 1


# ---------------------------------------------------------------- keras h5


def _keras_layers():
    stem = RNG.standard_normal((7, 7, 3, 4)).astype(np.float32)
    proj = RNG.standard_normal((1, 1, 4, 8)).astype(np.float32)
    return [
        ("resnet", [("resnet/root_block/standardized_conv2d/kernel:0", stem),
                    ("resnet/block1/unit01/a/group_norm/gamma:0", np.ones(4, np.float32)),
                    ("resnet/block1/unit01/a/proj/standardized_conv2d/kernel:0", proj)]),
        ("flatten", []),
        ("head", [("head/dense/kernel:0", RNG.standard_normal((8, 10)).astype(np.float32)),
                  ("head/dense/bias:0", np.zeros(10, np.float32))]),
    ]


@pytest.mark.parametrize("full_model", [False, True])
def test_keras_h5_in_stored_order(tmp_path: Path, full_model: bool) -> None:
    layers = _keras_layers()
    write_keras_h5(tmp_path / "w.h5", layers, full_model)
    checkpoint = read_keras_h5(tmp_path / "w.h5")
    assert checkpoint.format == "keras-h5"
    expected = [f"{layer}/{w[:-2]}" for layer, ws in layers for w, _ in ws]
    assert list(checkpoint.tensors) == expected
    assert checkpoint.meta["order"] == [(layer, [w[:-2] for w, _ in ws]) for layer, ws in layers]
    assert checkpoint.meta["keras_version"] == "2.4.0"
    arrays = [a for _, ws in layers for _, a in ws]
    for lazy, array in zip(checkpoint.tensors.values(), arrays):
        _same(lazy.load(), array)


def test_keras_h5_missing_weight_names_and_dataset(tmp_path: Path) -> None:
    write_keras_h5(tmp_path / "w.h5", _keras_layers())
    with h5py.File(tmp_path / "w.h5", "a") as h5:
        del h5["head"].attrs["weight_names"]
    with pytest.raises(InputError, match="layer 'head' has no 'weight_names'"):
        read_keras_h5(tmp_path / "w.h5")
    write_keras_h5(tmp_path / "v.h5", _keras_layers())
    with h5py.File(tmp_path / "v.h5", "a") as h5:
        del h5["head/head/dense/bias:0"]
    with pytest.raises(InputError, match="missing '/head/head/dense/bias:0'"):
        read_keras_h5(tmp_path / "v.h5")


def test_keras_h5_in_file_soft_link_is_followed(tmp_path: Path) -> None:
    write_keras_h5(tmp_path / "w.h5", [("d", [("kernel:0", np.arange(4, dtype=np.float32))])])
    with h5py.File(tmp_path / "w.h5", "a") as h5:
        h5["store/k"] = h5["d/kernel:0"][()]
        del h5["d/kernel:0"]
        h5["d"]["kernel:0"] = h5py.SoftLink("/store/k")
    _same(read_keras_h5(tmp_path / "w.h5").tensors["d/kernel"].load(), np.arange(4, dtype=np.float32))


# ---------------------------------------------------------------- torch


def _vit_state(dtype=torch.float32) -> dict:
    torch.manual_seed(0)
    return {
        "cls_token": torch.randn(1, 1, 8, dtype=dtype),
        "blocks.0.norm1.weight": torch.randn(8, dtype=dtype),
        "blocks.0.attn.qkv.weight": torch.randn(24, 8, dtype=dtype),
        "blocks.0.attn.q_bias": torch.randn(8, dtype=dtype),
        "blocks.0.attn.relative_position_index": torch.arange(25).reshape(5, 5),
        "head.weight": torch.randn(10, 8, dtype=dtype),
    }


def test_torch_data2vec_v1_container(tmp_path: Path) -> None:
    model = _vit_state()
    saved = {
        "model": model,
        "model_ema": {k: v.clone() for k, v in model.items()},
        "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(8)}},
                      "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "epoch": 799,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "args": argparse.Namespace(model="beit_base_patch16_224", layer_scale_init_value=0.1,
                                   input_size=224, rel_pos_bias=True, drop=None, tags=["a", "b"]),
    }
    torch.save(saved, tmp_path / "checkpoint-799.pth")
    checkpoint = read_torch(tmp_path / "checkpoint-799.pth")
    assert checkpoint.format == "torch-zip"
    assert "model.blocks.0.attn.qkv.weight" in checkpoint.tensors
    assert "model_ema.head.weight" in checkpoint.tensors
    assert "optimizer.state.0.exp_avg" in checkpoint.tensors
    assert checkpoint.tensors["model.blocks.0.attn.relative_position_index"].dtype == np.int64
    assert_torch_equal(checkpoint, saved)
    assert checkpoint.meta["args"] == {"model": "beit_base_patch16_224", "layer_scale_init_value": 0.1,
                                       "input_size": 224, "rel_pos_bias": True, "drop": None,
                                       "tags": ["a", "b"]}
    assert checkpoint.meta["epoch"] == 799
    assert checkpoint.meta["model"]["head.weight"] == "<tensor model.head.weight>"
    assert checkpoint.meta["optimizer"]["param_groups"] == [{"lr": 1e-3, "params": [0]}]


def test_torch_deepspeed_fp16_module(tmp_path: Path) -> None:
    saved = {"module": _vit_state(torch.float16), "global_steps": 1000, "dp_world_size": 8}
    torch.save(saved, tmp_path / "mp_rank_00_model_states.pt")
    checkpoint = open_checkpoint(tmp_path / "mp_rank_00_model_states.pt")
    assert checkpoint.tensors["module.head.weight"].dtype == np.float16
    assert_torch_equal(checkpoint, saved)
    assert checkpoint.meta["global_steps"] == 1000


def test_torch_bf16_widened_exactly(tmp_path: Path) -> None:
    values = torch.tensor([1.0, -2.5, 3.140625, 1e-30, float("inf")], dtype=torch.bfloat16)
    torch.save({"model": {"w": values, "m": values.reshape(1, 5).expand(3, 5)}}, tmp_path / "b.pt")
    checkpoint = read_torch(tmp_path / "b.pt")
    assert checkpoint.meta["source_dtypes"] == {"model.w": "bfloat16", "model.m": "bfloat16"}
    _same(checkpoint.tensors["model.w"].load(), values.float().numpy())
    _same(checkpoint.tensors["model.m"].load(), values.float().numpy()[None].repeat(3, 0))


def test_torch_views_and_shared_storage(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    saved = {
        "t": base.t(), "slice": base[2:5, 3:9:2], "row": base[4], "same": base,
        "tied": base, "scalar": base[1, 1], "empty": base[:0], "expanded": base[0].expand(4, 10),
        "param": torch.nn.Parameter(torch.ones(3)),
        "list": [base[0, :3], (base[1, :2],)],
    }
    torch.save(saved, tmp_path / "v.pt")
    checkpoint = read_torch(tmp_path / "v.pt")
    assert "list.0" in checkpoint.tensors and "list.1.0" in checkpoint.tensors
    assert_torch_equal(checkpoint, saved)
    assert checkpoint.tensors["scalar"].shape == ()


def test_torch_fairseq_plain_cfg(tmp_path: Path) -> None:
    cfg = {"model": {"_name": "data2vec_multi", "depth": 10, "layer_norm_first": False,
                     "modalities": {"image": {"prenet_depth": 2, "patch_size": 16}},
                     "norm_eps": 1e-6, "supported_modality": "IMAGE"},
           "task": {"_name": "mae_image_pretraining"}, "common": {"fp16": True}}
    saved = {"args": None, "cfg": cfg,
             "model": {"model.blocks.0.attn.qkv.bias": torch.randn(24), "_ema": {"x": torch.ones(2)}},
             "optimizer_history": [{"criterion_name": "ModelCriterion", "num_updates": 5}],
             "extra_state": {"metrics": {}, "previous_training_time": 12.5}}
    torch.save(saved, tmp_path / "base_imagenet.pt")
    checkpoint = read_torch(tmp_path / "base_imagenet.pt")
    assert checkpoint.meta["cfg"] == cfg
    assert checkpoint.meta["args"] is None
    assert set(checkpoint.tensors) == {"model.model.blocks.0.attn.qkv.bias", "model._ema.x"}
    assert_torch_equal(checkpoint, saved)


def test_torch_fairseq_omegaconf_cfg(tmp_path: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    plain = {"model": {"_name": "data2vec_multi", "depth": 24, "layer_norm_first": False,
                       "norm_eps": 1e-6, "missing": None, "layers": [1, "x", {"y": 2.5}]},
             "task": {"data": "/datasets/imagenet"}}
    cfg = omegaconf.OmegaConf.create(plain)
    torch.save({"cfg": cfg, "model": {"w": torch.ones(2)}}, tmp_path / "ft.pt")
    checkpoint = read_torch(tmp_path / "ft.pt")
    assert checkpoint.meta["cfg"] == plain
    _same(checkpoint.tensors["model.w"].load(), np.ones(2, np.float32))


def test_torch_legacy_format(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    saved = {"state_dict": {"a": base, "b": base.t()[1:], "h": base.half(), "bf": base.bfloat16()},
             "args": argparse.Namespace(lr=0.5)}
    torch.save(saved, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    checkpoint = open_checkpoint(tmp_path / "old.pth")
    assert checkpoint.format == "torch-legacy"
    assert checkpoint.meta["args"] == {"lr": 0.5}
    assert_torch_equal(checkpoint, saved)


def test_torch_is_lazy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import converters.readers.torch_pickle as tp

    torch.save({"w": torch.ones(4)}, tmp_path / "w.pt")
    reads = []
    real = tp.zipcheck.map_member
    monkeypatch.setattr(tp.zipcheck, "map_member", lambda *a: reads.append(a) or real(*a))
    checkpoint = read_torch(tmp_path / "w.pt")
    assert reads == []
    checkpoint.tensors["w"].load()
    assert len(reads) == 1 and reads[0][2] == 16  # exactly the tensor's bytes


def test_torch_zip_prefix_from_file_name(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "my_checkpoint.pth")
    with zipfile.ZipFile(tmp_path / "my_checkpoint.pth") as archive:
        assert "my_checkpoint/data.pkl" in archive.namelist()
    assert list(read_torch(tmp_path / "my_checkpoint.pth").tensors) == ["w"]


# ---------------------------------------------------------------- detection


def test_detect_by_content_not_extension(tmp_path: Path) -> None:
    with open(tmp_path / "weights.pt", "wb") as file:
        np.savez(file, a=np.ones(2, np.float32))
    torch.save({"w": torch.ones(2)}, tmp_path / "model.npz")
    write_keras_h5(tmp_path / "k.bin", [("d", [("kernel:0", np.ones(2, np.float32))])])
    assert open_checkpoint(tmp_path / "weights.pt").format == "npz"
    assert open_checkpoint(tmp_path / "model.npz").format == "torch-zip"
    assert open_checkpoint(tmp_path / "k.bin").format == "keras-h5"


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "empty file"),
    (b"hello world, not a checkpoint", "not a recognised checkpoint .*first bytes: b'hello world"),
    (b"\x93NUMPY\x01\x00", "single .npy array"),
    (b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.", "plain pickle"),
])
def test_detect_refuses_with_one_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "x.bin"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as error:
        open_checkpoint(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_detect_directory_and_safetensors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        open_checkpoint(tmp_path)
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    (tmp_path / "m.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(InputError, match="already safetensors"):
        open_checkpoint(tmp_path / "m.safetensors")


def test_detect_zip_of_other_files(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as archive:
        archive.writestr("readme.txt", "hi")
    with pytest.raises(InputError, match="neither an .npz nor a PyTorch checkpoint"):
        open_checkpoint(tmp_path / "x.zip")
