"""Scanning an identity-per-folder image tree and splitting it per identity.

The expected layout is the one used by LFW, VGGFace2, CASIA-WebFace dumps and
most aligned-face releases::

    root/
        Identity_A/  img0001.jpg  img0002.jpg ...
        Identity_B/  ...

Every direct sub-folder of ``root`` is one identity; every image file directly
inside it is one sample. Labels are assigned in sorted folder-name order, so the
same tree always produces the same label for the same identity.

The split is done *per identity* (closed-set identification: every identity
must be seen in training and evaluated on held-out images of itself), and the
shuffle of each identity is seeded by ``(seed, class_name)`` only, so an
identity's split never depends on which other identities were kept by
``min_images_per_class`` / ``max_classes``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import operator
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facecluster.data.recordio import (
    RecordError,
    RecordFile,
    image_layout,
    rec_paths,
)
from facecluster.io import atomic_file, shown_list

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

SPLIT_NAMES = ("train", "val", "test")


_PATH_CHUNK = 1 << 16


class PathTable(Sequence):
    """Image paths held as one byte buffer and int64 start/end offsets, each ``str``
    built when read.

    A list of 42.5M ``str`` (WebFace42M as folders) is about 100 bytes a path in every
    process, and a DataLoader worker that reads a path bumps its reference count, so
    over an epoch each forked worker copies the pages of the strings it touched: 96
    bytes per sample of the data set for one of 8 workers, measured on 1M paths. Here
    the bytes are written once and only read. UTF-8 with ``surrogatepass``: any
    ``str`` comes back as it was, a non-UTF-8 name's surrogate escapes too.
    """

    def __init__(self, buffer: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        self.buffer, self.starts, self.ends = buffer, starts, ends

    @classmethod
    def of(cls, paths: Iterable[str]) -> PathTable:
        if isinstance(paths, PathTable):
            return paths
        paths = paths if isinstance(paths, list) else list(paths)
        chunks = range(0, len(paths), _PATH_CHUNK)

        def encoded(start: int) -> bytes:  # each path, then a NUL
            part = paths[start : start + _PATH_CHUNK]
            return ("\0".join(part) + "\0").encode("utf-8", "surrogatepass")

        # encoded twice, a chunk at a time: the buffer is allocated once, at its size,
        # and the peak beside the strings is the buffer, not the buffer twice over
        buffer = np.empty(sum(len(encoded(start)) for start in chunks), dtype=np.uint8)
        ends, at = np.empty(len(paths), dtype=np.int64), 0
        for start in chunks:
            data = np.frombuffer(encoded(start), dtype=np.uint8)
            stops = np.flatnonzero(data == 0)
            if len(stops) != min(_PATH_CHUNK, len(paths) - start):  # no file system's
                bad = next(p for p in paths[start : start + _PATH_CHUNK] if "\0" in p)
                raise ValueError(f"image path {bad!r} holds a NUL character")
            buffer[at : at + len(data)] = data
            ends[start : start + len(stops)] = stops + at
            at += len(data)
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        return cls(buffer, starts[: len(paths)], ends)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        i = operator.index(index)
        start, end = int(self.starts[i]), int(self.ends[i])
        return self.buffer[start:end].tobytes().decode("utf-8", "surrogatepass")

    def take(self, indices: np.ndarray) -> PathTable:
        """The paths at ``indices``, over the same buffer."""
        return PathTable(self.buffer, self.starts[indices], self.ends[indices])


class Samples(Sequence):
    """``(locator, label)`` of every sample, held as columns, not as Python tuples.

    A locator is an image path (a folder) or ``<file>#<key>`` (a ``.rec``). The labels
    are an int64 array; a ``.rec``'s samples are its record keys, an int64 array, and
    each locator is built when asked for. Glint360K has 17.1M images: as a list of
    tuples of strings the index cost about 390 bytes per image in every process, and
    a DataLoader worker, whose reads bump the reference counts of the tuples and
    strings it touches, copied about 370 bytes per training sample per epoch of the
    parent's pages (``bench/sample_index.py``, docs/DATA.md). A record sample is two
    int64 entries here, and a worker reads them without writing.

    It is a sequence of ``(locator, label)`` pairs and equals a list of the same
    pairs; :meth:`take` selects samples by index without leaving the arrays.
    """

    def __init__(
        self,
        labels: Iterable[int] | np.ndarray,
        *,
        keys: Iterable[int] | np.ndarray | None = None,
        rec: str | Path | None = None,
        paths: Sequence[str] | None = None,
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if (keys is None) == (paths is None) or (keys is not None and rec is None):
            raise ValueError("Samples: give either keys with rec, or paths")
        self.keys = None if keys is None else np.asarray(keys, dtype=np.int64).reshape(-1)
        self.rec = None if rec is None else str(rec)
        self.paths = None if paths is None else PathTable.of(paths)
        if len(self.keys if self.paths is None else self.paths) != len(self.labels):
            raise ValueError("Samples: one label per sample")

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, int]]) -> Samples:
        """The samples of ``(path, label)`` pairs (or the Samples themselves)."""
        if isinstance(pairs, Samples):
            return pairs
        pairs = list(pairs)
        return cls([label for _, label in pairs], paths=[path for path, _ in pairs])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        i = operator.index(index)
        return self.locator(i), int(self.labels[i])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(
            isinstance(b, tuple | list) and a == tuple(b) for a, b in zip(self, other, strict=True)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        where = f"keys of {self.rec}" if self.paths is None else "paths"
        return f"Samples({len(self)} samples, {where})"

    def locator(self, i: int) -> str:
        """How sample ``i`` is named: its path, or ``<file>#<key>``."""
        return self.paths[i] if self.paths is not None else f"{self.rec}#{self.keys[i]}"

    def source(self, i: int) -> str | int:
        """What reads sample ``i``: its path, or its record key."""
        return self.paths[i] if self.paths is not None else int(self.keys[i])

    def take(self, indices: Sequence[int] | np.ndarray) -> Samples:
        """The samples at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.paths is None:
            return Samples(self.labels[indices], keys=self.keys[indices], rec=self.rec)
        return Samples(self.labels[indices], paths=self.paths.take(indices))

    def relabel(self, labels: np.ndarray) -> Samples:
        """The same samples with other labels."""
        if self.paths is None:
            return Samples(labels, keys=self.keys, rec=self.rec)
        return Samples(labels, paths=self.paths)

    def by_label(self) -> dict[int, np.ndarray]:
        """The sample indices of each label present, ascending."""
        if not len(self.labels):
            return {}
        order = np.argsort(self.labels, kind="stable")
        present, starts = np.unique(self.labels[order], return_index=True)
        return dict(zip(present.tolist(), np.split(order, starts[1:]), strict=True))

    @property
    def locators(self) -> Sequence[str]:
        """Every locator, built when indexed."""
        return _Locators(self)


class _Locators(Sequence):
    def __init__(self, samples: Samples) -> None:
        self._samples = samples

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._samples.locator(j) for j in range(len(self))[i]]
        return self._samples.locator(operator.index(i))


@dataclass(frozen=True)
class FaceFolder:
    """Result of scanning an identity-per-folder tree.

    Attributes:
        root: The scanned root directory.
        class_names: Sorted identity folder names; label ``i`` is ``class_names[i]``.
        samples: ``(image path, label)`` pairs sorted by label, then by path (a
            :class:`Samples`).
        empty_files: Zero-byte image files of the kept identities and of identity
            folders whose image files are all zero bytes, left out of ``samples``
            (the datamodule decides whether they stop the run).
        unreadable_records: For a RecordIO file without identity records, the records
            whose label cannot be read (corrupt, or not an identity label): their
            identity is unknown, so they are left out of ``samples`` (decided as
            ``empty_files``). The first few as ``<file> key K at offset O: why``, the
            rest as ``<file>#<key>``.
        records_read: How many records the scan of a RecordIO file without identity
            records read as images or :attr:`unreadable_records` (0 otherwise): the whole
            file's, whatever identities were kept.
        empty_folders: Identity folders holding no image file at all (an image folder's
            scan warns of them; enroll refuses them: a person it would skip).
    """

    root: Path
    class_names: list[str]
    samples: Samples
    empty_files: list[str] = field(default_factory=list)
    records: RecordFile | None = None
    """The RecordIO file the samples are in (their locators are ``<file>#<key>``),
    or None for an image folder (the locators are file paths)."""
    unreadable_records: list[str] = field(default_factory=list)
    records_read: int = 0
    empty_folders: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of identities (labels are ``0..num_classes-1``)."""
        return len(self.class_names)


@dataclass
class _Listing:
    """What one identity folder holds, sorted; only ``images`` become samples."""

    images: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)
    subfolders: list[str] = field(default_factory=list)
    bad_links: list[str] = field(default_factory=list)


