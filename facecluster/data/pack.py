"""``facecluster pack SRC OUT``: an image folder to InsightFace RecordIO.

Writes ``OUT/train.rec``, ``OUT/train.idx``, ``OUT/property`` (``num_classes,H,W``)
and ``OUT/identities.txt`` (one identity name per label). The image bytes are kept
as they are (no re-encode), so training on the packed file decodes exactly the
pixels of the folder.

Default layout, InsightFace's: record 0 a header ``(first identity key, end)``,
the images grouped by identity in name order, then one record per identity with
its ``[start, end)`` key range. With ``--shuffle`` the images are written in a
seeded random order without header or identity records (the plain im2rec layout
that DALI-style sequential readers want); the reader then finds the identities in
one pass over the record headers.

Zero-byte image files (an interrupted copy) are refused before anything is written,
naming them and the identities made only of them, as training on the folder refuses
them under ``data.on_bad_image=fail``: a packed file has no trace of them, so training
on it could not. ``--skip-empty`` packs without them (a warning names them); any other
broken image is packed as it is, for ``data.on_bad_image`` to decide on, and a warning
names those that look damaged (a JPEG cut short, a file that is no image: told from
the bytes' structure, without decoding).

An OUT that already holds a data set (any ``.rec`` or ``.idx``, ``property`` or
``identities.txt``: one mistyped OUT would replace a downloaded MS1MV3) is refused
before SRC is read, unless ``--overwrite`` is given.

    facecluster pack datasets/lfw-demo/images /data/lfw-demo-rec
    python -m facecluster.data.pack SRC OUT --shuffle
    facecluster pack SRC OUT --overwrite    # replace the data set OUT holds
    facecluster pack SRC OUT --skip-empty   # leave zero-byte image files out
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from facecluster.config import (
    NAME_RULE,
    SAME_NAME_RULE,
    escape_unencodable_output,
    name_collisions,
    shown_names,
    unknown_home,
    unreadable_names,
)
from facecluster.data.folder import IDENTITY_NAMES, FaceFolder, scan_image_folder
from facecluster.data.images import image_damage
from facecluster.data.recordio import RecordWriter, pack, rec_paths
from facecluster.io import (
    LOCK,
    folder_lock,
    replacing_together,
    shown_list,
    written_by_a_live_process,
)

logger = logging.getLogger(__name__)

DATA_SET = ("*.rec", "*.idx", "property", IDENTITY_NAMES)
"""What makes OUT hold a data set (any RecordIO pair, or the files beside one) that pack
refuses to replace or to write beside without ``--overwrite``."""


def pack_folder(
    src: str | Path,
    out: str | Path,
    shuffle: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    skip_empty: bool = False,
) -> Path:
    """Pack every identity of ``src`` into ``out``.

    Args:
        overwrite: replace the ``train.rec``/``train.idx`` that ``out`` holds (refused
            without it, before ``src`` is read).
        skip_empty: pack without the zero-byte image files of ``src`` (and the
            identities made only of them), with a warning that names them; without it
            they are refused before anything is written.

    Returns:
        The written ``train.rec``.

    Raises:
        FileExistsError: ``out`` holds a data set and ``overwrite`` is not set.
        ValueError: ``out`` is a file, ``src`` or inside it, or ``src`` cannot be packed (a
            zero-byte image file without ``skip_empty``).
    """
    for name, given in (("SRC", src), ("OUT", out)):
        if not str(given).strip():  # the working dir: OUT got the four files there
            raise ValueError(f"{name} {given!r} names no folder")
        if home := unknown_home(given):  # a RuntimeError traceback in expanduser
            raise ValueError(f"{name} {home}")
    out = Path(out).expanduser()
    # before the scan (minutes over millions of files): where the files go
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"OUT {out} is a file: pack writes train.rec, train.idx and property into a folder"
        )
    source, target = Path(src).expanduser().resolve(), out.resolve()
    if target == source:
        raise ValueError(f"OUT {out} is SRC: pack into another folder than the images'")
    # a hidden folder inside SRC is allowed: every scan skips it
    if source in target.parents and not target.relative_to(source).parts[0].startswith("."):
        raise ValueError(
            f"OUT {out} is inside SRC {src}: every scan of SRC would warn of it as an "
            "identity folder without images; pack into a folder outside the images'"
        )
    _check_out(out, overwrite)
    above = next((p for p in out.parents if p.exists()), None)  # found after the scan
    if above is not None and not above.is_dir():
        raise ValueError(f"OUT {out} cannot be made: {above} is a file")
    try:
        folder = scan_image_folder(src, name="SRC")
    except (OSError, ValueError) as e:
        packed = rec_paths(src)
        if packed is None:
            raise
        # said only "No identity sub-folders ... found"
        raise ValueError(
            f"SRC {src} is a RecordIO data set already ({packed[0]}): train on it as it is "
            f"(data.root={packed[0]}); pack reads an image folder ({e})"
        ) from None
    if (packed := rec_paths(src)) is not None:  # packed the folders without a word, where
        # training on SRC reads this .rec (the folder scan's warning named it "not an image")
        raise ValueError(
            f"SRC {src} holds a RecordIO data set ({packed[0]}) beside its identity folders: "
            "training on SRC reads that .rec, not the folders. Move it out of SRC to pack "
            "the images"
        )
    # identities.txt holds one name a line: a name with a line break would shift every
    # later identity's name onto another's images; training refuses the rest of what
    # name_problem refuses (a tab, a blank name). Refused before any record is written.
    if broken := unreadable_names(folder.class_names):
        raise ValueError(
            f"{src}: {len(broken)} identity folder name(s) cannot be packed "
            f"({shown_list([f'{name!r} {why}' for name, why in broken], 3)}); "
            f"{NAME_RULE}: rename them"
        )
    if alike := name_collisions(folder.class_names):
        raise ValueError(
            f"{src}: {len(alike)} pair(s) of identity folders name one person twice "
            f"({shown_list([shown_names(pair) for pair in alike], 3)}: {SAME_NAME_RULE}); "
            "merge or rename them"
        )
    _check_empty_files(src, folder, skip_empty)
    # the order as sample indices (8 bytes an image): a list of (path, label) tuples
    # took about 190 bytes an image (8 GB for WebFace42M's 42.5M, computed; review)
    order = np.arange(len(folder.samples))
    if shuffle:  # before OUT is made: a seed numpy refuses left an empty OUT behind
        order = np.random.default_rng(seed).permutation(len(order))
    out.mkdir(parents=True, exist_ok=True)
    rec = out / "train.rec"
    height, width = _image_size(folder)
    # Every file is written under a temporary name and they replace OUT's together at
    # the end, once all are on disk, train.rec last: a pack cut short (Ctrl-C, a time
    # limit, a full disk that only train.rec's fsync reports) leaves OUT as it was.
    names = ("property", IDENTITY_NAMES, "train.idx", "train.rec")
    with contextlib.ExitStack() as held:
        try:  # two packs into one OUT both finished, the later replacing the first's
            held.enter_context(folder_lock(out, "OUT", wait=False))
        except BlockingIOError:
            raise FileExistsError(
                f"OUT {out} is being written by another facecluster pack (it holds the "
                f"lock {out / LOCK}): wait for it to end, or choose another OUT"
            ) from None
        _check_out(out, overwrite)  # again: a pack that finished into it meanwhile
        _remove_stopped_packs(out, names)
        with replacing_together(*(out / name for name in names)) as temps:
            property_tmp, names_tmp, idx_tmp, rec_tmp = temps
            damaged = _write_records(folder, order, shuffle, rec_tmp, idx_tmp, f"packing {out}")
            property_tmp.write_text(f"{folder.num_classes},{height},{width}\n")
            # surrogateescape: a folder name that is not UTF-8 keeps its bytes, as
            # scan_image_folder reads them back
            names = "\n".join(folder.class_names) + "\n"
            names_tmp.write_bytes(names.encode("utf-8", errors="surrogateescape"))
    if damaged:  # named here, by file: training on the pack can name only its records
        logger.warning(
            "%s: %d image(s) look damaged, packed as they are (training skips or refuses "
            "them by data.on_bad_image): %s",
            src,
            len(damaged),
            shown_list(damaged),
        )
    return rec


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` holding a data set (without ``overwrite``), or another one's
    ``.rec``/``.idx`` beside which a pack would change its ``property``."""
    entries = [p for pattern in DATA_SET for p in out.glob(pattern)] if out.is_dir() else []
    if folders := sorted(p.name for p in entries if p.is_dir()):  # the rename failed at the
        # end, the other files replaced (SRC pp/train.rec into pp with --overwrite)
        raise ValueError(
            f"OUT {out} holds a folder named {folders[0]}, where pack writes a file: choose "
            "another OUT"
        )
    found = (p.name for p in entries)
    held = sorted(n for n in found if not n.startswith("."))  # not a killed pack's temp files
    other = [
        n for n in held if n.endswith((".rec", ".idx")) and n not in ("train.rec", "train.idx")
    ]
    if other:  # --overwrite replaces train.*: beside another pair, its files would change
        raise FileExistsError(
            f"OUT {out} holds another data set ({', '.join(other)}), whose property and "
            "identities.txt pack would replace, even with --overwrite: choose another OUT"
        )
    if held and not overwrite:
        raise FileExistsError(
            f"OUT {out} already holds a data set ({', '.join(held)}), which pack would "
            "replace. Pass --overwrite to replace it, or choose another OUT"
        )


