"""Deploying a trained run: ``facecluster export``, ``enroll`` and ``identify``.

An export folder holds ``identifier.pt`` (the torch identifier, plain data only)
and, with ``--onnx``, ``onnx/`` (see :mod:`facecluster.inference.onnx`).
``identify_files`` reads image files or folders in batches, identifies them with
either runtime and writes one CSV row per image. docs/DEPLOYMENT.md shows both
commands.

``export`` and ``enroll`` change an export folder as a whole: the new files are written
into a folder of their own inside it, which one rename commits (``.facecluster-update``),
and are then put in place (:func:`finish_update`). A failure or a killed process before
the rename leaves the export as it was; after it, the next command on the folder
(``identify``, ``enroll``, ``export``: :func:`load_export`) completes the update before
it reads anything. So ``identifier.pt`` and ``onnx/`` never hold two different
identifiers, one of each.

An enrolment reads the export it adds to, so it notes the files it read (:func:`_stamp`)
and commits only if they are still those: one that another command (``enroll``,
``export``) replaced meanwhile is refused (:class:`ExportChangedError`), nothing written,
instead of undoing that command's update. ``export`` reads nothing of the folder and
replaces the identifier whole, so it commits whatever came meanwhile.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from facecluster.config import CHECKOUT, Config, ConfigError, resolve_data_root
from facecluster.data import IMAGE_EXTENSIONS, build_transforms, scan_image_folder, scored
from facecluster.data.folder import warn_ignored_files
from facecluster.data.images import DECODE_ERRORS, decode_image
from facecluster.data.recordio import rec_paths
from facecluster.data.transforms import normalize_images
from facecluster.inference import TwoStageIdentifier
from facecluster.inference.identifier import FAILED, OPEN_SET_SCORE, UNKNOWN, unpack_names
from facecluster.inference.onnx import EXPORT_ID, ONNX_GALLERY, ONNX_META, check_replaceable
from facecluster.inference.openset import threshold_at_fpir
from facecluster.io import (
    LOCK,
    atomic_file,
    atomic_torch_save,
    check_can_write,
    file_stamp,
    folder_lock,
    fsync_dir,
    load_plain,
    replacing,
    shown_list,
    written_by_a_live_process,
)

if TYPE_CHECKING:
    from facecluster.run import RunFolder

logger = logging.getLogger(__name__)

TORCH_FILE = "identifier.pt"
BACKBONE_FILE = "backbone.pth"
"""The stage-1 backbone's state dict alone, as arcface_torch saves one (an IResNet's
keys are arcface_torch's): for other tools, and ``model.weights``."""
ONNX_FOLDER = "onnx"
UPDATE = ".facecluster-update"
"""An export folder's committed update, not yet all in place (:func:`finish_update`); an
update being written, or being removed, is ``UPDATE.<process>-<random>.tmp`` / ``.done``."""
UPDATE_PLAN = "update.json"
CSV_COLUMNS = ("path", "identity", "score", "similarity", "cluster", "top5", "status")
TOP = 5


class ExportChangedError(OSError):
    """An export folder was changed by another command while this one ran, so this
    one's update, made from what it read before, was not written (run it again)."""


