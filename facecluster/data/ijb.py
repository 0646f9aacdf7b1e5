"""The IJB-B and IJB-C releases as arcface_torch's ``eval_ijbc.py`` (1:1) and
InsightFace's ``IJB_evals.py`` (1:N) read them.

A release folder (``IJB_release/IJBC``; ``IJBB`` alike, file names in lower case)::

    loose_crop/<image>                      the face images, loosely cropped
    meta/ijbc_name_5pts_score.txt           <image> x1 y1 ... x5 y5 <detector score>
    meta/ijbc_face_tid_mid.txt              <image> <template id> <media id>
    meta/ijbc_template_pair_label.txt       1:1: <template id> <template id> <1 same, 0 not>
    meta/ijbc_1N_gallery_G1.csv             1:N: a header, then TEMPLATE_ID,SUBJECT_ID,...
    meta/ijbc_1N_gallery_G2.csv               (one row per image; IJB-B's galleries are
    meta/ijbc_1N_probe_mixed.csv              S1 and S2)

A face's template comes from ``face_tid_mid.txt`` in both protocols; the 1:N lists
give each gallery and probe template its subject.

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

import csv
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

PROTOCOLS = ("1:1", "1:N")

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
class TemplateList:
    """A 1:N list (a gallery, or the probes): its templates and their subjects."""

    name: str
    """``G1``, ``G2`` (IJB-B: ``S1``, ``S2``) or ``probes``."""
    path: Path
    templates: np.ndarray
    """``int64[T]``: its template ids, ascending."""
    subjects: np.ndarray
    """``int64[T]``: each template's subject id."""


@dataclass(frozen=True)
class IJBSet:
    """One IJB release's protocols, read and checked."""

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
    pairs: np.ndarray | None = None
    """1:1: ``int64[P, 2]``, the template ids of each pair (None: 1:1 not read)."""
    labels: np.ndarray | None = None
    """1:1: ``bool[P]``, whether each pair's two templates are of one person."""
    galleries: tuple[TemplateList, ...] = ()
    """1:N: the two galleries, each holding one template per subject, of different
    subjects (empty: 1:N not read)."""
    probes: TemplateList | None = None
    """1:N: the probe templates, searched in each gallery: mated where their subject is
    in it, non-mated otherwise."""

    @property
    def image_dir(self) -> Path:
        return self.root / "loose_crop"


META = {
    "points": "name_5pts_score.txt",
    "templates": "face_tid_mid.txt",
    "pairs": "template_pair_label.txt",
    "probes": "1N_probe_mixed.csv",
}

GALLERIES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}
"""The names of each release's two 1:N galleries (``meta/<target>_1N_gallery_<name>.csv``)."""

NEEDS = {"1:1": ("points", "templates", "pairs"), "1:N": ("points", "templates", "probes")}
"""The lists each protocol reads (1:N also its galleries')."""


def meta_file(root: Path, target: str, kind: str) -> Path:
    """``kind``: a key of :data:`META`, or a gallery's name (``G1``)."""
    name = f"1N_gallery_{kind}.csv" if kind in GALLERIES[target] else META[kind]
    return root / "meta" / f"{target.lower()}_{name}"


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


SUBJECT_FIELDS = "a template id and a subject id first (TEMPLATE_ID,SUBJECT_ID,...)"


