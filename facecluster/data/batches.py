"""Reused batch buffers: a loader decodes straight into memory that is already mapped.

A DataLoader worker normally builds each batch in a fresh shared-memory segment and
sends the main process its file descriptor; the main process maps it, and both unmap
it once the batch is used. Creating, faulting in and mapping 4.8 MB for every batch of
128 112x112 faces cost 50-90 us per image here (bench/data_throughput.py, DATA.md),
as much as decoding it. Even in one process, decoding into fresh memory, then
stacking, was a quarter slower than decoding into a buffer that was written before.

:class:`BatchBuffers` holds a few batch-sized slots, allocated once per loader (in
shared memory when the loader has workers, before they start, so every worker sees
the same pages). :meth:`FaceImageDataset.__getitems__
<facecluster.data.datamodule.FaceImageDataset.__getitems__>` claims a free slot,
decodes each image into it, and hands back the batch; from a worker only the slot's
number and the labels travel, pickled (:class:`PooledBatch`), and the main process
turns them back into a tensor over its own mapping of the slot.

When is a slot free again? When nothing in the main process uses the batch any more:
the delivered tensor is built on a numpy view of the slot, and a finalizer on that
view marks the slot free when the last tensor sharing its memory is gone (a copy to
the GPU or to pinned memory, the normalised network input: none of them hold it).
A batch that a consumer keeps keeps its slot; a slot claimed by a worker that was shut
down before its batch was read is taken back once that process has exited. No slot
free: the batch is built in fresh memory (shared, in a worker), as DataLoader does,
so running out costs speed, never correctness.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
import weakref

import numpy as np
import torch
from torch.utils.data import get_worker_info

from facecluster.io import pid_alive

__all__ = ["BatchBuffers", "PooledBatch"]

_FREE, _DELIVERED = 0, -1  # a slot's owner: free, in use in the main process, or a pid

_REGISTRY: weakref.WeakValueDictionary[str, BatchBuffers] = weakref.WeakValueDictionary()


def _release(owner: np.ndarray, slot: int, pid: int) -> None:
    # Only in the process that delivered the batch: a worker forked while the batch was
    # unreachable garbage (a reference cycle) inherits it, and its own collection would
    # otherwise free a slot the main process has since delivered again.
    if os.getpid() == pid and owner[slot] == _DELIVERED:
        owner[slot] = _FREE


def _fresh(shape: tuple[int, ...]) -> torch.Tensor:
    """A new batch; in a worker, in shared memory, where DataLoader would put it, so
    that sending it copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class _NoLock:
    """The lock of buffers no other process claims from."""

    def acquire(self, timeout: float) -> bool:
        return True

    def release(self) -> None:
        pass


