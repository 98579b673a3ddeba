"""Two ranks on a CPU through torch.distributed (gloo), as torchrun would start them."""
import os

import pytest
import torch.multiprocessing as mp

from fastscore import distributed


def _rank_main(rank: int, world: int, port: int, items: list, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    r = distributed.init("cpu")
    mine = distributed.shard(items, r)
    merged = distributed.gather_to_root({"rank": r.rank, "done": [x * x for x in mine]}, r)
    distributed.barrier(r)
    if r.is_root:
        results.put(merged)
    distributed.finish(r)


def test_single_process_is_rank_zero_of_one_and_never_joins_a_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    r = distributed.init("cpu")
    assert (r.rank, r.world, r.is_root) == (0, 1, True)
    assert distributed.shard([1, 2, 3], r) == [1, 2, 3]
    assert distributed.gather_to_root("x", r) == ["x"]


def test_the_group_waits_hours_for_a_slow_rank_not_torchs_default(monkeypatch):
    # a rank that finishes its cells early waits in gather_to_root for the slowest one; torch's default
    # timeout (30 min gloo, 10 min NCCL) would end a CPU sweep whose cells take hours
    import datetime

    import torch.distributed as dist
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    r = distributed.init("cpu")
    assert (r.rank, r.world, seen["backend"]) == (1, 2, "gloo")
    assert seen["timeout"] >= datetime.timedelta(days=1)


def test_shards_cover_every_item_once():
    items = list(range(11))
    shards = [distributed.shard(items, distributed.Rank(k, 3)) for k in range(3)]
    assert sorted(x for s in shards for x in s) == items
    assert [len(s) for s in shards] == [4, 4, 3]


@pytest.mark.slow
def test_two_gloo_ranks_share_the_work_and_rank_zero_gets_everything(free_port):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    items = list(range(7))
    mp.start_processes(_rank_main, args=(2, free_port, items, results), nprocs=2, join=True,
                       start_method="spawn")
    merged = results.get(timeout=60)
    assert [m["rank"] for m in merged] == [0, 1]
    assert sorted(x for m in merged for x in m["done"]) == sorted(x * x for x in items)
    assert merged[0]["done"] == [x * x for x in items[0::2]]
