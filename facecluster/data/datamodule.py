"""Lightning data module for the two-stage clustered face identification pipeline.

Data flow:

1. ``setup()`` scans ``root`` once (:func:`~facecluster.data.folder.scan`: an image
   folder, or an InsightFace ``.rec`` file, see :mod:`facecluster.data.recordio`)
   and splits every identity's images into train/val/test
   (:func:`~facecluster.data.folder.split_per_identity`). Labels are *global*
   identity indices ``0..C-1``.
2. Stage 1 (backbone on all identities): :meth:`FaceDataModule.train_dataloader`
   serves the whole train split with global labels.
3. Class means: :meth:`FaceDataModule.embedding_dataloader` serves the train
   split with evaluation transforms and no shuffle, optionally sharded by rank,
   so per-class embedding sums can be reduced across processes exactly.
4. The clustering step (k-means on class means, outside this package) hands
   its result to :meth:`FaceDataModule.connect_clusters` -- the only way cluster
   information enters the data module.
5. Stage 2 (one sub-net per cluster): :meth:`FaceDataModule.train_dataloader`
   now returns one loader whose every batch is a step of all the job's sub-nets,
   ``{k: batch_k}`` (:class:`SubnetSteps`, :class:`SubnetStepSampler`): cluster
   ``k``'s train images with labels remapped to the identity's *local* index
   inside the cluster. One pool of ``num_workers`` workers serves them all.
6. Validation and test always use global labels; mapping a global label to
   ``(cluster, local)`` is the model's job, which keeps evaluation identical
   across both stages.

This package must not import ``facecluster.models`` or ``facecluster.clustering``:
the data side only knows each cluster's identities, passed to ``connect_clusters``.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from facecluster.data.batches import BatchBuffers
from facecluster.data.folder import (
    SPLIT_NAMES,
    FaceFolder,
    Samples,
    scan,
    split_data,
    validate_fractions,
)
from facecluster.data.images import (
    BAD_IMAGE_POLICIES,
    DECODE_ERRORS,
    IGNORED,
    BadImageError,
    BadImageTracker,
    EncodedImages,
    decode_image,
    decode_jpeg_into,
    decode_on_device,
    device_decodable,
)
from facecluster.data.recordio import RecordError, RecordFile
from facecluster.data.transforms import FaceTransform, build_transforms, normalize_images
from facecluster.io import shown_list, signals_held

__all__ = [
    "EvalShardSampler",
    "FaceImageDataset",
    "FaceDataModule",
    "SubnetSampler",
    "SubnetStepSampler",
    "SubnetSteps",
    "subnet_seed",
]

SUBNET_EPOCH_SIZES = ("largest", "mean")
DECODE_PLACES = ("cpu", "device")

logger = logging.getLogger(__name__)


class ClusterLabels:
    """Global labels -> a cluster's labels: the position among its members (sorted
    global ids), every other identity ``len(members)`` (the "not mine" class of
    ``subnet_negatives``). Indexed like the dense ``[C]`` map it replaces, by a label or
    an array of them; it holds the members alone, where each sub-net's dense map was
    C int64s in every training process (K=64 at 2M identities: 1 GiB, computed)."""

    def __init__(self, members: np.ndarray) -> None:
        self.members = np.asarray(members, dtype=np.int64)

    def __getitem__(self, labels: int | np.ndarray) -> np.ndarray:
        at = np.searchsorted(self.members, labels)
        found = self.members[np.minimum(at, len(self.members) - 1)] == labels
        return np.where(found, at, len(self.members))


class FaceImageDataset(Dataset):
    """Images from a list of ``(path, global_label)`` pairs.

    Args:
        samples: ``(image path, global label)`` pairs.
        transform: The split's :class:`~facecluster.data.transforms.FaceTransform`.
        label_map: Optional ``LongTensor[C]`` or :class:`ClusterLabels`; when given,
            the returned label is ``label_map[global_label]`` (cluster-local labels).
        on_bad_image: ``"skip"``: an undecodable image is replaced by the next readable
            image of the same identity in ``samples`` (see :mod:`facecluster.data.images`);
            ``"fail"``: raise :class:`BadImageError` naming the file.
        tracker: Shared broken-file flags (the datamodule's); None: a private one.
        sample_ids: Index of each sample in ``tracker.paths`` (None: ``0..len-1``).
        split_ids: Tracker indices of the whole split these samples come from; the
            ``max_bad_fraction`` limit counts broken files over it (None: ``sample_ids``).
        max_bad_fraction: Stop (``BadImageError``) once more than this fraction of the
            split is known to be broken.
        split_name: Names the split in error messages.
        records: The RecordIO file the samples' ``<file>#<key>`` locators point into;
            None: the locators are image file paths.
        encoded: ``data.decode=device`` (training datasets): a JPEG the device can decode
            (:func:`~facecluster.data.images.device_decodable`) is returned as its bytes,
            and items carry their index, ``(bytes or image, label, mirror, index)``, for
            :func:`collate_encoded`.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: FaceTransform,
        label_map: Tensor | ClusterLabels | None = None,
        on_bad_image: str = "skip",
        tracker: BadImageTracker | None = None,
        sample_ids: Sequence[int] | None = None,
        split_ids: Sequence[int] | None = None,
        max_bad_fraction: float = 0.01,
        split_name: str = "dataset",
        records: RecordFile | None = None,
        encoded: bool = False,
    ) -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(
                f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}"
            )
        if encoded and not transform.train:
            raise ValueError("FaceImageDataset: encoded=True is for training datasets")
        self.samples = Samples.of(samples)
        self.records = records
        self.encoded = encoded
        self.transform = transform
        # numpy: indexing a tensor per item is slower and tensors in worker processes go
        # through shared memory for no benefit
        if isinstance(label_map, Tensor):
            label_map = label_map.numpy().astype(np.int64)
        self._label_map = label_map
        self.on_bad_image = on_bad_image
        if tracker is None:
            tracker = BadImageTracker(self.samples.locators)
            sample_ids = range(len(self.samples))
        if sample_ids is None or len(sample_ids) != len(self.samples):
            raise ValueError("FaceImageDataset: sample_ids must give one tracker index per sample")
        self.tracker = tracker
        # arrays, not lists of ints: a worker reading them copies no page (Samples)
        self.sample_ids = np.array(sample_ids, dtype=np.int64)  # a copy: any input order
        # the datamodule's own array, not a copy: stage 2 makes a dataset per sub-net,
        # each over the whole split (computed: 64 copies of Glint360K's, 6 GB per process)
        self._split_ids = np.asarray(
            split_ids if split_ids is not None else self.sample_ids, dtype=np.int64
        )
        self.max_bad_fraction = max_bad_fraction
        self.split_name = split_name
        self._by_label: dict[int, np.ndarray] | None = None  # unsorted labels, grouped
        self._labels_sorted: bool | None = None  # decided on the first broken file
        self.reserve: FaceImageDataset | None = None
        """A sub-net's spare "not mine" images, never drawn: see :meth:`_not_mine_substitute`."""
        self.buffers: BatchBuffers | None = None
        """Set by the datamodule's loaders: :meth:`__getitems__` then collates into them."""

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int, view: bool = False) -> bytes | memoryview:
        """The encoded bytes of ``samples[index]`` (``view``: of a ``.rec``, a memoryview
        of the mapped file). Raises the errors of ``DECODE_ERRORS``."""
        source = self.samples.source(index)
        if self.records is not None:
            return self.records.encoded(source, view)
        return Path(source).read_bytes()

    def _load(self, index: int, encoded: bool = False, data: bytes | memoryview | None = None):
        """The decoded image of ``samples[index]`` (``encoded``: its bytes when the device
        decodes it), or None when it is broken (skip policy). ``data``: its bytes, when
        the caller has read them already."""
        if self.tracker.is_bad(self.sample_ids[index]):
            return None
        try:
            data = self._read(index) if data is None else bytes(data)
            if encoded and device_decodable(data, self.transform.size):
                return data
            return decode_image(data)
        except DECODE_ERRORS as e:
            self.broken(index, e)
            return None

    def _peek(self, index: int) -> memoryview | bytes | None:
        """The bytes of ``samples[index]`` for the in-place decode (a ``.rec``'s as a view
        of the mapped file), or None when it is flagged broken or cannot be read; then
        :meth:`_load` reads it again and decides (skip, or the error that names it)."""
        if self.tracker.is_bad(self.sample_ids[index]):
            return None
        try:
            return self._read(index, view=True)
        except DECODE_ERRORS:
            return None

    def broken(self, index: int, error: BaseException) -> None:
        """``samples[index]`` cannot be decoded: stop (``fail``, or too many broken in the
        split), or flag it so that it is replaced from now on (``skip``)."""
        path = self.samples.locator(index)
        if self.records is not None and not isinstance(error, RecordError):
            # an undecodable image in a sound record: where it is, as a RecordError says
            key = int(self.samples.source(index))
            path = f"{path} (offset {self.records.offsets.get(key)})"
        if isinstance(error, PermissionError):  # not a damaged image: skip would hide it
            raise BadImageError(
                f"cannot read {path} ({error.strerror or error}): the file is not damaged "
                "but this user may not read it; make the data readable by this user"
            )
        if self.on_bad_image == "fail":
            # Raised while training, where no config layer can add the key: the
            # message names the setting as the user wrote it.
            raise BadImageError(
                f"cannot decode {path} ({type(error).__name__}: {error}); "
                "data.on_bad_image=fail stops here (data.on_bad_image=skip replaces broken "
                "images)"
            )
        self.tracker.mark(self.sample_ids[index], error, path)
        # Under DDP this counts this rank's finds only; the datamodule's share_bad_images
        # counts every rank's at each epoch end.
        self.tracker.check(self._split_ids, self.max_bad_fraction, self.split_name, self.records)

    def substitute(self, index: int) -> Tensor:
        """What replaces the broken ``samples[index]`` of a training set: the next
        readable image of the same identity (cyclic), decoded and resized, never
        mirrored here."""
        return self.transform(self._substitute(index), False)[0]

    def _blank(self) -> Tensor:
        """The image an :data:`IGNORED` face is given: black, at the transform's size."""
        return torch.zeros(self.transform.size, self.transform.size, 3, dtype=torch.uint8)

    def _substitute(self, index: int, encoded: bool = False):
        """The next readable image of the same identity after ``index`` (cyclic), or, for
        a sub-net's "not mine" image (``stage2.negatives``), of any of its outsiders; for
        an evaluation dataset, None (:data:`IGNORED`): the face is left out of the
        scores, not replaced by another face of its identity, which would count that
        face twice (an identity with one val image is common, and its one broken file
        must not stop training either)."""
        label = int(self.samples.labels[index])
        if not self.transform.train:  # (the tracker's warning named the file)
            return None
        group = self._identity_samples(label)  # the identity's samples, in sample order
        start = group.index(index)
        for j in group[start + 1 :] + group[:start]:
            image = self._load(j, encoded)
            if image is not None:
                return image
        if self._not_mine(label):
            return self._not_mine_substitute(index, encoded)
        raise BadImageError(
            f"every image in the {self.split_name} of the identity of "
            f"{self.samples.locator(index)} (label {label}) is undecodable; nothing can "
            "replace them: repair them (a run keeps its identities: one removed from the "
            "data cannot be resumed; remove it and start a new run instead)"
        )

    def _not_mine(self, label: int) -> bool:
        """Whether ``label`` is an outsider of a sub-net (its "not mine" class)."""
        members = getattr(self._label_map, "members", None)  # ClusterLabels
        return members is not None and int(self._label_map[label]) == len(members)

    def _not_mine_substitute(self, index: int, encoded: bool):
        """What replaces a sub-net's "not mine" image (``stage2.negatives``) when its
        identity has no other readable image here: any outsider's image has its label.
        The next readable outsider image (cyclic), else one of :attr:`reserve` (the rest
        of the identity that crossed the negatives' budget and gave its first images
        only, often a single one)."""
        not_mine = len(self._label_map.members)
        others = np.flatnonzero(self._label_map[self.samples.labels] == not_mine)
        later = int(np.searchsorted(others, index, side="right"))  # others[later-1]: index
        candidates = [(self, j) for j in [*others[later:], *others[: later - 1]]]
        if self.reserve is not None:
            candidates += [(self.reserve, j) for j in range(len(self.reserve))]
        for dataset, j in candidates:
            image = dataset._load(int(j), encoded)
            if image is not None:
                return image
        spares = len(self.reserve) if self.reserve is not None else 0
        raise BadImageError(
            f'every "not mine" image of this sub-net (stage2.negatives: {len(others)} '
            f"images of other clusters' identities, and {spares} spare) is undecodable "
            f"(e.g. {self.samples.locator(index)}); nothing can replace them"
        )

    def _identity_samples(self, label: int) -> list[int]:
        """The samples of identity ``label``, ascending. Samples sorted by label (every
        split and sub-net subset of a folder or an InsightFace .rec is) give a range by
        binary search; others are grouped once (a table of every identity, built in
        each worker every epoch, took seconds and hundreds of MB at 14M samples in a
        reviewer's measurement)."""
        labels = self.samples.labels
        if self._labels_sorted is None:  # decided on the first broken image
            ordered = len(labels) < 2 or bool(np.all(labels[1:] >= labels[:-1]))
            self._by_label = None if ordered else self.samples.by_label()
            self._labels_sorted = ordered
        if not self._labels_sorted:
            return self._by_label.get(label, np.empty(0, np.int64)).tolist()
        lo, hi = np.searchsorted(labels, label, "left"), np.searchsorted(labels, label, "right")
        return list(range(int(lo), int(hi)))

    def __getitem__(
        self, index: int | tuple[int, bool]
    ) -> tuple[Tensor, int] | tuple[Tensor, int, bool]:
        """``(image, label)``; training datasets add whether to mirror the image (and,
        ``encoded``, the index).

        ``index`` may be ``(index, mirror)``: the mirror was drawn by the sampler
        (:class:`SubnetSampler`) instead of here.
        """
        mirror = None
        if isinstance(index, tuple):
            index, mirror = index
        padding = index >= len(self.samples)  # EvalShardSampler's: a repeat, not scored
        index %= len(self.samples)
        label = int(self.samples.labels[index])
        image = self._load(index, self.encoded)
        if image is None:
            image = self._substitute(index, self.encoded)
        if image is None:  # an evaluation face nothing replaces: left out of the scores
            image, label = self._blank(), IGNORED
        elif padding:
            label = IGNORED
        elif self._label_map is not None:
            label = int(self._label_map[label])
        if isinstance(image, bytes):  # decoded on the device, already at its size
            return image, label, self.transform.mirror(mirror), index
        image, mirror = self.transform(image, mirror)
        if self.encoded:
            return image, label, mirror, index
        return (image, label, mirror) if self.transform.train else (image, label)

    def __getitems__(self, indices: list) -> list | tuple:
        """The items of a batch; with :attr:`buffers`, the batch itself, collated.

        Without buffers (or under ``encoded``) this is DataLoader's default: the list of
        ``self[i]``, for the collate function. With them, each image is decoded straight
        into a claimed slot (:class:`~facecluster.data.batches.BatchBuffers`), and the
        result, a tuple, holds what ``default_collate([self[i] for i in indices])`` would:
        the same pixels, labels and mirror draws (one ``torch.rand(n)`` draws what n
        ``torch.rand(1)`` would). Loaders over it use :func:`collated`.
        """
        if self.buffers is None or self.encoded:
            return [self[i] for i in indices]
        pairs = [i if isinstance(i, tuple) else (i, None) for i in indices]
        slot, images = self.buffers.claim(len(pairs))
        try:
            return self._collate_into(slot, images, pairs)
        except BaseException:  # data.on_bad_image=fail, too many broken files
            self.buffers.release(slot)
            raise

    def _collate_into(self, slot: int | None, images: np.ndarray, pairs: list) -> tuple:
        size = self.transform.size
        index = np.array([i for i, _ in pairs], dtype=np.int64)
        padding = index >= len(self.samples)  # EvalShardSampler's: a repeat, not scored
        index %= len(self.samples)
        positions = index.tolist()
        batched = self.records is not None and self.samples.keys is not None
        if not batched:  # files, or named records
            sources = [self._peek(i) for i in positions]
            checked = [False] * len(positions)
        else:  # the batch's lookups at once: per image, only a view and the decode
            ids = self.sample_ids[index]
            bad, checked = self.tracker.bad(ids), self.tracker.has_passed(ids)
            views = self.records.views(self.samples.keys[index])
            sources = [None if b else v for b, v in zip(bad.tolist(), views, strict=True)]
            checked = checked.tolist()  # decoded in place before: no header checks again
        passed, ignored = [], []
        for j, (i, data, known) in enumerate(zip(positions, sources, checked, strict=True)):
            out = images[j]
            if data is not None and decode_jpeg_into(data, out, known):
                passed.append(j)
                continue
            image = self._load(i, data=data)  # PNG, other size, broken: read once
            if image is None:
                image = self._substitute(i)
            if image is None:  # an evaluation face nothing replaces
                image = self._blank()
                ignored.append(j)
            if image.shape[:2] != (size, size):
                image = self.transform(image, False)[0]
            out[...] = image.numpy()
        if passed and batched:
            # A record's header is read once a run: a .rec is written once (facecluster
            # never rewrites one in place), where a folder's file may be replaced between
            # epochs. (A record rewritten mid-run into a same-sized CMYK JPEG would get
            # libjpeg-turbo's CMYK conversion instead of Pillow's.)
            self.tracker.mark_passed(self.sample_ids[index[passed]])
        labels = self.samples.labels[index]
        labels = labels if self._label_map is None else self._label_map[labels]
        if ignored or padding.any():
            labels = labels.copy()
            labels[ignored] = IGNORED
            labels[padding] = IGNORED
        rest = [torch.from_numpy(labels)]
        if self.transform.train:
            rest.append(self.transform.mirrors([m for _, m in pairs]))
        return self.buffers.batch(slot, images, *rest)


