"""InsightFace RecordIO (``train.rec`` + ``train.idx``), read and written without mxnet.

The format, after dmlc-core ``include/dmlc/recordio.h`` and mxnet's
``python/mxnet/recordio.py``:

- a record is ``uint32`` magic ``0xced7230a``, ``uint32`` lrecord (low 29 bits: the
  length, high 3 bits: cflag), the payload, then zero padding to 4 bytes. The writer
  splits a payload wherever the magic occurs at a 4-byte aligned position and drops
  those 4 bytes: cflag 0 is a whole record, 1/2/3 the start/middle/end of a split
  one, which the reader joins, putting the magic back between the parts;
- a payload is a header ``<IfQQ`` (flag, label, id, id2); when ``flag > 0`` that
  many float32 labels follow (the label is then an array); the rest is the encoded
  image (JPEG, sometimes PNG);
- the ``.idx`` file holds text lines ``key<TAB>offset``, in any order.

InsightFace's face layout (``rec_builder.py``, ``face2rec2.py``): record 0 is a
header whose label is ``(first identity-record key, end key)``; the image records
follow; then one record per identity, in identity order, whose label is that
identity's ``[start, end)`` range of image keys. Files written by plain ``im2rec``
have no header record: every record is an image carrying its label.

Labels are float32, exact only up to 2^24 = 16,777,216. Identity labels stay below
that (WebFace42M has 2.06M identities), but the key ranges of Glint360K (17.1M
images) and WebFace42M pass it. Each range boundary past 2^24 is therefore
corrected against the image records themselves: the true boundary is where the
(exact) identity label of consecutive image records changes, found among the few
keys a float32 rounding can reach.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import operator
import os
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from facecluster.data.images import BadImageError, decode_image
from facecluster.io import atomic_file, file_stamp

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2: 24 bytes
_LENGTH_MASK = (1 << 29) - 1
FLOAT32_EXACT = 1 << 24
"""Integers above this are not all representable in float32."""
KEY_LIMIT = 1 << 32
"""Header keys from here are refused: the search for a float32-rounded key's true value
reads a window of twice its spacing (512 keys at 2^32; 2^27, for hours, at 2^50)."""
HEADS_BLOCK = 1 << 18
"""Records per block of :meth:`RecordFile.heads` (a block gathers 16 bytes of each)."""
UNREADABLE = -2
"""The label :meth:`RecordFile.heads` gives, with ``strict=False``, a record whose
header cannot be read (a corrupt or truncated record): its identity is unknown."""

logger = logging.getLogger(__name__)


class RecordError(OSError):
    """A record cannot be read (bad magic, truncated); the message names file, key, offset.

    An OSError, so the datamodule treats a corrupt record like an undecodable image
    (``on_bad_image=skip|fail``).
    """


class TruncatedRecord(RecordError):
    """A record runs past the end of its file."""


@dataclass(frozen=True)
class Record:
    """One unpacked payload."""

    flag: int
    label: float | np.ndarray
    """A float, or a float32 array of ``flag`` labels when ``flag > 0``."""
    id: int
    id2: int
    data: bytes
    """The encoded image (empty for header and identity records)."""


def pack(label: float | Sequence[float], data: bytes = b"", id: int = 0, id2: int = 0) -> bytes:
    """A payload: header, optional label array, encoded image bytes."""
    if np.ndim(label) == 0:  # a Python or numpy number
        return _HEADER.pack(0, float(label), id, id2) + data
    labels = np.asarray(label, dtype=np.float32)
    return _HEADER.pack(len(labels), 0.0, id, id2) + labels.tobytes() + data


def _data_offset(payload: bytes) -> int:
    """Where the encoded image starts: after the header and its ``flag`` labels."""
    if len(payload) < _HEADER.size:
        raise ValueError(f"payload of {len(payload)} bytes is shorter than its 24-byte header")
    flag = _HEADER.unpack_from(payload)[0]
    offset = _HEADER.size + 4 * flag
    if offset > len(payload):
        raise ValueError(f"header says {flag} labels, the payload holds fewer")
    return offset


def unpack(payload: bytes) -> Record:
    offset = _data_offset(payload)
    flag, label, id_, id2 = _HEADER.unpack_from(payload)
    if flag > 0:
        label = np.frombuffer(payload[_HEADER.size : offset], dtype=np.float32).copy()
    return Record(flag, label, id_, id2, bytes(payload[offset:]))


def encode_record(payload: bytes) -> bytes:
    """The bytes of one record as dmlc's writer lays them out (magic splitting, padding)."""
    parts, start, i = [], 0, payload.find(_MAGIC_BYTES)
    while i >= 0:
        if i % 4 == 0:  # dmlc splits only at 4-byte aligned occurrences
            parts.append(payload[start:i])
            start = i + 4
            i = payload.find(_MAGIC_BYTES, i + 4)
        else:
            i = payload.find(_MAGIC_BYTES, i + 1)
    parts.append(payload[start:])
    too_long = max(len(part) for part in parts)
    if too_long >= 1 << 29:  # the length field's 29 bits; dmlc's writer refuses it too
        raise ValueError(
            f"a record payload holds {too_long} bytes without a break: RecordIO stores "
            "under 2^29 (512 MiB)"
        )
    out = bytearray()
    for n, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else 1 if n == 0 else 3 if n == len(parts) - 1 else 2
        out += struct.pack("<II", MAGIC, (cflag << 29) | len(part)) + part
        out += b"\0" * (-len(part) % 4)
    return bytes(out)


class RecordWriter:
    """Writes ``.rec`` and ``.idx`` side by side (keys in any order)."""

    def __init__(self, rec: str | Path, idx: str | Path) -> None:
        self._rec = open(rec, "wb")  # noqa: SIM115 (closed in close())
        self._idx = open(idx, "w")  # noqa: SIM115

    def write(self, key: int, payload: bytes) -> None:
        # encoded first: a payload encode_record refuses leaves no .idx line behind,
        # which would point at the next record's offset under this key
        record = encode_record(payload)
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        self._rec.write(record)

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rec_paths(root: str | Path) -> tuple[Path, Path] | None:
    """``(.rec, .idx)`` when ``root`` names a RecordIO data set, else None.

    - A folder is looked into first, whatever its name (a download unpacked into
      ``glint360k.rec/`` holds ``train.rec``): its ``train.rec``; without one, the one
      ``*.rec`` file it holds, when its ``.idx`` is beside it and the folder holds no
      sub-folder (identity folders: it is read as an image folder, as before; what
      a folder of several ``.rec`` files, or of one without its ``.idx``, is told is
      :func:`~facecluster.data.folder.scan`'s). The look stops at the first sub-folder,
      so an image folder costs a few entries.
    - A path ending in ``.rec`` that is no folder is the file itself (its absence is
      named when it is opened).
    - A path ending in ``.idx`` that is an existing file stands for its ``.rec``: the
      pair is one data set, named as plainly by either half (a missing one is not
      found as written).

    The ``.idx`` is always the ``.rec``'s path with the suffix ``.idx``."""
    root = Path(root).expanduser()
    if root.is_dir():
        try:
            return _rec_in_folder(root)
        except PermissionError as e:  # it named the train.rec it could not look for
            raise ValueError(
                f"cannot read the folder {root} ({e.strerror}): make it readable by this "
                "user (or run as one who can read it)"
            ) from None
    if root.suffix == ".idx" and root.is_file():  # a missing one: not found as written
        root = root.with_suffix(".rec")
    if root.suffix != ".rec":
        return None
    return root, root.with_suffix(".idx")


