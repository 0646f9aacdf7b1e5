"""A TwoStageIdentifier as ONNX models plus plain arrays, and back on onnxruntime.

``export_onnx`` writes into one folder:

* ``router.onnx`` and ``subnet<k>.onnx``: the stage-1 backbone and each sub-net,
  images ``float32[batch, 3, H, W]`` (normalised as in training, see
  :func:`facecluster.data.transforms.normalize_images`) to embeddings
  ``float32[batch, d]``, the batch size free (``torch.onnx.export``, dynamo);
* ``gallery.npz``: the class means, each sub-net's (normalised) head rows and the
  cluster assignment, plain numpy arrays (read with ``allow_pickle=False``);
* ``identifier.json``: identity names, backbone recipe, routing settings, format
  and version, written last, so a folder without it is an unfinished export.

``load_onnx`` rebuilds the :class:`TwoStageIdentifier` with each network replaced
by an :class:`OnnxBackbone` (an onnxruntime session): the networks run on
onnxruntime, and routing and the decision unit are the same code as the torch
identifier's, so both answer alike (tested on a real run's test split). With
``mmap=True`` (the commands' loads) the gallery's arrays are mapped from the file, as
``TwoStageIdentifier.load`` maps ``identifier.pt``. Needs the ``onnx`` extra:
``pip install 'facecluster[onnx]'``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

import facecluster
from facecluster.clustering import ClusterAssignment
from facecluster.config import newer_format
from facecluster.inference.identifier import (
    ROUTER_PARTS,
    TwoStageIdentifier,
    check_parts,
    checked_backbone,
    checked_route,
    loaded_open_set,
    older_index_note,
    refuses,
    reusable_index,
)
from facecluster.io import replacing, replacing_together, shown_list, shown_value

logger = logging.getLogger(__name__)

ONNX_META = "identifier.json"
"""An ONNX export's names, settings and format, written last: its presence marks the
folder finished."""
ONNX_GALLERY = "gallery.npz"
"""An ONNX export's arrays: head rows, class means, the assignment, the router index."""
ONNX_FORMAT = "facecluster.onnx_identifier"
ONNX_VERSION = 2
"""Version 2 (the layout of 1): the open-set threshold compares the answer's similarity;
a reader of version 1 refuses the folder instead of comparing log-probabilities."""
_ASSIGNMENT_ARRAYS = ("class_to_cluster", "local_index", "class_means", "centroids")
_OVERLAP = "overlap"  # the rows of clustering.overlap; absent when there are none
EXPORT_ID = "export_id"
"""``gallery.npz``'s member with the export's id (UTF-8 bytes), as ``identifier.json``
holds it: a check reads it without parsing every name (tens of MB at 2M)."""


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"ONNX export and the onnx runtime need the '{module}' package: "
            "pip install 'facecluster[onnx]'"
        ) from None


def require_onnx_export() -> None:
    """ImportError naming the missing package unless :func:`export_onnx` can run."""
    for module in ("onnx", "onnxscript"):  # the dynamo exporter and its dependency
        _require(module)


def require_onnx_runtime() -> None:
    """ImportError naming the package unless :func:`load_onnx` can run the networks: for
    a caller to ask before the folder is read (a gallery at 2M identities is gigabytes of
    arrays, read in full before the first network's session is built)."""
    _require("onnxruntime")


_WRITTEN = re.compile(r"(router|subnet\d+)\.onnx|gallery\.npz|identifier\.json|\..+\.tmp(\..+)?")
"""The names an export writes into its folder (the last: ``replacing``'s temporary files)."""


def written_name(name: str) -> bool:
    """Whether ``name`` is one that an ONNX export writes into its folder (one name: no
    ``/`` or ``..``)."""
    return _WRITTEN.fullmatch(name) is not None and "/" not in name and ".." not in name


