"""The meta-batch readers (metadist/data/split.py, order.py, device.py): the world-size-independent
stream (1/2/4 processes, start-at-step, workers, the device-resident reader)."""

import pytest
import torch

from metadist.data.device import ResidentBatches, meta_batches
from metadist.data.order import MetaBatches, StreamSpec
from metadist.data.prepare import shards_dir
from metadist.data.split import EpisodeSource


def _global_batch(cfg, step, world):
    src = EpisodeSource(shards_dir(cfg.data) / "train", seed=cfg.seed)
    parts = [
        MetaBatches(src, StreamSpec(cfg.seed, 8, r, world, 0, 10, task_aug=0.5)).batch_at(step)
        for r in range(world)
    ]
    return {
        k: torch.cat([p[k] for p in parts])
        for k in ("x_support", "x_query", "y_support", "y_query")
    }


@pytest.mark.parametrize("step", [0, 5, 13])  # 13 * 8 > 96 episodes: crosses into epoch 1
def test_same_global_meta_batch_for_1_2_4_processes(prepared, step):
    one = _global_batch(prepared, step, 1)
    assert one["x_support"].shape == (8, 5, 1, 28, 28) and one["x_query"].shape == (8, 5, 1, 28, 28)
    assert torch.equal(one["y_support"][0], torch.arange(5))
    for world in (2, 4):
        other = _global_batch(prepared, step, world)
        assert all(torch.equal(one[k], other[k]) for k in one)


def test_epoch_visits_every_episode_once(prepared):
    src = EpisodeSource(shards_dir(prepared.data) / "train", seed=0)
    seen = [src.locate(p) for p in range(src.size)]
    assert len(set(seen)) == src.size
    assert [src.locate(p) for p in range(src.size, 2 * src.size)] != seen  # next epoch, new order


def test_start_at_step_equals_skipping(prepared):
    d = shards_dir(prepared.data) / "train"
    full = list(meta_batches(d, StreamSpec(0, 8, 0, 1, 0, 8, task_aug=0.4)))
    late = list(meta_batches(d, StreamSpec(0, 8, 0, 1, 5, 8, task_aug=0.4)))
    assert [b["step"] for b in late] == [5, 6, 7]
    for a, b in zip(full[5:], late):
        assert torch.equal(a["x_support"], b["x_support"]) and torch.equal(
            a["x_query"], b["x_query"]
        )


def test_workers_deliver_the_same_stream(prepared):
    d = shards_dir(prepared.data) / "train"
    ref = list(meta_batches(d, StreamSpec(0, 8, 1, 2, 0, 6)))
    for workers in (1, 2):
        got = list(meta_batches(d, StreamSpec(0, 8, 1, 2, 0, 6, num_workers=workers)))
        assert [int(b["step"]) for b in got] == list(range(6))
        assert all(torch.equal(a["x_query"], b["x_query"]) for a, b in zip(ref, got))


@pytest.mark.parametrize("world", [1, 2])
def test_device_resident_split_gives_the_same_batches(prepared, world):
    """The whole train split resident on the device (here the CPU stands in for it): the same
    batches as the streaming reader, with task augmentation, across an epoch boundary, any rank."""
    src = EpisodeSource(shards_dir(prepared.data) / "train", seed=0)
    for rank in range(world):
        stream = MetaBatches(src, StreamSpec(0, 8, rank, world, 0, 14, task_aug=0.5))
        resident = ResidentBatches(
            src, StreamSpec(0, 8, rank, world, 0, 14, task_aug=0.5, device="cpu")
        )
        for a, b in zip(stream, resident):
            assert a["step"] == b["step"] and all(torch.equal(a[k], b[k]) for k in a if k != "step")


def test_the_mapped_pool_is_the_decoded_pool(prepared):
    """data.pool=mmap (the default) reads the pool shards in place: every image, every batch of
    the train stream (with task augmentation and DataLoader workers), and the val episodes equal
    those of the private decoded copy (data.pool=memory), and nothing of it is a private copy."""
    import numpy as np

    from metadist.data.split import MappedPool
    from metadist.data.store import Access

    root = shards_dir(prepared.data)
    mapped = EpisodeSource(root, "train", access=Access(pool="mmap"))
    memory = EpisodeSource(root, "train", access=Access(pool="memory"))
    assert isinstance(mapped.pool, MappedPool) and isinstance(memory.pool, np.ndarray)
    assert mapped.pool.shape == memory.pool.shape
    every = np.arange(len(memory.pool))
    assert np.array_equal(mapped.pool[every], memory.pool)
    assert not any(c.flags.owndata or c.flags.writeable for c in mapped.pool.classes)
    for workers in (0, 2):
        spec = StreamSpec(0, 8, 0, 1, 0, 14, task_aug=0.5, num_workers=workers)
        for a, b in zip(meta_batches(mapped, spec), meta_batches(memory, spec)):
            assert all(torch.equal(a[k], b[k]) for k in ("x_support", "x_query"))
    va = EpisodeSource(root, "val", access=Access(pool="mmap")).all()
    vb = EpisodeSource(root, "val", access=Access(pool="memory")).all()
    assert np.array_equal(va[:], vb[:])