def export_run(
    run: str | Path,
    out: str | Path,
    onnx: bool = False,
    fpir: float = 0.01,
    device: str = "auto",
    data_root: str | Path | None = None,
    drop_enrolled: bool = False,
) -> list[Path]:
    """Write ``out/identifier.pt`` and ``out/backbone.pth`` (the stage-1 backbone's state
    dict) from a finished two-stage run (and ``out/onnx``).

    An export is made from the run: identities enrolled into ``out`` are not in it. An
    ``out`` holding an export of the run with identities enrolled into it is refused
    before any work unless ``drop_enrolled``; an enrolment committed while this export
    runs stops it (:class:`ExportChangedError`, nothing written) unless ``drop_enrolled``
    (then it is replaced, with a warning naming them). An export of another run in
    ``out`` is replaced, with a warning naming the identities it held.

    An open-set run (``data.unseen_fraction > 0``) also gets its "unknown"
    threshold: the routed answer's similarity at which ``fpir`` of the validation
    split's unseen faces would be taken for someone enrolled
    (:func:`~facecluster.inference.openset.threshold_at_fpir`). The passes over the
    validation split (the decision unit's fit, the threshold) run on ``device``
    (``auto``: a GPU when there is one). ``data_root``: where the run's data is now,
    if it moved (the run's own data, checked as evaluation checks it).

    Raises:
        ConfigError: the data is missing, or is not the run's.
        ValueError: the run is a single-model run (no sub-nets to export), a device
            this machine lacks, or ``out`` holds enrolled identities (without
            ``drop_enrolled``).
        ExportChangedError: an enrolment into ``out`` committed while this export ran
            (without ``drop_enrolled``); nothing is written.
        ImportError: ``onnx`` without the onnx extra (before any work).
    """
    from facecluster.builders import build_datamodule  # Lightning: only for the export
    from facecluster.run import run_folder

    folder = run_folder(run)
    # the verification sets are not read here: a copied run exports without them
    moved = ["data.verification=[]", *([] if data_root is None else [f"data.root={data_root}"])]
    cfg = folder.finished_config(moved)
    cfg.route.check_identities(len(folder.class_names()))  # the router's index is built
    if data_root is not None and not resolve_data_root(cfg.data.root).exists():
        # a run that needs no data pass would not read it: named here all the same
        given = Path(data_root).expanduser()
        if given.is_absolute() or CHECKOUT is None:
            raise ConfigError(f"--data-root {data_root}: {given.absolute()} does not exist")
        raise ConfigError(  # resolve_data_root's two places
            f"--data-root {data_root}: neither {given.absolute()} nor {CHECKOUT / given} exists"
        )
    if cfg.method == "single":
        raise ValueError(
            f"{run} is a single-model run (method=single): export writes two-stage "
            "identifiers (router and sub-nets); train with method=clustered or random"
        )
    where = resolve_device(device)
    out = Path(out)
    # before the passes below: where the files go, and out/onnx, which is replaced
    _check_export_target(out, resolve_data_root(cfg.data.root).resolve())  # links resolved
    check_replaceable(out / ONNX_FOLDER)
    # identities enrolled into an export of this run follow its own (an export of another
    # run, or of this one trained on other data, is replaced with a warning, below)
    read, held, trained = _stamp(out), _held_names(out), folder.class_names()
    enrolled = held[len(trained) :] if held[: len(trained)] == trained else []
    if enrolled and not drop_enrolled:  # replaced after a warning: a gallery lost people
        raise ValueError(
            f"{out} holds {len(enrolled)} identit{'y' if len(enrolled) == 1 else 'ies'} "
            f"enrolled into it that the run does not have ({shown_list(enrolled)}), which "
            "an export of the run would replace: export to another folder, or pass "
            f"--drop-enrolled to replace them (and enrol them again with `facecluster "
            f"enroll {out} <folder>`)"
        )
    try:  # before the passes over the data, not after them
        check_can_write(out)
    except OSError as e:
        raise ConfigError(
            f"{e.filename or out}: export cannot write there ({e.strerror or e}): give an "
            "OUT in a writable folder"
        ) from None
    if onnx:
        from facecluster.inference.onnx import require_onnx_export

        require_onnx_export()
    identifier = TwoStageIdentifier.from_run(folder, cfg=cfg).to(where)
    # the data only for a pass over the validation split: a calibrated closed-set run
    # exports without it (a copied run folder, data elsewhere)
    calibrate = identifier.route_config["decision"] == "moe" and identifier.moe is None
    dm = unseen = None
    if calibrate or cfg.data.unseen_fraction > 0:
        dm = build_datamodule(cfg)
        folder.check_data(dm)
        unseen = dm.unseen_dataloader("val") if cfg.data.unseen_fraction > 0 else None
    if unseen is not None and fpir > 0 and len(unseen.dataset) * fpir < 1.0 - 1e-9:
        logger.warning(
            "--fpir %g: the run has %d unseen validation faces, too few to measure it (at "
            "least %d): the threshold lets none of them pass, stricter than asked; a larger "
            "data.unseen_fraction measures it",
            fpir, len(unseen.dataset), math.ceil(1 / fpir - 1e-9),
        )  # fmt: skip
    run = set(identifier.class_names)
    if dropped := [name for name in _held_names(out) if name not in run]:
        logger.warning(
            "%s held %d identit%s that the run does not have (enrolled into it, or another "
            "run's): %s. The new export replaces them; enrol people again with `facecluster "
            "enroll %s <folder>`",
            out, len(dropped), "y" if len(dropped) == 1 else "ies", shown_list(dropped), out,
        )  # fmt: skip
    calibrate_run(identifier, folder, cfg, dm)
    if unseen is not None:
        identifier.open_set = unknown_threshold(identifier, unseen, fpir)
    else:  # said nowhere on screen: identify then named a noise image (a walkthrough)
        logger.warning(
            "%s is a closed-set run (data.unseen_fraction=0): the export has no unknown "
            "threshold, so identify gives every face an enrolled name (its --threshold "
            "sets one); --fpir applies to runs trained with data.unseen_fraction > 0",
            folder.path,
        )
    identifier.to("cpu")  # the file loads anywhere
    identifier.export_id = uuid.uuid4().hex  # its identifier.pt and onnx/ say so alike
    # an earlier export's networks are not this identifier's: never leave them beside it
    check_replaceable(out / ONNX_FOLDER)  # unchanged since the check above, or refused
    # all written beside the earlier export first: an export that fails (the ONNX
    # exporter, a full disk, Ctrl-C) leaves that one as it was. An update committed to OUT
    # since its identities were checked (an enrolment) is not replaced: ExportChangedError
    # (with drop_enrolled it is, as if it had finished just before the export)
    with _updating(out, replace_onnx=True, read=None if drop_enrolled else read) as new:
        written = [identifier.export(new / TORCH_FILE)]
        atomic_torch_save(identifier.router_backbone.state_dict(), new / BACKBONE_FILE)
        written.append(new / BACKBONE_FILE)
        if onnx:
            from facecluster.inference.onnx import export_onnx

            written += export_onnx(identifier, new / ONNX_FOLDER)
    return [out / path.relative_to(new) for path in written]