def check_replaceable(folder: str | Path) -> None:
    """Refuse, naming it, a ``folder`` that an export may not delete to write its own:
    a link, a file, or a folder holding anything an ONNX export does not write (an
    earlier export of another run is replaced; a folder of the user's is kept)."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        what = "a link" if folder.is_symlink() else "not a folder"
        raise ValueError(
            f"{folder} is {what}: the export writes its ONNX networks there; remove it "
            "or export to another folder"
        )
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if not written_name(p.name))
        if foreign:
            raise ValueError(
                f"{folder} holds files an ONNX export does not write ({shown_list(foreign)}): "
                "it is replaced by each export, so "
                "it is not deleted; move them or export to another folder"
            )


def export_onnx(identifier: TwoStageIdentifier, folder: str | Path) -> list[Path]:
    """Write ``identifier`` as ONNX models, ``gallery.npz`` and ``identifier.json``.

    Returns:
        The files written, ``identifier.json`` last.
    """
    require_onnx_export()  # named up front
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ONNX_META).unlink(missing_ok=True)  # unfinished until rewritten
    size = identifier.backbone_args["image_size"]
    networks = {"router": identifier.router_backbone}
    networks |= {f"subnet{k}": net for k, net in enumerate(identifier.subnets)}
    written = []
    for name, network in networks.items():
        written.append(export_network(network, size, folder / f"{name}.onnx"))
    return written + write_gallery(identifier, folder)


def export_network(network: nn.Module, image_size: int, path: Path) -> Path:
    """Write one backbone as ``path``: ``images`` ``float32[batch, 3, image_size,
    image_size]`` in (the batch size free), ``embeddings`` out. Returns ``path``."""
    require_onnx_export()  # named up front
    device = next(network.parameters()).device
    example = (torch.zeros(2, 3, image_size, image_size, device=device),)
    # fsynced before it takes its name, as the gallery is: an export is committed as a
    # whole after its files are written (facecluster.deploy), so none may be left empty
    with replacing(path) as tmp, warnings.catch_warnings():
        # the exporter's note that it turned autograd's anomaly detection on, alone: a
        # deprecation of an argument given here must show (a review)
        warnings.filterwarnings("ignore", "Anomaly Detection has been enabled", UserWarning)
        torch.onnx.export(
            network.eval(),
            example,
            tmp,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return path


def write_gallery(identifier: TwoStageIdentifier, folder: str | Path) -> list[Path]:
    """``gallery.npz`` and ``identifier.json`` of ``identifier`` (the ONNX networks
    stay): what export writes after the networks, and all an enrolment changes.
    Each file is written beside its target and replaces it, the JSON last, when the
    files are all written. An enrolment writes them into a new folder, which replaces
    the export's files together with ``identifier.pt`` (facecluster.deploy)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with replacing_together(folder / ONNX_GALLERY, folder / ONNX_META) as temps:
        _write_gallery(identifier, *temps)
    return [folder / ONNX_GALLERY, folder / ONNX_META]


def _write_gallery(identifier: TwoStageIdentifier, gallery: Path, meta_path: Path) -> None:
    assignment = identifier.assignment.to_dict()
    arrays = {
        key: assignment[key].numpy() for key in (*_ASSIGNMENT_ARRAYS, _OVERLAP) if key in assignment
    }
    for k in range(identifier.num_clusters):
        arrays[f"head{k}"] = identifier.head_rows(k).cpu().numpy()
    parts = identifier.router.saved_parts()  # a load with the same settings reads them
    for name, part in (parts or {}).items():
        arrays[f"{ROUTER_PARTS}.{name}"] = part
    if identifier.export_id is not None:  # read alone by load_export's check of the folder
        arrays[EXPORT_ID] = np.frombuffer(identifier.export_id.encode(), np.uint8)
    with open(gallery, "wb") as f:  # a file object: np.savez would add ".npz" to a name
        np.savez(f, **arrays)
    meta = {
        "format": ONNX_FORMAT,
        "version": ONNX_VERSION,
        "facecluster": facecluster.__version__,  # the release that wrote it
        "backbone": identifier.backbone_args,
        "route": identifier.route_config,
        "class_names": identifier.class_names,
        "num_clusters": identifier.num_clusters,
        "open_set": identifier.open_set,
        "export_id": identifier.export_id,
        "router_index_settings": identifier.index_settings() if parts is not None else None,
        "assignment": {
            "format": assignment["format"],
            "version": assignment["version"],
            "method": assignment["method"],
        },
        "input": {
            "layout": "NCHW",
            "dtype": "float32",
            "size": identifier.backbone_args["image_size"],
            "normalise": "RGB, x / 255 * 2 - 1",
        },
    }
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")