def test_prefetch_keeps_order_depth_and_errors():
    """The device prefetcher (its CPU path: the same thread, queue and ordering as on CUDA):
    every batch once and in order, at most `depth` ahead of the consumer, and a failing gather is
    raised in the consumer, not lost in the thread."""
    import time

    from metadist.data.device import Prefetch

    pulled = []

    def source(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise RuntimeError(f"gather {i} failed")
            pulled.append(i)
            yield {"step": i, "x": torch.full((2,), float(i))}

    got = []
    for b in Prefetch(source(10), "cpu", depth=2):
        time.sleep(0.01)  # the consumer is slower: the thread runs ahead, but only so far
        assert len(pulled) - len(got) <= 2 + 2
        got.append(b["step"])
    assert got == list(range(10))
    with pytest.raises(RuntimeError, match="gather 3 failed"):
        for _ in Prefetch(source(10, fail_at=3), "cpu"):
            pass


def test_the_split_stays_on_the_device_when_it_fits_the_stated_fraction():
    from metadist.data.device import fits_device

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert fits_device(10, gpu, "auto", 0.25, free=40) and not fits_device(
        11, gpu, "auto", 0.25, free=40
    )
    assert not fits_device(1, cpu, "auto", 0.25) and fits_device(10**12, cpu, "on", 0.25)
    assert not fits_device(1, gpu, "off", 0.25, free=10**12)


def test_pretraining_gets_the_same_batches_from_the_split_held_on_the_device(prepared, monkeypatch):
    """Pre-training's labelled image batches (ClassBatches) from the split resident on the device
    (the CPU stands in for it; on a machine with a GPU, the GPU too): the same images and labels,
    with task augmentation, across an epoch, for each rank; its stream takes the spec's device as
    the episode stream does."""
    from metadist.algorithms.pretrain import Pretrain
    from metadist.data import device as device_mod
    from metadist.data.device import ResidentClassBatches
    from metadist.data.order import ClassBatches

    src = EpisodeSource(shards_dir(prepared.data) / "train", seed=0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for rank, device in ((r, d) for r in range(2) for d in devices):
        spec = StreamSpec(0, 4, rank, 2, 0, 30, task_aug=0.5)
        host = ClassBatches(src, spec, 10)
        held = ResidentClassBatches(
            src, StreamSpec(0, 4, rank, 2, 0, 30, task_aug=0.5, device=device), 10
        )
        assert isinstance(held.pool, torch.Tensor) and held.pool.device.type == device
        for a, b in zip(host, held):
            assert a["step"] == b["step"]
            assert all(torch.equal(a[k], b[k].cpu()) for k in a if k != "step")
    made = []
    monkeypatch.setattr(
        device_mod, "ResidentClassBatches", lambda *a: made.append(a) or ResidentClassBatches(*a)
    )
    spec = StreamSpec(0, 4, 0, 1, 0, 2, device="cpu")
    got = list(Pretrain.stream(None, src, spec))  # the algorithm's stream, as the Trainer asks it
    assert len(made) == 1 and len(got) == 2


def test_delivery_decides_residency_and_prefetch_for_every_stream(prepared):
    """The decision a GPU run takes (device="cuda" cannot run here; the free memory is given):
    one source of fixed episodes that fits is held on the device and not prefetched; one that
    does not fit, many sources, or variable episodes stream from the host through Prefetch; on a
    CPU nothing is wrapped. On a GPU: `make test` there runs these with the real device."""
    from types import SimpleNamespace

    from metadist.data.device import Delivery, Prefetch

    split = EpisodeSource(shards_dir(prepared.data) / "train", seed=0)
    nbytes, gpu = split.manifest["bytes"], torch.device("cuda")
    d = SimpleNamespace(device_cache="auto", device_cache_fraction=0.5)
    fits = Delivery(d, gpu, split, many=False, free=4 * nbytes)
    assert fits.resident == gpu and fits.wrap(iter(())) is not None
    assert not isinstance(fits.wrap(iter(())), Prefetch)
    for other in (
        Delivery(d, gpu, split, many=False, free=nbytes),  # too big for half the free memory
        Delivery(d, gpu, split, many=True, free=4 * nbytes),
        Delivery(SimpleNamespace(device_cache="off", device_cache_fraction=0.5), gpu, split, False),
    ):
        assert other.resident is None and isinstance(other.wrap(iter(())), Prefetch)
    cpu = Delivery(d, "cpu", split, many=False)
    assert cpu.resident is None and not isinstance(cpu.wrap(iter(())), Prefetch)
    on = Delivery(
        SimpleNamespace(device_cache="on", device_cache_fraction=0.5), "cpu", split, False
    )
    assert on.resident == torch.device("cpu")
