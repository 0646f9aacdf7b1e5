"""Face image data: image folders and InsightFace RecordIO files (scan, pack),
per-identity splits, transforms and the Lightning data module.

This package never imports ``facecluster.models`` or ``facecluster.clustering``.
"""

from facecluster.data.datamodule import (
    SEED_FORWARD,
    FaceDataModule,
    FaceImageDataset,
    SubnetSampler,
    subnet_seed,
)
from facecluster.data.folder import (
    IMAGE_EXTENSIONS,
    FaceFolder,
    scan,
    scan_image_folder,
    scan_record_file,
    split_per_identity,
)
from facecluster.data.images import IGNORED, BadImageError, load_rgb, scored
from facecluster.data.recordio import RecordError, RecordFile
from facecluster.data.transforms import build_transforms

__all__ = [
    "IMAGE_EXTENSIONS",
    "FaceFolder",
    "scan",
    "scan_image_folder",
    "scan_record_file",
    "RecordError",
    "RecordFile",
    "split_per_identity",
    "build_transforms",
    "FaceImageDataset",
    "FaceDataModule",
    "SEED_FORWARD",
    "IGNORED",
    "scored",
    "SubnetSampler",
    "subnet_seed",
    "BadImageError",
    "load_rgb",
]