class OnnxBackbone(nn.Module):
    """A backbone that runs an ONNX model on onnxruntime: images in, embeddings out.

    Args:
        path: the ``.onnx`` file.
        device: ``cuda``: onnxruntime's CUDA provider when it has one; else the CPU.
    """

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        super().__init__()
        ort = _require("onnxruntime")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist: an incomplete ONNX export?")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors are not OSErrors
            raise ValueError(f"{path} is not a loadable ONNX model: {e}") from None
        width = self.session.get_inputs()[0].shape[-1]
        self.image_size: int | None = width if isinstance(width, int) else None
        """The input's side in pixels (None: the graph takes any)."""

    def forward(self, images: Tensor) -> Tensor:
        feed = {"images": np.ascontiguousarray(images.detach().float().cpu().numpy())}
        return torch.from_numpy(self.session.run(None, feed)[0]).to(images.device)


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What makes a parsed ``identifier.json`` unreadable (keys missing or of another
    type), before any of it is used; None when nothing does."""
    k = meta.get("num_clusters")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        return f"num_clusters is {shown_value(k)}, not a number of clusters"
    names = meta.get("class_names")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return "class_names is not a list of names"
    if k > len(names):  # no cluster is empty: 10**10 ran out of memory listing its heads
        return f"num_clusters is {k}, more than its {len(names)} identities"
    for key in ("backbone", "assignment", "route"):
        if not isinstance(meta.get(key), dict):
            return f"{key} is {shown_value(meta.get(key))}, not a mapping"
    try:
        checked_backbone(meta["backbone"])
    except ValueError as e:
        return str(e)
    return None


def read_gallery(path: str | Path, mmap: bool = False) -> dict[str, np.ndarray]:
    """The arrays of ``gallery.npz``, by name (``allow_pickle=False``).

    ``mmap``: each array that the file stores uncompressed (``np.savez`` stores them
    so) is mapped copy-on-write instead of read: the head rows and class means (4 GB
    each at 2M identities x 512, computed) stay page cache, shared by the processes
    that load the gallery. The file must then only be replaced by a rename, as export
    and enrol replace it; a compressed member is read.

    Raises:
        ValueError: the file is not a readable ``.npz`` (damaged, truncated, a member's
            header or compression field changed), naming it.
    """
    path = Path(path)
    try:
        # one open file for the list of members, their headers and their mappings: a
        # gallery renamed over this one meanwhile (an enrolment) is not half read
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as gallery:
            if not mmap:
                return {key: gallery[key] for key in gallery.files}
            arrays = {}
            for info in gallery.zip.infolist():
                key = info.filename.removesuffix(".npy")
                mapped = (
                    _mapped_member(f, info) if info.compress_type == zipfile.ZIP_STORED else None
                )
                arrays[key] = gallery[key] if mapped is None else mapped
            return arrays
    except MemoryError:  # the machine's, not the file's
        raise
    except Exception as e:  # noqa: BLE001 - zipfile's and numpy's readers of damaged bytes
        # raise more than ValueError and OSError: a member's .npy header (TokenError), its
        # compression field (NotImplementedError), its deflated bytes (zlib.error), ...
        raise ValueError(
            f"{path} cannot be read ({type(e).__name__}: {e}): a damaged export?"
        ) from None


def _mapped_member(f: BinaryIO, info: zipfile.ZipInfo) -> np.ndarray | None:
    """The ``.npy`` array an uncompressed zip member of the open file ``f`` holds,
    mapped: its bytes follow the member's local header (30 bytes, then its name and
    extra field, whose lengths may differ from the central directory's) and the
    ``.npy`` header. None for a header format this does not map (3.0: read instead).
    Not checked against the member's CRC, as a mapped ``identifier.pt`` is not: the
    shapes are (``check_parts``)."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"member {info.filename}: no local header at {info.header_offset}")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_length + extra_length
    f.seek(start)
    version = np.lib.format.read_magic(f)
    read_header = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }.get(version)
    if read_header is None:
        return None
    shape, fortran, dtype = read_header(f)
    offset = f.tell()
    if dtype.hasobject:  # what allow_pickle=False refuses
        raise ValueError(f"member {info.filename} holds Python objects")
    count = math.prod(shape)
    if offset + count * dtype.itemsize > start + info.compress_size:  # a damaged shape
        raise ValueError(f"member {info.filename}: its header's shape {shape} runs past it")
    if count == 0:  # nothing to map (np.memmap refuses a length of 0)
        return np.empty(shape, dtype)
    # the data lies where the zip puts it, not 64-byte aligned as in identifier.pt:
    # torch's CPU kernels take unaligned float32 rows
    return np.memmap(f, dtype, "c", offset, shape, "F" if fortran else "C")


