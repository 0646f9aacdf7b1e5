"""InsightFace verification pair files (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``).

A ``.bin`` file is a pickle of ``(images, issame)``: ``2 * P`` encoded images (the
two faces of pair ``p`` are ``images[2p]`` and ``images[2p + 1]``), as ``bytes`` or
numpy uint8 arrays of the encoded file, and ``P`` booleans. Pickles can run code, so
:func:`read_bin` uses an unpickler that accepts only those types, and builds the numpy
arrays itself from checked dtypes and raw bytes (numpy's own pickle hooks accept dtype
states that make object arrays from the file's bytes). :func:`write_bin` makes one
from an image folder and an LFW-style ``pairs.txt``.

:func:`load_pairs` reads a set whole: the pickle (or the pairs list and its image
files), then every distinct image decoded once, as verification decodes it, and
dropped (LFW's 12,000 images, 7,701 distinct, 112x112: about 0.7 s here).
A file cut short or an image that cannot be decoded is refused there, named (the
file, and the image's index and pair), rather than when the first pass reaches it.
"""

from __future__ import annotations

import _compat_pickle
import dataclasses
import io
import os
import pickle
import re
import struct
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from facecluster.data.images import DECODE_ERRORS, decode_image, load_rgb
from facecluster.io import shown_value

FOLDS = 10
"""Folds of the verification protocol (LFW's, and arcface_torch's for its .bin sets)."""