def _remove_stopped_packs(out: Path, names: tuple[str, ...]) -> None:
    """Remove the temporary files (``.train.rec.<pid>-<hex>.tmp.rec`` ...) that a pack
    killed before its end left in ``out``: as large as the data set, and hidden. Called
    with ``out``'s lock held; a file whose process still runs here is kept all the same
    (a file system without ``flock`` runs the pack unlocked)."""
    found = [(p, name) for name in names for p in out.glob(f".{name}.*.tmp*") if p.is_file()]
    # this process's own pid names none of its files yet: a killed pack's, pid reused
    mine = f".{os.getpid()}-"
    live = [
        p for p, name in found if mine not in p.name and written_by_a_live_process(p, f".{name}")
    ]
    left = [p for p, _ in found if p not in live]
    if live:
        logger.warning(
            "%s: kept %s: a process still running here is writing them (another pack?)",
            out,
            shown_list(sorted(p.name for p in live)),
        )
    if left:
        size = sum(p.stat().st_size for p in left)
        for path in left:
            path.unlink(missing_ok=True)
        logger.warning(
            "%s: removed %d file(s) of %.1f MB that a pack stopped before its end left (%s)",
            out,
            len(left),
            size / 1e6,
            shown_list(sorted(p.name for p in left)),
        )


