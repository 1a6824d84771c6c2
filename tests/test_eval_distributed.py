"""Sharded evaluation (gloo, CPU): 2 processes give exactly the 1-process result."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_eval import WNIDS, make_bit, make_class_folders  # noqa: E402  (tests/ is on sys.path)


def _worker(rank: int, world: int, model: str, data: str, rendezvous: str, out: str) -> None:
    from parity.eval_run import evaluate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        result = evaluate(model, data, protocol="original", device="cpu", batch_size=3, workers=0, fast=False)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one(tmp_path):
    from parity.eval_run import evaluate

    # random weights (predictions vary by image); 11 images so the shards are uneven (6 + 5)
    model = make_bit(tmp_path / "model", 1000, seed=1)
    with torch.no_grad():
        from transformers import AutoModelForImageClassification

        m = AutoModelForImageClassification.from_pretrained(model)
        torch.nn.init.normal_(m.classifier[1].weight, std=5.0)  # well-separated logits: no near ties
        m.save_pretrained(model)
    data = make_class_folders(tmp_path / "val", WNIDS, [5, 3, 3])
    single = evaluate(model, data, protocol="original", device="cpu", batch_size=4, workers=0, fast=False)
    assert len(set(single["predictions"])) > 1  # the check means something only if predictions vary

    mp.spawn(_worker, args=(2, str(model), str(data), str(tmp_path / "rdv"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        multi = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert multi["world_size"] == 2 and multi["images"] == 11
        assert multi["predictions"] == single["predictions"]
        for key in ("top1", "top5", "correct", "failures", "rescored_batches"):
            assert multi[key] == single[key], key
        assert (single["batches"], multi["batches"]) == (3, 4)  # 11 images in 4s; 6 + 5 in 3s, summed over the ranks



def _failing_worker(rank: int, world: int, model: str, data: str, rendezvous: str, out: str) -> None:
    from converters.errors import InputError
    from parity.eval_run import evaluate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        evaluate(model, data, protocol="original", device="cpu", batch_size=1, workers=0, fast=False)
        Path(out, f"rank{rank}.txt").write_text("no error")
    except InputError as error:
        Path(out, f"rank{rank}.txt").write_text(str(error))
    finally:
        dist.destroy_process_group()


def test_a_rank_that_stops_stops_every_rank_with_its_error(tmp_path):
    from test_eval import _with_head_bias

    model = _with_head_bias(tmp_path / "model", 3, float("nan"))
    data = make_class_folders(tmp_path / "val", WNIDS[:1], [2])
    readable, garbage = sorted((data / WNIDS[0]).iterdir())
    garbage.write_bytes(b"not an image")  # rank 1's only image: counted as a failure, never blamed
    mp.spawn(_failing_worker, args=(2, str(model), str(data), str(tmp_path / "rdv"), str(tmp_path)), nprocs=2, join=True)
    problem = (f"{readable}: the model's logits are inf or NaN in fp32 for this image: its weights give "
               "non-finite outputs (check the folder with `parityport parity`)")
    assert (tmp_path / "rank0.txt").read_text() == problem
    assert (tmp_path / "rank1.txt").read_text() == problem + " (found by rank 0 of 2)"


def _out_of_memory_worker(rank: int, world: int, model: str, data: str, rendezvous: str, out: str) -> None:
    from parity import eval_run

    if rank == 1:
        def out_of_memory(*args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has ...")

        eval_run._run = out_of_memory
    _failing_worker(rank, world, model, data, rendezvous, out)


def test_a_rank_out_of_memory_stops_every_rank_with_its_error(tmp_path):
    """The rank whose device ran out of memory does not vanish, leaving the others waiting in a
    collective: every rank stops with its error."""
    model = make_bit(tmp_path / "model", 3, seed=1)
    data = make_class_folders(tmp_path / "val", WNIDS[:2], [2, 2])
    mp.spawn(_out_of_memory_worker, args=(2, str(model), str(data), str(tmp_path / "rdv"), str(tmp_path)), nprocs=2,
             join=True)
    problem = "cpu ran out of memory at --batch-size 1; give a smaller one (CUDA out of memory. Tried to allocate 2.00 GiB)"
    assert (tmp_path / "rank1.txt").read_text() == problem
    assert (tmp_path / "rank0.txt").read_text() == problem + " (found by rank 1 of 2)"


def test_each_rank_takes_its_own_gpu(monkeypatch):
    import pytest

    from converters.errors import InputError
    from parity import eval_run

    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert eval_run._rank_device(torch.device("cuda"), 1, 2) == torch.device("cuda", 1) == current[0]
    assert eval_run._rank_device(torch.device("cpu"), 1, 2) == torch.device("cpu")
    assert eval_run._rank_device(torch.device("cuda", 1), 0, 1) == torch.device("cuda", 1)  # one process: as asked
    with pytest.raises(InputError, match=r"^--device cuda:0 would put all 2 ranks on one GPU; give --device cuda "
                                         r"and each rank takes the GPU of its LOCAL_RANK$"):
        eval_run._rank_device(torch.device("cuda", 0), 1, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(InputError, match=r"^3 ranks on a machine with 2 GPUs; start at most one process per GPU "):
        eval_run._rank_device(torch.device("cuda"), 1, 3)
    assert current == [torch.device("cuda", 1)]