def fold_sizes(pairs: int, folds: int = FOLDS) -> list[int]:
    """How many pairs each fold of the protocol holds: the pairs in file order, cut into
    contiguous folds, the first ``pairs % folds`` one pair larger (scikit-learn's KFold,
    as InsightFace's verification.py cuts them; equal at 6,000 or 7,000 pairs)."""
    return [pairs // folds + (k < pairs % folds) for k in range(folds)]


class _Dtype:
    """``numpy.dtype`` as a verification pickle may hold it: a plain integer or boolean
    type. numpy's own ``dtype.__setstate__`` takes any state a file gives it, fields
    of Python objects included (an array of forged object pointers, read from the
    file's bytes): that state is checked here and never reaches numpy."""

    dtype: np.dtype | None = None  # set by __init__ (a pickle may skip it: NEWOBJ)

    def __init__(self, spec: object, align: object = False, copy: object = False) -> None:
        if isinstance(spec, bytes):  # a Python 2 pickle read with encoding="bytes"
            spec = spec.decode("ascii", "replace")
        try:
            dtype = np.dtype(spec) if isinstance(spec, str) else None
        except TypeError:
            dtype = None
        # integers, booleans, and byte strings (images as one numpy "S" array)
        if dtype is None or dtype.kind not in "biuS" or dtype.fields is not None:
            raise pickle.UnpicklingError(
                f"numpy dtype {shown_value(spec)} is not allowed in a verification .bin file"
            )
        self.dtype = dtype

    def __setstate__(self, state: object) -> None:
        # (version, byte order, subarray, names, fields, itemsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) >= 5 and state[2:5] == (None,) * 3):
            raise pickle.UnpicklingError("a structured numpy dtype is not allowed in a .bin file")
        if self.dtype is None:  # made by NEWOBJ, which skips __init__ and its checks
            raise pickle.UnpicklingError("a numpy dtype in the .bin file names no type")
        order = state[1].decode("ascii", "replace") if isinstance(state[1], bytes) else state[1]
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


class _NdarrayType:
    """What ``numpy.ndarray`` names in a verification pickle (an argument of
    ``_reconstruct``)."""


class _Array:
    """An array pickled by ``ndarray.__reduce__`` (``_reconstruct``, then its state):
    built from the state's raw bytes by :meth:`value`, after the load."""

    array: np.ndarray | None = None

    def __init__(self, cls: object = None, shape: object = None, typecode: object = None) -> None:
        if cls is not _NdarrayType:
            raise pickle.UnpicklingError("only numpy arrays may be reconstructed in a .bin file")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("a numpy array's state in the .bin file is not understood")
        _, shape, dtype, fortran, raw = state
        self.array = _frombuffer(raw, dtype, shape, "F" if fortran else "C")

    def value(self) -> np.ndarray:
        if self.array is None:
            raise pickle.UnpicklingError("a numpy array in the .bin file has no data")
        return self.array


def _frombuffer(buffer: object, dtype: object, shape: object, order: object) -> np.ndarray:
    """``numpy._core.numeric._frombuffer`` (protocol 5 arrays) over a checked dtype."""
    if (
        not isinstance(dtype, _Dtype)
        or dtype.dtype is None
        or not isinstance(buffer, (bytes, bytearray))
    ):
        raise pickle.UnpicklingError(
            "a numpy array in the .bin file has a dtype or data not allowed"
        )
    return np.frombuffer(buffer, dtype.dtype).reshape(shape, order=order)


def _scalar(dtype: object, raw: object = b"") -> np.generic:
    return _frombuffer(raw, dtype, (), "C")[()]


def _sized(kind: type, sources: tuple[type, ...] = (bytes, bytearray, str, list, tuple)):
    def make(*args: object) -> bytes | bytearray | list | tuple:
        # bytes(n) is n zero bytes: a few bytes of file asking for any amount of memory.
        # list/tuple copy a container or bytes only: the copy's size is then what
        # sys.getsizeof counts (_RestrictedUnpickler.built), no new object per element.
        if args and not isinstance(args[0], sources):
            raise pickle.UnpicklingError(
                f"{kind.__name__}({shown_value(args[0])}) is not allowed in a .bin file"
            )
        return kind(*args)

    return make


def _latin1(text: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    """``_codecs.encode`` as pickles of ``bytes`` before protocol 3 use it: latin-1 only
    (any other codec is no part of a verification file)."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in (
        "latin1",
        "latin-1",
    ):
        raise pickle.UnpicklingError(f"_codecs.encode(..., {shown_value(encoding)}) is not allowed")
    return text.encode("latin-1")


# What a verification pickle may contain: containers, bytes, booleans and numpy
# integer/boolean arrays, each name mapped to what builds it here.
_ALLOWED = {
    ("builtins", "list"): _sized(list, (bytes, bytearray, list, tuple)),
    ("builtins", "tuple"): _sized(tuple, (bytes, bytearray, list, tuple)),
    ("builtins", "bytes"): _sized(bytes),
    ("builtins", "bytearray"): _sized(bytearray),
    ("builtins", "bool"): bool,
    ("_codecs", "encode"): _latin1,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _Dtype,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _Array for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
}


# What builds new data from the file's objects. The pickle memo hands one object to
# them any number of times (bytearray(x) 1,000 times is 1,000 copies of x), so what
# they build is counted against the file's size.
_COPIES = (
    {("builtins", name) for name in ("list", "tuple", "bytes", "bytearray")}
    | {("_codecs", "encode")}
    | {(f"numpy.{core}.multiarray", "scalar") for core in ("core", "_core")}
)
_GROWTH = 8
"""A .bin file may build at most this many times its size in bytes (plus 1 MiB): what
its builders copy (above) and what its opcodes make (:data:`_OPCODE_COST`). The
costliest legitimate images, small numpy arrays pickled with protocol 1 (1 KB each, 32
opcodes each), are charged 4.6 times their size: twice their bytes (the latin-1 text made
bytes, then the array's bytes copied), and the memo entries, tuples and marks around
them; plain bytes of protocol 3 or later build about 0.1 times theirs."""


_OPCODE_COST, _MEMO_COST, _STACK_COST, _CALL_COST = 80, 112, 16, 320
"""Bytes each pickle opcode is charged against the budget (:data:`_GROWTH`): the most
one makes from its byte or two, measured with tracemalloc over 200,000 of each
(``EMPTY_DICT`` 72 and its stack slot 8, ``EMPTY_LIST`` and ``MARK`` 64, a ``TUPLE1``
56, a 2-character string 59); a memo entry, which a dict holds, up to 110; a reference
already made, a singleton or what only moves objects (:data:`_STACK_OPCODES`) a stack
slot and its copy into the container a mark's items end in (8 each, the stack list's
growth on top); a call of an allowed maker or a ``__setstate__`` (``REDUCE``,
``BUILD``), the object it makes (a numpy array view about 200 bytes, the array
wrapper here with its ``__dict__`` about 300; a copy it makes is charged on its own,
by size). Sets (224) are refused: no allowed object is one. A file of empty lists alone
took 64 times its size before it was refused for its missing end, one of ``REDUCE``
and ``BUILD`` calls 39 times."""
_MEMO_OPCODES = {op[0] for op in (pickle.MEMOIZE, pickle.PUT, pickle.BINPUT, pickle.LONG_BINPUT)}
_CALL_OPCODES = {
    op[0] for op in (pickle.REDUCE, pickle.BUILD, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.OBJ)
} | {pickle.INST[0]}
_STACK_OPCODES = {
    op[0]
    for op in (
        *(pickle.GET, pickle.BINGET, pickle.LONG_BINGET, pickle.DUP, pickle.EMPTY_TUPLE),
        *(pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE, pickle.BININT1, pickle.PROTO),
        *(pickle.APPEND, pickle.APPENDS, pickle.SETITEM, pickle.SETITEMS, pickle.FRAME),
        *(pickle.POP, pickle.POP_MARK, pickle.STOP, pickle.GLOBAL, pickle.STACK_GLOBAL),
    )
}


def _cost(opcode: int) -> int:
    if opcode in _MEMO_OPCODES:
        return _MEMO_COST
    if opcode in _CALL_OPCODES:
        return _CALL_COST
    return _STACK_COST if opcode in _STACK_OPCODES else _OPCODE_COST


_FEW = 1 << 16
"""Bytes a read from a .bin file may ask for without a look at what is left (a look at
every read made LFW's 12,000 images, pickled with protocol 2 as numpy arrays, read
0.4 s slower)."""


class _PastEnd(pickle.UnpicklingError):
    """The file ends before what a length field claims (cut short, or a corrupt length)."""


def _charged(load, cost: int):
    """``load``, an unpickler's opcode, charging ``cost`` bytes first (:meth:`built`)."""

    def run(self: _RestrictedUnpickler) -> None:
        self.built(cost)
        load(self)

    return run


class _RestrictedUnpickler(pickle._Unpickler):
    """Pickle's pure-Python unpickler, whose memo is a dict. The C one
    (``pickle.Unpickler``) grows its memo table to twice any index a LONG_BINPUT names
    and zero-fills it before anything here runs: 512 MiB for a 9-byte file naming index
    2^25, 64 GiB for 2^32. Every length field is bounded by the file: a read from it
    (an object's bytes, a frame) that asks for more than is left is refused before
    anything is allocated for it, and BYTEARRAY8 reads its bytes before it makes its
    bytearray (pickle's own zero-fills the claimed size first). It reads LFW's 12,000
    images 20 ms slower than the C one as ``write_bin`` writes them, up to 0.24 s as
    numpy arrays pickled with protocol 2 (docs/DATA.md)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedReader, size: int) -> None:
        super().__init__(file, encoding="bytes")
        self.size = size
        self.left = _GROWTH * size + (1 << 20)  # bytes the load may still build
        self._counted: dict[tuple[str, str], Callable[..., object]] = {}  # find_class's
        self._file = file
        self._file_read = self._read_file  # how the unpickler reads the file

    def _read_file(self, n: int) -> bytes:
        if n > _FEW and n > self.size - (at := self._file.tell()):
            raise _PastEnd(
                f"a length field claims {n} bytes from byte {at}, but the file ends at "
                f"byte {self.size}"
            )
        data = self._file.read(n)
        if len(data) < n:  # (pickle's pure-Python unpickler takes what there is)
            raise _PastEnd("pickle data was truncated")
        return data

    def _load_bytearray8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        self.append(bytearray(self.read(n)))  # read (bounded by the file), then copied

    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

    def _no_sets(self) -> None:
        raise pickle.UnpicklingError(
            "a set is not allowed in a verification .bin file (only lists of encoded "
            "images and booleans)"
        )

    for _opcode in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET):
        dispatch[_opcode[0]] = _no_sets

    # every opcode is charged what it may build from its byte or two (_OPCODE_COST), so
    # that a file of empty lists alone (64 bytes each) stays within the budget too
    dispatch = {code: _charged(load, _cost(code)) for code, load in dispatch.items()}
    del _opcode

    def built(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise pickle.UnpicklingError(
                f"it builds more than {_GROWTH} times its {self.size} bytes in memory (one "
                "object copied over and over, or a run of objects made from nothing)"
            )

    def find_class(self, module: str, name: str):
        # Python 2 names (protocol <= 2: __builtin__.bytes), mapped as pickle maps them.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not allowed in a verification .bin file "
                "(only lists of encoded images and booleans)"
            )
        make = _ALLOWED[module, name]
        if (module, name) not in _COPIES:
            return make
        if (module, name) not in self._counted:  # one a name: GLOBAL costs a stack slot

            def counted(*args: object) -> object:
                value = make(*args)
                self.built(sys.getsizeof(value))
                return value

            self._counted[module, name] = counted
        return self._counted[module, name]


def _plain(value: object) -> object:
    """A loaded value with every :class:`_Array` made its numpy array (a dtype or a
    class where an image or a flag belongs is refused)."""
    if isinstance(value, (_Dtype, type)):
        raise pickle.UnpicklingError(f"a {type(value).__name__} where data belongs")
    return value.value() if isinstance(value, _Array) else value


def _image_bytes(images: object, unpickler: _RestrictedUnpickler) -> list[bytes]:
    """Each image as bytes. One array the file references many times (its memo) is
    converted once, every reference sharing the bytes; the conversions are counted as
    the load's own copies are (:meth:`_RestrictedUnpickler.built`)."""
    done: dict[int, tuple[object, bytes]] = {}  # id -> (the object, kept alive; bytes)
    out = []
    for x in images:
        if isinstance(x, bytes):
            out.append(x)
            continue
        if id(x) not in done:
            done[id(x)] = (x, _one_image_bytes(_plain(x), unpickler))
        out.append(done[id(x)][1])
    return out


def _one_image_bytes(value: object, unpickler: _RestrictedUnpickler) -> bytes:
    """An image that is not ``bytes``: a ``bytearray`` or a numpy array of byte values
    (InsightFace's files hold one or the other), counted before it is copied. A list of
    numbers is refused: a list of N references to one list of N numbers costs 2N bytes
    of pickle and would become N^2 bytes here."""
    if isinstance(value, bytearray):
        unpickler.built(len(value))
        return bytes(value)
    if not isinstance(value, np.ndarray):
        raise pickle.UnpicklingError(
            f"an image is a {type(value).__name__}: a verification .bin holds each image as "
            "bytes or a numpy uint8 array"
        )
    unpickler.built(value.size)
    if value.dtype != np.uint8:
        fits = value.dtype.kind in "iu" and (
            value.size == 0 or (int(value.min()) >= 0 and int(value.max()) <= 255)
        )
        if not fits:
            raise pickle.UnpicklingError(
                f"an image is a numpy {value.dtype} array that does not hold bytes (0-255)"
            )
    return np.ascontiguousarray(value, dtype=np.uint8).tobytes()


@dataclass(frozen=True)
class VerificationPairs:
    """Face pairs with same/different labels."""

    images: list[bytes]
    """2 * P encoded images; pair p is (images[2p], images[2p + 1])."""
    issame: list[bool]
    source: str = field(default="", compare=False)
    """The file the pairs were read from (``.bin`` or ``pairs.txt``), for messages."""
    sizes: dict[tuple[int, int], int] = field(default_factory=dict, compare=False, repr=False)
    """``(width, height)`` -> how many of :attr:`images` have it; :func:`load_pairs`
    fills it when it decodes them (empty otherwise)."""
    identities: list[str] = field(default_factory=list, compare=False, repr=False)
    """The identity of each of :attr:`images` where the file names them (a ``pairs.txt``;
    a ``.bin`` does not): :func:`trained_pairs_warning` compares them with a run's."""

    def __len__(self) -> int:
        return len(self.issame)

    def pair(self, p: int) -> tuple[Image.Image, Image.Image]:
        """The two images of pair ``p``, decoded.

        Raises:
            ValueError: an image that cannot be decoded, named (:attr:`source`, index).
        """
        out = []
        for i in (2 * p, 2 * p + 1):
            try:
                out.append(load_rgb(io.BytesIO(self.images[i])))
            except DECODE_ERRORS as e:
                source = self.source or "verification set"
                raise ValueError(
                    f"{source}: {_image(i)} cannot be decoded ({_reason(e)})"
                ) from None
        return out[0], out[1]


def _reason(error: BaseException) -> str:
    """A decoder's error without the ``<_io.BytesIO object at 0x...>`` PIL names."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _image(i: int, file: object = None) -> str:
    """Image ``i`` of a set, as messages name it."""
    where = f", {file}" if file is not None else ""
    return f"image {i} (pair {i // 2}, its {'first' if i % 2 == 0 else 'second'} image{where})"


def decoded_sizes(
    pairs: VerificationPairs, files: Sequence[object] | None = None
) -> dict[tuple[int, int], int]:
    """Decode every distinct image of ``pairs`` once, with the decoder verification uses
    (:func:`~facecluster.data.images.decode_image`), and drop it; count the sizes.

    Args:
        files: the image files of ``pairs.images``, in order (a ``pairs.txt`` set), to
            name a broken one by its file too.

    Returns:
        ``(width, height)`` -> number of images (repeated images counted each time).

    Raises:
        ValueError: naming :attr:`VerificationPairs.source` and each image that cannot
            be decoded (the first three: index, pair, file; then how many more).
    """
    seen: dict[bytes, tuple[int, int] | None] = {}  # distinct bytes -> size (None: broken)
    sizes: Counter[tuple[int, int]] = Counter()
    bad: list[tuple[int, BaseException]] = []
    for i, data in enumerate(pairs.images):
        if data not in seen:
            try:
                height, width = decode_image(data).shape[:2]
                seen[data] = (width, height)
            except DECODE_ERRORS as e:
                seen[data] = None
                bad.append((i, e))
        if seen[data] is not None:
            sizes[seen[data]] += 1
    if not bad:
        return dict(sizes)
    source = pairs.source or "verification set"
    named = [(_image(i, files[i] if files is not None else None), e) for i, e in bad[:3]]
    if len(bad) == 1:
        raise ValueError(f"{source}: {named[0][0]} cannot be decoded ({_reason(named[0][1])})")
    listed = "; ".join(f"{image}: {_reason(e)}" for image, e in named)
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise ValueError(f"{source}: {len(bad)} distinct images cannot be decoded: {listed}{more}")


def size_warning(pairs: VerificationPairs, image_size: int) -> str | None:
    """What to say when some images of ``pairs`` are not ``image_size`` square (None when
    all are, or none was decoded): verification resizes them to it, squashing the ones
    that are not square, and the accuracy then compares faces framed otherwise than the
    training images, unless those were resized alike. From :attr:`VerificationPairs.sizes`."""
    other = {s: n for s, n in pairs.sizes.items() if s != (image_size, image_size)}
    if not other:
        return None
    total, count = sum(pairs.sizes.values()), sum(other.values())
    common = sorted(other.items(), key=lambda item: (-item[1], item[0]))
    if len(common) == 1:
        found = "{}x{}".format(*common[0][0])
    else:
        found = ", ".join(f"{w}x{h} ({n})" for (w, h), n in common[:3])
        found += f" and {len(common) - 3} other sizes" if len(common) > 3 else ""
    which = f"its {total} images are" if count == total else f"{count} of its {total} images are"
    verb = "squashes" if any(w != h for w, h in other) else "resizes"
    return (
        f"{pairs.source}: {which} {found} (width x height), not data.image_size={image_size} "
        f"square: verification {verb} them to {image_size}x{image_size}. Its accuracy means "
        "little unless the training images are crops framed alike, resized the same way "
        "(InsightFace's lfw.bin, cfp_fp.bin and agedb_30.bin hold 112x112 crops)"
    )


def read_bin(path: str | Path) -> VerificationPairs:
    """Read an InsightFace ``.bin`` verification file (no code from the file runs)."""
    with open(path, "rb") as f:
        unpickler = _RestrictedUnpickler(f, os.fstat(f.fileno()).st_size)
        try:
            loaded = unpickler.load()
            if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
                what = type(loaded).__name__ if loaded is not None else "None"
                raise pickle.UnpicklingError(f"it holds {what}, not (images, issame)")
            images, issame = map(_plain, loaded)
            images = _image_bytes(images, unpickler)
            issame = [_flag(_plain(x), p) for p, x in enumerate(issame)]
        except (OSError, MemoryError):  # the disk's or the machine's, not the file's:
            raise  # no length field's claim is allocated before the file holds it
        except Exception as e:
            # only the allowed builders run, but a forged argument makes them fail in
            # many ways (AttributeError, OverflowError, LookupError, ...): all the file's
            reason = str(e) or type(e).__name__
            f.seek(0)
            start = f.read(8)
            cut = " (the file ends early: cut short?)" if _truncated(e) else ""
            if not start:
                reason, cut = "the file is empty", ""
            elif start[0] != pickle.PROTO[0] and not cut:  # "pop from empty list" alone
                # InsightFace's sets are pickled with protocol 2 or later, which start so
                cut = f" (it starts with {start!r}, not a pickle's 0x80: not a pickle?)"
            if isinstance(e, KeyError) and e.args and isinstance(e.args[0], int):
                # an unknown opcode: its byte alone was the reason ("197")
                reason = f"unknown pickle opcode 0x{e.args[0]:02x}"
                reason += "" if cut else ": a damaged pickle?"
            raise ValueError(f"{path} is not a verification .bin file: {reason}{cut}") from None
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs (expected 2 each)")
    return VerificationPairs(images, issame, str(path))


def _flag(value: object, p: int) -> bool:
    """Pair ``p``'s is-same flag: a bool, numpy bool, or the number 0 or 1 (an int or a
    float). Anything else is refused: ``bool()`` read the string "no" as True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1):
        return bool(value)
    raise pickle.UnpicklingError(
        f"pair {p}'s is-same flag is {shown_value(value)} ({type(value).__name__}): a .bin holds "
        "True/False (or 0/1) for each pair"
    )