def load_onnx(
    folder: str | Path,
    route: dict[str, Any] | None = None,
    device: str = "cpu",
    mmap: bool = False,
) -> TwoStageIdentifier:
    """The identifier of a folder written by :func:`export_onnx`, its networks on
    onnxruntime. Reads JSON and ``allow_pickle=False`` arrays only: nothing in the
    folder can run code but the ONNX graphs, which onnxruntime interprets. ``mmap``:
    map the gallery's arrays instead of reading them (:func:`read_gallery`)."""
    folder = Path(folder)
    meta_path = folder / ONNX_META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} does not exist: {folder} is not a finished ONNX export "
            "(facecluster export RUN OUT --onnx writes OUT/onnx)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting
        raise ValueError(f"{meta_path} is not valid JSON ({e}): a damaged export?") from None
    meta = meta if isinstance(meta, dict) else {}
    version = meta.get("version")
    if meta.get("format") == ONNX_FORMAT and isinstance(version, int) and version > ONNX_VERSION:
        raise ValueError(
            newer_format(
                meta_path, "facecluster ONNX export", version, ONNX_VERSION, meta.get("facecluster")
            )
        )
    if meta.get("format") != ONNX_FORMAT or meta.get("version") not in (1, ONNX_VERSION):
        raise ValueError(
            f"{meta_path}: not a facecluster ONNX export of version 1 or {ONNX_VERSION} "
            f"(format {shown_value(meta.get('format'))}, "
            f"version {shown_value(meta.get('version'))})"
        )
    if problem := _meta_problem(meta):
        raise ValueError(f"{meta_path}: {problem}: a damaged export?")
    k = meta["num_clusters"]
    expected = [*_ASSIGNMENT_ARRAYS, *(f"head{i}" for i in range(k))]
    arrays = {
        key: torch.from_numpy(array)
        for key, array in read_gallery(folder / ONNX_GALLERY, mmap).items()
    }
    missing = [key for key in expected if key not in arrays]
    if missing:
        raise ValueError(f"{folder / ONNX_GALLERY} lacks {', '.join(missing)}")
    stored = [*_ASSIGNMENT_ARRAYS, *([_OVERLAP] if _OVERLAP in arrays else [])]
    heads = [arrays[f"head{i}"] for i in range(k)]
    try:  # before the networks' sessions: a mismatch named, not an IndexError later
        assignment = ClusterAssignment.from_dict(
            {**meta["assignment"], **{key: arrays[key] for key in stored}}
        )
        check_parts(assignment, len(meta["class_names"]), k, heads)
    except ValueError as e:
        raise ValueError(f"ONNX export {folder} (gallery.npz, identifier.json): {e}") from None
    given = route
    try:  # the route and open set it holds (and any given): a bad number named, not used
        route = checked_route({**meta["route"], **(given or {})})
        open_set = loaded_open_set(meta.get("open_set"), route)
    except ValueError as e:
        source = f"{ONNX_META}, route={given}" if refuses(given, meta["route"]) else ONNX_META
        raise ValueError(f"ONNX export {folder} ({source}): {e}") from None
    prefix = f"{ROUTER_PARTS}."
    saved_parts = {key[len(prefix) :]: a for key, a in arrays.items() if key.startswith(prefix)}
    if "router_index" in arrays:  # faiss's bytes: not read
        logger.warning(older_index_note(folder / ONNX_GALLERY))
    router = OnnxBackbone(folder / "router.onnx", device)
    subnets = [OnnxBackbone(folder / f"subnet{i}.onnx", device) for i in range(k)]
    size = meta["backbone"]["image_size"]
    for name, network in (("router", router), *((f"subnet{i}", n) for i, n in enumerate(subnets))):
        if network.image_size not in (None, size):  # None: a graph of any size
            raise ValueError(
                f"{folder / name}.onnx takes {network.image_size} px images but {meta_path} "
                f"says {size} (backbone.image_size): a damaged export?"
            )
    identifier = TwoStageIdentifier(
        meta["backbone"],
        router,
        subnets,
        heads,
        assignment,
        meta["class_names"],
        route,
        router_index=reusable_index(saved_parts, meta.get("router_index_settings"), route),
    )
    identifier.open_set = open_set
    identifier.export_id = meta.get("export_id")  # None: before export ids
    return identifier
