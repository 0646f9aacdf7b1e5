"""InsightFace verification pair files (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``).

A ``.bin`` file is a pickle of ``(images, issame)``: ``2 * P`` encoded images (the
two faces of pair ``p`` are ``images[2p]`` and ``images[2p + 1]``), as ``bytes`` or
numpy uint8 arrays of the encoded file, and ``P`` booleans. Pickles can run code, so
:func:`read_bin` uses an unpickler that accepts only those types. :func:`write_bin`
makes one from an image folder and an LFW-style ``pairs.txt``.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from facecluster.data.images import load_rgb

# What a verification pickle may contain: containers, bytes, and numpy arrays.
_ALLOWED = {
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "bool"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # numpy arrays pickled with protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Python 2 names (protocol <= 2: __builtin__.bytes), mapped as pickle maps them.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not allowed in a verification .bin file "
                "(only lists of encoded images and booleans)"
            )
        return super().find_class(module, name)


@dataclass(frozen=True)
class VerificationPairs:
    """Face pairs with same/different labels."""

    images: list[bytes]
    """2 * P encoded images; pair p is (images[2p], images[2p + 1])."""
    issame: list[bool]

    def __len__(self) -> int:
        return len(self.issame)

    def pair(self, p: int) -> tuple[Image.Image, Image.Image]:
        return (
            load_rgb(io.BytesIO(self.images[2 * p])),
            load_rgb(io.BytesIO(self.images[2 * p + 1])),
        )


def read_bin(path: str | Path) -> VerificationPairs:
    """Read an InsightFace ``.bin`` verification file (no code from the file runs)."""
    with open(path, "rb") as f:
        try:
            images, issame = _RestrictedUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as e:
            raise ValueError(f"{path} is not a verification .bin file: {e}") from None
    images = [
        bytes(np.asarray(x, dtype=np.uint8).tobytes()) if not isinstance(x, bytes) else x
        for x in images
    ]
    issame = [bool(x) for x in issame]
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs (expected 2 each)")
    return VerificationPairs(images, issame)


def read_pairs_txt(root: str | Path, pairs: str | Path) -> tuple[list[Path], list[bool]]:
    """Image paths (two per pair) and same/different flags from an LFW ``pairs.txt``.

    Lines ``name i j`` are same-identity pairs, ``name1 i name2 j`` different ones;
    image ``i`` of ``name`` is ``root/name/name_{i:04d}.jpg``. A first line of only
    numbers (LFW's ``folds pairs-per-fold``, or its one number) is skipped; a first
    line of three or four numbers is a pair of identities named by numbers.
    """
    root = Path(root)
    paths, issame = [], []
    for line_no, line in enumerate(Path(pairs).read_text().splitlines(), 1):
        parts = line.split()
        if not parts or (line_no == 1 and len(parts) <= 2 and all(p.isdigit() for p in parts)):
            continue
        if len(parts) == 3:
            a, b = (parts[0], int(parts[1])), (parts[0], int(parts[2]))
        elif len(parts) == 4:
            a, b = (parts[0], int(parts[1])), (parts[2], int(parts[3]))
        else:
            raise ValueError(f"{pairs} line {line_no}: expected 3 or 4 fields, got {line!r}")
        for name, i in (a, b):
            path = root / name / f"{name}_{i:04d}.jpg"
            if not path.is_file():
                raise FileNotFoundError(f"{pairs} line {line_no}: {path} does not exist")
            paths.append(path)
        issame.append(len(parts) == 3)
    return paths, issame


def load_pairs(path: str | Path) -> VerificationPairs:
    """A verification set named in ``data.verification``: an InsightFace ``.bin`` file,
    or an LFW-style ``pairs.txt`` whose images are in ``images/`` beside it (the
    layout of LFW-112: ``lfw-112/pairs.txt`` and ``lfw-112/images/<name>/...``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set {path} does not exist")
    if path.suffix == ".bin":
        return read_bin(path)
    images = path.parent / "images"
    if not images.is_dir():
        raise FileNotFoundError(
            f"verification set {path}: a pairs list needs its images in {images}/<name>/ "
            "(or give an InsightFace .bin file)"
        )
    paths, issame = read_pairs_txt(images, path)
    return VerificationPairs([p.read_bytes() for p in paths], issame)


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