def check_pairs(pairs: VerificationPairs) -> None:
    """Refuse a set that the 10-fold protocol cannot measure: fewer than two pairs a
    fold (fewer than the folds failed after stage 1's first epoch, the run folder left
    behind), pairs that are all same-identity or all different (the threshold the
    protocol picks then scores 100% whatever the model), or a fold of one kind (a list
    sorted by kind: each fold scored on the others' threshold, 28% measured).

    Raises:
        ValueError: the file, and what it holds.
    """
    same = sum(pairs.issame)
    if len(pairs) < 2 * FOLDS:
        raise ValueError(
            f"{pairs.source}: {len(pairs)} pairs; the {FOLDS}-fold protocol needs at least "
            f"{2 * FOLDS}, two a fold, one of each kind (LFW's pairs.txt lists 6,000)"
        )
    if same in (0, len(pairs)):
        kind = "same-identity" if same else "different-identity"
        raise ValueError(
            f"{pairs.source}: all {len(pairs)} pairs are {kind} pairs; verification needs "
            "both kinds to choose a threshold"
        )
    start = 0
    for k, size in enumerate(fold_sizes(len(pairs))):
        kinds = set(pairs.issame[start : start + size])
        if len(kinds) == 1:  # a pairs list sorted by kind: 28% measured below chance
            kind = "same-identity" if kinds.pop() else "different-identity"
            raise ValueError(
                f"{pairs.source}: fold {k + 1} of {FOLDS} (pairs {start + 1}-{start + size} "
                f"of {len(pairs)}, in file order) holds {kind} pairs only: the protocol "
                f"scores each fold on the threshold the other {FOLDS - 1} choose, so a fold "
                "of one kind measures that threshold, not the model. Order the pairs so "
                "that every tenth of the list holds both kinds (LFW's pairs.txt and "
                "InsightFace's .bin files hold half of each in every fold)"
            )
        start += size


