"""The IJB-B and IJB-C 1:1 verification sets as arcface_torch's ``eval_ijbc.py`` reads them.

A release folder (``IJB_release/IJBC``; ``IJBB`` alike, file names in lower case)::

    loose_crop/<image>                      the face images, loosely cropped
    meta/ijbc_name_5pts_score.txt           <image> x1 y1 ... x5 y5 <detector score>
    meta/ijbc_face_tid_mid.txt              <image> <template id> <media id>
    meta/ijbc_template_pair_label.txt       <template id> <template id> <1 same, 0 not>

The two image lists name the same images in the same order (eval_ijbc.py takes a
face's template from the second list by its line in the first). Each face is aligned
by its five points (eyes, nose tip, mouth corners) onto arcface_torch's 112 x 112
template (:data:`REFERENCE`, scaled to the model's image size) with a similarity
transform fitted by least squares (Umeyama's, as scikit-image's
``SimilarityTransform.estimate``), and sampled bilinearly with black outside the
image, as OpenCV's ``warpAffine`` does (its weights are rounded to 1/32: a pixel may
differ by one level).

:func:`read_ijb` reads and checks the lists whole before any image is decoded: a line
of the wrong shape, a number that is not one, lists that disagree, a template of a
pair that no face belongs to, or a missing image is refused with the file and line.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from facecluster.data.images import DECODE_ERRORS, decode_image

TARGETS = ("IJBB", "IJBC")

REFERENCE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)
"""arcface_torch's five points of a 112 x 112 face (its 96-wide template, x + 8):
left eye, right eye, nose tip, left and right mouth corners, as seen in the image."""


@dataclass(frozen=True)
class IJBSet:
    """One IJB release's 1:1 protocol, read and checked."""

    root: Path
    target: str
    images: list[str]
    """Image file names under ``loose_crop``, in the lists' order."""
    landmarks: np.ndarray
    """``float64[N, 5, 2]``: each image's five points (x, y), in pixels."""
    scores: np.ndarray
    """``float32[N]``: each face's detector score."""
    templates: np.ndarray
    """``int64[N]``: each face's template id."""
    medias: np.ndarray
    """``int64[N]``: each face's media id (a photo, or a video whose frames share it)."""
    pairs: np.ndarray
    """``int64[P, 2]``: the template ids of each pair."""
    labels: np.ndarray
    """``bool[P]``: whether each pair's two templates are of one person."""

    def meta(self, kind: str) -> Path:
        return meta_file(self.root, self.target, kind)

    @property
    def image_dir(self) -> Path:
        return self.root / "loose_crop"


META = {
    "points": "name_5pts_score.txt",
    "templates": "face_tid_mid.txt",
    "pairs": "template_pair_label.txt",
}


def meta_file(root: Path, target: str, kind: str) -> Path:
    return root / "meta" / f"{target.lower()}_{META[kind]}"