def _check_export_target(out: Path, data: Path) -> None:
    """Refuse an ``out`` that cannot hold an export, before any pass over the data: a
    file, a folder inside the run's image folder ``data`` (links resolved), a run
    folder, an export's own onnx/, or one holding a ``backbone.pth`` of the user's. An
    export or enrolment there that died after its commit is completed first."""
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"{out} is not a folder: export writes {TORCH_FILE} and {ONNX_FOLDER}/ in it"
        )
    if (out / TORCH_FILE).is_dir():
        raise ValueError(f"{out / TORCH_FILE} is a folder: export writes the identifier there")
    images = data.is_dir() and rec_paths(data) is None  # a .rec's folder: no scan to mislead
    if images and data in (out.resolve(), *out.resolve().parents):
        # the next scan of the data took it for an identity folder (warned of as one
        # holding no images), or for one more person where it held an image
        raise ValueError(
            f"{out} is inside the run's data.root ({data}), where the next training or "
            "evaluation would read it as an identity's folder: export to a folder of its own"
        )
    if (out / "config.yaml").is_file():  # identify would answer with this run for that one
        raise ValueError(
            f"{out} is a training run folder (it holds config.yaml): export to a folder of "
            f"its own, e.g. {out / 'export'}"
        )
    if (out / ONNX_META).is_file() and not (out / TORCH_FILE).exists():
        # an export's onnx/: its identifier.pt and onnx/ went in it, and the next export
        # to the export above refused the files it found there
        raise ValueError(
            f"{out} is an export's {ONNX_FOLDER} folder (it holds {ONNX_META}): export to "
            f"{out.parent} to replace that export, or to a folder of its own"
        )
    if out.is_dir():  # an export or enrolment there that died after its commit: completed
        finish_update(out)
    if (out / BACKBONE_FILE).exists() and not (out / TORCH_FILE).is_file():
        # weights of the user's (the file model.weights names, say); an export's killed
        # as its files moved in was completed above
        raise ValueError(
            f"{out / BACKBONE_FILE} is not an export's (no {TORCH_FILE} beside it): export "
            f"writes the stage-1 backbone there; export to a folder of its own"
        )


def _held_names(out: Path) -> list[str]:
    """The identities of the export in ``out``, in label order (an export's, then those
    enrolled into it); [] where ``out`` holds none, or a damaged one (replaced whole:
    said)."""
    try:
        if (out / TORCH_FILE).is_file():
            payload = load_plain(out / TORCH_FILE, "cpu", "exported identifier", mmap=True)
            held = unpack_names(payload["class_names"])
        elif (out / ONNX_FOLDER / ONNX_META).is_file():
            held = json.loads((out / ONNX_FOLDER / ONNX_META).read_text())["class_names"]
        else:
            return []
    except Exception as e:  # a damaged export is replaced whole: said, not fatal
        logger.warning("%s: its identities could not be read (%s); it is replaced", out, e)
        return []
    return list(held)


@torch.inference_mode()
def calibrate_run(
    identifier: TwoStageIdentifier, run: RunFolder, cfg: Config, dm: object = None
) -> None:
    """``route.decision=moe`` without its numbers set: fit them on the run's validation
    split, once, and keep them in the run folder (``calibration.json``), so evaluation
    and every export of the run use the same. ``dm``: the run's datamodule, if built."""
    if identifier.route_config["decision"] != "moe" or identifier.moe is not None:
        return
    if dm is None:
        from facecluster.builders import build_datamodule  # Lightning: only here

        dm = build_datamodule(cfg)
        run.check_data(dm)
    device = identifier.device
    faces = dm.sample_dataloader("val", cfg.route.calibration_faces)
    loader = tqdm(faces, desc="fitting the decision unit", leave=False)
    params = identifier.calibrate(loader, lambda images: normalize_images(images.to(device)))
    run.save_calibration(params.to_route())
    logger.info("decision unit fitted on the validation split: %s", params)


@torch.inference_mode()
def unknown_threshold(
    identifier: TwoStageIdentifier, unseen: Iterable, fpir: float
) -> dict[str, float]:
    """``{"threshold", "fpir", "measured_fpir", "probes", "top_m", "score"}`` from a run's
    unseen validation faces (``unseen``: their loader), identified where the identifier
    is. ``measured_fpir``: the share of them the threshold lets pass (at most ``fpir``;
    0 when they are fewer than ``1 / fpir``)."""
    device = identifier.device
    batches = [
        identifier.identify(normalize_images(x[scored(y)].to(device))).similarity.cpu()
        for x, y in unseen
        if scored(y).any()  # broken faces that nothing replaced: not probes
    ]
    if not batches:
        raise ValueError(
            "none of the run's unseen validation faces could be decoded: the unknown "
            "threshold is chosen on them (the warnings above name the files)"
        )
    scores = torch.cat(batches)
    threshold = threshold_at_fpir(scores, fpir)
    return {
        "threshold": threshold,
        "fpir": fpir,
        "measured_fpir": (scores >= threshold).double().mean().item(),
        "probes": len(scores),
        # the candidates searched decide the answer: the threshold is chosen at this top_m
        "top_m": identifier.route_config["top_m"],
        "score": OPEN_SET_SCORE,
    }