def _truncated(error: Exception) -> bool:
    """Whether the unpickler stopped at the end of the data (EOFError, a length past
    the file's end, or "pickle data was truncated")."""
    return isinstance(error, (EOFError, _PastEnd)) or "truncated" in str(error)


def read_pairs_txt(root: str | Path, pairs: str | Path) -> tuple[list[Path], list[bool]]:
    """Image paths (two per pair) and same/different flags from an LFW ``pairs.txt``.

    Lines ``name i j`` are same-identity pairs, ``name1 i name2 j`` different ones;
    image ``i`` of ``name`` is ``root/name/name_{i:04d}.jpg``. A first line of only
    numbers (LFW's ``folds pairs-per-fold``, or its one number) is skipped; a first
    line of three or four numbers is a pair of identities named by numbers.
    """
    root = Path(root)
    paths, issame = [], []
    try:
        text = Path(pairs).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # said without the file's name
        raise ValueError(
            f"{pairs}: not a UTF-8 text file ({e.reason} at byte {e.start}): save it as UTF-8"
        ) from None
    for line_no, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or (line_no == 1 and len(parts) <= 2 and all(p.isdigit() for p in parts)):
            continue
        numbers = parts[1::2] if len(parts) == 4 else parts[1:]
        # (more than 9 digits: no image number; 4,301 stopped int() without the file)
        if len(parts) not in (3, 4) or not all(n.isdecimal() and len(n) < 10 for n in numbers):
            # a word where an image number goes said only int()'s "invalid literal"
            raise ValueError(
                f"{pairs} line {line_no}: expected `name i j` or `name1 i name2 j` (i, j "
                f"image numbers), got {shown_value(line, 80)}"
            )
        if len(parts) == 3:
            a, b = (parts[0], int(parts[1])), (parts[0], int(parts[2]))
        else:
            a, b = (parts[0], int(parts[1])), (parts[2], int(parts[3]))
        for name, i in (a, b):
            path = root / name / f"{name}_{i:04d}.jpg"
            try:
                found = path.is_file()
            except OSError as e:  # a name too long for a file: a traceback
                raise ValueError(f"{pairs} line {line_no}: {path}: {e.strerror}") from None
            if not found:
                raise FileNotFoundError(f"{pairs} line {line_no}: {path} does not exist")
            paths.append(path)
        issame.append(len(parts) == 3)
    return paths, issame