def _lines(path: Path) -> list[list[str]]:
    """Each non-blank line's fields (split on whitespace); the file named when it cannot
    be read as text."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    return [line.split() for line in text.splitlines()]


def _numbers(path: Path, line: int, fields: list[str], kind: type) -> list:
    try:
        values = [kind(f) for f in fields]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(
            f"{path}, line {line}: expected {what}, got {' '.join(fields)!r}"
        ) from None
    if kind is float and not all(math.isfinite(v) for v in values):
        raise ValueError(f"{path}, line {line}: a value that is not finite: {' '.join(fields)!r}")
    return values


def _read_points(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, points, scores = [], [], []
    for number, fields in enumerate(_lines(path), 1):
        if not fields:
            continue
        if len(fields) != 12:
            raise ValueError(
                f"{path}, line {number}: {len(fields)} fields, expected 12 (an image "
                "name, 5 points as x y, a detector score)"
            )
        values = _numbers(path, number, fields[1:], float)
        if len({tuple(values[i : i + 2]) for i in range(0, 10, 2)}) == 1:
            raise ValueError(f"{path}, line {number}: its five points coincide: no face to align")
        names.append(fields[0])
        points.append(values[:10])
        scores.append(values[10])
    return (
        names,
        np.asarray(points, dtype=np.float64).reshape(-1, 5, 2),
        np.asarray(scores, dtype=np.float32),
    )


def _read_templates(path: Path, names: list[str], points: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [(n, f) for n, f in enumerate(_lines(path), 1) if f]
    if len(rows) != len(names):
        raise ValueError(
            f"{path} lists {len(rows):,} faces and {points} {len(names):,}: the two "
            "lists must name the same images in the same order"
        )
    ids = []
    for (number, fields), name in zip(rows, names, strict=True):
        if len(fields) != 3:
            raise ValueError(
                f"{path}, line {number}: {len(fields)} fields, expected 3 (an image "
                "name, its template id, its media id)"
            )
        if fields[0] != name:
            raise ValueError(
                f"{path}, line {number} names {fields[0]} where {points} names {name}: "
                "the two lists must name the same images in the same order"
            )
        ids.append(_numbers(path, number, fields[1:], int))
    table = np.asarray(ids, dtype=np.int64).reshape(-1, 2)
    return table[:, 0], table[:, 1]


PAIR_FIELDS = "three integers a line: two template ids and a label (1: one person, 0: two)"


def _line_of(path: Path, row: int) -> int:
    """The line of ``path`` that holds its ``row``-th (from 0) non-blank line, as numpy's
    reader counts rows (read again only to name a refused line)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = (number for number, line in enumerate(f, 1) if line.strip())
        return next(n for i, n in enumerate(rows) if i == row)


