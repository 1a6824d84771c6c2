"""Small hostile files are refused quickly and cheaply: the cost of reading is bounded by what the
file legitimately holds. Each attack of `attacks_budgets.SEEDS` runs through the command in a child
process under an address-space limit, and its peak RSS and CPU time are measured."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from attacks_budgets import SEEDS
from tests.measure import run_measured
from converters.errors import InputError
from converters.readers import keras_h5
from converters.readers import torch_pickle
from converters.readers.torch_pickle import read_torch

ADDRESS_SPACE = 3 << 30   # a safety net; python with numpy and h5py maps ~1 GiB before reading anything
MAX_RSS = 512 << 20
MAX_CPU_SECONDS = 5.0
MAX_WALL_SECONDS = 60.0   # only against a hang: wall time is at the mercy of the machine's load

# name -> the stable part of the one line each is refused with
EXPECTED = {
    "pid_memo_dag": r"refusing persistent id \(\(\(\(\(.*\.\.\. \(only torch storages are allowed\)",
    "legacy_protocol_memo_dag": r"legacy torch protocol \(\(\(\(.*\.\.\. is not supported",
    "tensor_size_memo_dag": r"malformed checkpoint pickle: invalid tensor size: \(\(\(\(.*\.\.\.",
    "deflated_opcode_run": r"member 'archive/data\.pkl' declares 134217732 bytes, over the 64 times its "
                           r"\d+ compressed that a real one inflates to; refused",
    "memo_dag_of_tensors": r"more than 10000 tensors for \d+ bytes of pickle \(the memo repeats one tensor under "
                           r"many names\); refused",
    "memo_dag_of_objects": r"object structure too large or too deep at '[0-9.]+' \(over 200000 objects for "
                           r"\d+ bytes of pickle",
    "byteorder_bzip2": r"member 'archive/byteorder' uses compression method 12 \(torch\.save stores",
    "byteorder_lzma": r"member 'archive/byteorder' uses compression method 14 \(torch\.save stores",
    "byteorder_deflate": r"member 'archive/byteorder' inflates past its declared 6 bytes",
    "h5_vlen_names_one_heap_object": r"the weights group: attribute 'layer_names' holds 3500 variable-length "
                                     r"strings \(Keras writes fixed-length names",
    "h5_chunks_inflating_past_their_shape": r"dataset '/d/kernel:0': the chunk at \[0\] stores \d+ bytes for a "
                                            r"chunk of 2688; refused",
    "h5_bit_kernel_inflating_past_its_shape": r"dataset '/[^']+kernel:0': the chunk at \[0, 0, 0, 0\] inflates "
                                              r"past its \d+ bytes",
}

def run_cli(*argv: str) -> tuple[int, list[str], int, float]:
    """(exit code, stderr lines, peak RSS in bytes, CPU seconds) of `parityport argv` in a child."""
    return run_measured(list(argv), ADDRESS_SPACE, MAX_WALL_SECONDS)


@pytest.mark.parametrize("name", list(SEEDS))
def test_attack_is_refused_quickly_and_cheaply(tmp_path: Path, name: str) -> None:
    src = SEEDS[name](tmp_path)
    assert src.stat().st_size < 16 << 20  # the largest, a small BiT .h5, is ~8 MB; the rest under 1.3 MB
    before = sorted(tmp_path.iterdir())
    dest = tmp_path / "out"
    code, err, rss, cpu = run_cli("convert", str(src), "--out", str(dest))
    assert code == 2, err
    # one error line, last; a file refused only once its tensors are read is first announced
    errors = [line for line in err if line.startswith("parityport: error: ")]
    assert errors == err[-1:] and err[-1].startswith(f"parityport: error: {src}: "), err
    assert len(err) == 1 or name.startswith("h5_bit_"), err
    assert re.search(EXPECTED[name], err[-1]), err[-1]
    assert sorted(tmp_path.iterdir()) == before and not dest.exists()
    assert rss < MAX_RSS, f"{name}: peak RSS {rss >> 20} MiB"
    assert cpu < MAX_CPU_SECONDS, f"{name}: {cpu:.1f} s of CPU"


def test_every_seed_has_an_expected_message() -> None:
    assert EXPECTED.keys() == SEEDS.keys()


# ---------------------------------------------------------------- real files stay inside the budgets


def test_the_largest_data2vec_layout_passes_with_a_third_of_each_budget(tmp_path: Path, monkeypatch) -> None:
    """data2vec 2.0 huge, pretrained (model, `_ema` teacher, decoder) plus an Adam state for every
    weight, the most tensors any family's file holds: the budgets grow with the pickle's size, which
    is the same with one-element tensors as with the real ones, so with the floors off and every
    budget cut to a third the file still reads."""
    from types import SimpleNamespace

    import torch

    from checkpoints import synthetic_data2vec as d2v

    monkeypatch.setattr(d2v, "_materialise", lambda shapes, seed: {name: torch.zeros(1) for name, _ in shapes})
    huge = SimpleNamespace(dim=1280, mlp_hidden=5120, image=224, patch=14, in_chans=3, prenet_depth=0, depth=32,
                           layer_norm_first=False, num_classes=1000, heads=16)
    sd = d2v.d2v2_state_dict(huge, seed=0, finetuned=False)
    path = d2v.write_d2v2_fairseq(tmp_path / "huge.pt", sd, d2v.d2v2_cfg(huge, finetuned=False))
    container = torch.load(path, weights_only=False)
    weights = [t for t in sd.values() if isinstance(t, torch.Tensor)]
    container["last_optimizer_state"]["state"] = {i: {"step": torch.zeros(()), "exp_avg": torch.zeros(1),
                                                      "exp_avg_sq": torch.zeros(1)} for i in range(len(weights))}
    torch.save(container, path)
    for name, value in {"NODE_FLOOR": 0, "TENSOR_FLOOR": 0, "OPCODE_FLOOR": 0, "NODES_PER_PICKLE_BYTE": 1 / 3,
                        "PICKLE_BYTES_PER_TENSOR": 3 * torch_pickle.PICKLE_BYTES_PER_TENSOR,
                        "OPCODES_PER_FILE_BYTE": torch_pickle.OPCODES_PER_FILE_BYTE / 3}.items():
        monkeypatch.setattr(torch_pickle, name, value)
    checkpoint = read_torch(path)
    assert len(checkpoint.tensors) > 5 * 32 * 12  # per block weight: model, teacher and three of Adam


def test_the_budgets_refuse_at_their_limits(tmp_path: Path, monkeypatch) -> None:
    """Each budget, made small, refuses an ordinary file by name (so none is dead code)."""
    import torch

    path = tmp_path / "w.pt"
    torch.save({"model": {f"w{i}": torch.zeros(2) for i in range(50)}}, path)
    read_torch(path)
    monkeypatch.setattr(torch_pickle, "TENSOR_FLOOR", 10)
    monkeypatch.setattr(torch_pickle, "PICKLE_BYTES_PER_TENSOR", 10**6)
    with pytest.raises(InputError, match=r"more than 10 tensors for \d+ bytes of pickle"):
        read_torch(path)
    monkeypatch.setattr(torch_pickle, "OPCODE_FLOOR", 100)
    monkeypatch.setattr(torch_pickle, "OPCODES_PER_FILE_BYTE", 0)
    with pytest.raises(InputError, match="malformed checkpoint pickle: more than 100 opcodes, over the budget"):
        read_torch(path)


def test_a_rezipped_checkpoint_with_a_deflated_pickle_still_reads(tmp_path: Path) -> None:
    import torch

    torch.save({"model": {f"blocks.{i}.w": torch.arange(4.0) + i for i in range(20)}}, tmp_path / "w.pt")
    with zipfile.ZipFile(tmp_path / "w.pt") as source, zipfile.ZipFile(tmp_path / "z.pt", "w") as target:
        for info in source.infolist():
            deflate = info.filename.endswith(("data.pkl", "byteorder"))
            target.writestr(info.filename, source.read(info), zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    assert zipfile.ZipFile(tmp_path / "z.pt").getinfo("w/data.pkl").compress_type == zipfile.ZIP_DEFLATED
    np.testing.assert_array_equal(read_torch(tmp_path / "z.pt").tensors["model.blocks.3.w"].load(),
                                  np.arange(4.0, dtype=np.float32) + 3)


def test_quoting_a_value_from_the_file_walks_only_what_it_shows() -> None:
    dag: object = "a"
    for _ in range(200):  # 2**200 leaves
        dag = (dag, dag)
    shown = torch_pickle._shown(dag)
    assert shown == "(" * 80 + "..."
    assert torch_pickle._shown(10**5000) == "<int of 16610 bits>"
    assert torch_pickle._shown({"k": [1, 2.5, None, b"x" * 10**6]}).startswith("{'k': [1, 2.5, None, b'xxx")
    assert torch_pickle._shown(("storage", 1)) == "('storage', 1)"


@pytest.mark.parametrize("options", [dict(compression="gzip"), dict(compression="gzip", shuffle=True),
                                     dict(compression="gzip", shuffle=True, fletcher32=True),
                                     dict(fletcher32=True), dict(compression="lzf")])
def test_filtered_h5_datasets_decode_as_libhdf5_decodes_them(tmp_path: Path, options: dict) -> None:
    """Chunks decoded here (deflate, shuffle, fletcher32, edge chunks, unwritten chunks) equal h5py's."""
    rng = np.random.default_rng(0)
    for dtype, shape, chunks in [("<f4", (37, 19), (8, 5)), (">f2", (1001,), (100,)), ("u1", (7,), (3,))]:
        value = (rng.standard_normal(shape) * 10).astype(dtype)
        with h5py.File(tmp_path / "f.h5", "w") as h5:
            h5.attrs["layer_names"] = np.array([b"d"])
            group = h5.create_group("d")
            group.attrs["weight_names"] = np.array([b"k:0"])
            dataset = group.create_dataset("k:0", shape=shape, dtype=dtype, chunks=chunks, fillvalue=7, **options)
            dataset[: shape[0] - chunks[0]] = value[: shape[0] - chunks[0]]  # the last chunk row never written
            expected = dataset[()]
        got = keras_h5.read_keras_h5(tmp_path / "f.h5").tensors["d/k"].load()
        np.testing.assert_array_equal(got, expected.astype(expected.dtype.newbyteorder("<")))