def _entry_kind(entry: os.DirEntry) -> str:
    """``dir``, ``file``, ``bad_link`` (broken or looping symlink) or ``other``.

    ``DirEntry.is_dir``/``is_file`` follow symlinks and *raise* ELOOP on a symlink
    loop (a broken link just answers False), so both cases are caught here.
    """
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError as e:  # a link to a folder this user may not enter: not broken
        if e.errno == errno.ELOOP or (entry.is_symlink() and not isinstance(e, PermissionError)):
            return "bad_link"
        raise
    return "bad_link" if entry.is_symlink() else "other"


def _list_images(directory: str) -> _Listing:
    """List the files directly inside an identity folder (sorted full paths).

    ``os.scandir`` is used (no image decoding) because this runs over 100k+ file
    trees at every start-up; image files get one ``stat`` each, to catch zero-byte
    files (an interrupted copy) before training. Sub-folders are not descended
    into, so a symlink pointing back up the tree cannot make the scan loop.
    """
    out = _Listing()
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files: .DS_Store, ._AppleDouble, editor swap files
            kind = _entry_kind(entry)
            if kind == "bad_link":
                out.bad_links.append(entry.path)
            elif kind == "dir":
                out.subfolders.append(entry.path)
            elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                out.other_files.append(entry.path)
            elif kind == "file":  # follows symlinks, so linked datasets work
                (out.empty if entry.stat().st_size == 0 else out.images).append(entry.path)
            else:
                out.other_files.append(entry.path)  # a fifo or socket named .jpg
    for paths in (out.images, out.empty, out.other_files, out.subfolders, out.bad_links):
        paths.sort()
    return out


def _deeper_hint(listings: dict[str, _Listing], name: str) -> str:
    """``data.root`` one level too high (a download's ``lfw/images/<identity>``): the
    first folder whose own sub-folders hold images, named as the root to give."""
    for entry in sorted(listings):
        for sub in listings[entry].subfolders[:3]:  # a look, not a second scan
            with contextlib.suppress(OSError):
                if _list_images(sub).images:
                    return (
                        f". Its folder {entry} holds identity folders: {name}={Path(sub).parent}?"
                    )
    return ""


def warn_ignored_files(where: str, files: list[str]) -> None:
    """Warn, naming them, of the files under ``where`` that are not read as images
    (their names do not end in :data:`IMAGE_EXTENSIONS`): the training scan's and
    ``identify``'s one wording."""
    if files:
        logger.warning(
            "%s: %d non-image file(s) are ignored (images end in %s): %s",
            where,
            len(files),
            ", ".join(IMAGE_EXTENSIONS),
            shown_list(files),
        )