def collated(batch):
    """The collate function of loaders over datasets with :attr:`FaceImageDataset.buffers`:
    their ``__getitems__`` returns the batch already collated."""
    return batch


def collate_encoded(items: list[tuple]) -> tuple[EncodedImages | Tensor, Tensor, Tensor]:
    """A ``data.decode=device`` batch: ``(EncodedImages, labels, mirror)``, or, when the
    loader decoded every image itself, the usual ``(uint8 images, labels, mirror)``."""
    images, labels, mirror, indices = zip(*items, strict=True)
    if any(isinstance(image, bytes) for image in images):
        images = EncodedImages(list(images), list(indices))
    else:
        images = torch.stack(images)
    return images, torch.tensor(labels, dtype=torch.long), torch.tensor(mirror, dtype=torch.bool)


_CHUNK = 65_536
"""Indices a sampler turns into Python ints at a time (:func:`_in_chunks`)."""


def _in_chunks(*columns: Tensor) -> Iterator:
    """The values of ``columns`` (one tensor: its items; several: tuples of theirs),
    turned into Python objects a chunk at a time, not a list of a whole epoch's (at 16M
    images torch's samplers' lists took 1.2-1.5 s and 950 MB per process, measured)."""
    for start in range(0, len(columns[0]), _CHUNK):
        chunks = [column[start : start + _CHUNK].tolist() for column in columns]
        yield from chunks[0] if len(chunks) == 1 else zip(*chunks, strict=True)


