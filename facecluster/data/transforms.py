"""Image transforms for aligned face crops.

Aligned face datasets (LFW-112, MS1MV2, VGGFace2 crops) already come at the
network resolution, so resizing is skipped when the image already has the
target size: it would only cost time and blur.

The per-image transforms end in a uint8 ``[3, H, W]`` tensor: batches stay uint8
through the DataLoader workers, collation and the copy to the device (a quarter of
the bytes of float32), and :func:`normalize_images` maps them to ``[-1, 1]`` (mean
0.5, std 0.5, the arcface_torch convention the backbones expect) where they are
used, on the device: ``FaceDataModule.on_after_batch_transfer`` for everything a
Trainer runs, the callers themselves for loaders used directly. The arithmetic is
that of ``ToTensor`` then ``Normalize``, so the values are bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

__all__ = ["build_transforms", "normalize_images"]


class ResizeIfNeeded:
    """Resize a PIL image to ``(size, size)`` only when it is not already that size.

    A top-level class (not a lambda) so it pickles into DataLoader worker processes.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.size == (self.size, self.size):
            return image
        return F.resize(
            image,
            [self.size, self.size],
            interpolation=InterpolationMode.BILINEAR,
            antialias=True,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def build_transforms(image_size: int, train: bool) -> Callable:
    """Build the transform from a PIL RGB image to a normalised tensor.

    Args:
        image_size: Output side length in pixels.
        train: Whether to add training augmentation (random horizontal flip only:
            faces are aligned, so crops/rotations would break the alignment).

    Returns:
        A callable mapping a PIL RGB image to ``uint8[3, image_size, image_size]``;
        :func:`normalize_images` makes network inputs of a batch of them.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    steps: list[Callable] = [ResizeIfNeeded(image_size)]
    if train:
        # flip draws from the global torch RNG, so seeded runs replay the same augmentation
        steps.append(T.RandomHorizontalFlip(p=0.5))
    steps.append(T.PILToTensor())
    return T.Compose(steps)


# The 256 possible results, computed once on the CPU with ToTensor's (/ 255) and
# Normalize's (- 0.5, / 0.5) float32 arithmetic. A lookup gives those exact values on
# any device (CUDA would turn "/ 255" into "* (1 / 255)", which rounds differently).
_LEVELS = torch.arange(256, dtype=torch.float32).div(255).sub_(0.5).div_(0.5)
_LEVELS_ON: dict[torch.device, torch.Tensor] = {}


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``[..., 3, H, W]`` to float32 in ``[-1, 1]``; float input is returned as is.

    Bit-identical to ``ToTensor`` then ``Normalize(0.5, 0.5)`` on every device.
    """
    if images.dtype != torch.uint8:
        return images
    levels = _LEVELS_ON.get(images.device)
    if levels is None:
        levels = _LEVELS_ON.setdefault(images.device, _LEVELS.to(images.device))
    return levels[images.long()]
