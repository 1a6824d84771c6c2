"""`convert --no-parity` stays lean: no torch, transformers or timm for any family.

Importing them costs seconds and most of a gigabyte before a byte is converted;
the target shapes come from `converters.shapes`, the class names from timm's
text files and data2vec 2.0's position check from `reference.mae_positions`
instead. Parity (without --no-parity) still imports everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints.labels import imagenet1k_wnids, imagenet21k_wnids, imagenet_id2label
from checkpoints.synthetic import bit_arrays, write_bit_npz

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "timm", "tensorflow", "jax")

_PROBE = """
import json, sys
from parityport.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def test_convert_without_parity_imports_no_framework(tmp_path: Path) -> None:
    src = tmp_path / "tiny.npz"
    write_bit_npz(src, bit_arrays((1, 1, 1, 1), 1, 1000, root_width=32))  # 1000 classes: labels too
    out = subprocess.run([sys.executable, "-c", _PROBE, "convert", str(src), "--out", str(tmp_path / "o"),
                          "--no-parity", "--dtype", "bfloat16"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "heavy": []}, out.stderr
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["id2label"]["0"] == "tench, Tinca tinca"


def test_class_lists_equal_timm() -> None:
    from timm.data import ImageNetInfo

    for classes, subset in ((1000, "imagenet-1k"), (21843, "imagenet-21k-goog")):
        info = ImageNetInfo(subset)
        assert imagenet_id2label(classes) == dict(enumerate(info.label_descriptions()))
    assert imagenet1k_wnids() == list(ImageNetInfo("imagenet-1k").label_names())
    assert imagenet21k_wnids() == list(ImageNetInfo("imagenet-21k-goog").label_names())


def test_data2vec1_convert_without_parity_imports_no_framework(tmp_path: Path) -> None:
    from checkpoints.synthetic_data2vec import d2v1_state_dict, write_d2v1_deepspeed
    from reference.data2vec1_torch import Data2Vec1Config

    config = Data2Vec1Config(dim=64, depth=2, heads=4, mlp_hidden=128, patch=16, image=64, num_classes=1000)
    src = write_d2v1_deepspeed(tmp_path / "mp_rank_00_model_states.pt",
                               d2v1_state_dict(config, seed=0, shared_rel_pos=True, finetuned=True))
    out = subprocess.run([sys.executable, "-c", _PROBE, "convert", str(src), "--out", str(tmp_path / "o"),
                          "--no-parity"], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"rc": 0, "heavy": []}, out.stderr


@pytest.mark.parametrize("finetuned", [True, False], ids=["ft", "pretrained"])
def test_data2vec2_convert_without_parity_imports_no_framework(tmp_path: Path, finetuned: bool) -> None:
    from checkpoints.synthetic_data2vec import d2v2_cfg, d2v2_state_dict, write_d2v2_fairseq
    from reference.data2vec2_torch import Data2Vec2Config

    config = Data2Vec2Config(dim=64, depth=2, prenet_depth=1, heads=4, mlp_hidden=256, patch=16, image=64,
                             num_classes=1000)
    name = "base_imagenet_ft.pt" if finetuned else "base_imagenet.pt"
    src = write_d2v2_fairseq(tmp_path / name, d2v2_state_dict(config, seed=0, finetuned=finetuned),
                             d2v2_cfg(config, finetuned=finetuned))
    out = subprocess.run([sys.executable, "-c", _PROBE, "convert", str(src), "--out", str(tmp_path / "o"),
                          "--no-parity"], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"rc": 0, "heavy": []}, out.stderr
    config_json = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config_json["architectures"] == [
        "Data2Vec2VisionForImageClassification" if finetuned else "Data2Vec2VisionModel"]
    assert (tmp_path / "o" / "modeling_data2vec2.py").read_bytes() == (
        REPO / "reference" / "data2vec2_hf" / "modeling_data2vec2.py").read_bytes()