def test_a_corrupt_fletcher32_chunk_is_refused(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        h5.attrs["layer_names"] = np.array([b"d"])
        group = h5.create_group("d")
        group.attrs["weight_names"] = np.array([b"k:0"])
        dataset = group.create_dataset("k:0", data=np.arange(64, dtype="<f4"), chunks=(64,), fletcher32=True)
        mask, raw = dataset.id.read_direct_chunk((0,))
        dataset.id.write_direct_chunk((0,), raw[:8] + bytes([raw[8] ^ 1]) + raw[9:], mask)
    with pytest.raises(InputError, match=r"dataset '/d/k:0': the chunk at \[0\]: bad fletcher32 checksum"):
        keras_h5.read_keras_h5(tmp_path / "f.h5").tensors["d/k"].load()


def test_h5_filters_may_not_repeat(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        h5.attrs["layer_names"] = np.array([b"d"])
        group = h5.create_group("d")
        group.attrs["weight_names"] = np.array([b"k:0"])
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_chunk((64,))
        plist.set_deflate(1)
        plist.set_deflate(9)
        space = h5py.h5s.create_simple((64,))
        h5py.h5d.create(group.id, b"k:0", h5py.h5t.IEEE_F32LE, space, dcpl=plist)
    with pytest.raises(InputError, match=r"dataset '/d/k:0' applies HDF5 filter 1 twice; refused"):
        keras_h5.read_keras_h5(tmp_path / "f.h5")


def test_a_long_key_repeated_at_every_level_is_refused_before_its_paths_grow(tmp_path: Path) -> None:
    """One 1 MiB key, memoized, names 200 nested dicts: the dotted paths would reach 200 MiB each."""
    key = pickle.dumps("k" * (1 << 20), 2)[2:-1]  # BINUNICODE, BINPUT 0
    pickled = b"\x80\x02}" + key + b"0" + b"}h\x00" * 199 + b"K\x01" + b"s" * 199 + b"."
    path = tmp_path / "k.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
    with pytest.raises(InputError, match=r"a dotted path of 1048576 characters \(over 4096\): 'kkk"):
        read_torch(path)