def _check_empty_files(src: str | Path, folder: FaceFolder, skip_empty: bool) -> None:
    """Zero-byte image files, which the scan leaves out of the samples (and an identity
    made only of them out of the identities): refused unless ``skip_empty``, then named
    in a warning. Training on the folder refuses them under ``data.on_bad_image=fail``
    and above ``data.max_bad_fraction``; the packed file keeps no trace of them."""
    empty = folder.empty_files
    if not empty:
        return
    lost = sorted({Path(p).parent.name for p in empty} - set(folder.class_names))
    what = f"{len(empty)} zero-byte image file(s): {shown_list(empty)}"
    if lost:
        identities = "identity" if len(lost) == 1 else "identities"
        what += f"; {len(lost)} {identities} made only of them ({shown_list(lost)})"
    if not skip_empty:
        raise ValueError(
            f"{src}: {what}. An interrupted copy? Repair or remove them, or pass "
            "--skip-empty to pack without them (training on SRC refuses them under "
            "data.on_bad_image=fail)"
        )
    logger.warning("%s: --skip-empty: left out %s", src, what)


def _image_size(folder: FaceFolder) -> tuple[int, int]:
    """``property``'s height and width: the first image that opens (training skips
    or refuses broken images by ``data.on_bad_image``; packing one is not an error)."""
    for path, _ in folder.samples:
        with contextlib.suppress(OSError, ValueError, Image.DecompressionBombError):
            with Image.open(path) as image:
                width, height = image.size
                return height, width
    raise ValueError(f"{folder.root}: no image opens, nothing to pack")


def _write_records(
    folder: FaceFolder, order: np.ndarray, shuffle: bool, rec: Path, idx: Path, what: str
) -> list[str]:
    """The records of ``folder``'s samples in ``order`` (and, unless ``shuffle``, the
    header and identity records) into ``rec`` and ``idx``.

    Returns:
        The images that look damaged (:func:`image_damage`), each with why.
    """
    samples = folder.samples
    damaged: list[str] = []
    with RecordWriter(rec, idx) as writer:
        first_key = 1
        identity_key = first_key + len(order)
        ranges: list[list[int]] = [[0, 0] for _ in folder.class_names]
        if not shuffle:  # first, so that the .idx is in key order (read as it is)
            writer.write(0, pack([identity_key, identity_key + len(ranges)]))
        for n, i in enumerate(tqdm(order, desc=what, unit="img")):  # no list of ints
            path, label = samples[i]
            key = n + (0 if shuffle else first_key)
            data = Path(path).read_bytes()
            if (why := image_damage(data)) is not None:
                damaged.append(f"{path} ({why})")
            writer.write(key, pack(float(label), data))
            if not shuffle:
                ranges[label] = [ranges[label][0] or key, key + 1]
        if not shuffle:
            for label, (start, end) in enumerate(ranges):
                writer.write(identity_key + label, pack([start, end]))
    return damaged


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the block runs, a time limit's SIGTERM (timeout, SLURM) unwinds as Ctrl-C
    does: the temporary files are removed and OUT is left as it was (the default
    action ended the process with them in OUT). The caller's own handler comes back
    after; off the main thread, where handlers cannot be set, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not stop the
        sys.exit(128 + signum)  # clean-up half way, leaving the rest of the temp files

    before = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="facecluster pack",
        # the module docstring without its reST markup (``x``), as a terminal shows it
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog=__doc__.split("\n\n", 1)[1].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="image folder, one sub-folder per identity")
    parser.add_argument("out", help="output folder for train.rec, train.idx, property")
    parser.add_argument("--shuffle", action="store_true", help="seeded random record order")
    parser.add_argument("--seed", type=int, default=0, help="seed of --shuffle")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the train.rec/train.idx (and property, identities.txt) OUT holds",
    )
    parser.add_argument(
        "--skip-empty",
        action="store_true",
        help="pack without SRC's zero-byte image files (refused without it)",
    )
    escape_unencodable_output()  # it prints the paths it wrote
    args = parser.parse_args(argv)
    if args.seed < 0:  # numpy said only "expected non-negative integer"
        parser.error(f"argument --seed: must be >= 0, got {args.seed}")
    try:
        with _sigterm_unwinds():
            rec = pack_folder(
                args.src, args.out, args.shuffle, args.seed, args.overwrite, args.skip_empty
            )
    except (OSError, ValueError) as e:  # OSError: OUT unwritable, or holding a data set
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {rec} and {rec.with_suffix('.idx')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
