"""The distributed helpers: batch shards, batching checks, mask digests, and the collectives on two gloo processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from prunelab.errors import UserError
from prunelab.training.distributed import SINGLE, RanksDisagree, World, masks_digest

pytestmark = pytest.mark.integration  # gloo process groups in spawned processes


def test_a_single_process_world_changes_nothing() -> None:
    x, y = torch.randn(5, 3), torch.arange(5)
    xs, ys, scale = SINGLE.shard(x, y)
    assert xs is x and ys is y and scale == 1.0
    assert SINGLE.share({"a": 1}) == {"a": 1} and SINGLE.gather_digests("ab" * 32) == ["ab" * 32]
    model = torch.nn.Linear(3, 2)
    assert SINGLE.wrap(model) is model
    SINGLE.check_batching(1001, 7)


@pytest.mark.parametrize("n", [12, 10, 7])
def test_shards_cover_the_batch_and_scaled_losses_average_to_the_global_mean(n: int) -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(n, 4), torch.randint(0, 4, (n,))
    size = 3
    shards = [World(rank=r, size=size).shard(logits, labels) for r in range(size)]
    assert torch.equal(torch.cat([s[0] for s in shards]), logits)
    assert max(len(s[1]) for s in shards) - min(len(s[1]) for s in shards) <= 1
    # DDP averages the ranks' gradients, so the ranks' scaled mean losses must average to the global mean.
    average = sum(F.cross_entropy(x, y) * scale for x, y, scale in shards) / size
    assert torch.allclose(average, F.cross_entropy(logits, labels))
    assert all(scale == 1.0 for *_, scale in shards) == (n % size == 0)


def test_batching_that_cannot_be_shared_is_one_sentence() -> None:
    world = World(rank=0, size=2)
    world.check_batching(1000, 64)  # last batch 40: 20 per process
    with pytest.raises(UserError, match="must be divisible by the number of processes"):
        world.check_batching(1000, 63)
    with pytest.raises(UserError, match="fewer than the 2 processes"):
        world.check_batching(1025, 64)  # last batch of 1


def test_mask_digest_ignores_layout_and_sees_one_flipped_weight() -> None:
    masks = {"conv.weight": torch.rand(4, 3, 5, 5) > 0.5, "fc.weight": torch.rand(10, 7) > 0.5}
    laid_out = {**masks, "conv.weight": masks["conv.weight"].contiguous(memory_format=torch.channels_last)}
    assert masks_digest(laid_out) == masks_digest(masks)
    flipped = {**masks, "fc.weight": masks["fc.weight"].clone()}
    flipped["fc.weight"][3, 2] = ~flipped["fc.weight"][3, 2]
    assert masks_digest(flipped) != masks_digest(masks)


def _collectives(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        world = World(rank=rank, size=2)
        assert world.share({"from": rank, "x": [1.5]} if rank == 0 else None) == {"from": 0, "x": [1.5]}
        assert world.sum(torch.tensor([1.0, float(rank)])).tolist() == [2.0, 1.0]
        same = masks_digest({"w": torch.ones(3, dtype=torch.bool)})
        assert world.agree(same, "the masks") == [same, same]
        mine = masks_digest({"w": torch.tensor([True, rank == 0, True])})
        with pytest.raises(RanksDisagree, match="the processes disagree on the masks"):
            world.agree(mine, "the masks")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_share_sum_and_catch_disagreeing_masks(tmp_path: Path) -> None:
    mp.spawn(_collectives, args=(str(tmp_path / "init"),), nprocs=2)
