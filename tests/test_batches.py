"""Batches decoded into reused buffers (facecluster.data.batches): the same batches as
DataLoader's per-item path, never overwritten while a consumer holds them."""

from __future__ import annotations

import gc
import io
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from facecluster.data import BadImageError, FaceDataModule, FaceImageDataset, build_transforms
from facecluster.data.batches import BatchBuffers
from facecluster.data.datamodule import collated

DEMO_ROOT = Path(__file__).resolve().parents[1] / "datasets" / "lfw-demo" / "images"
SIZE = 112


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[tuple[str, int]]:
    """22 faces of 3 identities: real JPEGs, one PNG, one JPEG at another size (resized
    by the loader) and one broken file (replaced under skip)."""
    root = tmp_path_factory.mktemp("faces")
    people = sorted(p for p in DEMO_ROOT.iterdir() if p.is_dir())[:3]
    out = []
    for label, person in enumerate(people):
        for k, jpeg in enumerate(sorted(person.glob("*.jpg"))[:7]):
            target = root / f"{label}_{k}.jpg"
            shutil.copyfile(jpeg, target)
            out.append((str(target), label))
    first = Image.open(out[0][0])
    first.save(root / "png.png")
    buffer = io.BytesIO()
    first.resize((90, 90)).save(buffer, format="JPEG")
    (root / "small.jpg").write_bytes(buffer.getvalue())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return (
        out
        + [(str(root / "png.png"), 0), (str(root / "small.jpg"), 1)]
        + [(str(root / "broken.jpg"), 2)]
    )


def _dataset(samples, train: bool, buffers: bool, workers: int, batch: int) -> FaceImageDataset:
    ds = FaceImageDataset(
        samples,
        build_transforms(SIZE, train=train),
        label_map=torch.tensor([2, 0, 1]),
        max_bad_fraction=0.5,
    )
    if buffers:
        ds.buffers = BatchBuffers(3, (batch, SIZE, SIZE, 3), shared=workers > 0)
    return ds


