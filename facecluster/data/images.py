"""Decoding face images robustly, and what to do with the ones that cannot be decoded.

Real face dumps of 100k+ files always hold a few broken files: truncated JPEGs from
an interrupted download, zero-byte files, an HTML error page saved as ``.jpg``. Fully
verifying every file at start-up would cost minutes on a large set, so undecodable
files are found lazily, when a DataLoader first reads them; only zero-byte files are
caught by the folder scan (see :mod:`facecluster.data.folder`).

Policy (``data.on_bad_image``):

* ``skip`` (default): the broken sample is replaced by the next readable image of
  the same identity in the same dataset (deterministic: it depends only on which
  files are broken). Dataset length, batch count and batch size are unchanged, so
  every DDP rank still runs the same number of steps and the per-epoch RNG draws
  of an exact resume are unchanged. Each broken path is logged once per process
  tree (a shared-memory flag per sample, visible to the DataLoader workers and the
  main process), and :class:`facecluster.callbacks.BadImageReport` prints the running total at every
  epoch end. More than ``data.max_bad_fraction`` of a split broken stops the run.
* ``fail``: the first broken file stops the run with an error naming it.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # recordio imports this module
    from facecluster.data.recordio import RecordFile

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("skip", "fail")


class BadImageError(RuntimeError):
    """An image cannot be decoded (``on_bad_image=fail``), or too many of a split cannot.

    A single-string constructor, so DataLoader workers can re-raise it in the main process.
    """


def _to_8bit(image: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float grayscale image to 8-bit ``L``.

    PIL's own ``convert("RGB")`` clips such images at 255, which turns an ordinary
    16-bit face photo almost entirely white; scaling keeps its contrast instead.
    """
    array = np.asarray(image)
    if image.mode.startswith("I;16") or array.dtype == np.uint16:
        scaled = array.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    elif image.mode == "F" and array.size and float(np.nanmax(array)) <= 1.0:
        scaled = array.astype(np.float64) * 255.0  # float images in [0, 1]
    else:  # "I" (32-bit) or "F": 16-bit data when it exceeds 8 bits, else already 8-bit
        peak = float(np.nanmax(array)) if array.size else 0.0
        scaled = array.astype(np.float64) / (257.0 if peak > 255 else 1.0)
    scaled = np.nan_to_num(scaled, nan=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def load_rgb(path: str | io.BytesIO) -> Image.Image:
    """Decode an image file completely and return it as 8-bit RGB.

    Grayscale, palette, RGBA, CMYK and 16-bit images are converted; the size is left
    to the transforms (which resize any size to ``image_size``).

    Raises:
        OSError, ValueError, SyntaxError, Image.DecompressionBombError: the file is not
            a decodable image (PIL's errors; :data:`DECODE_ERRORS` lists them).
    """
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        if not isinstance(path, io.BytesIO):
            raise
        # PIL names the buffer object ("<_io.BytesIO object at 0x...>"): what it holds
        start = path.getvalue()[:8]
        raise UnidentifiedImageError(
            f"not an image format Pillow reads (it starts with {start!r})"
        ) from None
    with image:
        image.load()  # decode now: a truncated file fails here, not inside a transform
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            image = _to_8bit(image)
        return image.convert("RGB")


# torchvision 0.29 deprecates its image codecs for TorchCodec's (docs/DATA.md): silenced once
# here, not around every training step's call under data.decode=device
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")

_JPEG_START = b"\xff\xd8"
_FAST_COLORSPACES = ("YCbCr", "Gray", "RGB")
_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 2**62


def decode_jpeg_into(data: bytes | memoryview, out: np.ndarray, checked: bool = False) -> bool:
    """Decode ``data`` straight into ``out`` (a writable ``uint8[H, W, 3]``) when it is a
    JPEG of exactly that size that :func:`decode_image` would hand to libjpeg-turbo;
    False otherwise (a PNG, another size, CMYK, broken bytes), and ``out`` then holds
    nothing useful. ``checked``: these bytes passed before (a ``.rec`` record flagged by
    :meth:`BadImageTracker.mark_passed`): the frame header is not read again.

    The loaders' per-image path: the frame header read in Python (:func:`_frame`, 60%
    of the time of libjpeg-turbo's header parse, which the decode does again anyway)
    and one decode into the batch, no tensor, no copy of ``data`` (a memoryview into a
    mapped ``.rec`` will do).
    """
    if not checked:
        frame = _frame(data) if data[:2] == _JPEG_START else None
        # one or three components: gray, YCbCr or RGB (four: CMYK/YCCK, as PIL converts)
        if frame is None or (frame[1], frame[2], 3) != out.shape or frame[3] not in (1, 3):
            return False
    try:
        decoded = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
    except ValueError:  # truncated or corrupt: decode_image decides and words the error
        return False
    return decoded.shape == out.shape  # libjpeg-turbo read the size the walk did


def decode_image(source: str | bytes) -> torch.Tensor:
    """Decode an image file (path) or encoded bytes to ``uint8[H, W, 3]``, RGB.

    JPEGs go to libjpeg-turbo through simplejpeg: no PIL object, and the decoder's
    own pixel order (height, width, channel), so nothing is transposed on the CPU.
    It was the fastest CPU decoder measured here (bench/data_throughput.py) and its
    pixels equal :func:`load_rgb`'s (all 13,233 LFW-112 images). Everything else
    (PNG, CMYK JPEGs, 16-bit images) and any JPEG that libjpeg-turbo refuses goes
    through :func:`load_rgb`, so a broken file raises PIL's error, as before.

    Raises:
        The errors of :data:`DECODE_ERRORS`, for bytes that are not a decodable image.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if data.startswith(_JPEG_START):
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            # CMYK/YCCK: libjpeg-turbo's conversion differs from PIL's; an absurd size:
            # PIL raises its DecompressionBombError
            if colorspace in _FAST_COLORSPACES and height * width <= _MAX_PIXELS:
                return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB"))
        except _HEADER_ERRORS:  # truncated, corrupt or unknown: PIL decides, words the error
            pass
    return torch.from_numpy(np.array(load_rgb(io.BytesIO(data))))


_HEADER_ERRORS = (ValueError, KeyError)
"""What ``simplejpeg.decode_jpeg_header`` raises for a header it cannot read: a KeyError
for a chroma subsampling its table lacks (libjpeg-turbo 3's 4:4:1, which Pillow and
libjpeg-turbo's decoder read: a loader stopped on ``KeyError: 6``)."""


_JPEG_END = b"\xff\xd9"
_DEVICE_COLORSPACES = ("YCbCr", "Gray")
_BASELINE_FRAMES = (0xC0, 0xC1)  # SOF0, SOF1: sequential, Huffman-coded
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: markers without a length field


def _frame(data: bytes | memoryview) -> tuple[int, int, int, int] | None:
    """``(marker, height, width, components)`` of a JPEG's frame header (marker ``0xC0``
    baseline, ``0xC2`` progressive...), found by walking its length-prefixed segments
    from the start-of-image marker; None when the bytes end or break first."""
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _NO_LENGTH:
            i += 2
        elif marker == 0xDA:  # a scan before any frame header
            return None
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 10 > end:
                return None
            # length (2), precision (1), height (2), width (2), components (1)
            height = data[i + 5] << 8 | data[i + 6]
            return marker, height, data[i + 7] << 8 | data[i + 8], data[i + 9]
        else:
            i += 2 + (data[i + 2] << 8 | data[i + 3])
    return None


_PNG_START, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def image_damage(data: bytes) -> str | None:
    """What is wrong with ``data`` as a whole image, told from its structure alone (no
    decode: 4.6 us an LFW JPEG, one-off measurement), or None: a JPEG whose segments
    break off before its frame header, or without an end-of-image marker (a file cut
    short, which the decoder refuses; one with data after its marker, a phone's motion
    photo, decodes and passes); a PNG without its IEND chunk; bytes of no format the
    loaders read. A BMP or WebP passes on its signature. ``facecluster pack`` names
    such files, which it packs as they are."""
    if data.startswith(_JPEG_START):
        if _frame(data) is None:
            return "a JPEG whose header breaks off"
        return None if _JPEG_END in data else "a JPEG cut short: no end-of-image marker"
    if data.startswith(_PNG_START):
        return None if _PNG_END in data else "a PNG cut short: no IEND chunk"
    if data.startswith(b"BM") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return None
    return f"not an image: it starts with {bytes(data[:8])!r}"


def device_decodable(data: bytes, size: int) -> bool:
    """Whether ``data.decode=device`` ships these bytes to the training device: a
    baseline JPEG that ends with its end-of-image marker, whose header libjpeg-turbo
    reads, in YCbCr or gray, already ``size`` x ``size`` (aligned face crops).

    Everything else is decoded on the CPU as usual: images to resize; a file cut short
    (nvJPEG may decode one without an error, grey where the data stops, where the CPU
    decoder rejects it); progressive JPEGs (nvJPEG decodes those one at a time on its
    hybrid path, with a host sync each); JPEGs stored as RGB (whether nvJPEG honours
    their Adobe marker is unverified here); anything that is not a JPEG."""
    if not data.startswith(_JPEG_START) or not data.rstrip(b"\0\r\n ").endswith(_JPEG_END):
        return False
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except _HEADER_ERRORS:  # a broken header: the CPU path decides and words the error
        return False
    if colorspace not in _DEVICE_COLORSPACES or not height == width == size:
        return False
    frame = _frame(data)
    return frame is not None and frame[0] in _BASELINE_FRAMES


class EncodedImages:
    """A training batch's images as the loaders ship them under ``data.decode=device``:
    JPEG bytes (decoded on the device by :func:`decode_on_device`), or, for an image the
    device path does not take (:func:`device_decodable`), the CPU-decoded ``uint8[H, W, 3]``.

    Not a tensor, a sequence or a dataclass, so Lightning's transfer to the device
    leaves it on the CPU, where the batched decoder wants its input. ``bytes`` travel
    from the workers through the pipe: no shared-memory segment per image.

    Attributes:
        items: one entry per image, bytes or a decoded tensor.
        indices: each image's index in its dataset (to name or replace a broken one).
    """

    def __init__(self, items: list[bytes | torch.Tensor], indices: list[int]) -> None:
        self.items, self.indices = items, indices

    def __len__(self) -> int:
        return len(self.items)


def decode_on_device(
    batch: EncodedImages, size: int, device: torch.device
) -> tuple[torch.Tensor, dict[int, Exception]]:
    """``uint8[N, size, size, 3]`` on ``device``: the JPEG bytes decoded in one batched
    call (torchvision's ``decode_jpeg``: nvJPEG on CUDA, libjpeg-turbo on the CPU, whose
    pixels equal simplejpeg's on all 13,233 LFW-112 images), the decoded ones copied.

    When the batched call fails, each image is decoded on its own; one the device
    refuses is decoded by :func:`decode_image` on the CPU (a JPEG feature the device
    decoder lacks is not a broken file; said once per process), and only one that fails
    there too is reported. A failure of the decoder itself (out of memory, nvJPEG
    missing or not starting: :func:`_decoder_failed`) stops with an error that names
    ``data.decode=device`` (out of memory as it is).

    Returns:
        The images, and ``{position: error}`` for bytes that do not decode anywhere
        (their rows are zeros; the caller names or replaces them).
    """
    jpegs = [i for i, item in enumerate(batch.items) if isinstance(item, bytes)]
    inputs = [torch.frombuffer(bytearray(batch.items[i]), dtype=torch.uint8) for i in jpegs]
    bad: dict[int, Exception] = {}
    try:
        decoded = _decode_jpegs(inputs, device) if jpegs else []
    except RuntimeError as e:  # one broken file fails the whole call: find it
        if _decoder_failed(e):
            _raise_decoder_failure(e, device)
        decoded, refused = [], []
        for i, data in zip(jpegs, inputs, strict=True):
            try:
                decoded.append(_decode_jpegs([data], device)[0])
            except RuntimeError as e:
                if _decoder_failed(e):
                    _raise_decoder_failure(e, device)
                try:
                    image = decode_image(batch.items[i])
                    refused.append(e)
                except DECODE_ERRORS as cpu_error:
                    bad[i], image = cpu_error, torch.zeros((size, size, 3), dtype=torch.uint8)
                decoded.append(image.to(device).permute(2, 0, 1))
        _note_refusals(refused, device)
    # channels first, the decoder's layout, viewed as [N, H, W, 3]: normalize_images moves
    # the channels first again, so the decoded pixels are copied once (by the stack).
    # torchvision decodes on the CPU for a device other than CUDA: .to() moves them.
    if len(jpegs) == len(batch):
        out = torch.stack(decoded).to(device)
    else:
        out = torch.empty((len(batch), 3, size, size), dtype=torch.uint8, device=device)
        if decoded:
            out[jpegs] = torch.stack(decoded).to(device)
        for i, item in enumerate(batch.items):
            if not isinstance(item, bytes):
                out[i] = item.to(device).permute(2, 0, 1)
    return out.permute(0, 2, 3, 1), bad


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
_REFUSALS_SAID = False

# torchvision wraps every error of its CUDA decoder in a RuntimeError ("Error while
# decoding JPEG images: ..."), with the C++ stack trace. Where nvJPEG's status ends
# a clause ("Failed to transfer jpeg to device: 5") it decides: 1 not initialised,
# 5 allocator failure, 6 execution failed, 7 architecture mismatch, 8 internal error
# are the decoder's; 3 bad JPEG, 4 or 9 not supported, 10 incomplete are the file's.
# Without a status, these words mark the decoder failing as a whole:
_DECODER_STATUSES = {1, 5, 6, 7, 8}
_DECODER_FAILURES = (
    "out of memory",
    "not compiled",
    "failed to initialize",
    "failed to create",
    "failed to synchronize",
    "cuda error",
    "cudaevent",
    "cudastream",
)
_STATUS = re.compile(r"failed to [a-z ]+: (\d+)")


def _decoder_failed(error: BaseException) -> bool:
    """Whether a decode error is the decoder's (out of memory, nvJPEG missing, not
    starting, a CUDA error), which no file's CPU decode works around."""
    if isinstance(error, (torch.OutOfMemoryError, NotImplementedError)):
        return True
    text = str(error).split("Exception raised from", 1)[0].lower()  # not the stack trace
    statuses = {int(s) for s in _STATUS.findall(text)}
    if statuses:
        return bool(statuses & _DECODER_STATUSES) or "out of memory" in text
    return any(words in text for words in _DECODER_FAILURES)


def _raise_decoder_failure(error: BaseException, device: torch.device) -> NoReturn:
    """Stop on a failure of the decoder itself, naming the setting that chose it (running
    out of memory stays torch's own error)."""
    if isinstance(error, (torch.OutOfMemoryError, NotImplementedError)):
        raise error
    words = str(error).split("Exception raised from", 1)[0].strip()
    raise RuntimeError(
        f"data.decode=device: the {device.type} JPEG decoder failed ({words}); "
        "data.decode=cpu decodes in the loader workers instead"
    ) from error


def _decode_jpegs(inputs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched ``decode_jpeg`` to RGB ``uint8[3, H, W]`` on ``device``.

    On CUDA it runs with a stream of its own current. nvJPEG's hardware engine can
    write its outputs before the work queued on the current stream has run, into
    memory that the caching allocator has just freed on that stream and that queued
    kernels still read (pytorch/vision#9606; torchcodec#1634 guards against it).
    Outputs allocated on a side stream cannot be such memory; the current stream then
    waits for the side stream, and the outputs are marked as used by it.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type != "cuda":
        return decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    side, current = _SIDE_STREAMS[index], torch.cuda.current_stream(index)
    with torch.cuda.stream(side):
        decoded = decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device)
    current.wait_stream(side)
    for image in decoded:
        image.record_stream(current)
    return decoded


def _note_refusals(refused: list[BaseException], device: torch.device) -> None:
    """Say once per process that the device decoder refused JPEGs the CPU decoded: every
    such image costs a CPU decode in the training process."""
    global _REFUSALS_SAID
    if refused and not _REFUSALS_SAID:
        _REFUSALS_SAID = True
        logger.warning(
            "data.decode=device: the %s decoder refused %d JPEG(s) of a batch that the CPU "
            "decoded (%s); such images are decoded in the training process, one at a time",
            device.type, len(refused), refused[0],
        )  # fmt: skip


# What PIL raises for files that are not decodable images: UnidentifiedImageError
# (an OSError) for text/HTML, OSError "image file is truncated", SyntaxError and
# ValueError from some plugins on corrupt headers, DecompressionBombError for
# absurd declared sizes.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


IGNORED = -(1 << 40)
"""The label of a broken face of an evaluation dataset (validation, test, the unseen
faces, the class-mean pass) under ``on_bad_image=skip``: left out, not replaced by
another face of its identity, which would count that face twice; scored by nothing
(:func:`scored`), not the reason a run stops. Negative, as no identity's label is (the
unseen identities' are ``-n..-1``)."""


def scored(labels: torch.Tensor) -> torch.Tensor:
    """Which faces of an evaluation batch count: all but the :data:`IGNORED` ones."""
    return labels != IGNORED


_RECORD_LOCATOR = re.compile(r"(?P<rec>.+\.rec)#(?P<key>\d+)")
"""A ``.rec`` record's locator, ``<file>#<key>`` (no image file's name ends so)."""


def _records_named(locators: list[str], records: RecordFile | None = None) -> list[str] | None:
    """``<file>#<key> (offset O)`` for each of ``locators`` when all are ``.rec``
    records (the offset from ``records``' index when they are its records, else from
    the ``.idx`` beside the file; without it when that cannot be read), else None. For
    :meth:`BadImageTracker.check`'s message, raised once."""
    found = [_RECORD_LOCATOR.fullmatch(locator) for locator in locators]
    if not found or not all(found):
        return None
    from facecluster.data.recordio import RecordFile  # recordio imports this module

    # the index already read, not the .idx again (WebFace42M's: 44.6M lines, seconds
    # and gigabytes, in a loader worker or on every rank at once)
    offsets: dict[str, object] = {} if records is None else {str(records.rec): records.offsets}
    named = []
    for locator, match in zip(locators, found, strict=True):
        rec, key = match["rec"], int(match["key"])
        try:
            if rec not in offsets:
                offsets[rec] = RecordFile(rec).offsets
            named.append(f"{locator} (offset {offsets[rec][key]})")
        except Exception:  # noqa: BLE001 (a message's detail: the locator alone will do)
            named.append(locator)
    return named


class BadImageTracker:
    """Per-sample "known broken" flags shared by a datamodule's datasets and their workers;
    and, for ``.rec`` records, "decoded in place before" (:attr:`passed`), so that later
    epochs skip the JPEG header checks (:func:`decode_jpeg_into`'s ``checked``).

    Args:
        paths: Every sample path (``FaceFolder.samples`` order); flag ``i`` is ``paths[i]``.
            Kept as given, not copied: ``Samples.locators`` builds a path when asked.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = paths
        # Shared memory: DataLoader workers (forked or spawned) write into the same
        # buffer the main process reads, so a path is logged once and counted at
        # epoch end, and later epochs' new workers skip it without retrying.
        self.flags = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()
        # A byte per sample: a .rec record whose header passed the in-place decode's
        # checks (mark_passed). Apart from the broken flags, which it never touches.
        self.passed = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()
        self._view: np.ndarray | None = None
        self._passed: np.ndarray | None = None

    def mark(self, sample_id: int, error: BaseException, name: str | None = None) -> None:
        """Flag a sample as broken, logging it (as ``name``, else its path) the first time."""
        if int(self.flags[sample_id]) == 0:
            self.flags[sample_id] = 1
            logger.warning(
                "data.on_bad_image=skip: cannot decode %s (%s: %s); training replaces it by "
                "another image of the same identity, evaluation and the class means leave it "
                "out",
                name or self.paths[sample_id],
                type(error).__name__,
                error,
            )

    def is_bad(self, sample_id: int) -> bool:
        return bool(self._flags()[sample_id])

    def bad(self, sample_ids: np.ndarray) -> np.ndarray:
        """:meth:`is_bad` of each of ``sample_ids``, as a bool array."""
        return self._flags()[sample_ids] != 0

    def has_passed(self, sample_ids: np.ndarray) -> np.ndarray:
        """Which of ``sample_ids`` :meth:`mark_passed` flagged, as a bool array."""
        return self._passed_flags()[sample_ids] != 0

    def mark_passed(self, sample_ids: np.ndarray) -> None:
        """``sample_ids`` (``.rec`` records) were decoded in place: their headers passed
        the checks, which later epochs need not run again."""
        self._passed_flags()[sample_ids] = 1

    def _passed_flags(self) -> np.ndarray:
        if self._passed is None:  # numpy views, as _flags
            self._passed = self.passed.numpy()
        return self._passed

    def _flags(self) -> np.ndarray:
        if self._view is None:  # a numpy view reads a flag 20x faster than tensor indexing
            self._view = self.flags.numpy()
        return self._view

    def __getstate__(self) -> dict:
        # the views are rebuilt on the shared buffers
        return {**self.__dict__, "_view": None, "_passed": None}

    def bad_paths(self) -> list[str]:
        """Every path flagged so far, in sample order."""
        return [self.paths[i] for i in self.flags.nonzero().flatten().tolist()]

    def count(self, sample_ids: np.ndarray | None = None) -> int:
        """Broken samples among ``sample_ids`` (all samples when None)."""
        flags = self._flags() if sample_ids is None else self.bad(sample_ids)
        return int(np.count_nonzero(flags))

    def check(
        self,
        split_ids: np.ndarray,
        max_bad_fraction: float,
        split_name: str,
        records: RecordFile | None = None,
    ) -> None:
        """Raise :class:`BadImageError` when more than ``max_bad_fraction`` of the split
        ``split_ids`` is flagged, naming the first flagged paths (``records``: the
        ``.rec`` they are records of, whose index gives their offsets)."""
        total = len(split_ids)
        # Called at every broken file: first every flag, a contiguous scan (2 ms at 17M
        # samples against 20 for the split's gather, one-off measurement); when those are
        # within the limit, so are the split's.
        if self.count() <= max_bad_fraction * total:
            return
        bad = self.count(split_ids)
        if bad > max_bad_fraction * total:
            ids = np.asarray(split_ids)
            shown = [self.paths[i] for i in ids[self.bad(ids)][:5].tolist()]  # this split's
            records = _records_named(shown, records)
            # a record cannot be repaired or removed inside its .rec: the file is made again
            fix = (
                "A .rec cannot be repaired in place: copy it again from its source, or pack "
                "its images again (facecluster pack SRC OUT --overwrite)"
                if records
                else "Repair or remove them"
            )
            raise BadImageError(  # "at least": a pass stops at the first over the limit
                f"at least {bad} of {total} images of the {split_name} are undecodable, more than "
                f"data.max_bad_fraction={max_bad_fraction}; the data set looks damaged "
                f"(e.g. {', '.join(records or shown)}). {fix}, or raise data.max_bad_fraction"
            )

    def merge(self, device: torch.device, group: Any = None) -> None:
        """Take every process's flags (``torch.distributed``; every rank calls it): a rank
        reads only its shard of a split, so it finds only the broken files in it. ``device``:
        where the collective runs (the rank's GPU under NCCL), over ``group`` (None: the
        default process group)."""
        flags = self.flags.to(device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)
        # a worker may flag a file meanwhile: keep its flag too
        torch.maximum(self.flags, flags.to(self.flags.device), out=self.flags)