def _warn_layout(
    root: Path,
    listings: dict[str, _Listing],
    empty_folders: list[str],
    root_files: list[str],
    root_bad_links: list[str],
    name: str = "data.root",
) -> None:
    """One warning per kind of layout problem, naming the paths (decided before training).
    ``name``: what the command calls the folder (``data.root``, pack's ``SRC``)."""
    if empty_folders:
        logger.warning(
            "%s=%s: %d identity folder(s) hold no image files (%s) and are ignored: %s",
            name,
            root,
            len(empty_folders),
            ", ".join(IMAGE_EXTENSIONS),
            shown_list(empty_folders),
        )
    bad_links = root_bad_links + [p for v in listings.values() for p in v.bad_links]
    if bad_links:
        logger.warning(
            "%s=%s: %d broken or looping symlink(s) are ignored: %s",
            name,
            root,
            len(bad_links),
            shown_list(bad_links),
        )
    loose = [p for p in root_files if p.lower().endswith(IMAGE_EXTENSIONS)]
    if loose:
        logger.warning(
            "%s=%s: %d image(s) directly in %s, not in an identity "
            "sub-folder (root/<identity>/<image>), are ignored: %s",
            name,
            root,
            len(loose),
            name,
            shown_list(loose),
        )
    other = sorted(set(root_files) - set(loose))
    other += [p for v in listings.values() for p in v.other_files]
    warn_ignored_files(f"{name}={root}", other)
    nested = [p for v in listings.values() for p in v.subfolders]
    if nested:
        logger.warning(
            "%s=%s: %d folder(s) inside identity folders are not read (only files "
            "directly inside root/<identity>/ are samples): %s",
            name,
            root,
            len(nested),
            shown_list(nested),
        )


def scan_image_folder(
    root: str | Path,
    min_images_per_class: int = 1,
    max_classes: int | None = None,
    name: str = "data.root",
) -> FaceFolder:
    """Scan ``root`` for identity sub-folders containing images.

    Args:
        root: Directory with one sub-folder per identity (``data.root``).
        min_images_per_class: Identities with fewer images are dropped (with a
            warning), the usual way LFW/VGGFace2 are restricted to identities
            that can be split into train/val/test.
        max_classes: If given, keep only the first ``max_classes`` identities in
            sorted name order, after the ``min_images_per_class`` filter.

        name: What the command calls ``root`` in its messages (``data.root``, ``SRC``).

    Returns:
        The scanned :class:`FaceFolder`.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a directory.
        ValueError: No identity sub-folder contains images, none has at least
            ``min_images_per_class`` images, or an argument is out of range.
    """
    _check_selection(min_images_per_class, max_classes)
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(
            f"{name}={str(root)!r} {what}: give the folder that holds one sub-folder per identity"
        )

    # identity name -> sorted image paths; folders without images are not identities
    found: dict[str, list[str]] = {}
    listings: dict[str, _Listing] = {}
    empty_folders: list[str] = []
    root_files: list[str] = []
    root_bad_links: list[str] = []
    where = root
    try:  # a folder or file this user may not read: named, not a PermissionError traceback
        with os.scandir(root) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                where = Path(entry.path)
                kind = _entry_kind(entry)
                if kind == "bad_link":
                    root_bad_links.append(entry.path)
                    continue
                if kind != "dir":
                    root_files.append(entry.path)
                    continue
                listing = _list_images(entry.path)
                listings[entry.name] = listing
                if listing.images:
                    found[entry.name] = listing.images
                elif not listing.empty:  # image files that are all zero bytes: counted below
                    empty_folders.append(entry.path)
    except OSError as e:  # NFS's ESTALE, EIO, a file gone between listing and stat
        culprit = e.filename or where
        advice = (
            ": make the data readable by this user, or move what it cannot read out of the folder"
            if isinstance(e, PermissionError)
            else ""
        )
        raise ValueError(
            f"{name}={str(root)!r}: cannot read {culprit} ({e.strerror or e}){advice}"
        ) from None
    empty_folders.sort()
    root_files.sort()
    root_bad_links.sort()
    _warn_layout(root, listings, empty_folders, root_files, root_bad_links, name)

    if not found and not any(listing.empty for listing in listings.values()):
        # (image files that are all zero bytes: an interrupted copy, said below)
        raise ValueError(
            f"No identity sub-folders containing images ({', '.join(IMAGE_EXTENSIONS)}) found in "
            f"{name}={str(root)!r}; expected root/<identity>/<image> layout"
            + _deeper_hint(listings, name)
        )

    # identities are chosen on the files they hold, zero-byte ones included: the damage
    # of a copy (an interrupted one empties files) does not decide which identities a
    # run has, and the zero-byte files of every chosen identity are the broken files
    # that on_bad_image and max_bad_fraction decide on. Counted on the readable files
    # alone, an identity pushed under min_images_per_class was dropped with its empty
    # files never named (under on_bad_image=fail too), and the empty folders past
    # max_classes were counted against the kept identities' files
    named = [n for n, ls in listings.items() if ls.images or ls.empty]
    counts = np.array([len(listings[n].images) + len(listings[n].empty) for n in named])
    chosen = [
        named[i]
        for i in _select_identities(root, named, counts, min_images_per_class, max_classes, name)
    ]
    empty_files = sorted(p for name in chosen for p in listings[name].empty)
    # with them left out (on_bad_image=skip), an identity below the minimum is dropped
    short = {n for n in chosen if len(found.get(n, ())) < min_images_per_class}
    kept = [n for n in chosen if n not in short]
    if short and min_images_per_class == 1:  # pack's and enroll's scans: no setting
        logger.warning(
            "Dropped %d %s made only of zero-byte files: %s",
            len(short),
            "identity" if len(short) == 1 else "identities",
            shown_list(sorted(short), 5),
        )
    elif short:
        logger.warning(
            "Dropped %d identities left with fewer than data.min_images_per_class=%d images "
            "without their zero-byte files: %s",
            len(short),
            min_images_per_class,
            shown_list(sorted(short), 5),
        )
    if not kept:
        raise ValueError(
            f"No identity in {name}={str(root)!r} has min_images_per_class="
            f"{min_images_per_class} images that are not empty (zero bytes): "
            f"{shown_list(empty_files)}. The copy of the data set looks incomplete"
        )
    del listings  # it and found hold the only other references to the path strings
    # the samples are built from the listings directly: a (path, label) tuple per image
    # first, then a list of each, peaked at 261 bytes an image against 173 now (a one-off
    # measurement, 1M paths)
    sizes = [len(found[name]) for name in kept]
    labels = np.repeat(np.arange(len(kept), dtype=np.int64), sizes)
    paths = [path for name in kept for path in found.pop(name)]
    del found
    samples = Samples(labels, paths=paths)
    return FaceFolder(
        root=root,
        class_names=kept,
        samples=samples,
        empty_files=empty_files,
        empty_folders=empty_folders,
    )


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The positions ``start, ..., start + size - 1`` of every (start, size) pair, in
    order, as one int64 array: a gather of many runs without a Python loop."""
    sizes = np.asarray(sizes, dtype=np.int64)
    offsets = np.asarray(starts, dtype=np.int64) - (np.cumsum(sizes) - sizes)
    return np.repeat(offsets, sizes) + np.arange(int(sizes.sum()), dtype=np.int64)


def _select_identities(
    root: Path,
    names: Sequence[str],
    counts: np.ndarray,
    min_images_per_class: int,
    max_classes: int | None,
    name: str = "data.root",
) -> np.ndarray:
    """Positions in ``names`` of the identities kept, in name order: at least
    ``min_images_per_class`` images (``counts``, one per name), the first
    ``max_classes``. The same rule for image folders and RecordIO files."""
    # a list already in order (a .rec's zero-padded labels) is sorted in one pass
    order = np.array(sorted(range(len(names)), key=names.__getitem__), dtype=np.int64)
    enough = counts[order] >= min_images_per_class
    if not enough.any():
        raise ValueError(
            f"No identity in {name}={str(root)!r} has at least min_images_per_class="
            f"{min_images_per_class} images (the largest identity has {counts.max()}). "
            "Resuming, evaluating or exporting a run: point data.root at the data it "
            f"trained on. A new run: lower it, data.min_images_per_class={counts.max()}"
        )
    dropped = order[~enough]
    if len(dropped):
        shown = shown_list([names[i] for i in dropped])
        logger.warning(
            "Dropped %d of %d identities with fewer than data.min_images_per_class=%d images: %s",
            len(dropped),
            len(names),
            min_images_per_class,
            shown,
        )
    kept = order[enough]
    return kept if max_classes is None else kept[:max_classes]


UNREADABLE_NAMED = 5
"""Unreadable records of a scan named with their reason (the rest by locator)."""

IDENTITY_NAMES = "identities.txt"
"""Written by ``facecluster pack`` beside ``train.rec``: one identity name per label."""

PROPERTY = "property"
"""InsightFace's ``num_classes,height,width`` beside ``train.rec`` (``facecluster pack``
writes it too): compared with the file's identities, with a warning, never trusted."""