def _first_malformed(path: Path) -> str:
    """The first line of ``path`` that is not three integers, named, for numpy's refusal
    (which counts rows from 0, blank lines left out)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if fields and (len(fields) != 3 or not all(_integer(x) for x in fields)):
                return f"{path}, line {number}: {line.strip()!r}: expected {PAIR_FIELDS}"
    return f"{path}: expected {PAIR_FIELDS}"


def _integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _read_pairs(path: Path, templates: np.ndarray, faces: Path) -> tuple[np.ndarray, np.ndarray]:
    try:  # numpy's C reader: IJB-C lists 15.7 million pairs
        with warnings.catch_warnings():  # an empty file: said below
            warnings.filterwarnings("ignore", "loadtxt: input contained no data")
            table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError:
        raise ValueError(_first_malformed(path)) from None
    if not table.size:
        raise ValueError(f"{path} lists no pairs")
    if table.shape[1] != 3:
        raise ValueError(_first_malformed(path))
    labels = table[:, 2]
    if bad := np.flatnonzero((labels != 0) & (labels != 1)).tolist():
        raise ValueError(
            f"{path}, line {_line_of(path, bad[0])}: label {labels[bad[0]]}, expected 1 "
            f"(the same person) or 0 (two people); {len(bad):,} such lines"
        )
    pairs = table[:, :2]
    known = np.isin(pairs, np.unique(templates))
    if not known.all():
        row, side = np.argwhere(~known)[0]
        raise ValueError(
            f"{path}, line {_line_of(path, int(row))}: template {pairs[row, side]} holds no "
            f"face of {faces}; {int((~known).any(axis=1).sum()):,} pairs name such templates"
        )
    same = labels.astype(bool)
    if same.all() or not same.any():
        raise ValueError(
            f"{path}: every pair is labelled {int(labels[0])}; the protocol needs pairs of "
            "one person (1) and of two people (0)"
        )
    return pairs, same


def read_ijb(root: str | Path, target: str = "IJBC") -> IJBSet:
    """The protocol of the release at ``root`` (which holds ``meta`` and ``loose_crop``).

    Raises:
        FileNotFoundError: ``root``, a list or an image is missing (named).
        ValueError: a list is malformed or the lists disagree (file and line named).
    """
    root = Path(root).expanduser()
    if target not in TARGETS:
        raise ValueError(f"target {target!r}: expected one of {', '.join(TARGETS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder (give the IJB release's {target} folder)")
    missing = [
        str(path)
        for path in (*(meta_file(root, target, kind) for kind in META), root / "loose_crop")
        if not path.exists()
    ]
    if missing:
        raise FileNotFoundError(
            f"{root} is not an IJB release's {target} folder: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (it holds meta/ and loose_crop/)"
        )
    points, faces = meta_file(root, target, "points"), meta_file(root, target, "templates")
    names, landmarks, scores = _read_points(points)
    if not names:
        raise ValueError(f"{points} lists no faces")
    templates, medias = _read_templates(faces, names, points)
    pairs, labels = _read_pairs(meta_file(root, target, "pairs"), templates, faces)
    for name in names:
        if not (root / "loose_crop" / name).is_file():
            absent = sum(not (root / "loose_crop" / n).is_file() for n in names)
            raise FileNotFoundError(
                f"{root / 'loose_crop' / name} does not exist ({absent:,} of the "
                f"{len(names):,} images that {points} lists)"
            )
    return IJBSet(root, target, names, landmarks, scores, templates, medias, pairs, labels)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The ``2 x 3`` similarity (rotation, uniform scale, translation; no reflection)
    that maps ``source`` points onto ``target`` points with the least squared error
    (Umeyama 1991, as scikit-image's ``SimilarityTransform.estimate``)."""
    src, dst = np.asarray(source, np.float64), np.asarray(target, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(covariance)
    d = np.ones(2)
    if np.linalg.det(covariance) < 0:
        d[1] = -1
    rotation = u @ np.diag(d) @ vt
    variance = src_c.var(axis=0).sum()
    if variance == 0:
        raise ValueError("the five points coincide: no face to align")
    scale = (s * d).sum() / variance
    out = np.empty((2, 3))
    out[:, :2] = scale * rotation
    out[:, 2] = dst_mean - scale * rotation @ src_mean
    return out


def align_face(image: torch.Tensor, landmarks: np.ndarray, size: int) -> torch.Tensor:
    """``uint8[size, size, 3]``: ``image`` (``uint8[H, W, 3]``) warped so that its five
    ``landmarks`` land on :data:`REFERENCE` scaled to ``size``; bilinear, black outside
    the image, rounded to the nearest level."""
    matrix = similarity_transform(landmarks, REFERENCE * (size / 112))
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]  # output pixel -> input
    axis = np.arange(size, dtype=np.float64)
    xs, ys = np.meshgrid(axis, axis)  # pixel centres at integers, as OpenCV's
    points = np.stack([xs, ys, np.ones_like(xs)], axis=-1) @ inverse.T  # [size, size, 2]
    height, width = image.shape[:2]
    # grid_sample's align_corners=True puts -1 and 1 on the first and last pixel centres
    # (a one-pixel side: its centre at 0, which -1 reaches as well)
    grid = points / [max(width - 1, 1) / 2, max(height - 1, 1) / 2] - 1
    pixels = image.permute(2, 0, 1)[None].double()
    out = F.grid_sample(
        pixels,
        torch.from_numpy(grid)[None],
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)


class IJBFaces(Dataset):
    """Each face of an :class:`IJBSet`, decoded and aligned: ``uint8[size, size, 3]``."""

    def __init__(self, protocol: IJBSet, size: int) -> None:
        self.protocol, self.size = protocol, size

    def __len__(self) -> int:
        return len(self.protocol.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.protocol.image_dir / self.protocol.images[i]
        try:
            image = upright_image(path.read_bytes())
        except DECODE_ERRORS as e:
            raise ValueError(f"{path} cannot be decoded ({type(e).__name__}: {e})") from None
        return align_face(image, self.protocol.landmarks[i], self.size)


def upright_image(data: bytes) -> torch.Tensor:
    """``uint8[H, W, 3]``: an encoded image turned as its EXIF orientation says, as
    OpenCV's ``imread`` (which eval_ijbc.py reads with, and the release's points were
    found on) turns it; training and ``identify`` read images as stored (docs/DATA.md)."""
    if data.find(b"Exif\x00\x00", 0, 65536) != -1:
        with Image.open(io.BytesIO(data)) as image:
            if image.getexif().get(ORIENTATION, 1) != 1:
                turned = ImageOps.exif_transpose(image).convert("RGB")
                return torch.from_numpy(np.array(turned))
    return decode_image(data)


ORIENTATION = 0x0112
"""The EXIF tag of an image's orientation."""
