"""Every sentence of a model card is true of its folder: read from the folder's own files and record."""

import json
import re
from pathlib import Path

import pytest

from checkpoints import synthetic_data2vec as synth
from checkpoints.fixtures.dataset import CLASSES
from checkpoints.fixtures.prepare_eval import main as prepare_eval
from checkpoints.synthetic import bit_arrays, write_bit_npz
from parityport.cli import main
from reference.data2vec1_torch import Data2Vec1Config
from reference.data2vec2_torch import Data2Vec2Config

TINY_BIT = dict(depths=(1, 1, 1, 1), root_width=32, num_classes=10, seed=3)
BIT_FIXTURE, D2V_FIXTURE = "fixture-BiT-R14x0.5-shapes10", "fixture-data2vec-vision-tiny-shapes10"
FIXTURE_SIZE = 32  # both fixtures' records: trained and evaluated at 32 px


def _convert(src: Path, out: Path, *options: str) -> Path:
    assert main(["convert", str(src), "--out", str(out), *options]) == 0
    return out


def _card(folder: Path) -> str:
    """The card's body, without its YAML header."""
    return (folder / "README.md").read_text().split("\n---\n", 1)[1]


def _section(card: str, title: str) -> str:
    return re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", card, re.S | re.M).group(1)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Tiny original files of each family, under the fixtures' catalog names where one exists: BiT
    (npz), data2vec 1.0 (DeepSpeed, fp16 weights under `module`), data2vec 2.0 (fairseq `_ft.pt`)."""
    work = tmp_path_factory.mktemp("sources")
    bit = work / f"{BIT_FIXTURE}.npz"
    write_bit_npz(bit, bit_arrays(**TINY_BIT))
    d2v1 = Data2Vec1Config(dim=32, depth=2, heads=2, mlp_hidden=64, patch=16, image=FIXTURE_SIZE, num_classes=10)
    d2v2 = Data2Vec2Config(dim=32, depth=2, prenet_depth=1, heads=2, mlp_hidden=64, patch=16, image=32, num_classes=10)
    return {"bit": bit,
            "data2vec1": synth.write_d2v1_deepspeed(work / f"{D2V_FIXTURE}.pt", synth.d2v1_state_dict(
                d2v1, seed=0, shared_rel_pos=False, finetuned=True)),
            "data2vec2": synth.write_d2v2_fairseq(work / "ft.pt", synth.d2v2_state_dict(d2v2, seed=0, finetuned=True),
                                                  synth.d2v2_cfg(d2v2))}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """`parityport convert` of a family's tiny file, with parity (True) or --no-parity (False)."""
    done: dict[tuple[str, bool], Path] = {}

    def folder(family: str, parity: bool) -> Path:
        if (family, parity) not in done:
            out = tmp_path_factory.mktemp("out") / f"{family}{'' if parity else '-no-parity'}"
            done[family, parity] = _convert(sources[family], out, *([] if parity else ["--no-parity"]))
        return done[family, parity]

    return folder


def _prepared(folder: Path, tmp_path: Path) -> Path:
    """prepare_eval on `folder`, as the README's fixture flow runs it, with a fixture trainer's record."""
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"image_size": FIXTURE_SIZE, "classes": list(CLASSES), "val": str(tmp_path / "val"),
                                  "top1": 88.6}))
    assert prepare_eval([str(record), str(folder)]) == 0
    return folder


# ---- prepare_eval: the folder's preprocessor IS the fixture's protocol --------------------------------------


@pytest.mark.parametrize("family, processor", [
    ("bit", {"size": {"height": 32, "width": 32}, "do_center_crop": False, "resample": 2}),
    ("data2vec1", {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
                   "resample": 3}),
])
def test_prepare_eval_writes_the_fixtures_protocol_into_the_processor(converted, tmp_path, family, processor):
    import shutil

    from transformers import AutoImageProcessor

    from converters.writer import check_sha256sums
    from parity.protocols import resolve_protocol

    folder = _prepared(Path(shutil.copytree(converted(family, False), tmp_path / family)), tmp_path)
    loaded = AutoImageProcessor.from_pretrained(str(folder)).to_dict()
    assert {key: loaded[key] for key in processor} == processor
    from parity.protocols import original_protocol

    hub, original = resolve_protocol(folder, "hub")[0], original_protocol(folder)
    assert (hub.resize, hub.resize_side, hub.image_size, hub.interpolation) == (
        original.resize, original.resize_side, original.image_size, original.interpolation)
    assert hub.image_size == FIXTURE_SIZE
    assert check_sha256sums(folder) == []
    words = "squash to 32x32 bilinear" if family == "bit" else "shorter side to 36 bicubic, centre crop 32"
    assert f"applies): {words}, mean 0.5 std 0.5." in _section(_card(folder), "Preprocessing")