OFFSETS_LOOKED_AT = 1024
"""How many of an ``.idx``'s offsets, evenly over the file, :func:`_foreign_index` looks at."""


class RecordScanError(RecordError, ValueError):
    """A RecordIO file whose identities cannot be read at start (:func:`scan_record_file`).

    A ValueError too, so that it reaches the user as every other data error at start
    (the config layer's ``data: ...``, exit 2, where a bare RecordError, an OSError,
    left a traceback), and still a :class:`RecordError` for whoever catches those.
    """


def _foreign_index(records: RecordFile) -> str:
    """A hint when the ``.idx`` looks like another file's: of up to
    :data:`OFFSETS_LOOKED_AT` of its offsets, evenly over the file, more than a tenth
    (and at least 2) start no record (no record magic, or the middle of a split one)
    where it says. One corrupt record is not enough. ``""`` otherwise (also when the
    file cannot be looked at: the error it adds to is the one to see)."""
    try:
        misplaced, looked_at = records.misplaced_offsets(OFFSETS_LOOKED_AT)
    except (OSError, ValueError):  # the file cannot be mapped (changed, emptied)
        return ""
    if misplaced < 2 or misplaced * 10 <= looked_at:
        return ""
    return (
        f". At {misplaced} of {looked_at} offsets that {records.idx} lists (looked at "
        "evenly over the file) no record starts: is it the .idx of another .rec? "
        f"Copy {records.rec.name} and {records.idx.name} together from one source, or pack "
        "the folder again"
    )


LARGEST_LABEL = "its largest image label + 1"


def _read_names(
    names_file: Path, records: RecordFile, count: int, whence: str, at_least: int | None
) -> list[str]:
    """``identities.txt``'s names, one per identity label of the file (``count``),
    exactly: a list left from another data set (more names, or fewer) would name
    identities wrongly. ``at_least``: where the count is not known (unreadable records
    without identity records), the fewest names accepted."""
    # UTF-8 (a name that is not keeps its bytes, as the folder's scan reads them),
    # split on \n or \r\n only (a file edited on Windows): str.splitlines would also
    # split a name at \x0b, \x1c or \u2028 (pack refuses names with line breaks)
    text = names_file.read_bytes().decode("utf-8", errors="surrogateescape")
    all_names = [n.removesuffix("\r") for n in text.split("\n")]
    while all_names and not all_names[-1]:  # blank lines at the end name nobody
        all_names.pop()
    blank = [i for i, n in enumerate(all_names, 1) if not n]  # " " may name a folder
    if blank:  # was an identity named ''
        raise ValueError(
            f"{names_file}: line {blank[0]} is blank ({len(blank)} such lines): it lists one "
            "name per identity label, each on its own line"
        )
    fits = len(all_names) == count if at_least is None else len(all_names) >= at_least
    if fits and len(set(all_names)) == len(all_names):
        return all_names
    twice = sorted(n for n, c in Counter(all_names).items() if c > 1)[:3]
    raise ValueError(
        f"{names_file}: {len(all_names)} names for identity labels up to {count - 1} "
        f"({count} identities in {records.rec}: {whence})"
        + (f", names listed twice: {', '.join(twice)}" if twice else "")
        + "; it must list one name per identity label, in label order. A list left from "
        f"another data set names identities wrongly: remove {names_file.name} (the names "
        "become the zero-padded labels), or pack the folder again (facecluster pack SRC "
        "OUT --overwrite)"
    )


def _check_property(
    path: Path, records: RecordFile, count: int, whence: str, at_least: bool = False
) -> None:
    """Warn when ``property``'s ``num_classes`` is not the file's identity count (a file
    left from another data set, or a ``.rec`` replaced beside it); its image size may
    differ from ``data.image_size`` (the images are resized) and is not compared."""
    text = path.read_text(errors="replace").strip()
    try:
        num_classes, _, _ = (int(v) for v in text.split(","))
    except ValueError:
        logger.warning(
            "%s holds %r, not num_classes,height,width: not compared with %s",
            path, text[:80], records.rec,
        )  # fmt: skip
        return
    if num_classes != count and not (at_least and num_classes > count):
        logger.warning(
            "%s says %d identities (num_classes,height,width = %s), but %s holds %d (%s): "
            "a property file left from another data set, or the .rec replaced beside it? "
            "The identities are the .rec's (property is only compared)",
            path, num_classes, text, records.rec, count, whence,
        )  # fmt: skip


