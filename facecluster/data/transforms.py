"""Image transforms for aligned face crops.

Aligned face datasets (LFW-112, MS1MV2, VGGFace2 crops) already come at the
network resolution, so resizing is skipped when the image already has the
target size: it would only cost time and blur. Normalisation maps pixels to
``[-1, 1]`` (mean 0.5, std 0.5), the arcface_torch convention the backbones
expect.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

__all__ = ["build_transforms"]


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
        A callable mapping a PIL RGB image to ``FloatTensor[3, image_size, image_size]``
        with values in ``[-1, 1]``.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    steps: list[Callable] = [ResizeIfNeeded(image_size)]
    if train:
        # flip draws from the global torch RNG, so seeded runs replay the same augmentation
        steps.append(T.RandomHorizontalFlip(p=0.5))
    steps += [T.ToTensor(), T.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])]
    return T.Compose(steps)
