"""Publishing: the model card, sharded weights, `parityport verify` and `parityport publish` (no network)."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints.synthetic import bit_arrays, write_bit_npz
from converters.errors import InputError
from converters.writer import check_sha256sums, listed_sha256sums, write_sha256sums
from parity.card import model_card, write_card
from parity.inputs import photo_path
from parityport.cli import main

TINY = dict(depths=(1, 1, 1, 1), root_width=32, num_classes=10, seed=3)
CATALOG_NAME = "BiT-M-R50x1-ILSVRC2012"  # published top-1 80.386 (timm protocol), Apache-2.0
EVAL = {"top1": 79.5, "top5": 94.25, "images": 50000, "protocol": "timm", "device": "cuda"}


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / f"{CATALOG_NAME}.npz"
    write_bit_npz(path, bit_arrays(**TINY))
    return path


@pytest.fixture(scope="module")
def folder(npz, tmp_path_factory) -> Path:
    """A converted folder with its first card, as `parityport convert` leaves it."""
    out = tmp_path_factory.mktemp("out") / "tiny"
    command = f"parityport convert {npz} --out {out}"
    assert main(["convert", str(npz), "--out", str(out)]) == 0
    write_card(out, command=command, model_id=str(out))
    write_sha256sums(out)
    return out


@pytest.fixture(scope="module")
def sharded(npz, folder, tmp_path_factory) -> Path:
    """The same weights from a file the catalog does not know, sharded at 100 KB."""
    from converters.export import source_digest, write_model
    from converters.readers.detect import open_checkpoint
    from parityport.cli import convert_checkpoint

    src = tmp_path_factory.mktemp("src2") / "tiny.npz"
    shutil.copy(npz, src)
    out = tmp_path_factory.mktemp("out") / "sharded"
    out.mkdir()
    checkpoint = open_checkpoint(src)
    _, conversion = convert_checkpoint(checkpoint)
    write_model(out, conversion, checkpoint, source_digest(src), "float32", max_shard_size=100_000)
    for name in ("parity.json", "parity.md", "parity.png"):
        shutil.copy(folder / name, out / name)
    write_card(out, model_id=str(out))
    write_sha256sums(out)
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ---- the card ----------------------------------------------------------------------------------

def test_card_parses_with_huggingface_hub(folder, npz):
    from huggingface_hub import ModelCard

    text = (folder / "README.md").read_text()
    for card in (ModelCard.load(folder / "README.md"), ModelCard(text)):
        data = card.data.to_dict()
        assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-classification"
        assert data["tags"] == ["parityport", "bit", "image-classification"]
        assert data["license"] == "apache-2.0"
        assert "model-index" not in data  # no eval attached yet
    meta_sha = hashlib.sha256(npz.read_bytes()).hexdigest()
    assert f"`{CATALOG_NAME}.npz` (npz)" in text and meta_sha in text
    assert "parityport convert " in text and "parityport 0." in text
    assert "| transformers BitForImageClassification | target | photo 224x224 | float32 |" in text
    assert "eps 1e-10" in text  # the known WS-eps difference, from parity.json's notes


def test_model_index_round_trips_through_eval_result(folder):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    text = model_card(folder, [dict(EVAL, model=str(folder))], None)
    card = ModelCard(text)
    index = card.data.to_dict()["model-index"]
    name, results = model_index_to_eval_results(index)
    assert name == CATALOG_NAME
    assert [(r.metric_config, r.metric_value) for r in results] == [("top-1", 79.5), ("top-5", 94.25),
                                                                   ("top-1", 80.386)]
    assert all(r.task_type == "image-classification" and r.dataset_type == "imagenet-1k"
               and r.dataset_split == "validation" for r in results)
    assert "published" in results[2].metric_name and "measured, protocol timm" in results[0].metric_name
    assert eval_results_to_model_index(name, results) == index
    assert [r.metric_value for r in card.data.eval_results] == [79.5, 94.25, 80.386]
    assert card.data.to_dict()["datasets"] == ["imagenet-1k"]
    assert "| timm | 50000 | 79.500 | 94.250 | 80.386 (" in text
    assert "parityport convert " in text  # the convert command survives regeneration


def test_license_states_source_terms_and_conflicts(sharded):
    from huggingface_hub import ModelCard

    from checkpoints.catalog import lookup
    from parity.card import license_fields, license_section

    d2v = lookup("data2vec-vision-base-ft1k")
    fields = license_fields(d2v)
    assert fields["license"] == "other" and fields["license_name"] == "cc-by-nc"
    assert fields["license_link"].startswith("https://github.com/facebookresearch/data2vec_vision/blob/HEAD/beit/README.md")
    text = " ".join(license_section(d2v))
    assert "CC-BY-NC" in text and "apache-2.0" in text and "disagree" in text
    assert license_fields(lookup(CATALOG_NAME)) == {"license": "apache-2.0"}
    data = ModelCard.load(sharded / "README.md").data.to_dict()  # tiny.npz: not in the catalog
    assert data["license"] == "other" and data["license_name"] == "unknown"


def test_usage_snippet_runs_as_written(folder, monkeypatch, capsys):
    import urllib.request

    text = (folder / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "trust_remote_code" not in snippet  # config.json has no auto_map
    monkeypatch.setattr(urllib.request, "urlopen", lambda url: open(photo_path(), "rb"))  # no network
    exec(compile(snippet, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(re.fullmatch(r"0\.\d{3}  LABEL_\d", line) for line in lines)


def test_pipeline_top5_equals_the_flax_source_on_the_photo(folder, npz):
    import jax
    from PIL import Image
    from transformers import pipeline

    from reference.bit_flax import from_npz

    jax.config.update("jax_default_matmul_precision", "highest")
    classify = pipeline("image-classification", model=str(folder), top_k=5)
    got = [p["label"] for p in classify(str(photo_path()))]
    pixels = classify.image_processor(images=Image.open(photo_path()).convert("RGB"),
                                      return_tensors="pt")["pixel_values"].numpy()
    assert pixels.shape == (1, 3, 480, 480) and -1.0 <= pixels.min() and pixels.max() <= 1.0
    flax_model, params = from_npz(dict(np.load(npz)))
    forward = jax.jit(lambda x: flax_model.apply({"params": params}, x)[0])  # one compile, not one per op
    logits = np.asarray(forward(pixels.transpose(0, 2, 3, 1)))[0]
    id2label = classify.model.config.id2label
    assert got == [id2label[int(i)] for i in np.argsort(-logits)[:5]]


# ---- shards ------------------------------------------------------------------------------------

def test_plan_shards_is_greedy_and_keeps_big_tensors_alone():
    from converters.shards import parse_size, plan_shards
    from converters.tensors import LazyTensor

    tensors = {n: LazyTensor.of(np.zeros(k, np.float64)) for n, k in (("a", 10), ("b", 10), ("c", 40), ("d", 5))}
    groups = plan_shards(tensors, "float32", 100)  # 40, 40, 160, 20 bytes stored
    assert [list(g) for g in groups] == [["a", "b"], ["c"], ["d"]]
    assert parse_size("5GB") == 5_000_000_000 and parse_size("100KB") == 100_000 and parse_size("1KiB") == 1024
    assert plan_shards(tensors, "float32", parse_size("5GB")) == [tensors]


@pytest.mark.parametrize("size, problem", [
    ("0.5", "'0.5' is under one byte"), ("0.0001KB", "'0.0001KB' is under one byte"),
    ("0", "'0' is under one byte"), ("5 parsecs", "bad size '5 parsecs'"),
])
def test_a_shard_size_under_one_byte_is_refused_not_read_as_the_default(npz, tmp_path, capsys, size, problem):
    out = tmp_path / "out"
    assert main(["convert", str(npz), "--out", str(out), "--no-parity", "--max-shard-size", size]) == 2
    assert capsys.readouterr().err.strip() == (
        f"parityport: error: --max-shard-size: {problem} (use e.g. 5GB, 500MB, 100KB)")
    assert not out.exists()


def test_sharded_folder_loads_identically_and_is_fully_checksummed(folder, sharded):
    from safetensors import safe_open
    from transformers import AutoModelForImageClassification

    from converters.shards import INDEX_FILE, read_metadata, weight_files
    from parity.verify import verify

    shards = weight_files(sharded)
    assert len(shards) > 3 and not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / INDEX_FILE).read_text())
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        keys, total = set(f.keys()), sum(f.get_tensor(k).nbytes for k in f.keys())
    assert set(index["weight_map"]) == keys and index["metadata"]["total_size"] == total
    metas = []
    for name in shards:
        with safe_open(sharded / name, framework="pt") as f:
            metas.append(f.metadata())
            assert len(f.keys()) == 1 or sum(f.get_tensor(k).nbytes for k in f.keys()) <= 100_000, name
    assert all(m == metas[0] for m in metas) and metas[0] == read_metadata(sharded)
    assert metas[0]["source_file"] == "tiny.npz"
    assert set(listed_sha256sums(sharded)) >= set(shards) | {INDEX_FILE, "README.md"} and check_sha256sums(sharded) == []
    a = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    b = AutoModelForImageClassification.from_pretrained(str(sharded)).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    assert verify(sharded) == []
    assert f"{len(shards)} shards + model.safetensors.index.json" in (sharded / "README.md").read_text()


def test_up_to_date_reads_the_first_shard(sharded):
    from converters.export import up_to_date
    from converters.shards import read_metadata

    assert up_to_date(sharded, read_metadata(sharded)["source_sha256"])
    assert not up_to_date(sharded, "0" * 64)


# ---- verify ------------------------------------------------------------------------------------

def test_verify_passes_on_a_converted_folder(folder, capsys):
    assert main(["verify", str(folder)]) == 0
    assert "verified" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["verify", "publish"])
@pytest.mark.parametrize("damage, name", [("tamper", "model.safetensors"), ("delete", "config.json"),
                                          ("add", "extra.bin")])
def test_a_changed_missing_or_unlisted_file_is_named(folder, tmp_path, capsys, command, damage, name):
    copy = copy_of(folder, tmp_path)
    path = copy / name
    if damage == "tamper":
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"?")
    argv = [command, str(copy)] + (["--repo-id", "me/tiny", "--dry-run"] if command == "publish" else [])
    assert main(argv) == 1
    message = last_line(capsys.readouterr().err)
    assert name in message and str(copy) in message


@pytest.mark.parametrize("command", ["verify", "publish"])
def test_a_failed_parity_record_is_refused(folder, tmp_path, capsys, command):
    copy = copy_of(folder, tmp_path)
    report = json.loads((copy / "parity.json").read_text())
    report.update(passed=False, first_diverging_tap="block2.unit01")
    (copy / "parity.json").write_text(json.dumps(report))
    write_sha256sums(copy)  # consistent checksums: only the verdict is wrong
    argv = [command, str(copy)] + (["--repo-id", "me/tiny", "--dry-run"] if command == "publish" else [])
    assert main(argv) == 1
    message = last_line(capsys.readouterr().err)
    assert "parity.json" in message and "block2.unit01" in message


@pytest.fixture(scope="module")
def d2v2_folder(tmp_path_factory) -> Path:
    """A converted data2vec 2.0 folder: its model is custom code, shipped beside config.json."""
    from checkpoints import synthetic_data2vec as synth
    from reference.data2vec2_torch import Data2Vec2Config

    config = Data2Vec2Config(dim=32, depth=2, prenet_depth=1, heads=2, mlp_hidden=64, patch=16, image=32,
                             num_classes=10)
    work = tmp_path_factory.mktemp("d2v2")
    src = synth.write_d2v2_fairseq(work / "ft.pt", synth.d2v2_state_dict(config, seed=0, finetuned=True),
                                   synth.d2v2_cfg(config))
    assert main(["convert", str(src), "--out", str(work / "out")]) == 0
    return work / "out"


@pytest.mark.parametrize("command", ["verify", "publish", "parity"])
@pytest.mark.parametrize("change", ["code", "auto_map"])
def test_custom_code_that_is_not_ours_is_never_run_or_published(d2v2_folder, tmp_path, capsys, command, change):
    copy = copy_of(d2v2_folder, tmp_path)
    ran = tmp_path / "RAN"
    planted = f"\nopen({str(ran)!r}, 'w').close()\n"
    if change == "code":
        with open(copy / "modeling_data2vec2.py", "a") as f:
            f.write(planted)
        named = "modeling_data2vec2.py: missing or differs from the code parityport ships"
    else:
        (copy / "evil.py").write_text(planted + "from modeling_data2vec2 import *\n")
        config = json.loads((copy / "config.json").read_text())
        config["auto_map"]["AutoModelForImageClassification"] = "evil.Data2Vec2VisionForImageClassification"
        (copy / "config.json").write_text(json.dumps(config))
        named = "config.json: auto_map {"
    write_sha256sums(copy)  # consistent checksums: anyone can list them again
    argv = {"verify": ["verify", str(copy)], "publish": ["publish", str(copy), "--repo-id", "me/d2v2", "--dry-run"],
            "parity": ["parity", str(d2v2_folder.parent / "ft.pt"), str(copy)]}[command]
    assert main(argv) == (2 if command == "parity" else 1)
    assert named in last_line(capsys.readouterr().err)
    assert not ran.exists()


def test_verify_runs_our_own_custom_code(d2v2_folder, capsys):
    assert main(["verify", str(d2v2_folder)]) == 0
    assert "verified" in capsys.readouterr().out


# ---- publish -----------------------------------------------------------------------------------

def test_dry_run_lists_the_commit_operations_and_changes_nothing(folder, tmp_path, capsys):
    from huggingface_hub import CommitOperationAdd

    from parityport.publish import commit_operations, staged_files

    copy = copy_of(folder, tmp_path)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps(dict(EVAL, model=str(copy))))
    assert main(["publish", str(copy), "--repo-id", "me/tiny", "--dry-run", "--eval", str(eval_json)]) == 0
    out = capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    operations = commit_operations(staged_files(copy, [dict(EVAL, model=str(copy))], "me/tiny"))
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    assert [op.path_in_repo for op in operations] == sorted(before)
    for op in operations:
        assert f"{op.path_in_repo} " in out and op.upload_info.sha256.hex() in out
    card = next(op for op in operations if op.path_in_repo == "README.md").path_or_fileobj
    assert b'model_id = "me/tiny"' in card and b"79.500" in card
    sums = next(op for op in operations if op.path_in_repo == "SHA256SUMS").path_or_fileobj.decode()
    assert f"{hashlib.sha256(card).hexdigest()}  README.md" in sums


def test_a_side_by_side_eval_puts_every_protocol_on_the_card(folder, tmp_path):
    from parityport.publish import read_evals, staged_files

    hub = dict(EVAL, protocol="hub", top1=79.1, top5=94.0, model=str(folder))
    side_by_side = tmp_path / "eval.json"
    side_by_side.write_text(json.dumps({"protocols": ["timm", "hub"], "runs": {"timm": dict(EVAL, model=str(folder)),
                                                                              "hub": hub}, "side_by_side": []}))
    evals = read_evals(side_by_side, folder)
    assert [e["protocol"] for e in evals] == ["timm", "hub"]
    card = staged_files(folder, evals, "me/tiny")["README.md"].decode()
    assert "| timm | 50000 | 79.500 | 94.250 | 80.386 (" in card and "| hub | 50000 | 79.100 | 94.000 | none catalogued |" in card
    side_by_side.write_text(json.dumps({"runs": {"timm": {"top5": 94.0}}}))
    with pytest.raises(InputError, match="not a `parityport eval --json` result"):
        read_evals(side_by_side, folder)


def _no_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_publish_without_a_token_is_one_clear_line(folder, tmp_path, monkeypatch, capsys):
    _no_token(monkeypatch, tmp_path)
    copy = copy_of(folder, tmp_path)
    before = (copy / "README.md").read_bytes()
    assert main(["publish", str(copy), "--repo-id", "me/tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "token" in err and "HF_TOKEN" in err
    assert (copy / "README.md").read_bytes() == before


def test_publish_offline_or_unreachable_is_one_clear_line(folder, tmp_path, monkeypatch, capsys):
    _no_token(monkeypatch, tmp_path)
    copy = copy_of(folder, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["publish", str(copy), "--repo-id", "me/tiny", "--token", "hf_test"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE" in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    assert main(["publish", str(copy), "--repo-id", "me/tiny", "--token", "hf_test"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the Hugging Face Hub" in err


def test_publish_creates_the_repo_and_commits_every_file(folder, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, endpoint=None, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = (repo_id, kwargs)

        def create_commit(self, repo_id, operations, **kwargs):
            calls["create_commit"] = (repo_id, operations)
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

    _no_token(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    copy = copy_of(folder, tmp_path)
    assert main(["publish", str(copy), "--repo-id", "me/tiny", "--private"]) == 0
    assert calls["token"] == "hf_from_env"
    assert calls["create_repo"] == ("me/tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    repo_id, operations = calls["create_commit"]
    assert repo_id == "me/tiny" and {op.path_in_repo for op in operations} == {p.name for p in copy.iterdir()}
    assert check_sha256sums(copy) == []  # the regenerated card is in SHA256SUMS
    assert 'model_id = "me/tiny"' in (copy / "README.md").read_text()
    assert "commit/0" in capsys.readouterr().out


def test_synthetic_weights_are_listed_but_never_uploaded(folder, tmp_path, monkeypatch, capsys):
    _no_token(monkeypatch, tmp_path)
    copy = copy_of(folder, tmp_path)
    report = json.loads((copy / "parity.json").read_text())
    report["notes"].insert(0, "SYNTHETIC source: random weights in the exact original layout.")
    (copy / "parity.json").write_text(json.dumps(report))
    write_sha256sums(copy)
    assert main(["publish", str(copy), "--repo-id", "me/tiny", "--dry-run"]) == 2
    refusal = capsys.readouterr().err.strip()
    assert refusal == (f"parityport: error: {copy}: refusing to publish: its weights are SYNTHETIC (random values "
                       "in the original layout), not the published checkpoint")
    assert main(["publish", str(copy), "--repo-id", "me/tiny", "--token", "hf_test"]) == 2
    assert capsys.readouterr().err.strip() == refusal
    assert "Not the published weights" in model_card(copy, [], None)
    assert main(["verify", str(copy)]) == 0
    assert capsys.readouterr().out.strip().endswith(
        "verified (checksums, parity record, strict load, finite logits on the photo); its weights are a "
        "SYNTHETIC stand-in (random values), not the published checkpoint")


@pytest.mark.parametrize("parity", [True, False])
@pytest.mark.parametrize("named", ["NAME.synthetic.npz", "renamed NAME.npz"])
def test_a_stand_in_converted_by_its_path_is_still_synthetic(npz, tmp_path, monkeypatch, capsys, parity, named):
    """A stand-in is known by its name, and, renamed to the real file's name, by its archive comment."""
    from checkpoints.offline import _mark

    _no_token(monkeypatch, tmp_path)
    stand_in = Path(shutil.copy(npz, tmp_path / f"{CATALOG_NAME}{'.synthetic' if 'synthetic' in named else ''}.npz"))
    _mark(stand_in)  # as synthetic_stand_in writes every stand-in
    out = tmp_path / "out"
    assert main(["convert", str(stand_in), "--out", str(out)] + ([] if parity else ["--no-parity"])) == 0
    assert "SYNTHETIC weights" in capsys.readouterr().err
    assert "Not the published weights" in (out / "README.md").read_text()
    assert main(["publish", str(out), "--repo-id", "me/tiny", "--token", "hf_test"]) == 2
    assert "refusing to publish: its weights are SYNTHETIC" in last_line(capsys.readouterr().err)
    if parity:
        assert main(["verify", str(out)]) == 0
        assert "SYNTHETIC stand-in" in capsys.readouterr().out