def _check_selection(min_images_per_class: int, max_classes: int | None) -> None:
    """Refuse selection values out of range (a .rec took max_classes=-1 as all but the
    last identity)."""
    if min_images_per_class < 1:
        raise ValueError(f"min_images_per_class must be >= 1, got {min_images_per_class}")
    if max_classes is not None and max_classes < 1:
        raise ValueError(f"max_classes must be >= 1 or null, got {max_classes}")


def scan_record_file(
    root: str | Path,
    min_images_per_class: int = 1,
    max_classes: int | None = None,
    cache: str | Path | None = None,
) -> FaceFolder:
    """Identities and samples of an InsightFace RecordIO file (``.rec`` + ``.idx``).

    Args:
        root: the ``.rec`` file or its ``.idx``, or a folder holding ``train.rec`` and
            ``train.idx`` (or one other ``.rec`` and its ``.idx``: see
            :func:`~facecluster.data.recordio.rec_paths`).
        min_images_per_class: as for :func:`scan_image_folder`.
        max_classes: as for :func:`scan_image_folder`.
        cache: a folder where the label pass over a file without identity records is
            kept for the next scan (:func:`~facecluster.data.recordio.image_layout`).

    Identity names come from ``identities.txt`` beside the file when present (what
    ``facecluster pack`` writes, so a packed folder splits exactly like the folder),
    else the zero-padded label; it must hold one name per identity label of the file.
    ``property`` beside it, when present, is compared with the identity count (a
    warning). Labels are renumbered ``0..C-1`` over the kept identities in name order,
    as for a folder.

    Raises:
        RecordScanError: a record the layout needs cannot be read (a ValueError too).
        ValueError: the file or ``identities.txt`` does not fit.
    """
    _check_selection(min_images_per_class, max_classes)
    paths = rec_paths(root)
    if paths is None:
        raise FileNotFoundError(
            f"root {str(root)!r} is not a .rec file, its .idx, or a folder holding train.rec"
        )
    records = RecordFile(*paths)
    try:
        layout = image_layout(records, cache)
    except RecordError as e:
        raise RecordScanError(f"{e}{_foreign_index(records)}") from None
    except ValueError as e:  # an .idx missing lines (another file's?)
        hint = _foreign_index(records)
        if not hint:
            raise
        raise ValueError(f"{e}{hint}") from None
    # the identities present, in label order (the layout groups its keys by label)
    labels = layout.labels
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]]) if len(labels) else labels
    counts = np.diff(np.r_[starts, len(labels)])
    present = labels[starts].tolist()
    unreadable = []
    for key in layout.unreadable[:UNREADABLE_NAMED].tolist():  # why, for the first few
        try:
            records.head(key)
        except RecordError as e:
            unreadable.append(str(e))
        else:  # read since the scan kept it (the file was not changed: see _stamp)
            unreadable.append(records.locator(key))
    unreadable += [records.locator(k) for k in layout.unreadable[UNREADABLE_NAMED:].tolist()]
    if not present:
        raise ValueError(
            f"root={str(root)!r}: {records.rec} holds no image record"
            + (f" whose label can be read: {unreadable[0]}" if unreadable else "")
            + _foreign_index(records)
        )
    names_file = records.rec.parent / IDENTITY_NAMES
    property_file = records.rec.parent / PROPERTY
    if names_file.is_file() or property_file.is_file():
        count = layout.identities
        header = layout.identity_records is not None
        whence = "the identity records its header gives" if header else LARGEST_LABEL
        if not header and len(present) < count:  # labels unused: one corrupt label?
            # (a label of 2e9 in an im2rec file blamed identities.txt alone)
            key = int(layout.keys[-1])  # grouped by label: the largest label's last
            whence += (
                f", key {key}'s at offset {records.offsets[key]}; {len(present)} labels "
                "have images: a corrupt label?"
            )
        if property_file.is_file():  # unreadable records may hold larger labels
            at_least = bool(len(layout.unreadable)) and not header
            _check_property(property_file, records, count, whence, at_least)
    if names_file.is_file():
        # without identity records an unreadable record's label is unknown: a larger
        # one, its identity's name, may be among them
        open_ended = len(layout.unreadable) and not header
        all_names = _read_names(names_file, records, count, whence, count if open_ended else None)
        names = [all_names[label] for label in present]
    else:
        names = list(map(f"%0{len(str(present[-1]))}d".__mod__, present))  # zero-padded
    # one vectorised gather, where a dict of each identity's keys took 8 s at 2M
    # identities (10M records), per process
    kept = _select_identities(records.rec, names, counts, min_images_per_class, max_classes)
    sizes = counts[kept]
    samples = Samples(
        np.repeat(np.arange(len(kept)), sizes),
        keys=layout.keys[_ranges(starts[kept], sizes)],
        rec=records.rec,
    )
    return FaceFolder(
        root=records.rec,
        class_names=[names[i] for i in kept],
        samples=samples,
        records=records,
        unreadable_records=unreadable,
        records_read=len(layout.keys) + len(layout.unreadable) if len(layout.unreadable) else 0,
    )


def _rec_hint(folder: Path) -> str:
    """What to point ``data.root`` at when ``folder``, read as an image folder, holds
    RecordIO files that :func:`~facecluster.data.recordio.rec_paths` does not take
    (several, one without its ``.idx``, or one beside sub-folders); ``""`` when none."""
    if not folder.is_dir():
        return ""
    found = sorted(p for p in folder.glob("*.rec") if p.is_file())
    recs = [p for p in found if not p.name.startswith(".")]  # as rec_paths reads a folder
    if not recs and any(".tmp" in p.name for p in found):  # replacing_together's names
        return (
            f"{folder} holds the temporary files of a `facecluster pack` ({found[0].name}): "
            "a pack is writing the data set there, or was stopped before its end; wait for "
            "it to finish (or pack again), then train on the folder"
        )
    if len(recs) > 1:
        return (
            f"{folder} holds {len(recs)} RecordIO files and no train.rec "
            f"({shown_list([p.name for p in recs])}): point data.root at the .rec to train on"
        )
    if recs and not recs[0].with_suffix(".idx").is_file():
        return (
            f"{folder} holds {recs[0].name} without {recs[0].with_suffix('.idx').name} "
            "beside it, which a .rec is read with: copy it there too, then point data.root "
            f"at {recs[0]}"
        )
    if recs:
        return f"To train on the RecordIO file {folder} holds, point data.root at {recs[0]}"
    return ""


def scan(
    root: str | Path,
    min_images_per_class: int = 1,
    max_classes: int | None = None,
    cache: str | Path | None = None,
) -> FaceFolder:
    """An image folder or a RecordIO file, told apart by the path (``cache``: see
    :func:`scan_record_file`; folders ignore it).

    A RecordIO file is named by its ``.rec``, its ``.idx`` or its folder
    (:func:`~facecluster.data.recordio.rec_paths`). Any other file is refused as such,
    naming the ``.rec`` beside it (``property``, ``identities.txt``), and a folder
    read as an image folder that fails names the ``.rec`` files it holds."""
    paths = rec_paths(root)
    path = Path(root).expanduser()
    if paths is not None:
        if path.is_dir() and Path(paths[1]).is_file():  # a missing .idx: its error alone
            _warn_folders_beside(path, paths[0])
        return scan_record_file(root, min_images_per_class, max_classes, cache)
    if path.exists() and not path.is_dir():
        beside = rec_paths(path.parent)
        if beside is not None:
            hint = f"it lies beside {beside[0]}: point data.root at that file (or its folder)"
        else:
            hint = _rec_hint(path.parent)
        raise NotADirectoryError(
            f"root {str(root)!r} is a file, not an image folder, a .rec or its .idx"
            + (f"; {hint}" if hint else "")
        )
    try:
        return scan_image_folder(root, min_images_per_class, max_classes)
    except ValueError as e:
        hint = _rec_hint(path)
        if not hint:
            raise
        raise ValueError(f"{e}. {hint}") from None


def _warn_folders_beside(root: Path, rec: Path) -> None:
    """Warn when ``root``, read for its ``train.rec``, holds folders too (identity
    folders, maybe: it trained on the ``.rec`` without a word). Hidden ones and a
    file system's ``lost+found`` are not counted; up to 3 are named. A folder that
    cannot be listed (execute permission only: its files can still be read) is not
    looked into."""
    folders: list[str] = []
    with contextlib.suppress(OSError), os.scandir(root) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):  # a looping link is no folder
                if entry.name[:1] != "." and entry.name != "lost+found" and entry.is_dir():
                    folders.append(entry.name)
                    if len(folders) > 3:
                        break
    if folders:
        shown = ", ".join(sorted(folders[:3])) + (", ..." if len(folders) > 3 else "")
        logger.warning(
            f"root {str(root)!r} holds {rec.name} and folders too ({shown}): training "
            f"reads {rec}. To train on the image folders, point data.root at a folder "
            f"without {rec.name}"
        )


UNSEEN_SPLITS = ("val", "test")


def hold_out_identities(
    folder: FaceFolder, unseen_fraction: float, seed: int
) -> tuple[FaceFolder, dict[str, tuple[list[str], Samples]]]:
    """Keep ``unseen_fraction`` of the identities out of training entirely (open set).

    The unseen identities are the ``round(fraction * C)`` names (at least 2) that
    rank first by a hash of the seed and the name: the same for the same set of
    identities and seed. Adding identities can change which are drawn.
    Alternately, in draw order, they go to ``val`` (their faces choose the
    "unknown" threshold) and ``test`` (their faces measure the false positives): no
    identity serves both.

    Returns:
        The folder of the seen identities (labels renumbered ``0..C'-1`` in name
        order) and ``{"val": (names, faces), "test": ...}``: each split's unseen
        identities in name order and their faces, as :class:`Samples` (record keys or
        paths, not a string per face) labelled ``i - n`` for the i-th of the n.

    Raises:
        ValueError: a fraction outside ``[0, 1)``, or too few identities for it.
    """
    return _hold_out(folder, _draw_unseen(folder.class_names, unseen_fraction, seed))


def _unseen_count(num_classes: int, unseen_fraction: float) -> int:
    """How many identities :func:`hold_out_identities` draws (0 for a fraction of 0).

    Raises:
        ValueError: a fraction outside ``[0, 1)``, or too few identities for it.
    """
    if not 0.0 <= unseen_fraction < 1.0:
        raise ValueError(f"unseen_fraction must be in [0, 1), got {unseen_fraction}")
    if unseen_fraction == 0.0:
        return 0
    count = max(2, round(unseen_fraction * num_classes))
    if count > num_classes - 1:
        raise ValueError(
            f"unseen_fraction={unseen_fraction} of {num_classes} identities leaves "
            f"{num_classes - count} to train on (at least 2 unseen and 1 seen needed): "
            "lower unseen_fraction or use more identities"
        )
    return count


def _draw_unseen(names: Sequence[str], unseen_fraction: float, seed: int) -> list[int]:
    """The positions in ``names`` of :func:`hold_out_identities`' unseen identities, in
    draw order."""
    count = _unseen_count(len(names), unseen_fraction)
    if not count:
        return []
    # by position, ties in name order as sorting the names did; one generator reseeded
    rng = random.Random()

    def rank(i: int) -> float:
        rng.seed(_name_seed(f"{seed}:unseen:{names[i]}"))  # = Random(that text).random()
        return rng.random()

    return sorted(range(len(names)), key=rank)[:count]