class BatchBuffers:
    """``slots`` reusable ``uint8[batch, size, size, 3]`` batches of one loader.

    Args:
        slots: How many batches may be in flight at once (queued in workers, being
            transferred, held by the consumer) before new ones go to fresh memory.
        shape: ``(batch, height, width, 3)``, the largest batch served.
        shared: In shared memory, for a loader with worker processes; create the
            buffers before the workers start.
    """

    def __init__(self, slots: int, shape: tuple[int, ...], shared: bool) -> None:
        if slots < 1:
            raise ValueError(f"BatchBuffers: slots must be >= 1, got {slots}")
        self.shape = tuple(shape)
        nbytes = slots * int(np.prod(self.shape))
        if shared:
            # _new_shared maps the segment without writing it: pages are faulted in by
            # the first batch that uses a slot, not here (share_memory_() would copy)
            storage = torch.UntypedStorage._new_shared(nbytes)
            self.images = torch.empty(0, dtype=torch.uint8).set_(storage)
            self.owner = torch.zeros(slots, dtype=torch.int64).share_memory_()
            # a spawn-context lock: forked workers inherit it, spawned or forkserver
            # ones receive it pickled (a fork-context lock refuses that)
            self._lock = multiprocessing.get_context("spawn").Lock()
        else:
            self.images = torch.empty(nbytes, dtype=torch.uint8)
            self.owner = torch.zeros(slots, dtype=torch.int64)
            self._lock = _NoLock()
        self.images = self.images.view(slots, *self.shape)
        self.key = uuid.uuid4().hex
        self._fresh: torch.Tensor | None = None  # the batch claim() made without a slot
        _REGISTRY[self.key] = self
        self._views()

    def _views(self) -> None:
        # numpy views: indexing them is many times faster than indexing tensors
        self._images_np = self.images.numpy()
        self._owner_np = self.owner.numpy()

    def __getstate__(self) -> dict:
        # spawned workers: the tensors travel as shared memory, the lock as a lock
        state = {k: v for k, v in self.__dict__.items() if not k.endswith("_np")}
        return {**state, "_fresh": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._views()

    def in_use(self) -> int:
        """Slots not free now (claimed by a worker or held in the main process)."""
        return int((self._owner_np != _FREE).sum())

    def claim(self, n: int) -> tuple[int | None, np.ndarray]:
        """A slot for a batch of ``n`` and its ``uint8[n, ...]`` array to fill; ``(None,
        fresh array)`` when every slot is in use or ``n`` is larger than a slot."""
        # a worker killed while holding the lock must not stall the others: after a
        # second without it, this batch goes to fresh memory
        if n <= self.shape[0] and self._lock.acquire(timeout=1.0):
            try:
                pid = os.getpid()
                for slot, owner in enumerate(self._owner_np.tolist()):
                    # a pid other than ours: claimed by a worker; one that has exited
                    # was shut down before the main process read that batch
                    if owner == _FREE or (owner > 0 and owner != pid and not pid_alive(owner)):
                        self._owner_np[slot] = pid
                        return slot, self._images_np[slot, :n]
            finally:
                self._lock.release()
        # batch() sends this tensor: a tensor made again from the array would not know
        # its memory is shared, and pickling it would copy the batch into a new segment
        self._fresh = _fresh((n, *self.shape[1:]))
        return None, self._fresh.numpy()

    def release(self, slot: int | None) -> None:
        """Give back a claimed slot whose batch will not be delivered (an error)."""
        self._fresh = None
        if slot is not None and self._owner_np[slot] == os.getpid():
            self._owner_np[slot] = _FREE

    def batch(self, slot: int | None, images: np.ndarray, *rest: torch.Tensor):
        """The batch ``(images, *rest)`` as the DataLoader should pass it on.

        In the process that made the buffers: the tuple, the images a tensor over the
        slot. In a worker: a :class:`PooledBatch`, which pickles to the slot's number
        and becomes that tuple in the main process.
        """
        if slot is None:
            fresh, self._fresh = self._fresh, None
            return (fresh if fresh is not None else torch.from_numpy(images), *rest)
        if get_worker_info() is not None:
            return PooledBatch(self.key, slot, os.getpid(), len(images), rest)
        return self._deliver(slot, os.getpid(), len(images), rest)

    def _deliver(self, slot: int, claimer: int, n: int, rest) -> tuple:
        # under the claim lock: a worker taking back a dead worker's slot in claim()
        # cannot slip between the check and the mark (a second at most, as in claim)
        locked = self._lock.acquire(timeout=1.0)
        try:
            owner = int(self._owner_np[slot])
            if owner == claimer:
                self._owner_np[slot] = _DELIVERED
        finally:
            if locked:
                self._lock.release()
        if owner != claimer:
            # only if the worker died after queuing the batch and another took the slot
            raise RuntimeError(
                f"batch slot {slot} was claimed again (by process {owner}) before the "
                f"batch process {claimer} built in it was read; that worker must have died"
            )
        view = self._images_np[slot, :n]  # a new view object: its finalizer is this batch's
        # not at interpreter exit: a forked child exiting must not free the parent's slots
        weakref.finalize(view, _release, self._owner_np, slot, os.getpid()).atexit = False
        return (torch.from_numpy(view), *rest)


class PooledBatch:
    """A batch built in a worker in a slot of :class:`BatchBuffers`: it pickles to the
    slot's number and the small tensors, and unpickles as the batch tuple."""

    def __init__(
        self, key: str, slot: int, claimer: int, n: int, rest: tuple[torch.Tensor, ...]
    ) -> None:
        self.key, self.slot, self.claimer, self.n, self.rest = key, slot, claimer, n, rest

    def __reduce__(self):
        # numpy arrays pickle as bytes; tensors would each take a shared-memory segment
        rest = tuple(t.numpy() for t in self.rest)
        return _receive, (self.key, self.slot, self.claimer, self.n, rest)


def _receive(key: str, slot: int, claimer: int, n: int, rest: tuple[np.ndarray, ...]) -> tuple:
    buffers = _REGISTRY.get(key)
    if buffers is None:
        raise RuntimeError(
            "a DataLoader batch arrived after its loader's batch buffers were released"
        )
    return buffers._deliver(slot, claimer, n, tuple(torch.from_numpy(a) for a in rest))