def resolve_device(device: str) -> torch.device:
    """``auto``: the first GPU when there is one, else the CPU.

    Raises:
        ValueError: not a device name, or a GPU that this machine does not have.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        where = torch.device(device)
    except RuntimeError:  # a name torch does not know
        raise ValueError(f"device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if where.type not in ("cpu", "cuda"):  # mps, xpu...: not what the exports were tested on
        raise ValueError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    if where.type == "cuda" and (where.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return where


def load_export(
    model: str | Path, runtime: str = "auto", device: str = "auto", top_m: int | None = None
) -> TwoStageIdentifier:
    """The identifier of an export folder, on ``runtime`` (torch, onnx, auto)."""
    model = Path(model).expanduser()
    if not model.is_dir():
        raise FileNotFoundError(f"{model} is not a folder written by facecluster export")
    if not (model / TORCH_FILE).exists() and (model / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{model} is a training run folder, not an export: write one with "
            f"`facecluster export {model} <folder>` and use that folder"
        )
    finish_update(model)  # an export or enrolment that died after its commit: completed
    if not (model / TORCH_FILE).exists() and not (model / ONNX_FOLDER).exists():
        raise FileNotFoundError(  # it named onnx/identifier.json, as if half an export
            f"{model} holds neither {TORCH_FILE} nor {ONNX_FOLDER}/: not a folder written by "
            "facecluster export (`facecluster export <run> <folder>` makes one)"
        )
    if runtime == "onnx" and not (model / ONNX_FOLDER).exists():  # not a damaged export
        raise FileNotFoundError(
            f"{model} was exported without --onnx (no {ONNX_FOLDER}/): `facecluster export "
            f"<run> {model} --onnx` writes one, or leave the runtime to torch"
        )
    if runtime == "auto":
        runtime = "torch" if (model / TORCH_FILE).is_file() else "onnx"
    route = None if top_m is None else {"top_m": top_m}
    where = resolve_device(device)
    if runtime == "onnx":
        from facecluster.inference.onnx import load_onnx, require_onnx_runtime

        require_onnx_runtime()  # before the gallery is read

        # the networks run where onnxruntime's provider is; the gallery follows the images.
        # Mapped, as identifier.pt is below
        identifier = load_onnx(model / ONNX_FOLDER, route, where.type, mmap=True)
    elif runtime == "torch":
        # read onto the CPU, then moved: loaded onto a GPU, the whole file (K sub-nets'
        # state dicts, the assignment's [C, d] class means) stayed there beside the
        # modules made from it; mapped: a command's load (identify, enroll) keeps the
        # largest arrays shared page cache
        identifier = TwoStageIdentifier.load(model / TORCH_FILE, route, mmap=True)
    else:
        raise ValueError(f"runtime must be auto, torch or onnx, got {runtime!r}")
    _check_one_export(model, identifier.export_id, runtime)
    return identifier.to(where)


def _check_one_export(model: Path, export_id: str | None, runtime: str) -> None:
    """ValueError when ``model``'s ``identifier.pt`` and ``onnx/`` come from different
    exports (one copied from another export): each runtime answered with its own
    networks and gallery, and an enrolment wrote the torch gallery into ``onnx/`` beside
    another export's networks, silently. Exports from before the ids pass."""
    other = ONNX_FOLDER if runtime == "torch" else TORCH_FILE
    if export_id is None or not (model / other).exists():
        return
    try:
        if runtime == "torch":
            their_id = _onnx_export_id(model / ONNX_FOLDER)
        else:
            theirs = load_plain(model / TORCH_FILE, "cpu", "exported identifier", mmap=True)
            their_id = theirs.get("export_id") if isinstance(theirs, dict) else None
    except Exception:  # unreadable: its own load says so, when it reads it
        return
    if their_id is not None and their_id != export_id:
        raise ValueError(
            f"{model}: {TORCH_FILE} and {ONNX_FOLDER}/ come from different exports "
            f"({export_id} and {their_id}): one was copied from another export. Export "
            f"the run again into {model} (`facecluster export <run> {model} --onnx`)"
        )


def _onnx_export_id(folder: Path) -> str | None:
    """The id of the ONNX export ``folder``: ``gallery.npz``'s small member, read alone
    (``identifier.json``, which holds every name, for an export written before it)."""
    if not (folder / ONNX_META).is_file():  # unfinished (another command writes it)
        return None
    with np.load(folder / ONNX_GALLERY, allow_pickle=False) as gallery:
        if EXPORT_ID in gallery.files:
            return bytes(gallery[EXPORT_ID]).decode()
    meta = json.loads((folder / ONNX_META).read_text())
    return meta.get("export_id") if isinstance(meta, dict) else None


def enroll_folder(model: str | Path, folder: str | Path, batch_size: int = 64) -> dict[str, int]:
    """Add the identities of ``folder`` (one sub-folder of face crops each) to the
    export ``model``, in place: ``identifier.pt`` and ``onnx/`` (gallery and JSON;
    the ONNX networks do not change) as the export has them. Embeddings come from
    torch when the export has ``identifier.pt``, else from onnxruntime.

    Returns:
        Each new identity's cluster.

    Raises:
        ValueError: a name that is enrolled already (nothing is written then).
        ExportChangedError: another command changed the export while this one ran
            (nothing is written then; run it again).
    """
    model = Path(model).expanduser()
    finish_update(model)  # an update left committed is no other command's change
    read = _stamp(model)  # before the read: a change after it is found at the commit
    identifier = load_export(model, "auto", "cpu")
    identities = scan_image_folder(folder, min_images_per_class=1, name="folder")
    for path in identities.empty_files:  # not in the samples: left out without a word
        logger.warning("cannot decode %s (an empty file, zero bytes): left out", path)
    size = identifier.backbone_args["image_size"]
    faces: dict[str, list[Path]] = {}
    for path, label in identities.samples:
        faces.setdefault(identities.class_names[label], []).append(Path(path))
    # a person whose files are all empty, or who has no image file at all (.heic only,
    # an empty folder), was dropped by the scan, with a warning; one whose files cannot
    # be decoded stops the enrolment (below): all are refused (the others enrolled, a
    # second enroll of the folder refused them as enrolled already)
    bare = {Path(p).relative_to(identities.root).parts[0] for p in identities.empty_files}
    # a zip made on macOS holds __MACOSX/ of hidden ._* copies: no person (warned of)
    no_images = {Path(p).name for p in identities.empty_folders} - {"__MACOSX"}
    if (bare | no_images) - faces.keys():
        name = min((bare | no_images) - faces.keys())
        why = (
            f"no image file (images end in {', '.join(IMAGE_EXTENSIONS)})"
            if name in no_images
            else "its image files are empty (zero bytes)"
        )
        raise ValueError(
            f"{folder}/{name}: no decodable face image to enrol: {why}; nothing is enrolled"
        )
    identifier.check_new_names(list(faces))  # before any image is read

    def people() -> Iterator[tuple[str, torch.Tensor]]:  # one person's images at a time
        for name, paths in tqdm(faces.items(), desc="enroll", unit="identity"):
            batches = [b for _, _, b in _batches(paths, size, batch_size) if b is not None]
            if not batches:
                raise ValueError(f"{folder}/{name}: no decodable face image to enrol")
            yield name, normalize_images(torch.cat(batches))

    clusters = identifier.enroll(people(), batch_size)
    # every file written into a new folder first, then all committed by one rename: a
    # failure (a full disk, Ctrl-C, a killed process) leaves the export as it was, and the
    # enrolment can be run again; torch and ONNX galleries never disagree
    with _updating(model, replace_onnx=False, read=read) as new:
        if (model / TORCH_FILE).is_file():
            identifier.export(new / TORCH_FILE)
        if (model / ONNX_FOLDER / ONNX_META).is_file():
            from facecluster.inference.onnx import write_gallery

            write_gallery(identifier, new / ONNX_FOLDER)
    return clusters