def _hold_out(
    folder: FaceFolder, drawn: Sequence[int]
) -> tuple[FaceFolder, dict[str, tuple[list[str], Samples]]]:
    """:func:`hold_out_identities` with its draw made (``drawn``, in draw order)."""
    unseen: dict[str, tuple[list[str], Samples]] = {}
    if not len(drawn):
        return folder, unseen
    names = folder.class_names
    labels = folder.samples.labels
    counts = np.bincount(labels, minlength=len(names))
    order = np.argsort(labels, kind="stable")  # each label's samples, ascending
    starts = np.cumsum(counts) - counts
    for k, split in enumerate(UNSEEN_SPLITS):  # alternately, in draw order
        held = [i for i in sorted(drawn[k::2], key=names.__getitem__) if counts[i]]
        sizes = counts[held]
        own = np.repeat(np.arange(len(held), dtype=np.int64) - len(held), sizes)
        ids = order[_ranges(starts[held], sizes)]
        unseen[split] = ([names[i] for i in held], folder.samples.take(ids).relabel(own))
    is_seen = np.ones(len(names), dtype=bool)
    is_seen[drawn] = False
    seen = [names[i] for i in np.flatnonzero(is_seen).tolist()]
    new_label = np.where(is_seen, np.cumsum(is_seen) - 1, -1)
    relabelled = new_label[labels]
    kept_ids = np.flatnonzero(relabelled >= 0)
    samples = folder.samples.take(kept_ids).relabel(relabelled[kept_ids])
    # the held-out identities' empty files stay: the copy of the data set is damaged
    # there too (they were dropped, so on_bad_image=fail passed them silently)
    return (
        FaceFolder(
            folder.root,
            seen,
            samples,
            folder.empty_files,
            folder.records,
            folder.unreadable_records,
            folder.records_read,
        ),
        unseen,
    )


def _n_held_out(n: int, fraction: float) -> int:
    """Held-out count for one identity: at least one image whenever the fraction is non-zero."""
    return max(1, round(n * fraction)) if fraction > 0 else 0


def _min_images_for(val_fraction: float, test_fraction: float) -> int:
    """Smallest identity size that leaves >= 1 training image for these fractions."""
    n = 1
    while n - _n_held_out(n, val_fraction) - _n_held_out(n, test_fraction) < 1:
        n += 1
    return n


def validate_fractions(val_fraction: float, test_fraction: float) -> None:
    """Check that the split fractions are each in ``[0, 1)`` and sum to less than 1.

    Raises:
        ValueError: With a message naming ``val_fraction`` / ``test_fraction``.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave training images, "
            f"got {val_fraction} + {test_fraction} = {val_fraction + test_fraction}"
        )


def _name_seed(text: str) -> bytes:
    """A seed for ``random.Random`` from ``text``: its UTF-8 bytes, surrogate escapes
    kept, so a name that is not UTF-8 (kept by the scan with surrogate escapes, which
    ``Random(str)`` refuses to encode) seeds too, and every other name gives the same
    generator as ``Random(text)``, so no existing split moves."""
    return text.encode("utf-8", "surrogateescape")


_SPLIT_BLOCK = 1 << 20
"""Images :func:`split_per_identity` shuffles between two vectorised writes."""


def split_per_identity(
    folder: FaceFolder,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Split every identity's images into train/val/test.

    For each identity, its images (sorted by path) are shuffled with
    ``random.Random(f"{seed}:{class_name}")``; the first ``n_test`` go to test,
    the next ``n_val`` to val, the rest to train, where
    ``n_x = max(1, round(n * x_fraction))`` if ``x_fraction > 0`` else 0.
    Seeding by class name (not label) keeps an identity's split unchanged when
    other identities are added or removed.

    Args:
        folder: The scanned folder.
        val_fraction: Fraction of each identity's images for validation.
        test_fraction: Fraction of each identity's images for test.
        seed: Split seed.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``: ascending indices into
        ``folder.samples`` (int64 arrays; each split is ordered by label, then path).

    Raises:
        ValueError: Invalid fractions, or an identity would get no training image.
    """
    return _splits_of(_split_codes(folder, val_fraction, test_fraction, seed))