class ShuffleSampler(DistributedSampler):
    """Stage 1's training stream: ``(index, mirror)`` pairs, a function of
    ``(seed, epoch, rank, world_size)`` alone, held as tensors and handed out a chunk
    at a time (:func:`_in_chunks`).

    One generator, seeded by ``(seed, epoch)`` through numpy's SeedSequence
    (:func:`subnet_seed`), draws a permutation, then a mirror for each position; the
    permutation is padded with its first indices to a multiple of ``world_size``, and
    rank ``r`` takes positions ``r, r + world_size, ...`` (DistributedSampler's
    layout). Until 2026-12-06 the order was torch's: under DDP DistributedSampler's
    ``seed + epoch``, under which seed 43's first epoch was seed 42's second (a seed
    sweep trained one identity sequence shifted by an epoch), in one process
    RandomSampler's draw from the global RNG, and the mirrors were drawn by whichever
    process collated the batch: the worker count changed stage 1's weights (the
    global RNG stood elsewhere when a loader with workers started its iterator, and
    the mirrors came from the workers' RNGs; a review). A DistributedSampler
    subclass, so Lightning neither replaces it under DDP nor forgets :meth:`set_epoch`.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.rank, self.num_replicas = size, rank, world_size
        self.epoch, self.seed, self.shuffle, self.drop_last = 0, seed, True, False
        self.num_samples = math.ceil(size / world_size)
        self.total_size = self.num_samples * world_size

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        generator = torch.Generator()
        generator.manual_seed(subnet_seed(self.seed, 0, SEED_SHUFFLE, self.epoch))
        order = torch.randperm(self.size, generator=generator)
        # a byte each, not rand()'s float: 16M positions are 16 MB, not 64 + 16
        drawn = torch.randint(2, (self.total_size,), generator=generator, dtype=torch.uint8)
        mirror = drawn.view(torch.bool)
        if self.total_size > self.size:
            order = order.repeat(math.ceil(self.total_size / self.size))[: self.total_size]
        mine = slice(self.rank, self.total_size, self.num_replicas)
        yield from _in_chunks(order[mine].contiguous(), mirror[mine].contiguous())

    def __len__(self) -> int:
        return self.num_samples


class EvalShardSampler(DistributedSampler):
    """An evaluation split under DDP: rank r takes positions r, r + world, ... in order,
    every rank as many (the loop's collectives and the sharded heads need each rank at
    every step). Where the split runs out, a rank gets ``size + i`` instead of a repeat
    of face i: :class:`FaceImageDataset` serves it as face i labelled :data:`IGNORED`,
    which no score counts (DistributedSampler's repeats were counted twice). A
    DistributedSampler subclass, so Lightning keeps it."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.size, self.rank, self.num_replicas = size, rank, world_size
        self.epoch, self.seed, self.shuffle, self.drop_last = 0, 0, False, False
        self.num_samples = math.ceil(size / world_size)
        self.total_size = self.num_samples * world_size

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class SubnetSampler(DistributedSampler):
    """One sub-net's training stream: ``(index, mirror)`` pairs, a function of
    (seed, epoch, rank) alone.

    Stage 2 must train each sub-net the same way however sub-nets are grouped into
    jobs: its shuffle and mirrors come from its own generator here, never from the
    global RNG that the group's other loaders also draw from, and every sub-net
    gets the same number of batches per epoch (``samples_per_rank``, set from all
    K clusters), a small cluster passing over its images more than once, each pass
    reshuffled. A DistributedSampler subclass, so Lightning neither replaces it
    under DDP nor forgets to call :meth:`set_epoch`.

    Args:
        size: Images of the cluster (the dataset's length).
        samples_per_rank: Pairs each rank draws per epoch (steps x batch size).
        seed: The run's seed.
        subnet: The sub-net (cluster) this stream is for.
        rank: This process's rank.
        world_size: Training processes.
    """

    def __init__(
        self,
        size: int,
        samples_per_rank: int,
        seed: int,
        subnet: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        # DistributedSampler.__init__ would size itself from a dataset: set its fields.
        self.size = size
        self.subnet = subnet
        self.num_replicas = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.shuffle = True
        self.drop_last = False
        self.num_samples = samples_per_rank
        self.total_size = samples_per_rank * world_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(
            subnet_seed(self.seed, self.subnet, SEED_DATA, self.epoch)
        )
        passes = math.ceil(self.total_size / self.size)
        order = torch.cat([torch.randperm(self.size, generator=generator) for _ in range(passes)])
        mirror = torch.rand(self.total_size, generator=generator) < 0.5
        mine = slice(self.rank, self.total_size, self.num_replicas)
        return _in_chunks(order[: self.total_size][mine].contiguous(), mirror[mine].contiguous())

    def __len__(self) -> int:
        return self.num_samples


class SubnetStepSampler(DistributedSampler):
    """Stage 2's steps: each item is one step's batch of every sub-net of the job,
    ``{k: [(index, mirror), ...]}``, cut in order from each sub-net's
    :class:`SubnetSampler` (the batches a ``DataLoader(batch_size=b, sampler=...)``
    over that sampler would make). A DistributedSampler subclass, as theirs, so
    Lightning neither replaces it under DDP nor forgets :meth:`set_epoch`.

    Args:
        samplers: Each sub-net's stream.
        batch_sizes: Each sub-net's batch size.
        steps: Steps per epoch (each sampler yields ``steps x batch`` pairs).
    """

    def __init__(
        self, samplers: dict[int, SubnetSampler], batch_sizes: dict[int, int], steps: int
    ) -> None:
        first = next(iter(samplers.values()))
        self.samplers, self.batch_sizes = samplers, batch_sizes
        self.num_replicas, self.rank, self.seed = first.num_replicas, first.rank, first.seed
        self.epoch, self.shuffle, self.drop_last = first.epoch, True, False
        self.num_samples, self.total_size = steps, steps * first.num_replicas

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for sampler in self.samplers.values():
            sampler.set_epoch(epoch)

    def __iter__(self):
        streams = {k: iter(sampler) for k, sampler in self.samplers.items()}
        for _ in range(self.num_samples):
            yield {k: list(itertools.islice(s, self.batch_sizes[k])) for k, s in streams.items()}

    def __len__(self) -> int:
        return self.num_samples


class SubnetSteps(Dataset):
    """Stage 2's training data in one dataset: the item of ``{k: pairs_k}`` (a
    :class:`SubnetStepSampler` step) is ``{k: batch_k}``, each sub-net's batch from its
    own :class:`FaceImageDataset`, collated.

    One loader, so one pool of ``data.num_workers`` worker processes, serves all the
    sub-nets of a job; a loader per sub-net started K x ``num_workers`` workers per
    training process every epoch (512 at K=64 and 8 workers).

    Args:
        datasets: Each sub-net's dataset.
        collate: Each sub-net's collate function (:func:`collated` for datasets with
            batch buffers, :func:`collate_encoded` under ``data.decode=device``).
    """

    def __init__(self, datasets: dict[int, FaceImageDataset], collate: dict[int, Callable]) -> None:
        self.datasets, self.collate = datasets, collate

    def __getitem__(self, batches: dict[int, list]) -> dict:
        return {
            k: self.collate[k](self.datasets[k].__getitems__(pairs)) for k, pairs in batches.items()
        }


STEPS_PREFETCH = 1
"""Stage 2's steps each worker prepares ahead: a step is a batch of every sub-net (K
batches, 308 MB at K=64, batch 128 and 112 px, computed), so one each keeps a GPU fed, and the
shared memory in flight is half of DataLoader's default 2."""

SEED_INIT, SEED_DATA, SEED_FORWARD, SEED_SHUFFLE = 0, 1, 2, 3
"""What a sub-net's seed is for: its initial weights, its data stream (per epoch), its
forward pass's random draws (per epoch and batch); and stage 1's stream
(:class:`ShuffleSampler`, drawn as sub-net 0's SEED_SHUFFLE, a purpose no sub-net
draws)."""


def subnet_seed(seed: int, k: int, purpose: int = SEED_INIT, *counters: int) -> int:
    """Sub-net ``k``'s own seed for ``purpose`` (and an epoch, a batch...): independent
    streams for every (run seed, sub-net, purpose, counters), through numpy's
    SeedSequence, whatever other sub-nets train in the same job."""
    entropy = [seed % 2**32, k, purpose, *counters]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _network_batch(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    images, labels, *mirror = batch
    return normalize_images(images, *mirror), labels


def network_batches(batch, trainer: lightning.Trainer | None):
    """Loader batches of uint8 images, on the device, as the networks take them: each
    ``(images, labels[, mirror])`` (or ``{cluster: ...}`` of them) becomes
    ``(normalised float32 images, labels)``, converted by the precision plugin."""
    if isinstance(batch, dict):
        batch = {k: _network_batch(v) for k, v in batch.items()}
    else:
        batch = _network_batch(batch)
    if trainer is not None:
        batch = trainer.precision_plugin.convert_input(batch)
    return batch


class WorkerStart:
    """A DataLoader worker's start: SIGTERM from anyone but the training process
    dropped, then Lightning's worker seeding.

    scancel, a SLURM time limit or systemd send SIGTERM to every process of the run,
    the workers too. torch's workers die of it, and the training process then ended in
    "DataLoader worker (pid ...) is killed by signal: Terminated" (exit 1, no resume
    command) instead of stopping at its next batch (exit 143). The training process
    decides; its workers end when it ends their loader, when it terminates them, or
    when it is gone. A worker starts with SIGTERM blocked (:class:`FaceDataLoader`) and
    keeps it blocked; one thread takes each SIGTERM and ends the worker when the
    training process sent it (``Process.terminate``: multiprocessing's at the
    interpreter's exit, DataLoader's for a worker that does not stop). Ignoring every
    SIGTERM, as before 2026-12-02, made a script that exited with a loader's iterator
    alive (a failed in-process ``train()``, an abandoned ``next(iter(loader))``) wait
    for its workers forever. Where ``signal.sigwaitinfo`` is missing (not Linux), every
    SIGTERM is ignored, as before.
    Lightning seeds workers (``seed_everything(workers=True)``) only in a loader
    without a ``worker_init_fn``: this does it as Lightning would, for ``rank``.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        # Ctrl-C as torch's workers take it (they end quietly; the training process
        # raises it): held while this worker was started (FaceDataLoader), with the
        # handler that noted it there (ignored, as by a shell's background job: left so)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        if hasattr(signal, "sigwaitinfo"):
            # blocked here too: a start method that did not inherit the mask
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # taken by the thread only
            parent = os.getppid()
            threading.Thread(target=_end_on_sigterm_from, args=(parent,), daemon=True).start()
        else:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # drops one that waits
            if hasattr(signal, "pthread_sigmask"):
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        if int(os.environ.get("PL_SEED_WORKERS", 0)):
            pl_worker_init_function(worker_id, rank=self.rank)


def _end_on_sigterm_from(parent: int) -> None:
    """A worker's SIGTERM thread: each one taken, the worker ends if ``parent`` sent it."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            # 0, as torch's own worker handler exits on its parent's SIGTERM: the
            # parent's SIGCHLD check took 143 for a crash ("exited unexpectedly")
            os._exit(0)


def worker_kwargs(num_workers: int, rank: int = 0) -> dict[str, Any]:
    """The DataLoader arguments of a :class:`FaceDataLoader`'s workers: none without
    workers; :class:`WorkerStart` (SIGTERM and Ctrl-C as the command takes them), and
    on Linux forked workers (they share the sample and index arrays' pages; Python
    3.14's default, forkserver, would pickle them into every worker, every epoch)."""
    if not num_workers:
        return {}
    kwargs: dict[str, Any] = {"worker_init_fn": WorkerStart(rank)}
    if sys.platform == "linux":
        kwargs["multiprocessing_context"] = "fork"
    return kwargs


class FaceDataLoader(DataLoader):
    """A DataLoader whose workers start with SIGTERM blocked, which :class:`WorkerStart`
    keeps so: sent to every process while an epoch's workers were being started
    (the moment a checkpoint is written), it killed a worker before it could ignore
    it, and the run again ended in "DataLoader worker ... killed by signal" (once in
    CI). The training process holds the signal while it starts them, then takes it.

    Ctrl-C (SIGINT) is held so too (:func:`~facecluster.io.signals_held`), then raised
    once the workers have started: its KeyboardInterrupt, raised in the hooks that
    ``os.fork`` runs, was dropped ("Exception ignored in: _releaseLock"), and the
    command went on to its end (exit 0), or stopped on the workers the Ctrl-C had
    ended ("DataLoader worker ... exited unexpectedly", exit 1; a kill-and-resume
    fuzz: 4 of 13 Ctrl-Cs at the end of a training's evaluation)."""

    def __iter__(self):  # DataLoader's iterator types are private
        if not self.num_workers or not hasattr(signal, "pthread_sigmask"):
            return super().__iter__()
        before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            with signals_held():  # (the main thread's: this one's mask above)
                return super().__iter__()  # no persistent workers: it starts them
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


class FaceDataModule(lightning.LightningDataModule):
    """Identity-per-folder face dataset with per-identity splits and per-cluster subsets.

    Args:
        root: Image folder with one sub-folder per identity, or an InsightFace ``.rec``
            file (or a folder holding ``train.rec``) (``data.root``).
        image_size: Side length of the network input.
        batch_size: Training batch size (per loader, per process).
        eval_batch_size: Batch size for val/test/embedding loaders; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        val_fraction: Fraction of each identity's images used for validation.
        test_fraction: Fraction of each identity's images used for test.
        min_images_per_class: Identities with fewer images are dropped.
        max_classes: Keep only the first ``max_classes`` identities (sorted names).
        seed: Split seed.
        on_bad_image: ``skip`` or ``fail`` for undecodable images (see
            :mod:`facecluster.data.images`); zero-byte files, found by the scan, are
            dropped with a warning under ``skip`` and stop :meth:`setup` under ``fail``.
        max_bad_fraction: More undecodable (or zero-byte) files than this fraction of
            a split (of all images, for zero-byte files at setup) stops the run.
        subnet_epoch_size: Stage 2's batches per sub-net per epoch, from the largest
            cluster's training images (``largest``) or the average cluster's (``mean``:
            an epoch puts the training split's worth of images through the sub-nets,
            more with overlap or negatives, whose images the clusters count)
            (``stage2.epoch_size``).
        subnet_negatives: Stage 2: each sub-net's loader also serves this many images
            per image of its own from the identities of other clusters nearest it
            (``connect_clusters``' ``neighbours``), labelled "not mine", one more
            class than its identities (``stage2.negatives``).
        decode: ``cpu``: the loaders decode; ``device``: training loaders ship JPEG bytes
            and :meth:`on_after_batch_transfer` decodes each batch on the training device
            (``data.decode``).
        cache: Where the label pass over a ``.rec`` without identity records and the
            split (:func:`~facecluster.data.folder.split_data`) are kept for the next
            process that scans and splits the same data (the run's ``output_dir``/
            ``.cache``; None: not kept).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 112,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        min_images_per_class: int = 10,
        max_classes: int | None = None,
        seed: int = 42,
        on_bad_image: str = "skip",
        max_bad_fraction: float = 0.01,
        unseen_fraction: float = 0.0,
        subnet_epoch_size: str = "largest",
        decode: str = "cpu",
        subnet_negatives: float = 0.0,
        cache: str | None = None,
    ) -> None:
        super().__init__()
        # fail at construction (config time) rather than after a long scan
        if batch_size < 2:
            raise ValueError(
                "batch_size must be >= 2 (BatchNorm1d cannot train on a batch of 1), "
                f"got {batch_size}"
            )
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 or null, got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        validate_fractions(val_fraction, test_fraction)
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(
                f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}"
            )
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if not 0.0 <= unseen_fraction < 1.0:
            raise ValueError(f"unseen_fraction must be in [0, 1), got {unseen_fraction}")
        if decode not in DECODE_PLACES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_PLACES)}, got {decode!r}")
        if subnet_negatives < 0:
            raise ValueError(f"subnet_negatives must be >= 0, got {subnet_negatives}")
        if subnet_epoch_size not in SUBNET_EPOCH_SIZES:
            raise ValueError(
                f"subnet_epoch_size must be one of {', '.join(SUBNET_EPOCH_SIZES)}, "
                f"got {subnet_epoch_size!r}"
            )
        # this frame given: Lightning's own lookup keeps its frame in a reference cycle,
        # and with it every caller's frame and locals until the next garbage collection
        # (a loader's worker processes, a caller's tensors). Not logged: the stages'
        # optim, head, num_classes... under one name each, W&B's config kept stage 2's
        # (a review); StageSystem.on_fit_start logs the run's config instead.
        self.save_hyperparameters(frame=inspect.currentframe(), logger=False)

        self._tracker: BadImageTracker | None = None
        self._folder: FaceFolder | None = None
        self._splits: dict[str, np.ndarray] | None = None
        self._unseen: dict[str, tuple[list[str], Samples]] = {}  # split: names, faces
        self._members: list[Tensor] = []  # each cluster's identities (connect_clusters)
        self._subnets: list[int] = []
        self._cluster_ids: list[np.ndarray] = []
        self._cluster_spares: list[np.ndarray] = []  # a cut negative identity's rest
        self._subnet_epoch = 0  # the first epoch the sub-nets' samplers draw
        self._stage1_epoch = 0  # the first epoch stage 1's sampler draws
        # data.decode=device: each training loader's dataset (None: stage 1's, k: sub-net
        # k's), which names or replaces an image that the device cannot decode
        self._encoded_sets: dict[int | None, FaceImageDataset] = {}
        self._warned_decode = False

    @property
    def eval_batch_size(self) -> int:
        """Batch size of the validation, test and embedding loaders."""
        return self.hparams.eval_batch_size or self.hparams.batch_size

    @property
    def image_size(self) -> int:
        return self.hparams.image_size

    # ------------------------------------------------------------------ setup

    def setup(self, stage: str | None = None) -> None:
        """Scan the folder and split it; later calls (any stage) do nothing.

        Scanning and splitting are deterministic, so every DDP rank computes the
        same result independently without communication.
        """
        if self._folder is not None:
            return
        folder = scan(
            self.hparams.root,
            min_images_per_class=self.hparams.min_images_per_class,
            max_classes=self.hparams.max_classes,
            cache=self.hparams.cache,
        )
        self._check_empty_files(folder)  # the whole scan: held-out identities' files too
        folder, self._unseen, splits = split_data(
            folder,
            self.hparams.unseen_fraction,
            self.hparams.val_fraction,
            self.hparams.test_fraction,
            self.hparams.seed,
            cache=self.hparams.cache,  # the next process's (rank, job, evaluation) split
        )
        self._tracker = BadImageTracker(folder.samples.locators)
        self._folder, self._splits = folder, splits

    def _check_empty_files(self, folder: FaceFolder) -> None:
        """Zero-byte files, and records whose label cannot be read in a ``.rec`` without
        identity records (found by the scan, already left out of the samples).

        Decided here, before any training: ``fail`` stops, ``skip`` warns, and either
        way too many of them means a broken copy of the data set.
        """
        kinds = (
            (
                "zero-byte image file(s)",
                folder.empty_files,
                len(folder.samples) + len(folder.empty_files),  # of the kept identities
                "image files",
                "are empty (zero bytes)",
            ),
            (
                "record(s) whose label cannot be read (their identity is unknown)",
                folder.unreadable_records,
                folder.records_read,  # of the whole file: their identities are unknown
                "records",
                "have labels that cannot be read",
            ),
        )
        for what, left_out, total, unit, are in kinds:
            if not left_out:
                continue
            shown = shown_list(left_out)
            if self.hparams.on_bad_image == "fail":
                raise ValueError(
                    f"{len(left_out)} {what} in root={self.hparams.root!r}: {shown}; "
                    "on_bad_image=fail stops here (skip leaves them out)"
                )
            if len(left_out) > self.hparams.max_bad_fraction * total:
                raise ValueError(
                    f"{len(left_out)} of {total} {unit} in root={self.hparams.root!r} {are}, "
                    f"more than max_bad_fraction={self.hparams.max_bad_fraction}: {shown}. "
                    "The copy of the data set looks incomplete; repair it or raise "
                    "max_bad_fraction"
                )
            logger.warning("data.on_bad_image=skip: left out %d %s: %s", len(left_out), what, shown)

    def bad_images(self) -> list[str]:
        """Paths found undecodable so far in this process tree (grows during training;
        under DDP, with every rank's after :meth:`share_bad_images`)."""
        return [] if self._tracker is None else self._tracker.bad_paths()

    def share_bad_images(self, device: torch.device, group: Any = None) -> None:
        """At an epoch end, on every rank: merge the ranks' broken-file flags (each rank
        reads only its shard, so it finds only the broken files in it), then stop on every
        rank alike (:class:`BadImageError`) when more than ``max_bad_fraction`` of a split
        is broken. Afterwards every rank skips every file found so far, and
        :meth:`bad_images` lists them all. One process: only the check.

        Args:
            device: Where the collective runs (the rank's GPU under NCCL).
            group: Its process group (None: the default one).
        """
        if self._tracker is None:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._tracker.merge(device, group)
        for split in SPLIT_NAMES:
            ids = self._split_indices(split)
            if len(ids):
                self._tracker.check(
                    ids, self.hparams.max_bad_fraction, f"{split} split", self._folder.records
                )

    def _ensure_setup(self) -> tuple[FaceFolder, dict[str, np.ndarray]]:
        self.setup()
        assert self._folder is not None and self._splits is not None
        return self._folder, self._splits

    @property
    def num_classes(self) -> int:
        """Number of identities after filtering."""
        return len(self._ensure_setup()[0].class_names)

    @property
    def class_names(self) -> list[str]:
        """Identity names; ``class_names[label]`` is the folder name of ``label``."""
        return list(self._ensure_setup()[0].class_names)

    def split_fingerprint(self, identities: int = 64) -> dict[str, list[str]]:
        """What the val and test splits hold: for each, a short digest of the encoded
        bytes of each of its images of the first ``identities`` identities, in split
        order ("" for one that cannot be read). The same data split the same way gives
        the same digests whatever its layout (a folder, or that folder packed); the
        same identities with their images in another order (a ``--shuffle`` pack of
        it) other ones, as their split differs (:meth:`RunFolder.check_data` compares
        them). About ``identities`` x 30% of an identity's images are read."""
        folder, splits = self._ensure_setup()
        digests: dict[str, list[str]] = {}
        for split in ("val", "test"):
            index = splits[split]
            digests[split] = []
            for i in index[folder.samples.labels[index] < identities].tolist():
                source = folder.samples.source(i)
                try:
                    if folder.records is not None:
                        data = folder.records.encoded(source)
                    else:
                        data = Path(source).read_bytes()
                except OSError:  # unreadable (RecordError too): not compared
                    digests[split].append("")
                    continue
                digests[split].append(hashlib.sha1(data).hexdigest()[:16])
        return digests

    def images_per_identity(self) -> tuple[int, str]:
        """How many images the train, val and test splits hold in all, and a short digest
        of each identity's count. An image added to or removed from any identity splits
        it otherwise (:meth:`split_fingerprint` reads the first identities' images only);
        the labels tell, no image is read."""
        folder, splits = self._ensure_setup()
        index = np.concatenate([splits[split] for split in SPLIT_NAMES])
        counts = np.bincount(folder.samples.labels[index], minlength=self.num_classes)
        return len(index), hashlib.sha1(counts.astype("<i8").tobytes()).hexdigest()[:16]

    def _split_indices(self, split: str) -> np.ndarray:
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        return self._ensure_setup()[1][split]

    def split_samples(self, split: str) -> Samples:
        """``(locator, global label)`` of the ``train``/``val``/``test`` samples, in order
        (a locator is an image path, or ``<file>#<key>`` in a RecordIO file)."""
        folder, _ = self._ensure_setup()
        return folder.samples.take(self._split_indices(split))

    def _dataset(
        self,
        split: str,
        ids: np.ndarray,
        train: bool,
        label_map: ClusterLabels | None = None,
        encoded: bool = False,
    ) -> FaceImageDataset:
        """A dataset of the samples ``ids`` (indices into the scan) drawn from ``split``."""
        folder, _ = self._ensure_setup()
        return FaceImageDataset(
            folder.samples.take(ids),
            build_transforms(self.hparams.image_size, train=train),
            label_map,
            on_bad_image=self.hparams.on_bad_image,
            tracker=self._tracker,
            sample_ids=ids,
            split_ids=self._split_indices(split),
            max_bad_fraction=self.hparams.max_bad_fraction,
            split_name=f"{split} split",
            records=folder.records,
            encoded=encoded,
        )

    def split_labels(self, split: str) -> torch.LongTensor:
        """Global labels of the ``"train"``/``"val"``/``"test"`` samples, in split order."""
        return torch.from_numpy(self.split_samples(split).labels)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 images become normalised float32 on the device (every Trainer batch).

        Training loaders give ``(images, labels, mirror)`` (stage 2:
        ``{cluster: (images, labels, mirror)}``), validation and test loaders
        ``(images, labels)``; every batch leaves as ``(network input, labels)``.
        Labels are int64 and pass unchanged. The precision plugin's input conversion
        (``*-true`` precisions) ran before this hook and skipped the uint8 images: it
        runs again on the floats. Under ``data.decode=device`` the images are decoded
        first (:meth:`_decoded`).
        """
        if isinstance(batch, dict):
            batch = {k: self._decoded(v, k) for k, v in batch.items()}
        else:
            batch = self._decoded(batch, None)
        return network_batches(batch, self.trainer)

    def _decoded(self, batch: Sequence, loader: int | None) -> Sequence:
        """``data.decode=device``: the batch with its images decoded on the device of its
        labels. An image that does not decode is handled as the loaders handle one:
        ``fail`` stops naming it; ``skip`` flags it (later epochs replace it in the
        loader) and puts the next readable image of its identity in its place."""
        images, labels, *rest = batch
        training = len(rest) == 1  # (images, labels, mirror); evaluation batches have no mirror
        if self.hparams.decode != "device" or not training:
            return batch
        encoded = isinstance(images, EncodedImages)
        on_cpu = sum(not isinstance(i, bytes) for i in images.items) if encoded else len(images)
        self._warn_once(on_cpu, len(images), labels.device)
        if not encoded:
            return batch
        dataset = self._encoded_sets[loader]
        decoded, bad = decode_on_device(images, self.hparams.image_size, labels.device)
        for position, error in bad.items():
            index = images.indices[position]
            dataset.broken(index, error)  # raises under fail
            decoded[position] = dataset.substitute(index).to(labels.device)
        return (decoded, labels, *rest)

    def _warn_once(self, on_cpu: int, total: int, device: torch.device) -> None:
        """What ``data.decode=device`` does not do here, said once per run."""
        if self._warned_decode:
            return
        size = self.hparams.image_size
        if on_cpu:
            logger.warning(
                "data.decode=device: %d of the %d images of a training batch were decoded by "
                "the loader (not a JPEG, or not %dx%d, the network input: resized on the "
                "CPU); only aligned %dx%d JPEG crops are decoded on the device",
                on_cpu, total, size, size, size, size,
            )  # fmt: skip
        elif device.type == "cpu":
            logger.warning(
                "data.decode=device on a CPU: the training process decodes every batch, "
                "the loader workers no longer do; data.decode=cpu is faster here"
            )
        self._warned_decode = bool(on_cpu) or device.type == "cpu"

    # --------------------------------------------------------------- clusters

    def connect_clusters(
        self,
        members: Sequence[Tensor],
        subnets: Sequence[int] | None = None,
        neighbours: Sequence[Tensor] | None = None,
    ) -> None:
        """Attach the stage-2 clusters; training then serves them from one loader of steps.

        Calling it again replaces the previous clusters.

        Args:
            members: ``members[k]``, the global ids of cluster ``k``'s identities in
                increasing order (``ClusterAssignment.classes_of(k)``); the position of
                an id is its label in sub-net ``k``. Every identity is in at least one
                cluster; with ``clustering.overlap`` some are in two, and their images
                train both sub-nets.
            subnets: The clusters whose loaders training serves (a stage-2 job's
                group); None: all K.
            neighbours: With ``subnet_negatives``: ``neighbours[k]``, identities that
                are not cluster ``k``'s, nearest first
                (``ClusterAssignment.neighbours(k)``); their training images, in that
                order (each identity's in split order), ``subnet_negatives`` times
                cluster ``k``'s own (rounded; fewer when the outsiders have fewer),
                join its loader with label ``len(members[k])`` ("not mine").

        Raises:
            ValueError: Not integer ids, an empty cluster, ids out of range, repeated
                or not increasing, or an identity in no cluster.
        """
        num_classes = self.num_classes
        if num_classes == 0:  # unreachable after a successful scan
            raise ValueError("connect_clusters: no classes")
        clusters = [self._members_tensor(ids, k, num_classes) for k, ids in enumerate(members)]
        if not clusters:
            raise ValueError("connect_clusters: no clusters")
        covered = torch.zeros(num_classes, dtype=torch.bool)
        for ids in clusters:
            covered[ids] = True
        if not bool(covered.all()):
            missing = (~covered).nonzero().flatten()[:10].tolist()
            raise ValueError(f"connect_clusters: identities {missing} are in no cluster")
        num_clusters = len(clusters)
        outside = sorted(set(subnets or ()) - set(range(num_clusters)))
        if outside:
            raise ValueError(
                f"connect_clusters: subnets {outside} are not clusters 0..{num_clusters - 1}"
            )
        self._members = clusters
        self._subnets = sorted(subnets) if subnets is not None else list(range(num_clusters))
        self._subnet_epoch = 0
        # each cluster's train samples, in split order: one vectorised pass per cluster
        train = torch.from_numpy(self._split_indices("train"))
        labels = self.split_labels("train")
        self._cluster_ids, self._cluster_spares = [], []
        share = self.hparams.subnet_negatives
        if share > 0 and (neighbours is None or len(neighbours) != len(clusters)):
            raise ValueError("connect_clusters: subnet_negatives needs every cluster's neighbours")
        per_class = torch.bincount(labels, minlength=num_classes)
        # the train split's positions grouped by label (stable: split order within one),
        # so a cluster's images are gathered from its identities' runs, not found by a
        # pass over every training label per cluster (O(N K): 35 s at 40M images, K=64)
        by_label = torch.argsort(labels, stable=True)
        starts = torch.cumsum(per_class, 0) - per_class
        for k, ids in enumerate(clusters):
            taken, lengths, spares = ids, per_class[ids], torch.zeros(0, dtype=torch.long)
            budget = round(share * int(per_class[ids].sum()))
            if budget > 0 and len(neighbours[k]):  # the nearest outsiders' images, in order,
                # up to the budget (none: one cluster, or every identity in two)
                ranked = torch.as_tensor(neighbours[k], dtype=torch.long).cpu()
                member = torch.zeros(num_classes, dtype=torch.bool)
                member[ids] = True
                if bool(member[ranked].any()):
                    raise ValueError(f"connect_clusters: neighbours[{k}] holds members of {k}")
                upto = torch.cumsum(per_class[ranked], 0)
                outsiders = ranked[: int(torch.searchsorted(upto, budget)) + 1]
                counts = per_class[outsiders].clone()
                # the identity that crosses the budget gives its first images only (in
                # split order): taken whole, one identity of 370 training images could
                # make the "not mine" class most of a sub-net's data at r=0.25
                counts[-1] -= max(0, int(upto[len(outsiders) - 1]) - budget)
                # its other images replace a broken one of those (_not_mine_substitute)
                c = int(outsiders[-1])
                spares = by_label[starts[c] + torch.arange(int(counts[-1]), int(per_class[c]))]
                taken, lengths = torch.cat([ids, outsiders]), torch.cat([lengths, counts])
            # position j of identity c's run: starts[c] + j, for every taken identity
            first = torch.repeat_interleave(
                starts[taken] - (torch.cumsum(lengths, 0) - lengths), lengths
            )
            positions = by_label[first + torch.arange(int(lengths.sum()))].sort().values
            self._cluster_ids.append(train[positions].numpy())
            self._cluster_spares.append(train[spares.sort().values].numpy())

    @staticmethod
    def _members_tensor(value: Tensor, k: int, num_classes: int) -> Tensor:
        tensor = torch.as_tensor(value)
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(
                f"connect_clusters: cluster {k}'s members must be integer ids, got {tensor.dtype}"
            )
        # private copy on CPU: the caller's tensor may live on GPU or be modified later
        tensor = tensor.detach().to(device="cpu", dtype=torch.long).flatten().clone()
        if not len(tensor):
            raise ValueError(f"connect_clusters: cluster {k} has no identity")
        if int(tensor.min()) < 0 or int(tensor.max()) >= num_classes:
            raise ValueError(
                f"connect_clusters: cluster {k}'s members must be in [0, {num_classes}), got "
                f"range [{int(tensor.min())}, {int(tensor.max())}]"
            )
        if not bool((tensor[1:] > tensor[:-1]).all()):
            raise ValueError(
                f"connect_clusters: cluster {k}'s members must be increasing ids without "
                f"repeats (their position is the sub-net's label), got {tensor.tolist()[:20]}"
            )
        return tensor

    def _label_map(self, k: int) -> ClusterLabels:
        """Global label -> cluster ``k``'s label: its members' positions, and for every
        other identity ``len(members)``, the "not mine" class of ``subnet_negatives``."""
        return ClusterLabels(self._members[k].numpy())

    @property
    def num_clusters(self) -> int | None:
        """Number of clusters K, or ``None`` before :meth:`connect_clusters`."""
        return len(self._members) if self._members else None

    def _cluster_train_ids(self, k: int) -> np.ndarray:
        assert self._members, "connect_clusters() first"
        return self._cluster_ids[k]

    def cluster_train_images(self) -> list[int]:
        """Training images of each cluster (index = cluster), after :meth:`connect_clusters`."""
        return [len(self._cluster_train_ids(k)) for k in range(self.num_clusters or 0)]

    # ------------------------------------------------------------ dataloaders

    def _world_size(self) -> int:
        """Number of training processes, 1 when not attached to a trainer."""
        # DistributedSampler (injected by Lightning under DDP) splits each subset by this
        return self.trainer.world_size if self.trainer is not None else 1

    def _check_train_subset(self, n: int, what: str) -> int:
        """Per-process size of a training subset; rejects subsets that give 1-sample batches."""
        per_rank = math.ceil(n / self._world_size())  # DistributedSampler pads to ceil(n / world)
        if per_rank < 2:
            # Also raised while training (stage 2's loaders): names the config keys.
            raise ValueError(
                f"Training subset of {what} has {n} image(s) ({per_rank} per process), so it would "
                f"yield batches of size 1, which BatchNorm1d cannot train on. Raise "
                f"data.min_images_per_class or lower data.val_fraction / data.test_fraction"
            )
        return per_rank

    def _loader_kwargs(self, dataset: FaceImageDataset | None, batch_size: int = 0) -> dict:
        """A loader's DataLoader arguments; with ``dataset``, its collate function (and
        its batch buffers, :meth:`_collate`)."""
        # Pinned (page-locked) batches when a Trainer runs on a CUDA device: the copy to
        # the GPU is then asynchronous DMA. No persistent workers: each epoch's iterator
        # starts its own, as before 2026-12-06, when their seeds decided the mirrors
        # (the samplers hand every draw to the workers now); persistent workers saved
        # no time at an epoch's start (docs/PERFORMANCE.md).
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        kwargs = {
            "num_workers": self.hparams.num_workers,
            "pin_memory": device is not None and device.type == "cuda",
            "persistent_workers": False,
        }
        rank = self.trainer.global_rank if self.trainer is not None else 0
        kwargs.update(worker_kwargs(self.hparams.num_workers, rank))
        if dataset is not None:
            kwargs["collate_fn"] = self._collate(dataset, batch_size)
        return kwargs

    def _collate(self, dataset: FaceImageDataset, batch_size: int, prefetch: int = 2) -> Callable:
        """The collate function of ``dataset``'s batches; unless it is ``encoded``, it
        gets batch buffers first (``prefetch``: the loader's ``prefetch_factor``)."""
        if dataset.encoded:
            return collate_encoded
        # Batches decoded into reused buffers (facecluster.data.batches): as many as
        # can be in flight, each worker's prefetched batches plus the ones the main
        # process holds (the current batch, Lightning's next one, the pin thread's)
        workers = self.hparams.num_workers
        dataset.buffers = BatchBuffers(
            prefetch * workers + 4 if workers else 3,
            (batch_size, self.hparams.image_size, self.hparams.image_size, 3),
            shared=workers > 0,
        )
        return collated

    def _train_loader(
        self, ids: np.ndarray, label_map: ClusterLabels | None, what: str
    ) -> DataLoader:
        per_rank = self._check_train_subset(len(ids), what)
        dataset = self._train_dataset(ids, label_map, None)
        # Our own sampler, at the epoch the checkpoint continues with (state_dict):
        # Lightning's would shuffle a resumed fit's first epoch as epoch 0 (it makes the
        # first iterator, whose workers draw their indices at once, before it calls
        # set_epoch)
        world = self._world_size()
        rank = self.trainer.global_rank if world > 1 else 0
        sampler = ShuffleSampler(len(ids), self.hparams.seed, rank, world)
        sampler.set_epoch(self._stage1_epoch)
        # drop_last only when there is more than one batch: a remainder could be a
        # single sample, and a subset no larger than a batch must still yield one batch
        return FaceDataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            drop_last=per_rank > self.hparams.batch_size,
            **self._loader_kwargs(dataset, self.hparams.batch_size),
        )

    def _train_dataset(
        self, ids: np.ndarray, label_map: ClusterLabels | None, loader: int | None
    ) -> FaceImageDataset:
        encoded = self.hparams.decode == "device"
        dataset = self._dataset("train", ids, train=True, label_map=label_map, encoded=encoded)
        if encoded:
            self._encoded_sets[loader] = dataset
        return dataset

    def train_dataloader(self) -> DataLoader:
        """The training loader.

        Returns:
            Before :meth:`connect_clusters`: one shuffled loader over the train split
            with global labels. After: one loader of stage-2 steps, each batch
            ``{k: (images, local labels, mirror)}`` over the connected sub-nets, sub-net
            ``k``'s from its own :class:`SubnetSampler` (:class:`SubnetSteps`).
        """
        if not self._members:
            return self._train_loader(self._split_indices("train"), None, "the train split")
        return self._subnet_steps_loader()

    def state_dict(self) -> dict:
        """The epoch a resumed fit continues with, for the samplers (stage 1's and stage
        2's).

        Lightning creates a resumed fit's first training iterator before it calls
        ``set_epoch`` on the samplers, so they must start at the right epoch.
        """
        if self.trainer is None:
            return {}
        key = "next_subnet_epoch" if self._members else "next_epoch"
        return {key: self.trainer.current_epoch + 1}

    def load_state_dict(self, state: dict) -> None:
        self._subnet_epoch = int(state.get("next_subnet_epoch", 0))
        self._stage1_epoch = int(state.get("next_epoch", 0))

    def subnet_steps(self, world: int | None = None) -> int:
        """Batches per stage-2 epoch, the same for every sub-net, counted over all K
        clusters so that it does not depend on which sub-nets a job trains: the
        largest cluster's full batches per process (``subnet_epoch_size="largest"``)
        or the average cluster's (``"mean"``), at least 1. ``world``: the processes
        (default: the attached trainer's)."""
        images = self.cluster_train_images()
        if self.hparams.subnet_epoch_size == "mean":
            return self._full_batches(sum(images) / len(images), world)
        return max(self._full_batches(n, world) for n in images)

    def stage1_steps(self, world: int | None = None) -> int:
        """Batches per stage-1 epoch per process (a single model's too), as
        :meth:`subnet_steps` counts them over the train split."""
        return self._full_batches(len(self._split_indices("train")), world)

    def _full_batches(self, images: float, world: int | None) -> int:
        """A process's full batches of ``images`` shared by ``world`` processes (default:
        the attached trainer's), at least 1: the loaders drop a last partial batch."""
        world = world or self._world_size()
        return max(1, math.ceil(images / world) // self.hparams.batch_size)

    def stage1_batch_size(self) -> int:
        """Stage 1's batch per process: ``batch_size``, or all of the train split a
        process draws when that is fewer (the loader's rule, :meth:`train_dataloader`)."""
        per_rank = math.ceil(len(self._split_indices("train")) / self._world_size())
        return min(self.hparams.batch_size, per_rank)

    def subnet_batch_size(self, k: int) -> int:
        """Sub-net ``k``'s batch per process in stage 2: ``batch_size``, or all of its
        cluster's training images a process draws when they are fewer (no repeats),
        at least 2 (its stream then passes over its images more than once: BatchNorm
        cannot train on 1; refused, it stopped a run whose stage 1 had trained, and no
        resume could change the clustering)."""
        per_rank = math.ceil(len(self._cluster_train_ids(k)) / self._world_size())
        return max(2, min(self.hparams.batch_size, per_rank))

    def _subnet_steps_loader(self) -> DataLoader:
        steps, rank = self.subnet_steps(), self.trainer.global_rank if self.trainer else 0
        samplers, batches, datasets, collate = {}, {}, {}, {}
        for k in self._subnets:
            ids = self._cluster_train_ids(k)
            batches[k] = self.subnet_batch_size(k)
            # every sampler yields steps x batch pairs: no partial batch
            samplers[k] = SubnetSampler(
                len(ids), steps * batches[k], self.hparams.seed, k, rank, self._world_size()
            )
            datasets[k] = self._train_dataset(ids, self._label_map(k), k)
            if len(self._cluster_spares[k]):
                datasets[k].reserve = self._dataset(
                    "train", self._cluster_spares[k], train=True, label_map=self._label_map(k)
                )
            collate[k] = self._collate(datasets[k], batches[k], STEPS_PREFETCH)
        sampler = SubnetStepSampler(samplers, batches, steps)
        sampler.set_epoch(self._subnet_epoch)
        kwargs = self._loader_kwargs(None)
        if kwargs["num_workers"]:
            kwargs["prefetch_factor"] = STEPS_PREFETCH
        # batch_size=None: each item is a whole step, collated by SubnetSteps
        steps_data = SubnetSteps(datasets, collate)
        return FaceDataLoader(
            steps_data, batch_size=None, sampler=sampler, collate_fn=collated, **kwargs
        )

    def _eval_loader(
        self, split: str, ids: np.ndarray, shard: tuple[int, int] | None = None
    ) -> DataLoader:
        dataset = self._dataset(split, ids, train=False)
        return self._shard_loader(dataset, shard)

    def _shard_loader(self, dataset: FaceImageDataset, shard: tuple[int, int] | None) -> DataLoader:
        """``dataset`` in order, this process's shard of it: ``shard`` (rank, world size)
        when given, else the Trainer's (the whole of it without one)."""
        rank, world = shard or (
            (self.trainer.global_rank, self._world_size()) if self.trainer else (0, 1)
        )
        if world == 1:
            return self._fixed_order_loader(dataset)
        # Lightning's DistributedSampler would pad with repeated faces, counted twice
        return self._fixed_order_loader(dataset, EvalShardSampler(len(dataset), rank, world))

    def _fixed_order_loader(
        self, dataset: FaceImageDataset, positions: Sequence[int] | Sampler | None = None
    ) -> DataLoader:
        """``dataset`` in order (``positions``: only those of its items, in order)."""
        return FaceDataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            sampler=positions,
            drop_last=False,
            # Its own generator: creating an evaluation iterator (sanity check,
            # validation) must not draw from the global RNG that training reseeds.
            generator=torch.Generator().manual_seed(self.hparams.seed),
            **self._loader_kwargs(dataset, self.eval_batch_size),
        )

    def val_dataloader(self) -> DataLoader:
        """Validation split, evaluation transforms, global labels, fixed order."""
        return self._eval_loader("val", self._split_indices("val"))

    def test_dataloader(self, shard: tuple[int, int] | None = None) -> DataLoader:
        """Test split, evaluation transforms, global labels, fixed order. ``shard``:
        ``(rank, world_size)``, that process's positions ``rank, rank + world_size, ...``
        (an evaluation over several processes; default: the Trainer's)."""
        return self._eval_loader("test", self._split_indices("test"), shard)

    def sample_dataloader(self, split: str, faces: int) -> DataLoader:
        """At most ``faces`` of the faces of ``split`` (evaluation transforms, global
        labels, fixed order): all of them, or a sample drawn with the data seed, the same
        every time."""
        ids = self._split_indices(split)
        if len(ids) > faces:
            rng = np.random.default_rng(self.hparams.seed)
            ids = np.sort(rng.choice(ids, faces, replace=False))
        return self._eval_loader(split, ids)

    def unseen_identities(self, split: str) -> list[str]:
        """Names of the identities held out of training whose faces serve ``split``
        (``val`` or ``test``) as non-mated probes (``data.unseen_fraction``)."""
        self._ensure_setup()
        return list(self._unseen[split][0]) if split in self._unseen else []

    def unseen_dataloader(
        self, split: str, shard: tuple[int, int] | None = None
    ) -> DataLoader | None:
        """The faces of the unseen identities of ``split``, in fixed order; None when
        there are none. Their labels are negative, no enrolled identity being right for
        them: ``i - n`` for the i-th of the n identities (a broken face is left out,
        :data:`IGNORED`, under ``on_bad_image=skip``). ``shard``: as for
        :meth:`test_dataloader` (default: all of them)."""
        folder, _ = self._ensure_setup()
        samples = self._unseen[split][1] if split in self._unseen else None
        if samples is None or not len(samples):
            return None
        dataset = FaceImageDataset(
            samples,
            build_transforms(self.hparams.image_size, train=False),
            on_bad_image=self.hparams.on_bad_image,
            max_bad_fraction=self.hparams.max_bad_fraction,
            split_name=f"unseen identities of the {split} split",
            records=folder.records,
        )
        return self._shard_loader(dataset, shard or (0, 1))

    def embedding_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Train split for computing class-mean embeddings.

        Evaluation transforms (no flip), global labels, fixed order, and the
        shard ``train[rank::world_size]`` with no padding or duplication, so
        per-class sums reduced over ranks equal a single-process pass exactly. The
        dataset is the whole split and the sampler takes the shard: a broken image
        (``on_bad_image=skip``) is left out of its class mean (:data:`IGNORED`), on any
        shard as in a one-process pass.

        Args:
            rank: This process's rank.
            world_size: Number of processes.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                "embedding_dataloader: need 0 <= rank < world_size, "
                f"got rank={rank}, world_size={world_size}"
            )
        ids = self._split_indices("train")
        dataset = self._dataset("train", ids, train=False)
        return self._fixed_order_loader(dataset, range(rank, len(ids), world_size))