def _read_subjects(path: Path, name: str, known: np.ndarray, faces: Path) -> TemplateList:
    """A 1:N list: a header line (skipped), then a row per image whose first two fields
    are its template and that template's subject; a gallery's subjects each once."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    seen: dict[int, tuple[int, int]] = {}  # template -> (subject, line)
    header = True
    for number, fields in enumerate(csv.reader(text.splitlines()), 1):
        if not "".join(fields).strip():
            continue
        if header and not _integer(fields[0]):  # TEMPLATE_ID,SUBJECT_ID,...
            header = False
            continue
        header = False
        if len(fields) < 2 or not (_integer(fields[0]) and _integer(fields[1])):
            raise ValueError(
                f"{path}, line {number}: {','.join(fields)!r}: expected {SUBJECT_FIELDS}"
            )
        template, subject = int(fields[0]), int(fields[1])
        first = seen.setdefault(template, (subject, number))
        if first[0] != subject:
            raise ValueError(
                f"{path}, line {number}: template {template} of subject {subject}, where "
                f"line {first[1]} gives it subject {first[0]}: a template is one subject's"
            )
    if not seen:
        raise ValueError(f"{path} lists no templates")
    templates = np.array(sorted(seen), dtype=np.int64)
    subjects = np.array([seen[t][0] for t in templates.tolist()], dtype=np.int64)
    if (absent := ~np.isin(templates, known)).any():
        template = int(templates[absent][0])
        raise ValueError(
            f"{path}, line {seen[template][1]}: template {template} holds no face of "
            f"{faces}; {int(absent.sum()):,} of its templates are such"
        )
    if name != "probes":
        owner: dict[int, int] = {}
        for template in templates.tolist():
            other = owner.setdefault(seen[template][0], template)
            if other != template:
                raise ValueError(
                    f"{path}, line {seen[template][1]}: subject {seen[template][0]} has a "
                    f"second template, {template} (its first, {other}, is on line "
                    f"{seen[other][1]}): a gallery holds one template per subject"
                )
    return TemplateList(name, path, templates, subjects)


def _read_search(root: Path, target: str, templates: np.ndarray, faces: Path) -> tuple:
    """The 1:N lists, read and checked against each other: ``(galleries, probes)``."""
    probes = _read_subjects(meta_file(root, target, "probes"), "probes", templates, faces)
    galleries = tuple(
        _read_subjects(meta_file(root, target, name), name, templates, faces)
        for name in GALLERIES[target]
    )
    first, second = galleries
    if len(both := np.intersect1d(first.templates, second.templates)):
        raise ValueError(
            f"{first.path} and {second.path} both hold template {both[0]} ({len(both):,} "
            "in all): the two galleries are of different people"
        )
    if len(both := np.intersect1d(first.subjects, second.subjects)):
        raise ValueError(
            f"{first.path} and {second.path} both hold subject {both[0]} ({len(both):,} "
            "in all): the two galleries are of different people"
        )
    for gallery in galleries:
        if len(both := np.intersect1d(probes.templates, gallery.templates)):
            raise ValueError(
                f"template {both[0]} is both a probe ({probes.path}) and in the gallery "
                f"{gallery.path} ({len(both):,} in all): a probe would find itself"
            )
        mated = np.isin(probes.subjects, gallery.subjects)
        if mated.all() or not mated.any():
            raise ValueError(
                f"{'every' if mated.all() else 'no'} probe of {probes.path} is of a subject "
                f"in {gallery.path}: the protocol needs probes of its subjects (to find) and "
                "of others (to reject)"
            )
    return galleries, probes


def read_ijb(
    root: str | Path, target: str = "IJBC", protocols: tuple[str, ...] = ("1:1",)
) -> IJBSet:
    """The ``protocols`` (``1:1``, ``1:N``) of the release at ``root`` (which holds
    ``meta`` and ``loose_crop``); the lists the others need are not read.

    Raises:
        FileNotFoundError: ``root``, a list or an image is missing (named).
        ValueError: a list is malformed or the lists disagree (file and line named).
    """
    root = Path(root).expanduser()
    if target not in TARGETS:
        raise ValueError(f"target {target!r}: expected one of {', '.join(TARGETS)}")
    if not protocols or not set(protocols) <= set(PROTOCOLS):
        raise ValueError(f"protocols {protocols!r}: expected some of {', '.join(PROTOCOLS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder (give the IJB release's {target} folder)")
    kinds = dict.fromkeys(kind for p in protocols for kind in NEEDS[p])
    if "1:N" in protocols:
        kinds.update(dict.fromkeys(GALLERIES[target]))
    missing = [
        str(path)
        for path in (*(meta_file(root, target, kind) for kind in kinds), root / "loose_crop")
        if not path.exists()
    ]
    are = "is" if len(missing) == 1 else "are"
    search_lists = {str(meta_file(root, target, k)) for k in ("probes", *GALLERIES[target])}
    if missing and set(missing) <= search_lists:  # a 1:1 release without the 1:N lists
        raise FileNotFoundError(
            f"{root} lacks 1:N lists: {', '.join(missing)} {are} missing (InsightFace's "
            "updated IJB meta files hold them; docs/EVALUATION.md)"
        )
    if missing:
        other = next(t for t in TARGETS if t != target)
        hint = (
            f"; it holds {other}'s lists: give --target {other}"
            if meta_file(root, other, "points").is_file()
            else " (it holds meta/ and loose_crop/)"
        )
        raise FileNotFoundError(
            f"{root} is not an IJB release's {target} folder: {', '.join(missing)} {are} "
            f"missing{hint}"
        )
    points, faces = meta_file(root, target, "points"), meta_file(root, target, "templates")
    names, landmarks, scores = _read_points(points)
    if not names:
        raise ValueError(f"{points} lists no faces")
    templates, medias = _read_templates(faces, names, points)
    pairs = labels = probes = None
    galleries = ()
    if "1:1" in protocols:
        pairs, labels = _read_pairs(meta_file(root, target, "pairs"), templates, faces)
    if "1:N" in protocols:
        galleries, probes = _read_search(root, target, templates, faces)
    for name in names:
        if not (root / "loose_crop" / name).is_file():
            absent = sum(not (root / "loose_crop" / n).is_file() for n in names)
            raise FileNotFoundError(
                f"{root / 'loose_crop' / name} does not exist ({absent:,} of the "
                f"{len(names):,} images that {points} lists)"
            )
    return IJBSet(
        root, target, names, landmarks, scores, templates, medias, pairs, labels, galleries, probes
    )


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
    the image, rounded to the nearest level. Only the part of the photo that the face's
    samples reach is converted and sampled (a 12-megapixel photo is 288 MB in float64)."""
    matrix = similarity_transform(landmarks, REFERENCE * (size / 112))
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]  # output pixel -> input
    axis = np.arange(size, dtype=np.float64)
    xs, ys = np.meshgrid(axis, axis)  # pixel centres at integers, as OpenCV's
    points = np.stack([xs, ys, np.ones_like(xs)], axis=-1) @ inverse.T  # [size, size, 2]
    # the pixels a bilinear sample can reach: floor(p) and floor(p) + 1, within the
    # photo (a pixel outside is black either way), one more on each side for safety, at
    # least two a side where the photo has two (grid_sample maps a one-pixel side's
    # whole range onto its one pixel)
    height, width = image.shape[:2]
    flat = points.reshape(-1, 2)
    low = np.clip(np.floor(flat.min(axis=0)) - 1, 0, [max(width - 2, 0), max(height - 2, 0)])
    high = np.clip(np.floor(flat.max(axis=0)) + 2, low + 1, [width - 1, height - 1])
    (x0, y0), (x1, y1) = low.astype(np.int64), high.astype(np.int64)
    crop = image[y0 : y1 + 1, x0 : x1 + 1]
    points = points - [x0, y0]
    height, width = crop.shape[:2]
    # grid_sample's align_corners=True puts -1 and 1 on the first and last pixel centres
    # (a one-pixel side: its centre at 0, which -1 reaches as well)
    grid = points / [max(width - 1, 1) / 2, max(height - 1, 1) / 2] - 1
    pixels = crop.permute(2, 0, 1)[None].double()
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
