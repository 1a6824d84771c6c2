"""Hostile files aimed at the zip readers and at the shape and config checks behind them.

`SEEDS` maps an attack's name to a function that writes the attack file into a folder and
returns its path. Every file is small (under 1 MB), built from the tiny synthetic models in the
exact original layouts, with one thing made wrong:

- corrupt data: a storage's bytes that disagree with their CRC-32 (one converted, one only
  dropped by rule), a central-directory entry pointed at another member's local header, and one
  pointed at a forged local header inside another member's data (CRC-32s made consistent);
- a zero-size dimension: a head of shape (10**12, 0) in each reader's format;
- numbers that break arithmetic or formatting: dimensions of thousands of digits, a BiT width
  too large for a float, a data2vec 2.0 cfg with a 5,000-digit `num_heads` or `norm_eps` 10**400.
"""

from __future__ import annotations

import collections
import io
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from checkpoints.synthetic import TINY_BIT, bit_arrays, write_bit_h5

HEAD_BIAS = "resnet/head/conv2d/bias"
ZERO_DIM_CLASSES = (10**12, 0)
# Within what each reader lets a zero-size tensor declare: only the family's class bound refuses it.
ZERO_DIM_10M_CLASSES = (10**7, 0)
_CENTRAL = b"PK\x01\x02"
_LOCAL = struct.Struct("<4s2B4HL2L2H")


# ---------------------------------------------------------------- zip surgery


def _central_entries(raw: bytes) -> dict[str, int]:
    """Member name -> offset of its central-directory record."""
    entries, at = {}, raw.find(_CENTRAL)
    while at >= 0:
        name_len, extra_len, comment_len = struct.unpack_from("<3H", raw, at + 28)
        entries[raw[at + 46: at + 46 + name_len].decode()] = at
        at = raw.find(_CENTRAL, at + 46 + name_len + extra_len + comment_len)
    return entries


def _data_start(raw: bytes, info: zipfile.ZipInfo) -> int:
    name_len, extra_len = struct.unpack_from("<2H", raw, info.header_offset + 26)
    return info.header_offset + 30 + name_len + extra_len


def _members(raw: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        return [(info, archive.read(info)) for info in archive.infolist()]


def _member_holding(raw: bytes, data: bytes) -> zipfile.ZipInfo:
    return next(info for info, held in _members(raw) if held == data)


def _flip_byte(path: Path, data: bytes) -> Path:
    """Flip one byte inside the member whose bytes are `data`; its recorded CRC-32 stays."""
    raw = bytearray(path.read_bytes())
    info = _member_holding(bytes(raw), data)
    raw[_data_start(bytes(raw), info) + len(data) // 2] ^= 0x55
    path.write_bytes(bytes(raw))
    return path


def _forge_inside(path: Path, host: bytes, victim: bytes, forged_data: bytes) -> Path:
    """Point the victim member's directory entry at a local header forged near the end of the host
    member's data, holding `forged_data`; both CRC-32s in the directory are made to agree."""
    raw = bytearray(path.read_bytes())
    host_info, victim_info = _member_holding(bytes(raw), host), _member_holding(bytes(raw), victim)
    name = victim_info.filename.encode()
    assert len(forged_data) == len(victim)
    flags, crc, size = victim_info.flag_bits, zlib.crc32(forged_data), len(victim)
    descriptor = struct.pack("<4s3L", b"PK\x07\x08", crc, size, size) if flags & 0x8 else b""
    known = (0, 0, 0) if descriptor else (crc, size, size)  # with a descriptor, the header leaves them 0
    forged = _LOCAL.pack(b"PK\x03\x04", 20, 0, flags, 0, 0, 0, *known, len(name), 0) + name + forged_data + descriptor
    start = _data_start(bytes(raw), host_info)
    at = start + len(host) - len(forged) - 16
    assert at > start + 256
    raw[at: at + len(forged)] = forged
    entries = _central_entries(bytes(raw))
    host_crc = zlib.crc32(raw[start: start + len(host)])
    struct.pack_into("<L", raw, entries[host_info.filename] + 16, host_crc)
    if host_info.flag_bits & 0x8:  # the host's own data descriptor repeats its CRC-32
        after = start + len(host)
        struct.pack_into("<L", raw, after + (4 if raw[after: after + 4] == b"PK\x07\x08" else 0), host_crc)
    else:  # or its local header does
        struct.pack_into("<L", raw, host_info.header_offset + 14, host_crc)
    struct.pack_into("<L", raw, entries[victim_info.filename] + 16, zlib.crc32(forged_data))
    struct.pack_into("<L", raw, entries[victim_info.filename] + 42, at)
    path.write_bytes(bytes(raw))
    return path


def _entry_at_other_member(path: Path, victim: bytes, other: bytes) -> Path:
    """Point the victim member's directory entry at another member of the same size."""
    raw = bytearray(path.read_bytes())
    victim_info, other_info = _member_holding(bytes(raw), victim), _member_holding(bytes(raw), other)
    assert victim_info.file_size == other_info.file_size
    entry = _central_entries(bytes(raw))[victim_info.filename]
    struct.pack_into("<L", raw, entry + 16, other_info.CRC)
    struct.pack_into("<L", raw, entry + 42, other_info.header_offset)
    path.write_bytes(bytes(raw))
    return path


# ---------------------------------------------------------------- tiny models


def _tiny_d2v1(finetuned: bool = True):
    from checkpoints import synthetic_data2vec as synth
    from reference import data2vec1_torch as d2v1

    config = d2v1.Data2Vec1Config(dim=64, depth=2, heads=4, mlp_hidden=256, patch=16, image=64,
                                  num_classes=10 if finetuned else 0)
    return synth.d2v1_state_dict(config, seed=1, shared_rel_pos=False, finetuned=finetuned)


def _d2v1_deepspeed(folder: Path, name: str, mutate=lambda sd: None) -> tuple[Path, dict]:
    from checkpoints import synthetic_data2vec as synth

    sd = _tiny_d2v1()
    mutate(sd)
    path = synth.write_d2v1_deepspeed(folder / name, sd)
    return path, {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}


def _d2v2_fairseq(folder: Path, name: str, cfg_mutate) -> Path:
    from checkpoints import synthetic_data2vec as synth
    from reference import data2vec2_torch as d2v2

    config = d2v2.Data2Vec2Config(dim=64, depth=2, prenet_depth=1, heads=4, mlp_hidden=256, patch=16,
                                  image=64, num_classes=10)
    cfg = synth.d2v2_cfg(config)
    cfg_mutate(cfg["model"]["pretrained_model_args"]["model"], cfg["model"])
    return synth.write_d2v2_fairseq(folder / name, synth.d2v2_state_dict(config, seed=3), cfg)


def _bit_arrays() -> dict[str, np.ndarray]:
    """The tiny BiT's arrays, quantised to four values so that a deflated file stays small."""
    arrays = bit_arrays(**TINY_BIT, seed=1)
    return {k: (np.round(v * 2) / 4).clip(-0.5, 0.5).astype(np.float32) for k, v in arrays.items()}


def _npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array(stream, np.asarray(array, np.float32))
    return stream.getvalue()


def _npy_header(shape: str) -> bytes:
    """A bare .npy (version 1.0) header for float32 of `shape` (written out, any integers)."""
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % shape
    text += " " * (-(len(text) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def _write_npz(path: Path, arrays: dict[str, np.ndarray], headers: dict[str, bytes] | None = None,
               stored: tuple[str, ...] = ()) -> Path:
    """`arrays` as np.savez members, deflated except `stored`; `headers` replace whole members."""
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            method = zipfile.ZIP_STORED if key in stored else zipfile.ZIP_DEFLATED
            archive.writestr(key + ".npy", (headers or {}).get(key) or _npy(value), method)
    return path


def _write_h5(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """`write_bit_h5`'s layout, copied with every dataset deflated (a small file)."""
    import h5py

    plain = path.with_name(path.name + ".plain")
    write_bit_h5(plain, arrays)
    with h5py.File(plain, "r") as source, h5py.File(path, "w") as target:
        def copy(name: str, obj) -> None:
            if isinstance(obj, h5py.Group):
                target.require_group(name).attrs.update(obj.attrs)
            elif obj.size:
                target.create_dataset(name, data=obj[()], compression="gzip", chunks=True)
            else:
                target.create_dataset(name, shape=obj.shape, dtype=obj.dtype)
        target.attrs.update(source.attrs)
        source.visititems(copy)
    plain.unlink()
    return path


def _bytes(tensor) -> bytes:
    return tensor.contiguous().numpy().tobytes()


class _Declared:
    """Pickles as a tensor of any declared size and stride over a real (empty) storage."""

    def __init__(self, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.size, self.stride = size, stride

    def is_floating_point(self) -> bool:  # the synthetic writers keep it as it is
        return False

    def __reduce__(self):
        import torch

        with warnings.catch_warnings():  # a typed storage is what torch.save writes for a half tensor
            warnings.simplefilter("ignore", UserWarning)
            storage = torch.empty(0, dtype=torch.float16).storage()
        return torch._utils._rebuild_tensor_v2, (storage, 0, self.size, self.stride, False,
                                                 collections.OrderedDict())


# ---------------------------------------------------------------- item 1: corrupt data


def pt_storage_bad_crc(folder: Path) -> Path:
    """A DeepSpeed file whose classifier weight's storage no longer matches its CRC-32."""
    path, sd = _d2v1_deepspeed(folder, "mp_rank_00_model_states.pt")
    return _flip_byte(path, _bytes(sd["head.weight"]))


def pt_dropped_storage_bad_crc(folder: Path) -> Path:
    """A pretrained file whose EMA teacher (dropped by rule, never loaded) has a corrupt storage."""
    from checkpoints import synthetic_data2vec as synth

    path = synth.write_d2v1_pretrained(folder / "checkpoint-799.pth", _tiny_d2v1(finetuned=False))
    import torch

    teacher = torch.load(path, weights_only=False)["model_ema"]
    return _flip_byte(path, _bytes(teacher["blocks.0.mlp.fc1.weight"]))


def pt_entry_at_other_member(folder: Path) -> Path:
    """The q_bias storage's directory entry points at the v_bias member (same size)."""
    path, sd = _d2v1_deepspeed(folder, "mp_rank_00_model_states.pt")
    return _entry_at_other_member(path, _bytes(sd["blocks.0.attn.q_bias"]), _bytes(sd["blocks.0.attn.v_bias"]))


def pt_entry_inside_member(folder: Path) -> Path:
    """The q_bias storage's entry points at a forged local header inside the fc1 weight's storage."""
    path, sd = _d2v1_deepspeed(folder, "mp_rank_00_model_states.pt")
    q_bias = sd["blocks.0.attn.q_bias"]
    return _forge_inside(path, _bytes(sd["blocks.0.mlp.fc1.weight"]), _bytes(q_bias), _bytes(q_bias * 2))


def npz_entry_inside_member(folder: Path) -> Path:
    """A BiT npz whose head bias entry points at a forged .npy member inside a kernel's data."""
    arrays = _bit_arrays()
    host, victim = "resnet/block1/unit01/b/standardized_conv2d/kernel", HEAD_BIAS
    path = _write_npz(folder / "BiT-forged.npz", arrays, stored=(host, victim))
    return _forge_inside(path, _npy(arrays[host]), _npy(arrays[victim]), _npy(arrays[victim] * 2))


# ---------------------------------------------------------------- item 2: a zero-size dimension


def _npz_head(folder: Path, shape: tuple[int, ...]) -> Path:
    arrays = _bit_arrays()
    arrays[HEAD_BIAS] = np.zeros(shape, np.float32)
    return _write_npz(folder / "BiT-zero.npz", arrays)


def _h5_head(folder: Path, shape: tuple[int, ...]) -> Path:
    arrays = _bit_arrays()
    arrays[HEAD_BIAS] = np.zeros(shape, np.float32)
    return _write_h5(folder / "BiT-zero.h5", arrays)


def npz_zero_dim_classes(folder: Path) -> Path:
    """A BiT npz whose head bias is (10**12, 0): no bytes, a trillion classes."""
    return _npz_head(folder, ZERO_DIM_CLASSES)


def npz_zero_dim_10m_classes(folder: Path) -> Path:
    """A BiT npz whose head bias is (10**7, 0)."""
    return _npz_head(folder, ZERO_DIM_10M_CLASSES)


def h5_zero_dim_classes(folder: Path) -> Path:
    """A BiT Keras h5 whose Dense head bias is (10**12, 0)."""
    return _h5_head(folder, ZERO_DIM_CLASSES)


def h5_zero_dim_10m_classes(folder: Path) -> Path:
    """A BiT Keras h5 whose Dense head bias is (10**7, 0)."""
    return _h5_head(folder, ZERO_DIM_10M_CLASSES)


def pt_zero_dim_classes(folder: Path) -> Path:
    """A data2vec 1.0 DeepSpeed file whose classifier weight is (10**12, 0)."""
    return _pt_head(folder, ZERO_DIM_CLASSES)


def pt_zero_dim_10m_classes(folder: Path) -> Path:
    """A data2vec 1.0 DeepSpeed file whose classifier weight is (10**7, 0)."""
    return _pt_head(folder, ZERO_DIM_10M_CLASSES)


def _pt_head(folder: Path, shape: tuple[int, ...]) -> Path:
    import torch

    def mutate(sd: dict) -> None:
        sd["head.weight"] = torch.empty(shape)

    return _d2v1_deepspeed(folder, "mp_rank_00_model_states.pt", mutate)[0]


# ---------------------------------------------------------------- item 3: numbers as data


def npz_dim_digits(folder: Path) -> Path:
    """A BiT npz whose head bias header declares shape (10**3000, 0)."""
    headers = {HEAD_BIAS: _npy_header(f"{10**3000}, 0")}
    return _write_npz(folder / "BiT-digits.npz", _bit_arrays(), headers)


def npz_dims_product_digits(folder: Path) -> Path:
    """A BiT npz whose head bias declares (10**2500, 10**2500, 0): each dimension formats, their
    product does not."""
    headers = {HEAD_BIAS: _npy_header(f"{10**2500}, {10**2500}, 0")}
    return _write_npz(folder / "BiT-product.npz", _bit_arrays(), headers)


def bit_width_overflow(folder: Path) -> Path:
    """A BiT npz whose widths are 32 * 2**1100 (no float holds them), every kernel zero-size."""
    arrays, huge = _bit_arrays(), 32 * 2**1100
    headers = {}
    for key, value in arrays.items():
        if key.endswith("/kernel") and "head" not in key:
            headers[key] = _npy_header(f"{value.shape[0]}, {value.shape[1]}, 0, {huge}")
        elif key.endswith(("gamma", "beta")):
            headers[key] = _npy_header(f"{huge}, 0")
    return _write_npz(folder / "BiT-wide.npz", arrays, headers)


def pt_dim_digits(folder: Path) -> Path:
    """A data2vec 1.0 DeepSpeed file whose classifier weight's pickle declares (10**5000, 0)."""
    def mutate(sd: dict) -> None:
        sd["head.weight"] = _Declared((10**5000, 0), (1, 1))

    return _d2v1_deepspeed(folder, "mp_rank_00_model_states.pt", mutate)[0]


def pt_dim_digits_nonzero(folder: Path) -> Path:
    """A data2vec 1.0 DeepSpeed file whose classifier weight declares (10**5000, 64) over no bytes."""
    def mutate(sd: dict) -> None:
        sd["head.weight"] = _Declared((10**5000, 64), (64, 1))

    return _d2v1_deepspeed(folder, "mp_rank_00_model_states.pt", mutate)[0]


def d2v2_cfg_heads_digits(folder: Path) -> Path:
    """A data2vec 2.0 file whose cfg gives a 5,000-digit `num_heads`."""
    return _d2v2_fairseq(folder, "heads_ft.pt", lambda backbone, model: backbone.update(num_heads=10**5000 + 1))


def d2v2_cfg_eps_huge(folder: Path) -> Path:
    """A data2vec 2.0 file whose cfg gives `norm_eps` 10**400 (an int no float holds)."""
    return _d2v2_fairseq(folder, "eps_ft.pt", lambda backbone, model: model.update(norm_eps=10**400))


SEEDS: dict[str, Callable[[Path], Path]] = {
    "pt_storage_bad_crc": pt_storage_bad_crc,
    "pt_dropped_storage_bad_crc": pt_dropped_storage_bad_crc,
    "pt_entry_at_other_member": pt_entry_at_other_member,
    "pt_entry_inside_member": pt_entry_inside_member,
    "npz_entry_inside_member": npz_entry_inside_member,
    "npz_zero_dim_classes": npz_zero_dim_classes,
    "h5_zero_dim_classes": h5_zero_dim_classes,
    "pt_zero_dim_classes": pt_zero_dim_classes,
    "npz_zero_dim_10m_classes": npz_zero_dim_10m_classes,
    "h5_zero_dim_10m_classes": h5_zero_dim_10m_classes,
    "pt_zero_dim_10m_classes": pt_zero_dim_10m_classes,
    "npz_dim_digits": npz_dim_digits,
    "npz_dims_product_digits": npz_dims_product_digits,
    "bit_width_overflow": bit_width_overflow,
    "pt_dim_digits": pt_dim_digits,
    "pt_dim_digits_nonzero": pt_dim_digits_nonzero,
    "d2v2_cfg_heads_digits": d2v2_cfg_heads_digits,
    "d2v2_cfg_eps_huge": d2v2_cfg_eps_huge,
}