def test_remote_code_models_get_trust_remote_code_in_the_snippet():
    from parity.card import usage_snippet

    snippet = usage_snippet("me/d2v2", remote_code=True)
    assert snippet.count("trust_remote_code=True") == 2
    compile(snippet, "README.md", "exec")


def test_an_encoder_card_loads_automodel_and_its_snippet_runs(tmp_path, monkeypatch, capsys):
    import urllib.request

    from huggingface_hub import ModelCard

    from checkpoints.synthetic_data2vec import d2v1_state_dict, write_d2v1_pretrained
    from reference.data2vec1_torch import Data2Vec1Config

    config = Data2Vec1Config(dim=64, depth=2, heads=4, mlp_hidden=128, patch=16, image=64, num_classes=0)
    src = write_d2v1_pretrained(tmp_path / "checkpoint-799.pth",
                                d2v1_state_dict(config, seed=0, shared_rel_pos=True, finetuned=False))
    out = tmp_path / "encoder"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    assert ModelCard(text).data.to_dict()["pipeline_tag"] == "image-feature-extraction"
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "AutoModel.from_pretrained" in snippet and "ForImageClassification" not in snippet
    monkeypatch.setattr(urllib.request, "urlopen", lambda url: open(photo_path(), "rb"))  # no network
    capsys.readouterr()
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([1, 17, 64])"
    assert main(["verify", str(out)]) == 0  # loaded as an encoder, with no head to miss
    assert capsys.readouterr().out.strip().endswith(
        "verified (checksums, parity record, strict load, finite features on the photo)")


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_data2vec_pipeline_top5_equals_the_source_reference_on_the_photo(tmp_path, version):
    """The converted folder through `pipeline`, against the original-keys reference on the same tensor."""
    from PIL import Image
    from transformers import pipeline

    from checkpoints import synthetic_data2vec as synth
    from converters.readers.detect import open_checkpoint
    from parity import data2vec as sides
    from reference.data2vec1_torch import Data2Vec1Config
    from reference.data2vec2_torch import Data2Vec2Config

    if version == "1.0":
        config = Data2Vec1Config(dim=64, depth=2, heads=4, mlp_hidden=128, patch=16, image=64, num_classes=1000)
        src = synth.write_d2v1_deepspeed(tmp_path / "mp_rank_00_model_states.pt",
                                         synth.d2v1_state_dict(config, seed=0, shared_rel_pos=False, finetuned=True))
    else:
        config = Data2Vec2Config(dim=64, depth=2, prenet_depth=1, heads=4, mlp_hidden=128, patch=16, image=64,
                                 num_classes=1000)
        src = synth.write_d2v2_fairseq(tmp_path / "ft.pt", synth.d2v2_state_dict(config, seed=0, finetuned=True),
                                       synth.d2v2_cfg(config))
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    classify = pipeline("image-classification", model=str(out), top_k=5, trust_remote_code=version == "2.0")
    got = [p["label"] for p in classify(str(photo_path()))]
    pixels = classify.image_processor(images=Image.open(photo_path()).convert("RGB"),
                                      return_tensors="pt")["pixel_values"].numpy()
    assert pixels.shape == (1, 3, 64, 64)
    checkpoint = open_checkpoint(src)
    source = (sides.d2v1_source(checkpoint) if version == "1.0" else
              sides.d2v2_source(checkpoint, json.loads((out / "config.json").read_text())))
    logits = np.asarray(source.run(pixels)["logits"])[0]
    id2label = classify.model.config.id2label
    assert got == [id2label[int(i)] for i in np.argsort(-logits)[:5]]
    assert got[0] != "LABEL_0" and len(id2label) == 1000  # ImageNet labels in the folder