def _splits_of(split_of: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`split_per_identity`'s result from each sample's split (its index in
    ``SPLIT_NAMES``)."""
    return {name: np.flatnonzero(split_of == k) for k, name in enumerate(SPLIT_NAMES)}


def _split_codes(
    folder: FaceFolder, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """Each sample's split of :func:`split_per_identity`, as its index in
    ``SPLIT_NAMES`` (int8)."""
    validate_fractions(val_fraction, test_fraction)

    samples = folder.samples
    # which split each sample goes to, one byte each: Python lists of the indices took
    # about 36 bytes an image in every rank (1.5 GB at WebFace42M's 42.5M, computed)
    split_of = np.full(len(samples), len(SPLIT_NAMES), dtype=np.int8)
    TEST, VAL, TRAIN = (SPLIT_NAMES.index(name) for name in ("test", "val", "train"))
    too_small: list[str] = []
    # Every identity's images at once, by label, each in path (record key) order, so the
    # shuffle input never depends on scan order; a packed folder's keys follow its sorted
    # paths, so both split alike. A folder's samples are in path order within a label
    # already (FaceFolder): sorting them again, one decoded path per image, made the
    # split 2.5 times slower. One sort for all, and the splits written a block of
    # identities at a time: a numpy call or four per identity took 22 of the 38 s that
    # 2M identities (10M records) took (measured); each identity's generator is the rest.
    labels = samples.labels
    if samples.paths is None:
        order = np.lexsort((samples.keys, labels))
    else:
        order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=len(folder.class_names))
    present = np.flatnonzero(counts)
    sizes = counts[present]
    ends = np.cumsum(sizes)
    rng = random.Random()
    block_end = 0
    while block_end < len(present):  # blocks of about _SPLIT_BLOCK images
        block_start = block_end
        first = int(ends[block_start - 1]) if block_start else 0
        block_end = max(
            block_start + 1, int(np.searchsorted(ends, first + _SPLIT_BLOCK, side="right"))
        )
        block = order[first : int(ends[block_end - 1])].tolist()
        shuffled: list[int] = []
        runs: list[int] = []
        at = 0
        ids = present[block_start:block_end].tolist()
        for label, n in zip(ids, sizes[block_start:block_end].tolist(), strict=True):
            indices = block[at : at + n]
            at += n
            n_test = _n_held_out(n, test_fraction)
            n_val = _n_held_out(n, val_fraction)
            if n - n_test - n_val < 1:
                too_small.append(f"{folder.class_names[label]} ({n})")
                continue
            rng.seed(_name_seed(f"{seed}:{folder.class_names[label]}"))  # = Random(that text)'s
            rng.shuffle(indices)
            shuffled += indices
            runs += (n_test, n_val, n - n_test - n_val)
        codes = np.tile(np.array([TEST, VAL, TRAIN], dtype=np.int8), len(runs) // 3)
        split_of[np.array(shuffled, dtype=np.int64)] = np.repeat(codes, runs)

    if too_small:
        shown = shown_list(too_small, 10)
        raise ValueError(
            f"{len(too_small)} identities have too few images to keep at least one training image "
            f"with val_fraction={val_fraction} and test_fraction={test_fraction} "
            f"(each needs >= {_min_images_for(val_fraction, test_fraction)} images): {shown}. "
            f"Raise min_images_per_class to drop them, or lower val_fraction / "
            f"test_fraction"
        )
    return split_of


SPLIT_VERSION = 1
"""The version of :func:`hold_out_identities` and :func:`split_per_identity`'s results,
part of what names a kept split, and recorded in a run's ``split.json`` (a run split by
another is refused, :meth:`RunFolder.check_data`): raise it when either gives other
results."""


def split_data(
    folder: FaceFolder,
    unseen_fraction: float,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    cache: str | Path | None = None,
) -> tuple[FaceFolder, dict[str, tuple[list[str], Samples]], dict[str, np.ndarray]]:
    """:func:`hold_out_identities`, then :func:`split_per_identity` of the seen identities.

    With ``cache``, the result is kept there as ``split-<digest>.npz`` (one byte an
    image, 8 an unseen identity) for the next process that splits the same samples
    alike. At 2M identities and 41M images the two took 77 s in every process (each
    DDP rank, each stage-2 job, each evaluation and resume; measured on this 2-core
    machine), most of it one seeded generator per identity, which keeps an identity's
    split independent of the others. The digest is taken over what the result depends
    on, not the file's stamp: the names, every sample's label in order (and a ``.rec``'s
    record keys; a folder's paths only ordered its samples), the seed, the fractions and
    :data:`SPLIT_VERSION`. So a kept split is used exactly when the split made again
    would equal it. A kept file that cannot be read is made again; one that cannot be
    written costs a warning, not the run.

    Returns:
        The seen identities' folder, the unseen ones (:func:`hold_out_identities`) and
        the seen samples' splits (:func:`split_per_identity`).
    """
    count = _unseen_count(len(folder.class_names), unseen_fraction)
    validate_fractions(val_fraction, test_fraction)
    path = None
    if cache is not None:
        digest = _split_digest(folder, unseen_fraction, val_fraction, test_fraction, seed)
        path = Path(cache) / f"split-{digest}.npz"
        try:
            return _kept_split(path, folder, count)
        except FileNotFoundError:
            pass
        except Exception as e:  # any unreadable file (zip, npy or shape errors): made again
            logger.warning(f"{path}: unreadable ({e!r}); splitting {folder.root} again")
    drawn = _draw_unseen(folder.class_names, unseen_fraction, seed)
    seen, unseen = _hold_out(folder, drawn)
    split_of = _split_codes(seen, val_fraction, test_fraction, seed)
    if path is not None:
        try:
            with atomic_file(path, shared=True) as f:  # other users' runs read it too
                np.savez(f, drawn=np.array(drawn, dtype=np.int64), split_of=split_of)
        except OSError as e:
            logger.warning(f"could not keep the split of {folder.root} in {path}: {e}")
    return seen, unseen, _splits_of(split_of)


def _kept_split(
    path: Path, folder: FaceFolder, count: int
) -> tuple[FaceFolder, dict[str, tuple[list[str], Samples]], dict[str, np.ndarray]]:
    """:func:`split_data`'s result from its file ``path``, for ``count`` unseen identities.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that does not fit ``folder`` (or numpy's errors reading it).
    """
    with np.load(path) as kept:
        drawn, split_of = kept["drawn"], kept["split_of"]
    if drawn.dtype != np.int64 or drawn.shape != (count,) or len(np.unique(drawn)) != count:
        raise ValueError(f"not {count} distinct unseen identities: {drawn.shape} {drawn.dtype}")
    if count and not 0 <= drawn.min() <= drawn.max() < len(folder.class_names):
        raise ValueError("an unseen identity out of range")
    seen, unseen = _hold_out(folder, drawn.tolist())
    if split_of.dtype != np.int8 or split_of.shape != (len(seen.samples),):
        raise ValueError(f"not {len(seen.samples)} splits: {split_of.shape} {split_of.dtype}")
    if len(split_of) and not 0 <= split_of.min() <= split_of.max() < len(SPLIT_NAMES):
        raise ValueError("a split out of range")
    return seen, unseen, _splits_of(split_of)


def _split_digest(
    folder: FaceFolder, unseen_fraction: float, val_fraction: float, test_fraction: float, seed: int
) -> str:
    """A digest of everything :func:`split_data`'s result depends on."""
    digest = hashlib.blake2b(digest_size=16)
    settings = [SPLIT_VERSION, seed, unseen_fraction, val_fraction, test_fraction]
    digest.update(repr(settings).encode())
    samples = folder.samples
    digest.update(len(folder.class_names).to_bytes(8, "little"))
    for start in range(0, len(folder.class_names), _PATH_CHUNK):  # a NUL after each name
        part = folder.class_names[start : start + _PATH_CHUNK]
        digest.update(("\0".join(part) + "\0").encode("utf-8", "surrogatepass"))
    # a folder's split reads its samples' order, never their paths (they are in path
    # order already): the same run's data under a relative and an absolute data.root,
    # or moved, is the same split; a .rec's is sorted by record key
    records = samples.paths is None
    digest.update(b"keys" if records else b"order")
    columns = [samples.labels, *([samples.keys] if records else [])]
    for column in columns:
        array = np.ascontiguousarray(column)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()
