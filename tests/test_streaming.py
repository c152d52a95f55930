"""partkit.streaming: the seeded shuffle buffer, the split of positions over ranks and workers, seeking."""
import random

import numpy as np
import pytest
import torch

from partkit.errors import BadSample, PartkitError, SkipBad
from partkit.streaming import SampleStream, StreamLoader, default_workers, packed_bytes, run_length, shuffled
from conftest import write_shard


def _shards(tmp_path, sizes=(1, 2, 4)):
    return [write_shard(tmp_path / f"s{i}.tar", [{"__key__": f"k{i}_{j}", "txt": f"{i} {j}"} for j in range(n)])
            for i, n in enumerate(sizes)]


def key(sample):
    return sample["__key__"]


def test_shuffle_buffer_is_a_seeded_permutation_that_holds_at_most_buffer_items():
    pulled = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield i

    out = []
    for item in shuffled(source(), 10, random.Random(3)):
        assert len(pulled) - len(out) <= 10 + 1  # held: the buffer, and the item being handed out
        out.append(item)
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert out == list(shuffled(iter(range(100)), 10, random.Random(3)))
    assert out != list(shuffled(iter(range(100)), 10, random.Random(4)))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_rank_gets_its_share_of_each_epoch_even_without_a_shard(tmp_path, world):
    urls = _shards(tmp_path)  # 3 shards of 1, 2, 4 samples; 4 ranks > 3 shards
    per_rank = []
    for rank in range(world):
        stream = SampleStream(urls, key, seed=5, buffer=3, rank=rank, world=world, per_epoch=7)
        items = stream.items()
        per_rank.append([next(items)[1] for _ in range(2 * 7 // world)])  # the first two epochs' share
    epoch0 = [key(s) for s in stream.epoch(0)]
    epoch1 = [key(s) for s in stream.epoch(1)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # each epoch: every sample once, a new order
    both = epoch0 + epoch1
    for rank, got in enumerate(per_rank):
        assert got == both[rank::world][:len(got)]  # position g belongs to rank g % world
    assert all(per_rank)  # no rank is left without samples


def test_workers_and_seeking_give_the_straight_sequence(tmp_path):
    urls = _shards(tmp_path)
    straight = SampleStream(urls, key, seed=1, buffer=4, rank=1, world=2, per_epoch=7).items()
    expect = [next(straight)[1] for _ in range(12)]
    # runs of 3 items per worker message (4 MB items) or 24 (small items): the same sequence
    for workers, item_bytes in ((0, 0), (2, 4 << 20), (2, 10)):
        loader = StreamLoader(SampleStream(urls, key, seed=1, buffer=4, rank=1, world=2), batch=3, workers=workers,
                              item_bytes=item_bytes)
        assert loader.run == (3 if item_bytes > 1 << 20 else 24)
        loader.seek(0)
        assert loader.next_batch() + loader.next_batch() == expect[:6]
        assert loader.position == 6
        loader.seek(5)  # a resume: the stream restarts at this rank's item 5
        assert loader.next_batch() + loader.next_batch() == expect[5:11]
        loader.close()
    known = StreamLoader(SampleStream(urls, key, seed=1, buffer=4, rank=1, world=2, per_epoch=7), batch=3)
    known.seek(8)  # with the epoch size known, whole epochs are skipped unread
    assert known.next_batch() == expect[8:11]


def test_worker_messages_hold_whole_batches_up_to_the_run_bytes():
    assert run_length(8, 200_000) == 40  # 1.6 MB batches: 5 fill 8 MB
    assert run_length(8, 0) == run_length(8, 1) == 64  # small items: at most 8 batches
    assert run_length(8, 100 << 20) == 8  # one batch even when it is larger than the bound
    assert packed_bytes(("k", np.zeros(10, np.float32), torch.zeros(3, dtype=torch.float16))) == 64 + 64


def test_workers_default_to_none_on_cpu_and_two_on_cuda():
    assert default_workers(None, torch.device("cpu")) == 0 and default_workers(None, "cpu") == 0
    assert default_workers(None, torch.device("cuda", 1)) == 2 and default_workers(None, "cuda") == 2
    assert default_workers(3, "cpu") == 3 and default_workers(0, "cuda") == 0  # as given


def test_bad_items_go_to_the_handler_and_still_count(tmp_path):
    urls = _shards(tmp_path, sizes=(3,))

    def load(sample):
        if sample["__key__"] == "k0_1":
            raise BadSample("k0_1", "broken")
        return key(sample)

    skip = SkipBad()
    loader = StreamLoader(SampleStream(urls, load, seed=0, buffer=1, shuffle_shards=False), batch=2, handler=skip)
    assert loader.next_batch() == ["k0_0", "k0_2"] and loader.position == 3
    assert skip.records == [{"key": "k0_1", "reason": "broken"}]
    with pytest.raises(BadSample, match="broken"):
        StreamLoader(SampleStream(urls, load, seed=0, buffer=1, shuffle_shards=False), batch=2).next_batch()


def test_stdin_and_empty_inputs_are_refused(tmp_path):
    with pytest.raises(PartkitError, match="stdin"):
        SampleStream(["-"], key)
    empty = write_shard(tmp_path / "empty.tar", [])
    with pytest.raises(PartkitError, match="no usable samples"):
        StreamLoader(SampleStream([empty], key), batch=1).next_batch()


def test_workers_pass_bad_items_errors_and_arrays_through_packed_runs(tmp_path):
    """With loader workers, items travel in packed runs: bad items still reach the handler in stream order,
    an error ends the stream with its message, and arrays / tensors come back equal (writable views)."""
    import numpy as np
    import torch

    urls = _shards(tmp_path, sizes=(5,))

    def load(sample):
        k = sample["__key__"]
        if k == "k0_2":
            raise BadSample(k, "broken")
        if k == "k0_4":
            raise PartkitError("the fifth sample is unreadable")
        i = int(k[-1])
        return k, np.full((2, 3), i, np.int32), torch.full((4,), float(i), dtype=torch.float16)

    skip = SkipBad()
    loader = StreamLoader(SampleStream(urls, load, seed=0, buffer=1, shuffle_shards=False), batch=2, workers=2,
                          handler=skip)
    got = loader.next_batch() + [loader.next_item()]
    assert [g[0] for g in got] == ["k0_0", "k0_1", "k0_3"] and skip.records == [{"key": "k0_2", "reason": "broken"}]
    for key, arr, t in got:
        i = int(key[-1])
        assert arr.dtype == np.int32 and (arr == i).all() and arr.flags.writeable
        assert t.dtype == torch.float16 and torch.equal(t, torch.full((4,), float(i), dtype=torch.float16))
    with pytest.raises(PartkitError, match="fifth sample is unreadable"):
        loader.next_item()
    loader.close()
