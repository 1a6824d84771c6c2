"""The checkpoint catalog: schema of every entry, known facts, lookup and the printed table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checkpoints.catalog import CATALOG_PATH, FAMILIES, FORMATS, Entry, format_table, load_catalog, lookup
from converters.errors import InputError

CATALOG = load_catalog()
ENTRIES = list(CATALOG.values())
OFFICIAL = [e for e in ENTRIES if e.kind == "official"]
FIXTURES = [e for e in ENTRIES if e.kind == "fixture"]
ARCHS = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")
TIMM_TOP1 = {"R50x1": 80.386, "R101x1": 82.332, "R50x3": 83.982, "R101x3": 84.430, "R152x2": 84.468, "R152x4": 84.936}


@pytest.mark.parametrize("entry", OFFICIAL, ids=lambda e: e.name)
def test_every_entry_is_well_formed(entry: Entry) -> None:
    assert entry.kind == "official" and entry.family in FAMILIES and entry.format in FORMATS
    assert entry.url.startswith("https://") and entry.url.endswith("." + entry.format)
    assert entry.filename.endswith("." + entry.format) and "/" not in entry.filename
    assert entry.sha256 is None, "no real hash is known here; none may be invented"
    assert entry.license.original and entry.license.original_source
    assert entry.classes in {None, 10, 1000, 21843}
    for figure in entry.published:
        assert figure.protocol is None or figure.protocol in entry.eval
        assert figure.source and 50.0 < figure.top1 < 100.0
    for protocol in entry.eval.values():
        assert protocol.crop_size is None or protocol.crop_size <= protocol.resize_size
        assert protocol.source and len(protocol.mean) == len(protocol.std) == 3


def test_names_and_cache_files_are_unique() -> None:
    assert len({e.name.lower() for e in ENTRIES}) == len(ENTRIES)
    assert len({e.filename for e in ENTRIES}) == len(ENTRIES)


def test_every_official_bit_npz_is_listed() -> None:
    expected = {f"BiT-{u}-{a}.npz" for u in "SM" for a in ARCHS}
    expected |= {f"BiT-M-{a}-ILSVRC2012.npz" for a in ARCHS} | {"BiT-M-R50x1-CIFAR10.npz"}
    expected |= {f"distill/{f}.npz" for f in ("R50x1_224", "R50x1_160", "R152x2_T_224", "R152x2_T_384")}
    prefix = "https://storage.googleapis.com/bit_models/"
    listed = {e.url.removeprefix(prefix) for e in OFFICIAL if e.family == "bit" and e.format == "npz"}
    assert listed == expected


def test_bit_h5_files_and_the_broken_ones() -> None:
    h5 = {e.name: e for e in OFFICIAL if e.format == "h5"}
    assert set(h5) == {f"BiT-{u}-{a}.h5" for u in "SM" for a in ARCHS if a != "R152x2"}
    assert {n for n, e in h5.items() if e.broken} == {"BiT-S-R50x3.h5", "BiT-S-R101x1.h5"}
    assert "big_transfer#47" in h5["BiT-S-R50x3.h5"].broken
    assert h5["BiT-M-R50x1.h5"].classes == 21843 and h5["BiT-S-R50x1.h5"].classes == 1000


def test_bit_known_facts() -> None:
    ft = lookup("BiT-M-R50x1-ILSVRC2012")
    assert ft.classes == 1000 and ft.top1 == 80.386 and "timm" in ft.top1_source
    assert ft.published[0].image_size == 448 and ft.published[0].protocol == "timm"
    assert ft.eval["original"].resize == "squash" and ft.eval["original"].resize_size == 480
    assert ft.eval["timm"].mean == (0.5, 0.5, 0.5) and ft.license.original == "Apache-2.0"
    assert lookup("BiT-M-R50x1").classes == 21843 and lookup("BiT-S-R50x1").classes == 1000
    assert lookup("BiT-M-R50x1-CIFAR10").classes == 10
    for arch, top1 in TIMM_TOP1.items():
        entry = lookup(f"BiT-M-{arch}-ILSVRC2012")
        assert entry.top1 == top1 and entry.eval["timm"].crop_size == (480 if arch == "R152x4" else 448)
    assert [p.top1 for p in lookup("BiT-M-R152x4-ILSVRC2012").published] == [84.936, 85.39]
    assert lookup("BiT-M-R152x2-teacher-384").size == 945_485_848
    assert [e.name for e in OFFICIAL if e.size is not None] == ["BiT-M-R152x2-teacher-384"]


def test_data2vec_known_facts() -> None:
    base = lookup("data2vec-vision-base-ft1k")
    assert base.url.endswith("data2vec_vision/finetuned_base/checkpoint-99/mp_rank_00_model_states.pt")
    assert base.family == "data2vec1" and base.classes == 1000 and base.top1 == 84.2
    assert base.eval["original"].crop_size == 224 and base.eval["hub"].resize == "squash"
    assert base.license.original == "CC-BY-NC" and base.license.hub_card == "apache-2.0"
    assert lookup("data2vec-vision-base-800ep").classes is None
    large2 = lookup("data2vec2-vision-large-ft1k")
    assert large2.url == "https://dl.fbaipublicfiles.com/fairseq/data2vec2/large_imagenet_ft.pt"
    assert large2.top1 == 86.8 and large2.eval["original"].mean == (0.485, 0.456, 0.406)
    assert large2.license.original == "CC-BY-NC" and large2.license.hub_card is None
    families = [e.family for e in OFFICIAL]
    assert families.count("data2vec1") == 5 and families.count("data2vec2") == 6


@pytest.mark.parametrize("entry", FIXTURES, ids=lambda e: e.name)
def test_trained_fixtures_carry_their_measured_figure(entry: Entry) -> None:
    assert entry.url is None and entry.family in ("bit", "data2vec1")
    assert 50 < entry.top1 < 100 and "checkpoints/fixtures/train_" in entry.top1_source


def test_both_trained_fixtures_are_listed() -> None:
    assert sorted(e.family for e in FIXTURES) == ["bit", "data2vec1"]


def test_lookup_accepts_case_and_file_names() -> None:
    assert lookup("bit-m-r50x1-ilsvrc2012").name == "BiT-M-R50x1-ILSVRC2012"
    assert lookup("BiT-M-R50x1.npz").name == "BiT-M-R50x1"
    assert lookup("BiT-M-R50x1.h5").format == "h5"
    assert lookup("R152x2_T_384.npz").name == "BiT-M-R152x2-teacher-384"


def test_lookup_unknown_names_suggest_close_ones() -> None:
    with pytest.raises(InputError) as caught:
        lookup("BiT-M-R50x1-ILSVRC")
    assert str(caught.value) == (
        "unknown checkpoint 'BiT-M-R50x1-ILSVRC'; did you mean 'BiT-M-R50x1-ILSVRC2012', "
        "'BiT-M-R50x3-ILSVRC2012' or 'BiT-M-R101x1-ILSVRC2012'? (parityport catalog lists them)"
    )
    with pytest.raises(InputError, match=r"^unknown checkpoint 'zzz' \(parityport catalog lists them\)$"):
        lookup("zzz")
    with pytest.raises(InputError, match="checkpoint-799.pth"):  # shared by three files: ambiguous
        lookup("checkpoint-799.pth")


def test_format_table() -> None:
    table = format_table([lookup("BiT-M-R50x1-ILSVRC2012"), lookup("BiT-S-R50x3.h5"), lookup("data2vec2-vision-base")])
    header, ft, broken, headless, blank, reason = table.splitlines()
    assert header.split() == ["name", "family", "format", "classes", "top-1", "source"]
    assert ft.split()[:6] == ["BiT-M-R50x1-ILSVRC2012", "bit", "npz", "1000", "80.386", "@448"]
    assert ft.endswith("timm results-imagenet.csv, resnetv2_50x1_bit.goog_in21k_ft_in1k")
    assert "h5 (broken)" in broken and headless.split()[-3:] == ["-", "-", "-"]
    assert blank == "" and reason == f"BiT-S-R50x3.h5 (broken): {lookup('BiT-S-R50x3.h5').broken}"
    assert len({line.index(line.split()[1]) for line in (header, ft)}) == 1  # aligned columns


def _write(tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"schema": 1, "entries": entries}))
    return path


def _raw(name: str = "BiT-M-R50x1-ILSVRC2012") -> dict:
    doc = json.loads(CATALOG_PATH.read_text())
    return next(e for e in doc["entries"] if e["name"] == name)


def test_schema_is_open_and_fixtures_need_no_url(tmp_path: Path) -> None:
    fixture = dict(_raw(), name="tiny-bit", kind="fixture", url=None, published=[], trained_by="make fixture")
    entry = load_catalog(_write(tmp_path, [fixture]))["tiny-bit"]
    assert entry.kind == "fixture" and entry.url is None and entry.extra == {"trained_by": "make fixture"}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"classes": "1000"}, "field 'classes' must be an integer or null"),
        ({"family": "vit"}, "field 'family' must be one of bit, data2vec1, data2vec2 (got 'vit')"),
        ({"sha256": "abc"}, "field 'sha256' must be 64 lowercase hex digits or null"),
        ({"url": None}, "field 'url' must be a string"),
        ({"size": 0}, "field 'size' must be a positive integer or null"),
    ],
)
def test_malformed_entries_are_named(tmp_path: Path, change: dict, problem: str) -> None:
    path = _write(tmp_path, [dict(_raw(), **change)])
    with pytest.raises(InputError) as caught:
        load_catalog(path)
    assert str(caught.value) == f"{path}: catalog entry 'BiT-M-R50x1-ILSVRC2012': {problem}"


def test_nested_and_duplicate_errors(tmp_path: Path) -> None:
    bad = _raw()
    bad["published"] = [dict(bad["published"][0], protocol="paper")]
    with pytest.raises(InputError, match=r"field 'published.protocol' names no protocol"):
        load_catalog(_write(tmp_path, [bad]))
    with pytest.raises(InputError, match="duplicate catalog name 'BiT-M-R50x1-ILSVRC2012'"):
        load_catalog(_write(tmp_path, [_raw(), _raw()]))


def test_an_unconfirmed_figure_is_cited_as_such():
    from dataclasses import replace

    from checkpoints.catalog import load_catalog

    figure = next(p for e in load_catalog().values() for p in e.published if p.confirmed)
    assert figure.cited == figure.source
    assert replace(figure, confirmed=False).cited == f"{figure.source} (unconfirmed)"
