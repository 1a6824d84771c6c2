"""The family modules are the one statement of each layout, and the JAX references need no torch."""

import subprocess
import sys
from pathlib import Path

from checkpoints.synthetic import TINY_BIT, bit_arrays, keras_layers
from converters.families import bit

REPO = Path(__file__).resolve().parents[1]

_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from checkpoints.synthetic import TINY_BIT, bit_arrays
from reference import bit_flax, data2vec1_flax, data2vec2_flax
model, params = bit_flax.from_npz(bit_arrays(**TINY_BIT, seed=0))
logits, taps = model.apply({"params": params}, np.zeros((1, 32, 32, 3), np.float32))
assert logits.shape == (1, 10) and list(taps)[:2] == ["stem", "block1.unit01"], list(taps)
print("ran without torch")
"""


def test_jax_references_import_and_run_without_torch() -> None:
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ran without torch"


def test_spec_is_read_back_from_the_layout_it_states() -> None:
    """npz_shapes and infer_spec are inverses for the published variants and the tiny one."""
    specs = [bit.bit_spec(d, w, k) for d, w, k in ((50, 1, 1000), (101, 3, 21843), (152, 4, 10))]
    for spec in specs + [bit.BitSpec(**TINY_BIT)]:
        assert bit.infer_spec(bit.npz_shapes(spec)) == spec


def test_h5_order_is_the_npz_order_with_the_dense_head() -> None:
    arrays = bit_arrays(**TINY_BIT, seed=0)
    order = [name.removesuffix(":0") for _, weights in keras_layers(arrays) for name, _ in weights]
    npz = list(bit.npz_shapes(bit.BitSpec(**TINY_BIT)))
    assert order[:-2] == npz[:-2] and order[-2:] == ["resnet/head/dense/kernel", "resnet/head/dense/bias"]
    assert order[10] == "resnet/block1/unit01/a/proj/standardized_conv2d/kernel"  # built last in unit01
