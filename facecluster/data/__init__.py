"""Face image data: image folders and InsightFace RecordIO files (scan, pack),
per-identity splits, transforms and the Lightning data module.

This package never imports ``facecluster.models`` or ``facecluster.clustering``.
Its names are imported from their modules when first used (PEP 562): ``facecluster
pack`` reads no Lightning (``facecluster pack --help`` took 10 s, Lightning's import).
"""

from __future__ import annotations

import importlib
from typing import Any

# each name, and the module of this package that defines it
_MODULES = {
    "SEED_FORWARD": "datamodule",
    "FaceDataModule": "datamodule",
    "FaceImageDataset": "datamodule",
    "SubnetSampler": "datamodule",
    "subnet_seed": "datamodule",
    "IMAGE_EXTENSIONS": "folder",
    "FaceFolder": "folder",
    "scan": "folder",
    "scan_image_folder": "folder",
    "scan_record_file": "folder",
    "split_per_identity": "folder",
    "IGNORED": "images",
    "BadImageError": "images",
    "load_rgb": "images",
    "scored": "images",
    "RecordError": "recordio",
    "RecordFile": "recordio",
    "build_transforms": "transforms",
    "load_faces": "transforms",
    "normalize_images": "transforms",
}

__all__ = list(_MODULES)


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULES})