def _epochs(ds, workers: int, batch: int, sampler=None, epochs: int = 2) -> list:
    torch.manual_seed(7)
    kwargs = {"collate_fn": collated} if ds.buffers is not None else {}
    loader = DataLoader(
        ds,
        batch_size=batch,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        **kwargs,
    )
    return [b for _ in range(epochs) for b in loader]  # every batch kept


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("train", [True, False])
def test_batches_equal_the_per_item_path_and_held_batches_stay_intact(samples, workers, train):
    """Pixels, labels and mirror draws equal DataLoader's default per-item path (JPEGs,
    a PNG, a resized JPEG, a broken file's substitute), with every batch of two epochs
    held at once: with 3 slots, later batches go to fresh memory, never over a held one."""
    expected = _epochs(_dataset(samples, train, False, workers, 4), workers, 4)
    got = _epochs(_dataset(samples, train, True, workers, 4), workers, 4)
    assert len(got) == len(expected) == 12
    for e, g in zip(expected, got, strict=True):
        assert len(g) == len(e) == (3 if train else 2)
        for a, b in zip(e, g, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    if train:
        mirrors = torch.cat([b[2] for b in got])
        assert 0 < int(mirrors.sum()) < len(mirrors)


def test_mirrors_drawn_by_a_sampler_are_kept(samples):
    """Stage 2's sampler draws the mirror with the index, ``(index, mirror)``."""
    order = [(i, i % 3 == 0) for i in range(len(samples))]
    expected = _epochs(_dataset(samples, True, False, 0, 5), 0, 5, sampler=order, epochs=1)
    got = _epochs(_dataset(samples, True, True, 0, 5), 0, 5, sampler=order, epochs=1)
    for e, g in zip(expected, got, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(e, g, strict=True))
    assert torch.cat([b[2] for b in got]).tolist() == [m for _, m in order]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_datamodules_loaders_decode_into_reused_slots(workers):
    """Batches dropped after use leave their slot free: every batch of an epoch, from
    the main process or from worker processes, lies in the loader's own buffers."""
    dm = FaceDataModule(str(DEMO_ROOT), batch_size=8, max_classes=6, seed=3, num_workers=workers)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        if workers and sys.platform == "linux":  # forked whatever Python's default
            assert loader.multiprocessing_context.get_start_method() == "fork"
        buffers = loader.dataset.buffers
        start = buffers.images.data_ptr()
        end = start + buffers.images.numel()
        count = 0
        for images, *_ in loader:
            assert start <= images.data_ptr() < end
            count += 1
        del images
        assert count > 2 and buffers.in_use() == 0


def _steps(workers: int) -> tuple[list, list]:
    dm = FaceDataModule(str(DEMO_ROOT), batch_size=4, max_classes=6, seed=3, num_workers=workers)
    dm.connect_clusters([torch.tensor([0, 1, 2]), torch.tensor([3, 4]), torch.tensor([5])])
    loader = dm.train_dataloader()
    if workers:  # a step is a batch of every sub-net: one prepared ahead per worker
        assert loader.prefetch_factor == 1
        assert all(d.buffers.owner.numel() == workers + 4 for d in loader.dataset.datasets.values())
    inside = []
    steps = []
    for step in loader:
        for k, (images, *_) in step.items():
            buffers = loader.dataset.datasets[k].buffers
            start = buffers.images.data_ptr()
            inside.append(start <= images.data_ptr() < start + buffers.images.numel())
        steps.append({k: [t.clone() for t in batch] for k, batch in step.items()})
    return steps, inside


def test_stage2_steps_from_one_worker_pool_equal_the_steps_without_workers():
    """Stage 2's one loader of steps, through 2 worker processes (not 2 per sub-net):
    every sub-net's batch lies in its own reused slots and equals the batch decoded in
    the main process, pixels, local labels and mirrors."""
    expected, _ = _steps(0)
    got, inside = _steps(2)
    assert len(got) == len(expected) > 1 and all(inside)
    for e, g in zip(expected, got, strict=True):
        assert set(g) == set(e) == {0, 1, 2}
        for k in e:
            assert all(torch.equal(a, b) for a, b in zip(e[k], g[k], strict=True))


def test_device_decode_loaders_ship_bytes_not_buffers():
    dm = FaceDataModule(str(DEMO_ROOT), batch_size=8, max_classes=6, seed=3, decode="device")
    assert dm.train_dataloader().dataset.buffers is None


def _claim_and_exit(buffers: BatchBuffers) -> None:
    buffers.claim(2)


def test_a_slot_claimed_by_an_exited_worker_is_claimed_again():
    """A worker shut down before the main process read its batch leaves its slot claimed;
    once that process is gone the slot is free. A live process's claim is kept."""
    buffers = BatchBuffers(2, (2, 4, 4, 3), shared=True)
    worker = multiprocessing.get_context("fork").Process(target=_claim_and_exit, args=(buffers,))
    worker.start()
    worker.join()
    assert buffers.owner.tolist() == [worker.pid, 0]
    slots = [buffers.claim(2)[0], buffers.claim(2)[0]]
    assert sorted(slots) == [0, 1]
    slot, fresh = buffers.claim(2)  # all claimed by this live process: fresh memory
    assert slot is None and fresh.shape == (2, 4, 4, 3)
    slot, too_big = BatchBuffers(1, (2, 4, 4, 3), shared=False).claim(3)
    assert slot is None and too_big.shape == (3, 4, 4, 3)


def test_a_delivered_batch_frees_its_slot_when_its_last_view_is_gone():
    buffers = BatchBuffers(1, (2, 4, 4, 3), shared=False)
    slot, images = buffers.claim(2)
    images[...] = 5
    batch = buffers.batch(slot, images, torch.tensor([1, 2]))
    view = batch[0][1:]  # a view keeps the slot
    del batch, images
    assert buffers.in_use() == 1 and buffers.claim(1)[0] is None
    assert int(view.sum()) == 5 * view.numel()
    del view
    assert buffers.in_use() == 0 and buffers.claim(1)[0] == 0
    with pytest.raises(ValueError, match="slots must be >= 1"):
        BatchBuffers(0, (1, 4, 4, 3), shared=False)


def test_a_batch_left_in_a_reference_cycle_is_not_freed_by_a_forked_worker():
    """A worker forked while a delivered batch was unreachable garbage inherits it; its
    collection must not free the slot the main process has delivered again since."""
    buffers = BatchBuffers(1, (2, 4, 4, 3), shared=True)
    # other garbage first (an earlier test's progress bars): the child's collection must
    # find only this test's cycle, not finalizers that wait on a lock another thread of
    # this process (tqdm's monitor) held at the fork
    gc.collect()
    gc.disable()
    try:
        slot, images = buffers.claim(2)
        cycle = [buffers.batch(slot, images)]
        cycle.append(cycle)
        del cycle, images
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the worker: collect once the parent has delivered the slot again
            os.read(read, 1)
            gc.collect()
            os._exit(0)
        gc.collect()
        slot, images = buffers.claim(2)
        live = buffers.batch(slot, images)
        os.write(write, b"x")
        os.waitpid(child, 0)
    finally:
        gc.enable()
    assert buffers.owner.tolist() == [-1] and buffers.claim(2)[0] is None
    del live


def test_without_a_free_slot_a_workers_batch_is_shared_memory_sent_as_it_is(monkeypatch):
    """No slot free: the batch goes to fresh shared memory, which pickling to the main
    process sends as it is, as DataLoader's own batches (no second copy)."""
    import facecluster.data.batches as batches

    monkeypatch.setattr(batches, "get_worker_info", lambda: object())  # as in a worker
    buffers = BatchBuffers(1, (2, 4, 4, 3), shared=True)
    buffers.owner[0] = os.getpid()  # the one slot is claimed
    slot, images = buffers.claim(2)
    images[...] = 7
    batch = buffers.batch(slot, images, torch.tensor([0, 1]))
    assert slot is None and batch[0].untyped_storage().is_shared()
    assert batch[0].data_ptr() == images.ctypes.data and int(batch[0].sum()) == 7 * 96


def test_an_error_gives_the_claimed_slot_back(samples):
    """data.on_bad_image=fail stops at the broken file; the slot its batch claimed is free."""
    ds = FaceImageDataset(samples, build_transforms(SIZE, train=True), on_bad_image="fail")
    ds.buffers = BatchBuffers(2, (len(samples), SIZE, SIZE, 3), shared=False)
    with pytest.raises(BadImageError, match="broken.jpg"):
        ds.__getitems__(list(range(len(samples))))
    assert ds.buffers.in_use() == 0


def test_a_batch_whose_slot_was_claimed_again_is_refused():
    """A worker died after queuing its batch, and another claimed the slot: refused,
    never delivered over the other batch."""
    buffers = BatchBuffers(1, (2, 4, 4, 3), shared=True)
    slot, images = buffers.claim(2)
    buffers.owner[slot] = 1  # as if another process had claimed it since
    with pytest.raises(RuntimeError, match="claimed again"):
        buffers.batch(slot, images, torch.tensor([0, 1]))


def test_a_batch_reads_each_file_once_when_it_is_resized(samples, monkeypatch):
    # the default demo trains at 64 px from 112 px files: the in-place decode declines
    # them, and the fallback decodes the bytes already read instead of reading again
    samples = samples[:-1]  # not the broken file: its substitute is another read
    ds = FaceImageDataset(samples, build_transforms(64, train=False))
    ds.buffers = BatchBuffers(1, (len(samples), 64, 64, 3), shared=False)
    reads = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: reads.append(p) or read_bytes(p))
    images, _ = ds.__getitems__(list(range(len(samples))))
    assert len(reads) == len(samples) and len(set(reads)) == len(samples)
    assert torch.equal(images, torch.stack([ds[i][0] for i in range(len(samples))]))


def test_a_loader_left_unfinished_in_a_returning_function_stops_its_workers():
    """A function that builds the data module and reads part of an epoch (a benchmark,
    a notebook's look at a few batches) leaves no worker process behind when it returns:
    Lightning's own frame lookup in save_hyperparameters kept the constructor's callers'
    frames, their loaders and workers, until the next garbage collection (the bench's
    forked decoders then ran those loaders' shutdown and printed AssertionErrors)."""

    def peek() -> None:
        dm = FaceDataModule(str(DEMO_ROOT), batch_size=8, max_classes=6, seed=3, num_workers=1)
        it = iter(dm.train_dataloader())
        next(it)

    gc.collect()
    gc.disable()  # what the cyclic collector would free later does not count
    try:
        before = len(multiprocessing.active_children())
        peek()
        assert len(multiprocessing.active_children()) == before
    finally:
        gc.enable()