@pytest.mark.parametrize("pretrained", [False, True])
def test_verify_loads_a_data2vec2_encoder_through_its_shipped_code(tmp_path, capsys, pretrained):
    from checkpoints import synthetic_data2vec as synth
    from reference.data2vec2_torch import Data2Vec2Config

    config = Data2Vec2Config(dim=32, depth=2, prenet_depth=1, heads=2, mlp_hidden=64, patch=16, image=32,
                             num_classes=0 if pretrained else 10)
    src = synth.write_d2v2_fairseq(tmp_path / "m.pt", synth.d2v2_state_dict(config, seed=0, finetuned=not pretrained),
                                   synth.d2v2_cfg(config))
    assert main(["convert", str(src), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "out")]) == 0
    assert f"finite {'features' if pretrained else 'logits'} on the photo" in capsys.readouterr().out


# ---- refusals: the same for a dry run and a real one; 2 for what a folder is, 1 for a failed check ----

FAILURE = "logits: max-abs 1.00e+00 > limit 1.00e-04 on noise 224x224"


def _unpublishable(kind: str, folder: Path, npz: Path, tmp_path: Path) -> Path:
    """A folder `publish` must refuse: synthetic weights, converted --no-parity, left by a failed
    parity run (`.parity-failed`: no card, no SHA256SUMS), a tampered weight file, or no SHA256SUMS."""
    if kind == "no-parity":
        out = tmp_path / "no-parity"
        assert main(["convert", str(npz), "--out", str(out), "--no-parity"]) == 0
        return out
    copy = Path(shutil.copytree(folder, tmp_path / ("tiny.parity-failed" if kind == "parity-failed" else "tiny")))
    report = json.loads((copy / "parity.json").read_text())
    if kind == "synthetic":
        report["notes"].insert(0, "SYNTHETIC source: random weights in the exact original layout.")
    if kind == "parity-failed":
        report.update(passed=False, failure=FAILURE)
    (copy / "parity.json").write_text(json.dumps(report))
    write_sha256sums(copy)
    if kind == "parity-failed":
        for name in ("README.md", "SHA256SUMS"):  # what a failed convert leaves
            (copy / name).unlink()
    if kind == "no-checksums":
        (copy / "SHA256SUMS").unlink()
    if kind == "tampered":
        data = bytearray((copy / "model.safetensors").read_bytes())
        data[-1] ^= 1
        (copy / "model.safetensors").write_bytes(bytes(data))
    return copy