# ---- the card's sentences -----------------------------------------------------------------------------------


def test_a_data2vec_card_states_the_processor_the_folder_holds(converted):
    processor = json.loads((converted("data2vec1", True) / "preprocessor_config.json").read_text())
    assert (processor["size"], processor["crop_size"]) == ({"shortest_edge": 36}, {"height": 32, "width": 32})
    card = _card(converted("data2vec1", True))
    assert not re.search(r"side (to )?256|crop 224", card)
    assert _section(card, "Preprocessing").strip() == (
        "`preprocessor_config.json` (what `AutoImageProcessor` loads and `parityport eval --protocol hub` applies): "
        "shorter side to 36 bicubic, centre crop 32, mean 0.5 std 0.5.")


@pytest.mark.parametrize("family, facts", [
    ("data2vec1", ["39 tensors are stored as float16 (fp16 training); they are widened to float32 exactly",
                   "layer_norm_eps is 1e-06 as in the original",
                   "Dropped by rule (optimizer state): 1 key: optimizer.fp32_groups_flat.0"]),
    ("bit", ["Weight standardization: the original uses eps 1e-10 inside the sqrt"]),
])
def test_a_card_without_parity_keeps_the_facts_of_the_conversion(converted, family, facts):
    differences = _section(_card(converted(family, False)), "Known differences")
    assert "None recorded" not in differences
    for fact in facts:
        assert f"- {fact}" in differences
    with_parity = _section(_card(converted(family, True)), "Known differences")
    assert [line for line in differences.splitlines() if line] == [line for line in with_parity.splitlines() if line]
    intro = _card(converted(family, False)).split("\n\n")[1]
    assert intro.endswith("converted to safetensors by parityport, without a parity record (converted with "
                          "`--no-parity`).")


@pytest.mark.parametrize("family, taps", [
    ("data2vec1", "patch_embed, blocks.0, blocks.1, pooled, logits"),
    ("data2vec2", "patch_embed, blocks.0, blocks.1, blocks.2, pooled, logits"),
    ("bit", "8 taps: stem, block1.unit01, block2.unit01, ..., norm, pre_logits, logits"),
])
def test_a_card_names_the_taps_that_were_compared(converted, family, taps):
    parity = _section(_card(converted(family, True)), "Parity")
    if family != "bit":
        assert "stem" not in parity and "unit" not in parity
    assert f"Every named tap ({taps}) was compared on the same input tensors" in parity


@pytest.mark.parametrize("family, name", [("bit", "BiT"), ("data2vec1", "data2vec-vision 1.0"),
                                          ("data2vec2", "data2vec-vision 2.0")])
def test_a_card_names_the_family_as_its_readers_do(converted, sources, family, name):
    card = _card(converted(family, True))
    assert f"The original {name} checkpoint `{sources[family].name}` converted to safetensors" in card
    variant = json.loads((converted(family, True) / "parity.json").read_text())["variant"]
    assert f"| converted as | {name} {variant} |" in card
    assert not re.search(r"\b(data2vec1|data2vec2|bit) (checkpoint|ViT|R\d)", card)


def test_a_card_names_the_hubs_own_preprocessor_only_where_it_differs():
    from checkpoints.catalog import lookup
    from converters.data2vec import preprocessor_config
    from parity.card import _preprocessing

    entry = lookup("data2vec-vision-base-ft1k")  # the hub card's processor squashes to 224 with no crop
    held = preprocessor_config(224, (0.5,) * 3, (0.5,) * 3)
    text = _preprocessing({"processor": held}, entry)[2]
    assert text.endswith("applies): shorter side to 256 bicubic, centre crop 224, mean 0.5 std 0.5. The hub's published "
                         "preprocessor for data2vec-vision-base-ft1k is another pipeline: squash to 224x224 bicubic, "
                         "mean 0.5 std 0.5.")
    squash = dict(held, size={"height": 224, "width": 224}, do_center_crop=False)
    assert _preprocessing({"processor": squash}, entry)[2].endswith("applies): squash to 224x224 bicubic, mean 0.5 std 0.5.")