def _rec_in_folder(root: Path) -> tuple[Path, Path] | None:
    """:func:`rec_paths` of a folder."""
    rec = root / "train.rec"
    if rec.is_file():
        return rec, rec.with_suffix(".idx")
    found = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    return None
                if entry.name.endswith(".rec") and entry.is_file():
                    found.append(Path(entry.path))
            except OSError:  # a looping link is no data set file
                continue
    if len(found) != 1 or not found[0].with_suffix(".idx").is_file():
        return None
    return found[0], found[0].with_suffix(".idx")


def _canonical_index(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """The key and offset columns of an ``.idx`` whose every line is ``<key>TAB<offset>``
    (what mxnet and ``facecluster pack`` write), parsed in one vectorised pass; None
    for anything else (a blank line, spaces, CRLF, a bad token), which the line-by-line
    reader then reads or names."""
    if not data:
        return None
    text = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(text == ord("\n"))
    if not data.endswith(b"\n"):
        ends = np.append(ends, len(text))
    tabs = np.flatnonzero(text == ord("\t"))
    # exactly one tab per line (the k-th tab in line k) and no other whitespace
    if len(tabs) != len(ends) or np.count_nonzero(np.isin(text, list(b" \r\x0b\x0c"))):
        return None
    if not np.array_equal(np.searchsorted(ends, tabs), np.arange(len(ends))):
        return None
    # every key and offset ends with a digit (numpy reads a lone "-" or "+" as 0)
    last = text[np.concatenate([tabs, ends]) - 1]
    if np.count_nonzero((last < ord("0")) | (last > ord("9"))):
        return None
    try:  # numpy's text parser: no Python object per token (4M lines: 0.5 s, not 2.3)
        with warnings.catch_warnings():  # an older numpy warns, not raises, on a bad token
            warnings.simplefilter("error", DeprecationWarning)
            values = np.fromstring(data, dtype=np.int64, sep=" ")
    except (ValueError, OverflowError, DeprecationWarning):
        return None
    limits = np.iinfo(np.int64)
    if np.count_nonzero((values == limits.max) | (values == limits.min)):
        return None  # out of range: numpy clips it, the line reader names it
    if len(values) != 2 * len(ends):  # a line with an empty key or offset
        return None
    return values[0::2], values[1::2]


class RecordIndex(Mapping):
    """The ``.idx``: record key -> byte offset, held in int64 arrays.

    A dict of 17M Python ints costs about 100 bytes per record in every process, and
    each lookup in a DataLoader worker bumps the reference count of the offset it
    returns, so over an epoch a worker copies those pages of its parent. Here a key
    is looked up in a dense table (keys ``0..max`` with few gaps, InsightFace's and
    ``im2rec``'s layout) or by binary search. A key listed twice keeps its last
    offset, as a dict filled line by line would.
    """

    def __init__(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        if len(keys) < 2 or bool(np.all(keys[1:] > keys[:-1])):
            # in key order, each once (what InsightFace and facecluster pack write): as
            # it is, no sort (np.unique and setdiff1d over 44.6M lines: 96 s, a review measured;
            # 5.5 s for 4M here)
            self.keys_, self.offsets_ = keys, offsets
            earlier = np.zeros(len(keys), dtype=bool)
        else:
            last = len(keys) - 1 - np.unique(keys[::-1], return_index=True)[1]
            self.keys_ = keys[last]  # sorted, unique
            self.offsets_ = offsets[last]
            earlier = np.ones(len(keys), dtype=bool)
            earlier[last] = False
        self.listed_twice = len(np.unique(keys[earlier]))
        """Keys listed more than once (im2rec of a list with a repeated index)."""
        named = np.unique(offsets[earlier])
        self.shadowed = named[~np.isin(named, self.offsets_)] if len(named) else named
        """Sorted offsets of those keys' earlier lines that no key reads (its last line
        wins, as in mxnet): records the ``.idx`` lists, left unread."""
        self._dense: np.ndarray | None = None
        if len(self.keys_) and self.keys_[0] >= 0 and self.keys_[-1] < 2 * len(self.keys_) + 64:
            self._dense = np.full(int(self.keys_[-1]) + 1, -1, dtype=np.int64)
            self._dense[self.keys_] = self.offsets_

    def is_shadowed(self, offset: int) -> bool:
        """Whether a record starts at ``offset`` that only an earlier line names."""
        i = int(np.searchsorted(self.shadowed, offset))
        return i < len(self.shadowed) and int(self.shadowed[i]) == offset

    def __getitem__(self, key: int) -> int:
        key = operator.index(key)
        if self._dense is not None:
            if 0 <= key < len(self._dense):
                offset = int(self._dense[key])
                if offset >= 0:
                    return offset
            raise KeyError(key)
        i = int(np.searchsorted(self.keys_, key))
        if i < len(self.keys_) and int(self.keys_[i]) == key:
            return int(self.offsets_[i])
        raise KeyError(key)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The offsets of ``keys`` (int64), -1 for a key not in the index."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._dense is not None:
            inside = (keys >= 0) & (keys < len(self._dense))
            return np.where(inside, self._dense[np.where(inside, keys, 0)], -1)
        if not len(self.keys_):  # RecordFile refuses an empty .idx; the class does not
            return np.full(keys.shape, -1, dtype=np.int64)
        i = np.minimum(np.searchsorted(self.keys_, keys), len(self.keys_) - 1)
        return np.where(self.keys_[i] == keys, self.offsets_[i], -1)

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except (KeyError, TypeError):  # TypeError: not an integer
            return False
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys_.tolist())

    def __len__(self) -> int:
        return len(self.keys_)

    @property
    def last_key(self) -> int:
        """The largest key (``max()`` without iterating every key)."""
        return int(self.keys_[-1])


class RecordFile:
    """Random access to an indexed RecordIO file, memory-mapped.

    Safe in DataLoader workers: the map is opened lazily in each process and never
    pickled. Every offset of the ``.idx`` is checked against the file size at open.

    Args:
        rec: the ``.rec`` file.
        idx: its ``.idx`` (default: beside it).
    """

    def __init__(self, rec: str | Path, idx: str | Path | None = None) -> None:
        self.rec = Path(rec)
        self.idx = Path(idx) if idx is not None else self.rec.with_suffix(".idx")
        for path in (self.rec, self.idx):
            if not path.is_file():
                hint = ""
                if path == self.idx and idx is None:  # the .rec is there, its index not
                    hint = (
                        f" (a .rec is read through its .idx, beside it: copy {path.name} "
                        "with it; `facecluster pack` writes both)"
                    )
                raise FileNotFoundError(f"{path} does not exist{hint}")
        self.stamp = file_stamp(self.rec, inode=False)  # what each process's map must be of
        self.size = self.stamp[0]
        self.offsets = self._read_index()
        self._map: memoryview | None = None
        self._pid = -1
        self._words_of: memoryview | None = None  # what _word_array views
        self._word_array: np.ndarray | None = None
        self._check_last_record()

    def _check_last_record(self) -> None:
        # A file cut inside its last record passes the offsets check of _read_index; a
        # file without identity records (im2rec, a shuffled pack) ends with an image
        # record, which would otherwise fail only when training reads it. A corrupt
        # record is on_bad_image's to report, not a reason to refuse the file.
        last = int(np.argmax(self.offsets.offsets_))
        key = int(self.offsets.keys_[last])
        # An .idx cut short (an interrupted copy) indexes fewer records than the file
        # holds: the records after the last indexed one, and their identities, would
        # be left out of training without a word.
        try:
            self.payload(key)
            end = self._end_of(self.offsets[key])
            while self.offsets.is_shadowed(end):  # records of keys listed again, last
                end = self._end_of(end)
            if self._buffer()[end : end + 4] == _MAGIC_BYTES:
                raise ValueError(
                    f"{self.idx} indexes {self.rec} up to byte {end}, its last indexed record "
                    f"(key {key}), but {self.size - end} more bytes of records follow that it "
                    f"does not list: truncated .idx? (copy it again, or pack the folder again)"
                )
        except TruncatedRecord:
            raise ValueError(
                f"{self.rec} ends inside its last record (key {key} at offset "
                f"{self.offsets[key]}, {self.size} bytes): truncated file?"
            ) from None
        except RecordError:
            pass
        finally:
            self._map = None  # each process maps the file itself, when it first reads

    def _end_of(self, pos: int) -> int:
        """Where the record that starts at ``pos`` ends: after its last part (a split
        record has several) and its padding to 4 bytes."""
        buf = self._buffer()
        while pos + 8 <= self.size:
            magic, lrecord = struct.unpack_from("<II", buf, pos)
            length = lrecord & _LENGTH_MASK
            pos += 8 + length + (-length % 4)
            if magic != MAGIC or lrecord >> 29 in (0, 3):
                break
        return pos

    def _read_index(self) -> RecordIndex:
        pairs = _canonical_index(self.idx.read_bytes())
        if pairs is None:  # a blank line, other whitespace, a bad token: line by line
            keys, offsets, line_numbers = self._read_index_lines()
        else:
            keys, offsets = pairs
            line_numbers = np.arange(1, len(keys) + 1)
        past = np.flatnonzero((offsets < 0) | (offsets > self.size - 8))
        if len(past):
            i = int(past[0])
            self._past_end(int(line_numbers[i]), int(keys[i]), int(offsets[i]))
        if not len(keys):
            raise ValueError(f"{self.idx} lists no record")
        index = RecordIndex(keys, offsets)
        self._check_one_record_per_key(index)
        if len(index.shadowed):  # (a line listed twice reads one record: no warning)
            logger.warning(
                "%s lists %d key(s) more than once: each reads the record of its last line, "
                "as in mxnet; %d record(s) that earlier lines name (the first at byte %d) "
                "are not read",
                self.idx,
                index.listed_twice,
                len(index.shadowed),
                index.shadowed[0],
            )
        return index

    def _check_one_record_per_key(self, index: RecordIndex) -> None:
        """Refuse two keys that point at one record: it was read under both, and the
        record the damaged line should name was never read, without a word (the checks
        of unlisted records miss it: every record start is still listed, up to 2^24).
        In file order (what InsightFace and ``facecluster pack`` write) one comparison
        pass; otherwise a sort (5 s at 44.6M keys)."""
        offsets = index.offsets_
        if len(offsets) < 2 or bool(np.all(offsets[1:] > offsets[:-1])):
            return
        ordered = np.sort(offsets)
        same = np.flatnonzero(ordered[1:] == ordered[:-1])
        if not len(same):
            return
        offset = int(ordered[same[0]])
        a, b = (int(k) for k in index.keys_[np.flatnonzero(offsets == offset)[:2]])
        raise ValueError(
            f"{self.idx}: keys {a} and {b} point at the same record, at offset {offset} "
            f"({len(same)} such repeat(s)): a damaged .idx? Each key names a record of its "
            f"own; restore the .idx from a copy of the data set"
        )

    def _past_end(self, line_no: int, key: int, offset: int) -> NoReturn:
        if offset < 0:  # was "past the end"
            raise ValueError(
                f"{self.idx} line {line_no}: key {key} points at offset {offset}, before the "
                "start of the file: a damaged .idx?"
            )
        raise ValueError(
            f"{self.idx} line {line_no}: key {key} points at offset {offset}, "
            f"past the end of {self.rec} ({self.size} bytes): truncated file, or the .idx "
            "of another .rec?"
        )

    def _read_index_lines(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys, offsets, line_numbers = [], [], []
        # ASCII, whatever the locale: a stray byte fails as a bad token on its line
        # (named), not as a UnicodeDecodeError, and no non-ASCII digit reads as one
        with open(self.idx, encoding="ascii", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    key, offset = (int(v) for v in line.split())
                except ValueError:
                    raise ValueError(
                        f"{self.idx} line {line_no}: expected 'key<TAB>offset', got {line!r}"
                    ) from None
                if not 0 <= offset <= self.size - 8:
                    self._past_end(line_no, key, offset)
                if not -(2**63) <= key < 2**63:
                    raise ValueError(f"{self.idx} line {line_no}: key {key} is out of range")
                keys.append(key)
                offsets.append(offset)
                line_numbers.append(line_no)
        as_array = [np.asarray(v, dtype=np.int64) for v in (keys, offsets, line_numbers)]
        return as_array[0], as_array[1], as_array[2]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_map"], state["_pid"] = None, -1
        state["_words_of"] = state["_word_array"] = None
        return state

    def _buffer(self) -> memoryview:
        # a memoryview: its slices are views of the mapped file, an mmap's are copies
        if self._map is None or self._pid != os.getpid():
            with open(self.rec, "rb") as f:
                now = file_stamp(f.fileno(), inode=False)
                if now != self.stamp:
                    # its offsets are the old file's: each record read as corrupt, and the
                    # run stopped on a "damaged" data set (a review: a `facecluster pack
                    # --overwrite` of the folder a run trained on, its workers opening the new
                    # file at the next epoch). Not an OSError: no bad image.
                    then, since = (datetime.fromtimestamp(t[1] / 1e9) for t in (self.stamp, now))
                    raise BadImageError(
                        f"{self.rec} was replaced or changed since it was read at start "
                        f"({self.stamp[0]:,} bytes modified {then:%Y-%m-%d %H:%M:%S.%f} then, "
                        f"{now[0]:,} bytes modified {since:%Y-%m-%d %H:%M:%S.%f} now): a .rec "
                        "must stay as it is while a run reads it (a `facecluster pack "
                        "--overwrite` into its folder?). Put the file the run started with "
                        "back, or start a new run on the new one (a resume checks that its "
                        "split is the run's)"
                    )
                self._map = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            self._pid = os.getpid()
        return self._map

    def payload(self, key: int) -> bytes | memoryview:
        """The payload of record ``key`` (split records joined, the magic restored): a
        view of the mapped file, or, for a split record, new bytes."""
        if key not in self.offsets:
            raise KeyError(f"{self.rec}: no record with key {key} in {self.idx}")
        buf, pos = self._buffer(), self.offsets[key]
        parts = []
        while True:
            if pos + 8 > self.size:
                raise TruncatedRecord(
                    f"{self.rec} key {key} at offset {self.offsets[key]}: truncated"
                )
            magic, lrecord = struct.unpack_from("<II", buf, pos)
            if magic != MAGIC:
                raise RecordError(
                    f"{self.rec} key {key} at offset {self.offsets[key]}: bad magic "
                    f"0x{magic:08x} at byte {pos} (corrupt record)"
                )
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            if pos + 8 + length > self.size:
                raise TruncatedRecord(
                    f"{self.rec} key {key} at offset {self.offsets[key]}: truncated"
                )
            if cflag == 0 and not parts:  # a whole record, the usual case: no copy
                return buf[pos + 8 : pos + 8 + length]
            parts.append(buf[pos + 8 : pos + 8 + length])
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)

    def head(self, key: int) -> tuple[int, float, bool]:
        """(identity label, first label, is an image record) of record ``key``, reading
        only its header bytes (the whole payload only for a record split by the writer).
        An image record is one with bytes after its labels, or one of no label array
        (``flag`` 0 or 1) whose image is empty (what mxnet's ``im2rec --pass-through``
        writes for a zero-byte file: a broken image, ``data.on_bad_image``'s); a header
        or identity record (a label array, ``flag >= 2``, nothing after it) is none."""
        pos = self.offsets.get(key)
        if pos is None:
            raise KeyError(f"{self.rec}: no record with key {key} in {self.idx}")
        buf = self._buffer()
        if pos + 8 + _HEADER.size <= self.size:
            magic, lrecord = struct.unpack_from("<II", buf, pos)
            length = lrecord & _LENGTH_MASK
            if magic == MAGIC and lrecord >> 29 == 0 and length >= _HEADER.size:
                flag, label, _, _ = _HEADER.unpack_from(buf, pos + 8)
                labels = _HEADER.size + 4 * flag
                if flag > 0 and length >= labels:
                    label = struct.unpack_from("<f", buf, pos + 8 + _HEADER.size)[0]
                if flag == 0 or length >= labels:
                    return self._whole(key, label), label, length > labels or flag < 2
        record = self.record(key)
        first = float(record.label if record.flag == 0 else record.label[0])
        return self._whole(key, first), first, bool(record.data) or record.flag < 2

    def heads(
        self, keys: np.ndarray, strict: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`head` for many keys at once, read from the mapped file with numpy:
        ``(labels, is_image, present)``, int64 and bool arrays like ``keys``. A key
        with no record is not present (its label -1). Records that are split, or whose
        header does not read cleanly, are read by :meth:`head`, which names what is
        wrong; so is a label that is not a whole number >= 0. ``strict=False``: such a
        record is present, holds no image and has the label :data:`UNREADABLE` (call
        :meth:`head` on it for the reason)."""
        keys = np.asarray(keys, dtype=np.int64).ravel()
        labels = np.full(len(keys), -1, dtype=np.int64)
        image = np.zeros(len(keys), dtype=bool)
        present = np.zeros(len(keys), dtype=bool)
        for block in range(0, len(keys), HEADS_BLOCK):
            part = slice(block, block + HEADS_BLOCK)
            at, clean, length, label_bytes, first, _ = self._fields(keys[part])
            whole = clean & (first >= 0) & (first < 2**62) & (first == np.floor(first))
            labels[part][whole] = first[whole].astype(np.int64)
            # bytes after the labels, or no label array (flag < 2: an empty image, broken)
            is_image = (length > label_bytes) | (label_bytes < _HEADER.size + 8)
            image[part][whole] = is_image[whole]
            present[part] = at >= 0
            for i in np.flatnonzero((at >= 0) & ~whole) + block:  # head reads or names it
                try:
                    labels[i], _, image[i] = self.head(int(keys[i]))
                except RecordError:
                    if strict:
                        raise
                    labels[i] = UNREADABLE
        return labels, image, present

    def ranges(self, keys: np.ndarray) -> np.ndarray:
        """``[n, 2]`` the key ranges of identity records (the first two entries of their
        label arrays), read as :meth:`heads` reads; a record that is not an identity
        record, or a range that is not whole numbers >= 0, is named by key and offset."""
        keys = np.asarray(keys, dtype=np.int64).ravel()
        out = np.zeros((len(keys), 2), dtype=np.int64)
        for block in range(0, len(keys), HEADS_BLOCK):
            part = slice(block, block + HEADS_BLOCK)
            at, clean, _, label_bytes, first, second = self._fields(keys[part])
            pair = np.stack([first, second], axis=1)
            whole = clean & (label_bytes >= _HEADER.size + 8)
            whole &= ((pair >= 0) & (pair < 2**62) & (pair == np.floor(pair))).all(axis=1)
            out[part][whole] = pair[whole].astype(np.int64)
            for i in np.flatnonzero(~whole) + block:  # one by one: read, or named
                key = int(keys[i])
                if key not in self.offsets:
                    raise RecordError(f"{self.rec}: no identity record with key {key}")
                record = self.record(key)
                if record.flag < 2:
                    raise RecordError(f"{self.rec} key {key}: not an identity record")
                out[i] = [self._whole(key, float(v)) for v in record.label[:2]]
        return out

    def _fields(self, keys: np.ndarray) -> tuple[np.ndarray, ...]:
        """What :meth:`heads` and :meth:`ranges` read of each record: its offset (-1:
        none), whether its start reads cleanly (magic, a whole record, the header and
        its label array inside the record and the file), its length and header size,
        and its first two labels (float64; NaN where it has no second)."""
        at = self.offsets.lookup(keys)
        data = np.frombuffer(self._buffer(), dtype=np.uint8)
        room = (at >= 0) & (at + 8 + _HEADER.size <= self.size)
        start = np.where(room, at, 0)
        fields = data[start[:, None] + np.arange(16)]  # magic, lrecord, flag, label
        words = fields.view("<u4")
        magic, lrecord, flag = words[:, 0], words[:, 1], words[:, 2].astype(np.int64)
        length = (lrecord & _LENGTH_MASK).astype(np.int64)
        label_bytes = _HEADER.size + 4 * flag
        clean = room & (magic == MAGIC) & (lrecord >> 29 == 0) & (length >= label_bytes)
        clean &= start + 8 + label_bytes <= self.size
        # bytes that are no label (a foreign .idx, a corrupt record) may read as a
        # signalling NaN, whose widening numpy warns of: such a label is refused anyway
        with np.errstate(invalid="ignore"):
            first = fields.view("<f4")[:, 3].astype(np.float64)
            second = np.full(len(keys), np.nan)
            listed = clean & (flag > 0)
            for entry, out, rows in ((0, first, listed), (1, second, listed & (flag >= 2))):
                if rows.any():  # a label array's first and second entries, after the header
                    offset = start[rows] + 8 + _HEADER.size + 4 * entry
                    out[rows] = data[offset[:, None] + np.arange(4)].view("<f4")[:, 0]
        return at, clean, length, label_bytes, first, second  # at: -1 for no record

    def _whole(self, key: int, label: float) -> int:
        """``label`` as an identity label or key, which is a whole number >= 0."""
        if 0 <= label < 2**62 and label == label // 1:  # NaN and inf fail
            return int(label)
        raise RecordError(
            f"{self.rec} key {key} at offset {self.offsets[key]}: label {label} is not an "
            "identity label or record key (a whole number >= 0)"
        )

    def record(self, key: int) -> Record:
        try:
            return unpack(self.payload(key))
        except ValueError as e:
            raise self._bad(key, e) from None

    def _bad(self, key: int, error: ValueError) -> RecordError:
        return RecordError(f"{self.rec} key {key} at offset {self.offsets[key]}: {error}")

    def encoded(self, locator: int | str, view: bool = False) -> bytes | memoryview:
        """The encoded image of record ``key`` or locator ``<file>#<key>``; ``view``: a
        memoryview of the mapped file where the record is whole (no copy; for reading
        at once, as a loader decodes it)."""
        key = locator if isinstance(locator, int) else int(locator.rsplit("#", 1)[1])
        payload = self.payload(key)
        # record(key).data without building the Record (a loader reads one per image)
        try:
            data = payload[_data_offset(payload) :]
        except ValueError as e:
            raise self._bad(key, e) from None
        return data if view else bytes(data)

    def views(self, keys: np.ndarray) -> list[memoryview | None]:
        """:meth:`encoded` with ``view`` for a batch of record keys, at a fraction of its
        per-record cost: one index lookup and one gather of the records' first words for
        all, then a slice per record. None for a record that is not whole and sound (a
        missing key, a split, truncated or corrupt record): :meth:`encoded` reads that
        one and says what is wrong."""
        buf, size = self._buffer(), self.size
        pos = self.offsets.lookup(keys)
        # magic, lrecord and the payload header's flag: 3 words from the record's start
        # (dmlc aligns records to 4 bytes; an unaligned offset is not a record start)
        inside = (pos >= 0) & (pos <= size - 8 - _HEADER.size) & (pos % 4 == 0)
        if not inside.any():
            return [None] * len(pos)
        at = np.where(inside, pos // 4, 0)[:, None] + np.arange(3)
        magic, lrecord, flag = self._words()[at].astype(np.int64).T
        start, end = pos + 8 + _HEADER.size + 4 * flag, pos + 8 + (lrecord & _LENGTH_MASK)
        sound = inside & (magic == MAGIC) & (lrecord >> 29 == 0) & (start <= end) & (end <= size)
        return [
            buf[a:b] if ok else None
            for a, b, ok in zip(start.tolist(), end.tolist(), sound.tolist(), strict=True)
        ]

    def misplaced_offsets(self, looked_at: int = 1024) -> tuple[int, int]:
        """``(offsets where no record starts, offsets looked at)``, of up to ``looked_at``
        of the ``.idx``'s offsets evenly over the file: most of them missing a record
        means the ``.idx`` of another ``.rec`` (one corrupt record is one of them)."""
        offsets = np.sort(self.offsets.offsets_)
        if len(offsets) > looked_at:
            offsets = offsets[np.linspace(0, len(offsets) - 1, looked_at).astype(np.int64)]
        starts, _ = self._record_starts(offsets)
        return int(np.count_nonzero(~starts)), len(offsets)

    def _record_starts(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For sorted byte ``offsets``: whether a record starts there (aligned, the
        magic, a whole record's or a split one's first part), and its length word (0
        where none can be read)."""
        words = self._words()
        inside = (offsets % 4 == 0) & (offsets // 4 + 1 < len(words))
        at = np.where(inside, offsets // 4, 0)
        lrecord = np.where(inside, words[at + 1], 0).astype(np.int64)
        return inside & (words[at] == MAGIC) & (lrecord >> 29 < 2), lrecord

    def _words(self) -> np.ndarray:
        """The mapped file as little-endian uint32 words (its last 0-3 bytes left out)."""
        buf = self._buffer()
        if self._words_of is not buf:
            self._words_of = buf
            self._word_array = np.frombuffer(buf[: len(buf) // 4 * 4], dtype="<u4")
        return self._word_array

    def image(self, locator: int | str) -> torch.Tensor:
        """The decoded image of record ``key`` or locator ``<file>#<key>``: ``uint8[H, W, 3]``
        (see :func:`~facecluster.data.images.decode_image`; PIL's errors for bad bytes)."""
        return decode_image(self.encoded(locator))

    def locator(self, key: int) -> str:
        """How a record is named in samples and messages: ``<file>#<key>``."""
        return f"{self.rec}#{key}"


@dataclass(frozen=True)
class RecordLayout:
    """Which records are images, and which identity each belongs to."""

    keys: np.ndarray
    """[N] image record keys, grouped by identity, identities in label order."""
    labels: np.ndarray
    """[N] identity label of each image record."""
    unreadable: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Keys of records whose header cannot be read, in a file without identity records:
    their identity is unknown, so they are in no identity (``data.on_bad_image``
    decides whether that stops the run, as for a zero-byte file of a folder)."""
    identity_records: int | None = None
    """How many identity records the header gives (InsightFace's layout: identities
    without an image count too); None for a file without them."""

    @property
    def identities(self) -> int:
        """How many identity labels the file has: its identity records, else its
        largest image label + 1."""
        if self.identity_records is not None:
            return self.identity_records
        return int(self.labels.max()) + 1 if len(self.labels) else 0


def image_layout(records: RecordFile, cache: str | Path | None = None) -> RecordLayout:
    """The image records and their identities, from the identity records when present.

    With InsightFace's header record only the identity records are read, plus, for
    boundaries past 2^24, the label bytes of the few records around each one.
    Without it (plain im2rec files) one pass reads every record's label bytes (not the
    image bytes). With ``cache`` (a folder), that pass is kept there and later calls on
    the same unchanged files read it instead (see :func:`_scan_cached`).
    """
    first_key = int(records.offsets.keys_[0])  # no list of every key unless scanned
    try:
        header = records.record(0) if first_key == 0 and not records.head(0)[2] else None
    except RecordError:  # im2rec's first image, broken (a header broken: read as im2rec)
        header = None
    if header is None or header.flag < 2:
        return _scan_cached(records, cache) if cache is not None else _scan_all(records)
    stored = [records._whole(0, float(v)) for v in header.label[:2]]
    if max(stored) >= KEY_LIMIT:  # the search around each float32 key grows with it
        raise RecordError(
            f"{records.rec} key 0 (the header record): its identity records [{stored[0]}, "
            f"{stored[1]}) lie at or past key 2^32, where a float32 label places a key only to "
            f"within +-{_spacing(max(stored))}: a damaged header? (the largest InsightFace "
            "data sets end below key 2^28)"
        )
    first, end = _exact_header(records, *stored)
    if first >= end:
        raise RecordError(
            f"{records.rec} key 0 (the header record): its identity records [{first}, "
            f"{end}) are none; an InsightFace header holds (first identity record, end)"
        )
    last = records.offsets.last_key
    if end > last + 1:  # a junk end was allocated for: 16 GiB of keys at 2^31
        raise RecordError(
            f"{records.rec} key 0 (the header record): its identity records [{first}, "
            f"{end}) run past the last key, {last}, that {records.idx} lists: a damaged "
            "header, or a truncated .idx"
        )
    ranges = records.ranges(np.arange(first, end))
    # far past the identity records: refused before the search around each boundary
    _refuse_past(
        records, first, ranges, np.flatnonzero(ranges.max(axis=1) > first + _spacing(first))
    )
    bounds = _exact_bounds(records, ranges)
    counts = bounds[:, 1] - bounds[:, 0]
    if (counts < 0).any():
        i = int(np.argmax(counts < 0))
        raise RecordError(
            f"{records.rec} key {first + i}: identity {i}'s image keys [{bounds[i, 0]}, "
            f"{bounds[i, 1]}) end before they start"
        )
    _check_ranges(records, first, bounds)
    labels = np.repeat(np.arange(len(bounds)), counts)
    # each identity's keys start..end-1, for all at once
    within = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)
    image_keys = np.repeat(bounds[:, 0], counts) + within
    missing = np.flatnonzero(records.offsets.lookup(image_keys) < 0)
    if len(missing):
        i = int(missing[0])
        a, b = (int(v) for v in bounds[labels[i]])
        raise RecordError(
            f"{records.rec}: identity {labels[i]}'s image keys [{a}, {b}) include key "
            f"{image_keys[i]}, which {records.idx} does not list ({len(missing)} such "
            "keys): a damaged or truncated .idx?"
        )
    _warn_uncovered(records, first, image_keys)
    return RecordLayout(image_keys, labels, identity_records=len(bounds))


def _warn_uncovered(records: RecordFile, first: int, covered: np.ndarray) -> None:
    """Warn of the image records keyed in ``[1, first)`` (between the header and the
    identity records) that no identity range covers: they are left out, where
    arcface_torch's ``MXFaceDataset`` trains on every key below the header's first
    identity record, each under its own label. ``covered``: the ranges' keys, each
    listed and in ``[1, first)`` once (checked before). Costs a count when there are
    none; the file is not kept (no label pass), so every scan warns."""
    listed = records.offsets.keys_  # sorted
    inside = listed[np.searchsorted(listed, 1) : np.searchsorted(listed, first)]
    if len(inside) == len(covered):
        return
    left = inside[~np.isin(inside, covered, assume_unique=True)]  # not an array of `first`
    labels, image, _ = records.heads(left, strict=False)
    left = left[image | (labels == UNREADABLE)]  # not a stray identity-style record
    if len(left):
        key = int(left[0])
        logger.warning(
            "%s: %d image record(s) keyed between the header and the identity records "
            "(keys 1-%d) lie in no identity's key range (the first: key %d at offset %d) "
            "and are left out of training, where arcface_torch's MXFaceDataset trains on "
            "them under their own labels: damaged identity records? (pack the images "
            "again to train on them)",
            records.rec,
            len(left),
            first - 1,
            key,
            records.offsets[key],
        )


def _refuse_past(records: RecordFile, first: int, bounds: np.ndarray, past: np.ndarray) -> None:
    """Refuse the identity ranges ``past`` (rows of ``bounds``) that lie past the identity
    records (keys from ``first``), naming the first one's record."""
    if len(past):
        i = int(past[0])
        raise RecordError(
            f"{records.rec} key {first + i} at offset {records.offsets[first + i]}: identity "
            f"{i}'s image keys [{bounds[i, 0]}, {bounds[i, 1]}) lie past the identity records "
            f"(keys {first}-); image keys lie in [1, {first})"
        )


def _check_ranges(records: RecordFile, first: int, bounds: np.ndarray) -> None:
    """Refuse identity ranges that take the header (key 0) or the identity records
    (keys from ``first``) for images, or that overlap: their records would be trained
    on as images, or under two labels. Empty ranges hold no key: one is refused only
    when it lies past the identity records' first key by more than float32's rounding
    there (a damaged record: [1e12, 1e12 + 3) stored one value, read as empty).
    Vector checks: up to 2M identities."""
    empty = np.flatnonzero(bounds[:, 1] == bounds[:, 0])
    _refuse_past(
        records, first, bounds, empty[bounds[empty, 0] > first + _spacing(bounds[empty, 0])]
    )
    rows = np.flatnonzero(bounds[:, 1] > bounds[:, 0])
    order = rows[np.argsort(bounds[rows, 0], kind="stable")]  # by start
    outside = order[(bounds[order, 0] < 1) | (bounds[order, 1] > first)]
    if len(outside):
        i = int(outside[0])
        a, b = (int(v) for v in bounds[i])
        what = "key 0, the header record" if a < 1 else f"the identity records (keys {first}-)"
        raise RecordError(
            f"{records.rec} key {first + i} at offset {records.offsets[first + i]}: identity "
            f"{i}'s image keys [{a}, {b}) cover {what}; image keys lie in [1, {first})"
        )
    clash = np.flatnonzero(bounds[order[1:], 0] < bounds[order[:-1], 1])
    if len(clash):
        i, j = int(order[clash[0] + 1]), int(order[clash[0]])
        raise RecordError(
            f"{records.rec} key {first + i} at offset {records.offsets[first + i]}: identity "
            f"{i}'s image keys [{bounds[i, 0]}, {bounds[i, 1]}) overlap identity {j}'s "
            f"[{bounds[j, 0]}, {bounds[j, 1]}) (key {first + j}): a record under two labels"
        )


def _exact_bounds(records: RecordFile, ranges: np.ndarray) -> np.ndarray:
    """Key ranges with float32-rounded boundaries (past 2^24) set to the true ones.

    A range whose stored start and end are one float32 value may be empty, ``[s, s)``,
    or hold a key or two that rounded alike (2^24 + 4 and + 5 both store 2^24 + 4):
    where no image record near it carries the identity's label it is empty, and kept
    as stored, as an empty range below 2^24 is."""
    bounds = ranges.copy()
    alike = ranges[:, 0] == ranges[:, 1]
    ends = np.flatnonzero(ranges[:, 1] >= FLOAT32_EXACT)  # 2^24 itself may be 2^24 + 1
    bounds[ends, 1] = _true_boundaries(
        records, ranges[ends, 1], ends, side=1, may_be_empty=alike[ends]
    )
    empty = bounds[:, 1] < 0
    bounds[empty] = ranges[empty]
    _check_followed(records, bounds[ends[~empty[ends]], 1] - 1)
    starts = np.flatnonzero((ranges[:, 0] >= FLOAT32_EXACT) & ~empty)
    # A start the previous identity's stored end equals is most often that end, found
    # already: taken where the record there is this identity's. Not always: a key of
    # neither between them (absent, or an image of no range) rounds alike too.
    before = np.maximum(starts - 1, 0)
    follows = (starts > 0) & (ranges[before, 1] == ranges[starts, 0]) & ~empty[before]
    labels, image, present = records.heads(bounds[before[follows], 1])
    follows[follows] = present & image & (labels == starts[follows])
    bounds[starts[follows], 0] = bounds[before[follows], 1]
    alone = starts[~follows]
    bounds[alone, 0] = _true_boundaries(records, ranges[alone, 0], alone, side=0)
    return bounds


def _check_followed(records: RecordFile, last: np.ndarray) -> None:
    """Refuse an ``.idx`` that leaves out the record after an identity's last image key
    (``last``, found past 2^24 by label): a range's end there is where its images stop
    being listed, and below 2^24 the exact range names a lost key at its end or at the
    next one's start, where past it those images were left out without a word. The
    record after each is the next key's as listed, or one listed elsewhere (identity
    records, another writer's order)."""
    if not len(last):
        return
    index, words, size = records.offsets, records._words(), records.size
    at = index.lookup(last)
    sound, lrecord = records._record_starts(at)
    length = lrecord & _LENGTH_MASK
    ends = at + 8 + length + (-length % 4)
    for i in np.flatnonzero(sound & (lrecord >> 29 == 1)):  # split: walk its parts
        ends[i] = records._end_of(int(at[i]))
    # a record starts there that is not the next key's (rare: the last identity's)
    after = sound & (ends + 8 <= size) & (ends != index.lookup(last + 1))
    after[after] = words[ends[after] // 4] == MAGIC
    unlisted = np.flatnonzero(after)
    if len(unlisted) > 16:  # not written in key order: sort the offsets once
        listed = np.sort(index.offsets_)
        found = listed[np.minimum(np.searchsorted(listed, ends[unlisted]), len(listed) - 1)]
        unlisted = unlisted[found != ends[unlisted]]
    else:  # one pass over the offsets each (isin hashes them all: 0.4 s at 400K)
        unlisted = unlisted[[not (index.offsets_ == ends[i]).any() for i in unlisted]]
    if len(unlisted):
        i = int(unlisted[0])
        raise RecordError(
            f"{records.idx} does not list the record at byte {int(ends[i])} of {records.rec}, "
            f"after key {int(last[i])} (offset {int(at[i])}), an identity's last listed "
            f"image ({len(unlisted)} such records): a damaged or truncated .idx? (copy it "
            "again, or pack the folder again)"
        )


def _spacing(approx: int | np.ndarray) -> int | np.ndarray:
    """How far a float32-rounded integer can be from the true one (its ulp): for a key
    or an array of keys (below 2^53, exact in float64, whose exponent is the bit length)."""
    bits = np.frexp(np.asarray(approx, dtype=np.float64))[1]
    spacing = np.left_shift(1, np.maximum(0, bits - 24)).astype(np.int64)
    return int(spacing) if spacing.ndim == 0 else spacing


def _exact_header(records: RecordFile, first: int, end: int) -> tuple[int, int]:
    """The header's (first identity key, end), exact: identity records come last, so
    within one float32 spacing of the stored key it is the first identity record past
    the last image record there (keys with no record, or a stray record of neither
    kind, may lie between them) whose range starts at the file's first image key: the
    next one, where the first one's ``.idx`` line is lost, starts at its own
    identity's images. None such: the stored key, which the caller then refuses."""
    if first >= FLOAT32_EXACT:
        spacing = _spacing(first)
        keys = range(first - spacing, first + spacing + 1)
        window = {k: _readable(records, k) for k in keys if k in records.offsets}
        last_image = max((k for k, r in window.items() if r is not None and r.data), default=-1)
        listed = records.offsets.keys_
        first_image = int(listed[1] if listed[0] == 0 and len(listed) > 1 else listed[0])
        for key, record in window.items():
            identity = record is not None and not record.data and record.flag >= 2
            if key > last_image and identity:
                start = float(np.asarray(record.label).reshape(-1)[0])
                if start <= float(np.float32(first_image)):  # both rounded alike
                    first = key
                    break
    last = records.offsets.last_key
    if end >= FLOAT32_EXACT and abs(end - (last + 1)) <= _spacing(end):
        end = last + 1
    return first, end


def _readable(records: RecordFile, key: int) -> Record | None:
    """Record ``key``, or None where it cannot be read."""
    try:
        return records.record(key)
    except RecordError:
        return None


def _true_boundaries(
    records: RecordFile,
    approx: np.ndarray,
    identity: np.ndarray,
    side: int,
    may_be_empty: np.ndarray | None = None,
) -> np.ndarray:
    """The true keys of float32-rounded range boundaries (``side`` 0: starts, 1: ends) of
    the identities ``identity``: where, within one float32 spacing of the stored key,
    the image records' (exact) label changes into (0) or out of (1) the identity.
    The records around every boundary are read at once (:meth:`RecordFile.heads`).
    -1 for a row of ``may_be_empty`` where no image record near it is the identity's."""
    if may_be_empty is None:
        may_be_empty = np.zeros(len(approx), dtype=bool)
    found = np.zeros(len(approx), dtype=np.int64)
    per = _spacing(approx)
    interleaved: list[np.ndarray] = []
    for spacing in np.unique(per).tolist():
        same = np.flatnonzero(per == spacing)
        chunk = max(1, 2**22 // (2 * spacing + 2))  # windows of a few million keys at once
        for rows in (same[i : i + chunk] for i in range(0, len(same), chunk)):
            found[rows], odd = _find_boundaries(
                records, approx[rows], identity[rows], side, may_be_empty[rows], spacing
            )
            interleaved.append(odd)
    keys = np.unique(np.concatenate(interleaved)) if interleaved else []
    if len(keys):  # below 2^24 the exact ranges decide, whatever a record's label says
        logger.warning(
            "%s: %d image record(s) past key 2^24, where float32 ranges leave an identity's "
            "boundary to its records' own labels, carry another label between two of its "
            "records (the first: key %d at offset %d): some of these images may be trained "
            "under the neighbouring identity; a damaged record?",
            records.rec,
            len(keys),
            int(keys[0]),
            records.offsets[int(keys[0])],
        )
    return found


def _find_boundaries(
    records: RecordFile,
    approx: np.ndarray,
    identity: np.ndarray,
    side: int,
    may_be_empty: np.ndarray,
    spacing: int,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_true_boundaries` of rows of one float32 ``spacing``: their true keys (-1:
    empty), and the keys of records of other labels between a row's own (a damaged
    label: at a boundary which of the two is damaged is not known)."""
    keys = approx[:, None] + np.arange(-spacing - 1, spacing + 1)  # [rows, window]
    # a record there that cannot be read stops the start: which identity's range
    # it lies in is what its label would say (below 2^24 the range says it)
    labels, image, present = records.heads(keys)
    shape = keys.shape
    labels, image, present = labels.reshape(shape), image.reshape(shape), present.reshape(shape)
    # a key with no record is no member: an identity's keys are contiguous, so the
    # first image key of a file (nothing before it) can start one too
    member = present & image & (labels == identity[:, None])
    if side == 0:
        change = member[:, 1:] & ~member[:, :-1]
    else:
        change = member[:, :-1] & ~member[:, 1:]
    empty = may_be_empty & ~member.any(axis=1)
    missed = ~change.any(axis=1) & ~empty
    if missed.any():
        i = int(np.argmax(missed))
        raise RecordError(
            f"{records.rec}: identity {identity[i]}'s range "
            f"{'start' if side == 0 else 'end'} {approx[i]} (float32) matches no "
            f"change of image label within +-{spacing} keys; the image records do not "
            "carry their identity's label"
        )
    # a start is the first change in the window, an end the last: a key the .idx
    # lacks inside the range is a change too, and taken for the end it cut the
    # range short there, leaving the keys after it out without a word (past 2^24;
    # below it the missing key is found inside the range and named)
    at = change.argmax(axis=1) if side == 0 else shape[1] - 2 - change[:, ::-1].argmax(axis=1)
    found = np.where(empty, -1, keys[np.arange(len(keys)), at + 1])
    column = np.arange(shape[1])
    first = member.argmax(axis=1)[:, None]
    last = shape[1] - 1 - member[:, ::-1].argmax(axis=1)[:, None]
    between = present & ~member & (column > first) & (column < last)
    return found, keys[between & member.any(axis=1)[:, None]]


def _scan_all(records: RecordFile) -> RecordLayout:
    """Every image record's label, in one pass (:meth:`RecordFile.heads`) in file
    order; header and identity records of other writers (a label array, no image) are
    left out, and an image record with an empty image is kept (a broken image, found
    when it is read, as one in an identity's range is).

    Without identity records nothing else says which records a file holds: an ``.idx``
    with lines missing in the middle would leave their images out of training without
    a word (:meth:`RecordFile._check_last_record` catches only a cut tail). So each
    block's records are checked, while their pages are fresh, to be followed by the
    next listed record (:func:`_check_listed`)."""
    index = records.offsets
    in_file = np.argsort(index.offsets_, kind="stable")
    starts = index.offsets_[in_file]
    # every record a line names, those of keys listed again later too (not read)
    listed = np.union1d(starts, index.shadowed) if len(index.shadowed) else starts
    labels = np.empty(len(in_file), dtype=np.int64)
    image = np.empty(len(in_file), dtype=bool)
    _check_listed(records, listed[:1], listed[:1], first=True)
    for block in range(0, len(in_file), HEADS_BLOCK):
        rows = in_file[block : block + HEADS_BLOCK]
        labels[rows], image[rows], _ = records.heads(index.keys_[rows], strict=False)
        # the listed records from this block's first to the next block's
        a = np.searchsorted(listed, starts[block]) if block else 0
        b = len(listed)
        if block + HEADS_BLOCK < len(starts):
            b = np.searchsorted(listed, starts[block + HEADS_BLOCK])
        _check_listed(records, listed[a:b], listed[a + 1 : b + 1])
    keys = index.keys_
    order = np.argsort(labels[image], kind="stable")
    return RecordLayout(keys[image][order], labels[image][order], keys[labels == UNREADABLE])


def _check_listed(
    records: RecordFile, starts: np.ndarray, following: np.ndarray, first: bool = False
) -> None:
    """Refuse an ``.idx`` that leaves out records: where one of the listed records
    (``starts``, sorted offsets) ends, the next listed one (``following``: the sorted
    offset after each, one fewer for the file's last record) must start, or no record may
    (another record's magic there means a record the ``.idx`` does not list).
    ``first``: check the file's start instead (bytes before the first listed record).
    A record that does not read cleanly (``on_bad_image`` decides on it) is not
    judged by its length: the next record start after it is looked for instead."""
    words, size = records._words(), records.size
    if first:
        ends = np.zeros(1, dtype=np.int64)
        after = starts
    else:
        after = np.r_[following[: len(starts)], np.full(len(starts) - len(following), size)]
        sound, lrecord = records._record_starts(starts)
        length = lrecord & _LENGTH_MASK
        ends = starts + 8 + length + (-length % 4)
        for i in np.flatnonzero(sound & (lrecord >> 29 == 1)):  # split: walk its parts
            ends[i] = records._end_of(int(starts[i]))
        for i in np.flatnonzero(~sound):  # a corrupt record: where does the next start?
            ends[i] = _next_record(words, int(starts[i]), int(after[i]))
    gap = (ends < after) & (ends + 8 <= size)
    gap[gap] = words[ends[gap] // 4] == MAGIC
    if gap.any():
        i = int(np.argmax(gap))
        index = records.offsets
        where = "before its first listed record"
        named = np.flatnonzero(index.offsets_ == starts[i]) if not first else []
        if len(named):
            where = f"after key {int(index.keys_[named[0]])} (offset {int(starts[i])})"
        elif not first:  # an earlier line of a key listed again names it
            where = f"after the record at byte {int(starts[i])} (a key listed again later)"
        raise ValueError(
            f"{records.idx} does not list the record at byte {int(ends[i])} of {records.rec}, "
            f"{where}; the next listed record starts at byte {int(after[i])}. Lines of the "
            ".idx are missing, and their images would be left out: copy it again, or pack "
            "the folder again"
        )


def _next_record(words: np.ndarray, start: int, limit: int) -> int:
    """The first aligned word after ``start`` and before ``limit`` that starts a record
    (the magic, then a whole record's or a first part's flag: the writer splits a
    payload wherever the magic word occurs, so no record holds one otherwise), else
    ``limit``."""
    first, last = start // 4 + 1, min(limit // 4, len(words) - 1)
    span = words[first:last]
    hits = np.flatnonzero(span == MAGIC)
    hits = hits[(words[first + hits + 1] >> 29) < 2] if len(hits) else hits
    return 4 * (first + int(hits[0])) if len(hits) else limit


LABEL_PASS_VERSION = 3
"""Of what :func:`_scan_all` finds: a pass kept by another version is made again (2:
unlisted records refused, unreadable ones kept apart; 3: a record of no label array and
an empty image is an image, broken, where it was left out)."""


def _stamp(records: RecordFile) -> dict:
    """What identifies a .rec/.idx pair's content without reading it: path, size,
    modification time (ns) and inode of both files (a file replaced by a copy that
    kept size and time has another inode), and the version of the pass."""
    stamp: dict = {"version": LABEL_PASS_VERSION}
    for part, path in (("rec", records.rec), ("idx", records.idx)):
        stamp[part] = [str(path.resolve()), *file_stamp(path)]
    return stamp


def _scan_cached(records: RecordFile, cache: str | Path) -> RecordLayout:
    """:func:`_scan_all`, kept in ``cache/<rec name>-<hash of its path>.labels.npz``.

    At Glint360K's size the pass reads a header from each of 17M records spread over
    the whole file, in every process that scans (each DDP rank, each stage-2 job, each
    evaluation, each resume); the kept result is 16 bytes an image, one file per
    ``.rec``. It is used only while both files keep the :func:`_stamp` it was made
    from, and replaced when they change. It is written by
    :func:`~facecluster.io.atomic_file`, so concurrent writers (DDP ranks, jobs on
    other nodes) never leave a partial file under the name. One that cannot be read
    (truncated, empty, another format) is made again; one that cannot be written
    costs a warning, not the run.
    """
    text = json.dumps(_stamp(records), sort_keys=True)
    name = hashlib.sha1(str(records.rec.resolve()).encode()).hexdigest()[:16]
    path = Path(cache) / f"{records.rec.stem}-{name}.labels.npz"
    try:
        # through a file of its own: np.load left its handle open on a file that is
        # not a zip (a ResourceWarning; a review)
        with open(path, "rb") as file, np.load(file) as kept:
            if str(kept["stamp"]) == text:
                layout = RecordLayout(kept["keys"], kept["labels"], kept["unreadable"])
                if layout.keys.shape != layout.labels.shape or layout.keys.ndim != 1:
                    raise ValueError("keys and labels differ in length")
                # what the pass could have made of these files (the cache is another
                # file: a key past the .idx's stopped a read, a negative label named
                # another identity, silently); bounds, not a lookup of each key (1 s a
                # process at Glint360K's 17M)
                index = records.offsets
                arrays = [a for a in (layout.keys, layout.unreadable) if len(a)]
                low = min((int(a.min()) for a in arrays), default=index.keys_[0])
                high = max((int(a.max()) for a in arrays), default=index.keys_[0])
                if low < index.keys_[0] or high > index.last_key or (layout.labels < 0).any():
                    raise ValueError(f"keys past {records.idx.name}'s, or negative labels")
                return layout
    except FileNotFoundError:
        pass
    except Exception as e:  # any unreadable file (zip, npy or stamp errors): made again
        logger.warning(f"{path}: unreadable ({e!r}); reading the labels of {records.rec} again")
    layout = _scan_all(records)  # the list of every key only now (17M at Glint360K)
    try:
        with atomic_file(path, shared=True) as f:  # other users' runs read it too
            np.savez(
                f,
                keys=layout.keys,
                labels=layout.labels,
                unreadable=layout.unreadable,
                stamp=np.array(text),
            )
    except OSError as e:
        logger.warning(f"could not keep the labels of {records.rec} in {path}: {e}")
    return layout