REFUSALS = {  # kind: (exit code, the line after "DIR: refusing to publish: " / "DIR: cannot be verified: ")
    "synthetic": (2, "its weights are SYNTHETIC (random values in the original layout), not the published checkpoint"),
    "no-parity": (2, "parity.json: missing (converted with --no-parity?); the folder is not verified"),
    "no-checksums": (2, "SHA256SUMS: missing (no checksums to verify against)"),
    "parity-failed": (1, f"parity.json: parity FAILED ({FAILURE}) (and 1 more)"),
    "tampered": (1, "model.safetensors: sha256 does not match SHA256SUMS (changed since conversion)"),
}


def _line(code: int, folder: Path, doing: str, problem: str) -> str:
    return f"parityport: {'error: ' if code == 2 else ''}{folder}: {doing}: {problem}"


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_a_dry_run_refuses_exactly_what_the_real_run_refuses(folder, npz, tmp_path, monkeypatch, capsys, kind):
    _no_token(monkeypatch, tmp_path)
    unpublishable = _unpublishable(kind, folder, npz, tmp_path)
    capsys.readouterr()
    code, problem = REFUSALS[kind]
    expected = _line(code, unpublishable, "refusing to publish", problem)
    for options in (["--dry-run"], ["--token", "hf_test"]):
        before = {p.name: p.read_bytes() for p in unpublishable.iterdir()}
        assert main(["publish", str(unpublishable), "--repo-id", "me/tiny", *options]) == code
        captured = capsys.readouterr()
        assert captured.err.strip() == expected and captured.out == ""
        assert {p.name: p.read_bytes() for p in unpublishable.iterdir()} == before