@contextlib.contextmanager
def _updating(
    out: Path, replace_onnx: bool, read: tuple[tuple[int, int, int] | None, ...] | None = None
) -> Iterator[Path]:
    """A new folder inside the export folder ``out`` to write its new files into, laid
    out as ``out`` (``identifier.pt``, ``onnx/...``), which replace ``out``'s together
    when the block succeeds.

    The folder is renamed :data:`UPDATE` in one step (the commit), then its files are
    put in place (:func:`finish_update`). On a failure before the commit the folder is
    removed and ``out`` is left as it was; a process killed before it leaves a folder
    that the next update removes, one killed after it leaves :data:`UPDATE`, which the
    next command on ``out`` puts in place before it reads anything.

    Args:
        replace_onnx: ``out/onnx`` becomes what was written to ``onnx/`` (removed when
            nothing was): an export, whose networks an earlier export's must not outlive.
            Else the files written there replace theirs and the rest stay (an enrolment:
            the networks do not change).
        read: :func:`_stamp` of ``out`` when the caller read what it updates (None: it
            read nothing). Another command's update committed since then is not undone:
            :class:`ExportChangedError`, and nothing is committed.
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{UPDATE}.*"):  # an update killed before its commit, or after
        if not _written_by_a_live_process(stale):  # it was put in place
            shutil.rmtree(stale, ignore_errors=True)
    new = out / f"{UPDATE}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    new.mkdir()
    try:
        yield new
        onnx = f"{ONNX_FOLDER}/"
        # identifier.json last: the file that marks an ONNX folder finished (load_onnx)
        files = sorted(
            (path.relative_to(new).as_posix() for path in new.rglob("*") if path.is_file()),
            key=lambda name: (name == f"{onnx}{ONNX_META}", name),
        )
        earlier = (out / ONNX_FOLDER).is_dir() and replace_onnx
        if earlier:  # again: a file of the user's may have come while the networks exported
            check_replaceable(out / ONNX_FOLDER)
        old = [onnx + path.name for path in (out / ONNX_FOLDER).iterdir()] if earlier else []
        marker = f"{onnx}{ONNX_META}"
        plan = {
            # the earlier ONNX folder's identifier.json first, even when a new one replaces
            # it last: that folder reads as unfinished (load_onnx) from the start, never
            # as finished with some of the new files beside some of its own
            "remove": sorted(
                (name for name in old if name not in files or name == marker),
                key=lambda name: (name != marker, name),
            ),
            "files": files,
            "remove_onnx": replace_onnx and not any(name.startswith(onnx) for name in files),
        }
        with atomic_file(new / UPDATE_PLAN) as f:
            f.write(json.dumps(plan, indent=1).encode())
        lock = contextlib.ExitStack()
        # a Ctrl-C while it waits: cleaned up too
        lock.enter_context(folder_lock(out, "the export"))
        with lock:
            _finish_locked(out)  # an update another command committed meanwhile: first
            if read is not None and _stamp(out) != read:
                raise ExportChangedError(
                    f"{out} was changed by another command (enroll or export) while this "
                    "one ran: nothing was written, run it again"
                )
            os.rename(new, out / UPDATE)  # the commit
            lock = lock.pop_all()  # held on, for putting the files in place
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # what this export made, if it is empty
                if [p.name for p in out.iterdir()] == [LOCK]:  # no other command's
                    (out / LOCK).unlink()
                out.rmdir()
        raise
    with lock:
        fsync_dir(out)
        _finish_locked(out)


def _stamp(out: Path) -> tuple[tuple[int, int, int] | None, ...]:
    """``identifier.pt`` and ``onnx/identifier.json`` of the export ``out``, each as
    (size, modification time, inode), None when absent. Every update replaces one of
    them at least (an export both, or removes the JSON; an enrolment those there are)
    with a file written for it and linked or copied in (:func:`_finish_locked`): one
    made later, while the file it replaces still held its inode."""
    stamps = []
    for name in (TORCH_FILE, f"{ONNX_FOLDER}/{ONNX_META}"):
        try:
            stamps.append(file_stamp(out / name))
        except (FileNotFoundError, NotADirectoryError):
            stamps.append(None)
    return tuple(stamps)


def finish_update(out: str | Path) -> None:
    """Put the committed update of the export folder ``out`` (:func:`_updating`) in
    place, if it has one: an export or enrolment that was killed while it moved its
    files. Every command that reads an export runs this first; one process at a time
    moves the files (:func:`~facecluster.io.folder_lock`), the others wait and find them
    in place."""
    out = Path(out)
    if not (out / UPDATE).is_dir():  # nothing pending: no lock (a read-only export)
        return
    try:
        with folder_lock(out, "the export"):
            _finish_locked(out)
    except PermissionError as e:  # was the bare errno line of a temporary file's name
        if e.filename is None:  # folder_lock's own word (a lock file NFS cannot lock)
            raise
        raise PermissionError(
            f"{out} holds an update that an export or enrolment committed but did not put "
            f"in place (it was stopped), which this user cannot do ({e.strerror or e}: "
            f"{e.filename}): a user who can write {out} (its owner, uid {out.stat().st_uid}) "
            f"completes it by running any facecluster command on it, e.g. `facecluster "
            f"identify {out} <image>`"
        ) from None


def _finish_locked(out: Path) -> None:
    """:func:`finish_update` with :func:`~facecluster.io.folder_lock` held: the plan is read, and
    every step taken, by this process alone. Each step can run again after a kill."""
    update = out / UPDATE
    if not update.is_dir():  # put in place by the process that held the lock before
        return
    plan = _read_plan(out)
    for name in plan["remove"]:
        stale = out / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)
    for name in plan["files"]:
        target = out / name
        target.parent.mkdir(exist_ok=True)
        with replacing(target) as tmp:
            try:
                os.link(update / name, tmp)
            except FileNotFoundError:
                raise
            except OSError:  # a file system without hard links
                shutil.copyfile(update / name, tmp)
    if plan["remove_onnx"]:
        with contextlib.suppress(OSError):  # a file that came since: the folder stays
            (out / ONNX_FOLDER).rmdir()
    done = out / f"{UPDATE}.{os.getpid()}-{uuid.uuid4().hex[:8]}.done"
    os.rename(update, done)  # all in place: no longer pending
    fsync_dir(out)
    shutil.rmtree(done, ignore_errors=True)


def _read_plan(out: Path) -> dict[str, Any]:
    """The committed update's plan, once every name in it is one that an export or an
    enrolment writes (``identifier.pt``, ``backbone.pth``, ``onnx/<network, gallery,
    identifier.json or a temporary file>``) and ``out/onnx`` is no link: the plan is
    acted on before anything of the folder is read, so a folder from elsewhere whose
    plan named ``../x``, an absolute path or a file under a linked folder removed any
    folder and wrote any file there, ``site-packages/x.pth`` too (a security review).

    Raises:
        ValueError: naming the plan and what it names, nothing done.
    """
    from facecluster.inference.onnx import written_name

    path = out / UPDATE / UPDATE_PLAN
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
        names = [*plan["remove"], *plan["files"]]
        ok_types = isinstance(plan["remove_onnx"], bool) and all(isinstance(n, str) for n in names)
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as e:
        raise ValueError(f"{path} cannot be read ({e}): {_PLAN_ADVICE.format(out=out)}") from None
    if not ok_types:
        raise ValueError(f"{path} is not an update plan: {_PLAN_ADVICE.format(out=out)}")
    onnx = f"{ONNX_FOLDER}/"
    foreign = [
        name
        for name in names
        if name not in (TORCH_FILE, BACKBONE_FILE)
        and not (name.startswith(onnx) and written_name(name.removeprefix(onnx)))
    ]
    if foreign:
        raise ValueError(
            f"{path} names {shown_list([repr(n) for n in foreign], 3)}, which no export or "
            f"enrolment writes, so nothing was done: {_PLAN_ADVICE.format(out=out)}"
        )
    if (out / ONNX_FOLDER).is_symlink() and any(n.startswith(onnx) for n in names):
        raise ValueError(
            f"{out / ONNX_FOLDER} is a link, which an update would write through, so nothing "
            f"was done: {_PLAN_ADVICE.format(out=out)}"
        )
    return plan


_PLAN_ADVICE = (
    "facecluster did not leave {out} so (a copy from elsewhere, or a folder changed by "
    "hand); export the run again into a new folder"
)


def _written_by_a_live_process(folder: Path) -> bool:
    """Whether ``UPDATE.<pid>-<rand>.tmp`` is being written by a process that is still
    running here (another command's update, not one killed before its commit); a
    ``.done`` is put in place already."""
    return folder.name.endswith(".tmp") and written_by_a_live_process(folder, UPDATE)


def _walk_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """The image files under ``folder`` and its other files, each sorted, as the
    training scan (and enroll's) tells them apart (:data:`IMAGE_EXTENSIONS`): linked
    folders followed (each real folder once, so a link up the tree cannot loop), hidden
    files and folders (``.DS_Store``, macOS's ``._*`` copies) in neither."""
    seen: set[str] = set()
    images, other = [], []
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                image = Path(name).suffix.lower() in IMAGE_EXTENSIONS
                (images if image else other).append(Path(root) / name)
    return sorted(images), sorted(other)


def image_files(sources: Sequence[str | Path]) -> list[Path]:
    """The image files named, folders searched recursively (sorted), in the order given,
    each once (a file named and found in a folder named too: one CSV row, not two).
    A folder's other files (``.tif``, ``.gif``: what training and enroll do not read
    either) are left out with a warning naming them, as enroll's is."""
    files: list[Path] = []
    for source in (Path(s).expanduser() for s in sources):
        if source.is_dir():
            found, other = _walk_images(source)
            # left out without a word, a .tif got no row (enroll's scan named it)
            warn_ignored_files(str(source), [str(p) for p in other])
            if not found:
                raise FileNotFoundError(
                    f"{source} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
                )
            files += found
        elif source.is_file():
            files.append(source)
        else:
            raise FileNotFoundError(f"{source} does not exist")
    unique, seen = [], set()
    for f in files:
        if os.path.abspath(f) not in seen:
            seen.add(os.path.abspath(f))
            unique.append(f)
    return unique


def _batches(
    files: list[Path], size: int, batch_size: int
) -> Iterator[tuple[list[Path], list[Path], torch.Tensor | None]]:
    """(the batch's files, the readable ones, their uint8 images) per ``batch_size`` files."""
    transform = build_transforms(size, train=False)
    for start in range(0, len(files), batch_size):
        batch, good, images = files[start : start + batch_size], [], []
        for path in batch:
            try:
                images.append(transform(decode_image(str(path)))[0])
                good.append(path)
            except DECODE_ERRORS as e:
                logger.warning("cannot decode %s (%s: %s): left out", path, type(e).__name__, e)
        yield batch, good, torch.stack(images) if images else None


def export_threshold(
    identifier: TwoStageIdentifier, model: str | Path, top_m: int | None = None
) -> float | None:
    """The export's unknown threshold (None for a closed-set export), for
    ``Identification.answer``.

    Raises:
        ValueError: a ``moe`` threshold that an earlier facecluster chose on the
            log-probability, or one chosen at another ``top_m`` than asked.
    """
    open_set = identifier.open_set
    if open_set is None:
        return None
    moe = identifier.route_config["decision"] == "moe"
    if moe and open_set.get("score") != OPEN_SET_SCORE:
        raise ValueError(
            f"{model}'s unknown threshold was chosen on the moe log-probability by an "
            "earlier facecluster; thresholds now compare the answer's similarity: export "
            "the run again (facecluster export; identities added since by facecluster "
            "enroll must then be enrolled again) or pass a threshold (--threshold)"
        )
    # under either decision the candidates searched move the answer's similarity
    if "top_m" not in open_set and top_m is not None:  # an export before eb054d1
        raise ValueError(
            f"{model} does not record the top_m its unknown threshold was chosen at (an "
            "export of an earlier facecluster): leave top_m at the export's, pass a "
            "threshold (--threshold), or export the run again"
        )
    chosen_at = open_set.get("top_m", identifier.route_config["top_m"])
    if top_m not in (None, chosen_at):
        raise ValueError(
            f"{model}'s unknown threshold was chosen at top_m={chosen_at}; with "
            f"top_m={top_m} the answers move: pass a threshold for top_m={top_m} "
            f"(--threshold) or leave top_m at {chosen_at}"
        )
    return open_set["threshold"]


def _check_out_is_not_read(out: Path, model: str | Path, files: Sequence[str | Path]) -> None:
    """Refuse an ``--out`` that would replace the export or an image being identified
    (it replaced them with the CSV, exit 0)."""
    target = Path(os.path.realpath(out))
    # by file identity, not by name: on a case-insensitive file system (macOS, Windows)
    # DEMO/x.csv is a file in the export demo/ too
    export = Path(model).expanduser()
    if any(p.exists() and os.path.samefile(p, export) for p in (target, *target.parents)):
        raise ValueError(f"--out {out} is inside the export {model}: name a CSV file elsewhere")
    same = os.path.samefile if target.exists() else (lambda a, b: False)  # also A.JPG, a.jpg
    if any(Path(os.path.realpath(f)) == target or same(f, target) for f in files):
        raise ValueError(f"--out {out} is one of the images to identify: name another file")


def identify_files(
    model: str | Path,
    sources: Sequence[str | Path],
    out: str | Path,
    runtime: str = "auto",
    threshold: float | None = None,
    batch_size: int = 64,
    device: str = "auto",
    top_m: int | None = None,
) -> int:
    """Identify every image of ``sources`` and write ``out`` (CSV); returns the row count.

    Columns: path; identity (a name; ``unknown`` when its similarity is below
    ``threshold``, by default the export's open-set threshold when it has one;
    ``unreadable`` for a file that is not a decodable image); score
    (the decision unit's score: a log-probability under moe); similarity (the answer's
    similarity, what the threshold compares); cluster (the cluster whose sub-net
    answered: with ``clustering.overlap``, the one of the answer's two clusters that
    gave its score, or under moe the larger share of it); top5 (up to 5 ``name:score``
    pairs from the searched clusters, best first, ``;``-separated); status (``known``,
    ``unknown``, ``unreadable`` or ``failed``: what the identity column says, whatever the
    names, since an identity may be named ``unknown``). A ``failed`` face is one whose
    embedding is NaN, inf or zero (``Identification.failed``): no name, the other columns
    empty, and one warning names such files.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name the CSV file to write")
    identifier = load_export(model, runtime, device, top_m)
    if top_m is not None and top_m > identifier.num_clusters:
        raise ValueError(f"top_m={top_m}: {model} has {identifier.num_clusters} clusters")
    if threshold is None:
        threshold = export_threshold(identifier, model, top_m)
    files = image_files(sources)
    _check_out_is_not_read(out, model, files)
    size = identifier.backbone_args["image_size"]
    where = resolve_device(device)
    names = identifier.class_names
    rows = 0
    failed = []
    # UTF-8 whatever the locale (a file name that is not UTF-8 keeps its bytes). A file
    # (a link: the file it names) is written beside it and put in its place at the end:
    # an earlier CSV is never left half overwritten. A device or a pipe (/dev/stdout,
    # a shell's >> or | behind it) is written as it is, appended to.
    special = out.absolute().parts[1:2] in (("dev",), ("proc",)) or (
        out.exists() and not out.is_file()
    )
    target = Path(os.path.realpath(out)) if out.is_symlink() else out
    if not special:
        target.parent.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.nullcontext(out) if special else replacing(target) as tmp,
        open(
            tmp, "a" if special else "w", newline="", encoding="utf-8", errors="surrogateescape"
        ) as f,
        tqdm(total=len(files), desc="identify", unit="img") as bar,
    ):
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for batch, good, images in _batches(files, size, batch_size):
            found = {}
            if images is not None:
                x = normalize_images(images.to(where))
                result = identifier.identify(x, k=min(TOP, len(names)))
                answers = result.answer(threshold).tolist()
                ids = result.candidates.cpu().tolist()
                scores = result.candidate_scores.cpu().tolist()
                close = result.similarity.cpu().tolist()
                answered_by = result.candidate_clusters[:, 0].cpu().tolist()
                for path, answer, row_ids, row_scores, sim, cluster in zip(
                    good, answers, ids, scores, close, answered_by, strict=True
                ):
                    if answer == FAILED:  # nothing to compare: no name, no number
                        failed.append(str(path))
                        found[path] = ("failed", "", "", "", "", "failed")
                        continue
                    pairs = zip(row_ids, row_scores, strict=True)
                    # fewer than 5 where the searched clusters hold fewer identities
                    top = ";".join(f"{names[i]}:{s:.4f}" for i, s in pairs if i < len(names))
                    identity, status = (
                        ("unknown", "unknown") if answer == UNKNOWN else (names[answer], "known")
                    )
                    scores = (f"{row_scores[0]:.4f}", f"{sim:.4f}", cluster, top)
                    found[path] = (identity, *scores, status)
            for path in batch:
                unreadable = ("unreadable", "", "", "", "", "unreadable")
                writer.writerow((path, *found.get(path, unreadable)))
            rows += len(batch)
            bar.update(len(batch))
    if failed:  # every file: the export's networks give NaN; some: those images
        logger.warning(
            "%d image(s) got no identity (status failed): the model's embedding of each is "
            "NaN, inf or zero (an image it cannot embed, or networks whose weights are not "
            "finite): %s",
            len(failed),
            shown_list(failed),
        )
    return rows


ARCFACE_TORCH_NETWORKS = {
    "r18": "iresnet18",
    "r34": "iresnet34",
    "r50": "iresnet50",
    "r100": "iresnet100",
    "r200": "iresnet200",
}
"""arcface_torch's ``--network`` names of its IResNets, facecluster's backbones of the
same weights (``mbf`` and ``mbf_large`` are named alike)."""


def ijb_export(
    model: str | Path,
    root: str | Path,
    target: str = "IJBC",
    out: str | Path | None = None,
    batch_size: int = 128,
    workers: int = 0,
    device: str = "auto",
    protocols: tuple[str, ...] = ("1:1",),
    backbone: str | None = None,
    embedding_dim: int = 512,
    image_size: int = 112,
) -> dict[str, Any]:
    """IJB-B/C 1:1 verification and/or 1:N identification (``protocols``) of a backbone,
    as arcface_torch's ``eval_ijbc.py`` and InsightFace's ``IJB_evals.py`` measure them
    (:mod:`facecluster.inference.ijb`): an export's stage-1 backbone (the router's), or,
    when ``model`` is a file, the weights it holds (arcface_torch's ``backbone.pth``, or
    any file ``model.weights`` takes) in the ``backbone`` they fit (a facecluster name
    or arcface_torch's ``r50``), of ``embedding_dim`` and ``image_size``. Writes ``out``
    (JSON: the model, the counts, the TAR at each FAR, the rank-k and TPIR at each
    FPIR) when given and returns what it holds.

    Raises:
        FileNotFoundError: the export, the release or one of its files is missing.
        ValueError: weights without ``backbone`` or that do not fit it, a malformed list,
            an image that cannot be decoded (named), or embeddings that are not finite.
    """
    from facecluster.data.ijb import read_ijb
    from facecluster.inference.ijb import evaluate_ijb

    if out is not None and Path(out).is_dir():
        raise ValueError(f"--out {out} is a folder: name the JSON file to write")
    weights = not Path(model).expanduser().is_dir()
    if weights == (backbone is None):
        raise ValueError(
            f"{model} is a weights file: name the backbone they fit with --backbone (such "
            "as arcface_torch's r50 or mbf)"
            if weights
            else f"--backbone {backbone}: {model} is an export, whose backbone it holds"
        )
    where = resolve_device(device)
    export_id = None
    if weights:  # before the release's lists, as an export is read first
        from facecluster.builders import backbone_weights
        from facecluster.models.components import load_backbone

        args = {
            "name": ARCFACE_TORCH_NETWORKS.get(backbone, backbone),
            "embedding_dim": embedding_dim,
            "image_size": image_size,
            "pretrained": False,
            "dropout": 0.0,
        }
        state = backbone_weights(model, args, str(model))
        net = load_backbone(args, state, f"the weights of {model}").to(where)
    else:
        identifier = load_export(model, "torch", device)
        net, args = identifier.router_backbone, identifier.backbone_args
        export_id = identifier.export_id
    protocol = read_ijb(root, target, protocols)
    size = args["image_size"]
    result, _ = evaluate_ijb(net.eval(), protocol, size, batch_size, workers, where)
    summary = {
        "model": str(Path(model).expanduser().absolute()),
        "export_id": export_id,
        "backbone": args,
        "root": str(protocol.root.absolute()),
        "image_size": size,
        **dataclasses.asdict(result),
    }
    if out is not None:
        Path(out).expanduser().parent.mkdir(parents=True, exist_ok=True)
        with replacing(Path(out).expanduser()) as tmp:
            tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary
