"""The rule engine: templates, invertible ops, strictness in both directions."""

import numpy as np
import pytest

from converters.errors import InputError
from converters.rules import (CONVERTIBLE_DTYPES, Broadcast, Compose, Drop, Rename, Reshape, SplitRows,
                              Template, Transpose, apply_rules, invert)
from converters.tensors import LazyTensor


def lazy(d):
    return {k: LazyTensor.of(v) for k, v in d.items()}


def test_template_fields_offsets_and_padding():
    src = Template("resnet/block{b}/unit{u:02d}/a/gamma")
    dst = Template("stages.{b-1}.layers.{u-1}.norm1.weight")
    values = src.match("resnet/block2/unit07/a/gamma")
    assert values == {"b": 2, "u": 7}
    assert dst.render(values) == "stages.1.layers.6.norm1.weight"
    assert dst.match("stages.1.layers.6.norm1.weight") == {"b": 2, "u": 7}
    assert src.match("resnet/block2/unit7/a/gamma") is None  # padding is part of the name
    assert src.match("resnet/block2/unit07/a/gammax") is None


def test_word_fields_and_repeated_fields():
    t = Template("blocks.{i}.{p:w}.weight")
    assert t.match("blocks.3.norm1.weight") == {"i": 3, "p": "norm1"}
    assert t.match("blocks.3.norm1.x.weight") is None
    same = Template("a{i}.b{i}")
    assert same.match("a1.b1") == {"i": 1}
    assert same.match("a1.b2") is None


@pytest.mark.parametrize("op, shape", [
    (Transpose((3, 2, 0, 1)), (3, 5, 2, 4)),
    (Compose((Reshape((1, 1, 4, 6), (4, 6)), Transpose((1, 0)))), (1, 1, 4, 6)),
])
def test_ops_invert_exactly(op, shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    (y,) = op([x])
    assert list(op.shapes([x.shape])) == [y.shape]
    (back,) = op.inverse()([y])
    np.testing.assert_array_equal(back, x)


def test_split_rows_and_broadcast_round_trip():
    qkv = np.arange(24, dtype=np.float32).reshape(6, 4)
    q, k, v = SplitRows(3)([qkv])
    np.testing.assert_array_equal(k, qkv[2:4])
    np.testing.assert_array_equal(SplitRows(3).inverse()([q, k, v])[0], qkv)
    copies = Broadcast(3)([qkv])
    assert len(copies) == 3
    np.testing.assert_array_equal(Broadcast(3).inverse()(copies)[0], qkv)
    with pytest.raises(ValueError, match="differ"):
        Broadcast(3).inverse()([qkv, qkv, qkv + 1])


RULES = [
    Drop("opt/{name:w}", "optimizer state"),
    Rename("blocks.{i}.qkv", ("layer.{i}.q", "layer.{i}.k", "layer.{i}.v"), SplitRows(3)),
    Rename("blocks.{i}.kernel", "layer.{i}.weight", Transpose((1, 0))),
    Rename("shared.table", ("layer.0.table", "layer.1.table"), Broadcast(2)),
]


def source():
    rng = np.random.default_rng(1)
    d = {"shared.table": rng.normal(size=(5,)).astype(np.float32), "opt/step": np.zeros(1)}
    for i in range(2):
        d[f"blocks.{i}.qkv"] = rng.normal(size=(6, 2)).astype(np.float32)
        d[f"blocks.{i}.kernel"] = rng.normal(size=(2, 3)).astype(np.float32)
    return d


def test_apply_is_lazy_strict_and_invertible():
    calls = []
    src = {k: LazyTensor(v.shape, v.dtype, lambda v=v, k=k: calls.append(k) or v) for k, v in source().items()}
    out = apply_rules(src, RULES)
    assert calls == []  # nothing read while mapping
    assert out.dropped == {"opt/step": "optimizer state"}
    assert out.tensors["layer.1.weight"].shape == (3, 2)
    assert sorted(out.tensors) == sorted([f"layer.{i}.{p}" for i in range(2) for p in ("q", "k", "v", "weight", "table")])
    back = apply_rules(out.tensors, invert(RULES))
    original = source()
    del original["opt/step"]
    assert sorted(back.tensors) == sorted(original)
    for k, v in original.items():
        np.testing.assert_array_equal(back.tensors[k].load(), v, err_msg=k)


def test_unknown_missing_extra_and_shape_errors_name_keys():
    src = lazy(source())
    src["blocks.0.surprise"] = LazyTensor.of(np.zeros(2))
    with pytest.raises(InputError, match=r"^f\.npz: no rule for blocks\.0\.surprise$"):
        apply_rules(src, RULES, path="f.npz")
    expected = {k: t.shape for k, t in apply_rules(lazy(source()), RULES).tensors.items()}
    short = lazy(source())
    del short["blocks.1.kernel"]
    with pytest.raises(InputError, match=r"^f\.npz: missing keys: blocks\.1\.kernel$"):
        apply_rules(short, RULES, expected, path="f.npz")
    wrong = lazy(source())
    wrong["blocks.1.kernel"] = LazyTensor.of(np.zeros((2, 4), np.float32))
    with pytest.raises(InputError, match=r"^f\.npz: blocks\.1\.kernel \[2, 4\] converts to layer\.1\.weight of shape "
                                         r"\[4, 2\], expected \[3, 2\]$"):
        apply_rules(wrong, RULES, expected, path="f.npz")
    fewer = {k: v for k, v in expected.items() if k != "layer.0.table"}
    with pytest.raises(InputError, match=r"unexpected keys: shared\.table \(converted to layer\.0\.table\)$"):
        apply_rules(lazy(source()), RULES, fewer, path="f.npz")


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "uint64", "complex64", "complex128"])
def test_a_dtype_the_writer_cannot_write_is_refused_by_name(dtype):
    tensors = lazy({"a": np.ones(2, np.float32), "b": np.ones(2, dtype), "c": np.ones(2, dtype)})
    rules = [Rename("a", "x"), Rename("b", "y"), Drop("c", "unused")]
    with pytest.raises(InputError, match=rf"^f.npz: b \(converted to y\) has dtype {dtype}, which does not convert "
                                         r"\(float, signed integer, uint8 or bool only\)$"):
        apply_rules(tensors, rules, path="f.npz")
    assert apply_rules(tensors, [rules[0], Drop("b", "unused"), rules[2]]).tensors.keys() == {"x"}


def test_convertible_dtypes_are_the_ones_the_writer_writes():
    from converters.writer import _TAGS

    assert CONVERTIBLE_DTYPES == set(_TAGS)