@pytest.mark.parametrize("kind", ["no-parity", "no-checksums", "parity-failed"])
def test_verify_exits_2_for_what_a_folder_is_and_1_for_a_failed_check(folder, npz, tmp_path, capsys, kind):
    unverifiable = _unpublishable(kind, folder, npz, tmp_path)
    capsys.readouterr()
    code, problem = REFUSALS[kind]
    assert main(["verify", str(unverifiable)]) == code
    doing = "cannot be verified" if code == 2 else "verification FAILED"
    assert last_line(capsys.readouterr().err) == _line(code, unverifiable, doing, problem)


def test_a_dry_run_writes_the_card_it_would_upload(folder, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from parityport.publish import staged_files

    copy = copy_of(folder, tmp_path)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps(dict(EVAL, model=str(copy))))
    card = tmp_path / "to-upload" / "README.md"
    card.parent.mkdir()
    assert main(["publish", str(copy), "--repo-id", "me/tiny", "--dry-run", "--eval", str(eval_json),
                 "--card-out", str(card)]) == 0
    assert f"the model card to upload: {card}" in capsys.readouterr().out
    assert card.read_bytes() == staged_files(copy, [dict(EVAL, model=str(copy))], "me/tiny")["README.md"]
    assert [r.metric_value for r in ModelCard.load(card).data.eval_results] == [79.5, 94.25, 80.386]
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    inside = copy / "card.md"
    assert main(["publish", str(copy), "--repo-id", "me/tiny", "--dry-run", "--card-out", str(inside)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"parityport: error: {inside}: --card-out lies inside {copy}, which publishing must not change before "
        "the upload; give a path outside it")
    assert not inside.exists()