def load_pairs(path: str | Path) -> VerificationPairs:
    """A verification set named in ``data.verification``, read whole: an InsightFace
    ``.bin`` file, or an LFW-style ``pairs.txt`` whose images are in ``images/`` beside
    it (the layout of LFW-112: ``lfw-112/pairs.txt`` and ``lfw-112/images/<name>/...``).
    Every image is decoded once (:func:`decoded_sizes`, which fills
    :attr:`VerificationPairs.sizes`) and dropped: the encoded bytes are kept.

    Raises:
        FileNotFoundError: no such file, or a pairs list without its images.
        ValueError: a file that is not a verification set, or an image that cannot be
            decoded, named (:func:`read_bin`, :func:`decoded_sizes`).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder: name its .bin file or pairs.txt" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"verification set {path} {what}")
    files = None
    if path.suffix == ".bin":
        pairs = read_bin(path)
    else:
        images = path.parent / "images"
        if not images.is_dir():
            raise FileNotFoundError(
                f"verification set {path}: a pairs list needs its images in {images}/<name>/ "
                "(or give an InsightFace .bin file)"
            )
        files, issame = read_pairs_txt(images, path)
        pairs = VerificationPairs(
            [p.read_bytes() for p in files],
            issame,
            str(path),
            identities=[p.parent.name for p in files],
        )
    check_pairs(pairs)
    return dataclasses.replace(pairs, sizes=decoded_sizes(pairs, files))


def trained_pairs_warning(pairs: VerificationPairs, trained: list[str]) -> str | None:
    """A warning when pairs of the set are of identities a run trains on (``trained``),
    counted apart for matched and mismatched pairs; None when none are, or when the set
    does not name its identities (a ``.bin``). A verification accuracy is a held-out
    figure only on identities that training never saw (InsightFace's benchmarks train
    on sets without LFW's people): on LFW-423's, 1,374 of LFW's 3,000 matched pairs are."""
    names, known = pairs.identities, set(trained)
    if not names or not known:
        return None
    seen = [names[2 * p] in known or names[2 * p + 1] in known for p in range(len(pairs))]
    same = sum(pairs.issame)
    matched = sum(s for s, flag in zip(seen, pairs.issame, strict=True) if flag)
    mismatched = sum(seen) - matched
    if not matched and not mismatched:
        return None
    return (
        f"{pairs.source}: {matched:,} of its {same:,} matched pairs and {mismatched:,} of its "
        f"{len(pairs) - same:,} mismatched pairs are of identities this run trains on: "
        "its accuracy is not a held-out figure (train on identities that no pair holds)"
    )


def set_name(path: str | Path) -> str:
    """How a verification set is called in logs and tables: ``lfw`` for ``lfw.bin``,
    the folder's name (``lfw-112``) for a ``pairs.txt``. The names as given, links not
    followed: a hub or annex cache links ``lfw.bin`` to a file named by its hash."""
    path = Path(os.path.abspath(path))  # "." and ".." resolved, links kept
    return path.stem if path.suffix == ".bin" else path.parent.name


def named_sets(paths: list[Path]) -> dict[str, Path]:
    """``{set_name(p): p}``; two sets of one name (two ``lfw.bin``) are refused, since
    their figures would be logged and tabled under that one name."""
    named: dict[str, Path] = {}
    for path in paths:
        name = set_name(path)
        if name in named:
            raise ValueError(
                f"data.verification: {named[name]} and {path} are both called {name!r}; "
                "rename one of the files (or its folder)"
            )
        named[name] = path
    return named


def write_bin(root: str | Path, pairs: str | Path, out: str | Path) -> Path:
    """Write a ``.bin`` verification file from an image folder and a ``pairs.txt``."""
    paths, issame = read_pairs_txt(root, pairs)
    out = Path(out)
    with open(out, "wb") as f:
        pickle.dump(([p.read_bytes() for p in paths], issame), f, protocol=4)
    return out
