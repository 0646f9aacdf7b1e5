"""Image transforms for aligned face crops.

Aligned face datasets (LFW-112, MS1MV2, VGGFace2 crops) already come at the
network resolution, so resizing is skipped when the image already has the
target size: it would only cost time and blur.

Images stay ``uint8[H, W, 3]``, the decoder's own pixel order, through the
per-image transform, the DataLoader workers, collation (``uint8[N, H, W, 3]``:
stacking contiguous images is a plain copy) and the copy to the device (a quarter
of the bytes of float32). The training augmentation, a horizontal mirror, is drawn
per image in the workers and applied on the device. :func:`normalize_images` turns
a batch into the ``float32[N, 3, H, W]`` network input in ``[-1, 1]`` (mean 0.5,
std 0.5, the arcface_torch convention), mirroring the images drawn for it, where
it is used: ``FaceDataModule.on_after_batch_transfer`` for everything a Trainer
runs, the callers themselves for loaders used directly. The values are those of
``RandomHorizontalFlip``, ``ToTensor`` then ``Normalize``, bit for bit. DALI's
pipelines do the same (decode to HWC; mirror, transpose and normalise in one step
on the GPU): on the CPU workers a mirror would cost about a tenth of a decode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from facecluster.data.images import decode_image

__all__ = ["FaceTransform", "build_transforms", "load_faces", "normalize_images"]


class FaceTransform:
    """``uint8[H, W, 3]`` to ``(uint8[size, size, 3], mirror)``: resized if needed, and
    whether to mirror it.

    A top-level class (not a lambda) so it pickles into DataLoader worker processes.

    Args:
        size: Output side length in pixels.
        train: Mirror horizontally with probability 0.5 (faces are aligned, so
            crops/rotations would break the alignment). The draw is the sampler's
            (``ShuffleSampler``, ``SubnetSampler``: a function of the seed and the
            epoch); an index that comes without one (another sampler's) draws
            ``torch.rand(1) < 0.5`` from the global torch RNG, as
            ``RandomHorizontalFlip`` does. :func:`normalize_images` applies it.
            False: never mirror.
    """

    def __init__(self, size: int, train: bool) -> None:
        if size < 1:
            raise ValueError(f"image_size must be >= 1, got {size}")
        self.size = size
        self.train = train

    def __call__(
        self, image: torch.Tensor, mirror: bool | None = None
    ) -> tuple[torch.Tensor, bool]:
        """The resized image and whether to mirror it (``mirror``: drawn by the caller)."""
        if image.shape[:2] != (self.size, self.size):
            # PIL's antialiased bilinear resize (tensor resize differs by up to 1 level)
            resized = F.resize(
                Image.fromarray(image.numpy()),
                [self.size, self.size],
                interpolation=InterpolationMode.BILINEAR,
                antialias=True,
            )
            image = torch.from_numpy(np.array(resized))
        return image, self.mirror(mirror)

    def mirror(self, drawn: bool | None = None) -> bool:
        """Whether to mirror the next image (``drawn``: the caller's draw)."""
        if drawn is not None:
            return self.train and bool(drawn)
        # the same draw and outcome as RandomHorizontalFlip's ``torch.rand(1) < 0.5``
        return self.train and torch.rand(1).item() < 0.5

    def mirrors(self, drawn: list[bool | None]) -> torch.Tensor:
        """:meth:`mirror` for a batch, in order, as a bool tensor: one ``torch.rand(n)``
        for the n images without a caller's draw, the same numbers as n ``torch.rand(1)``."""
        n = len(drawn)
        if not self.train:
            return torch.zeros(n, dtype=torch.bool)
        # facecluster's samplers draw every mirror; another sampler's indices come bare
        missing = [i for i, d in enumerate(drawn) if d is None]
        out = torch.tensor([bool(d) for d in drawn], dtype=torch.bool)
        if missing:
            out[missing] = torch.rand(len(missing)) < 0.5
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, train={self.train})"


def load_faces(sources: Sequence[str | bytes], image_size: int) -> torch.Tensor:
    """Image files or encoded images as one ``uint8[N, size, size, 3]`` batch (the
    evaluation transform; :func:`normalize_images` makes it a network input)."""
    transform = build_transforms(image_size, train=False)
    return torch.stack([transform(decode_image(source))[0] for source in sources])


def build_transforms(image_size: int, train: bool) -> FaceTransform:
    """The per-image transform of a split: see :class:`FaceTransform`."""
    return FaceTransform(image_size, train)


# The 256 possible results, computed once on the CPU with ToTensor's (/ 255) and
# Normalize's (- 0.5, / 0.5) float32 arithmetic. Off the CPU a lookup gives those
# exact values (CUDA would turn "/ 255" into "* (1 / 255)", which rounds differently);
# on the CPU the arithmetic itself is 8x faster than the lookup.
_LEVELS = torch.arange(256, dtype=torch.float32).div(255).sub_(0.5).div_(0.5)
_LEVELS_ON: dict[torch.device, torch.Tensor] = {}


def normalize_images(images: torch.Tensor, mirror: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images ``[N, H, W, 3]`` to float32 ``[N, 3, H, W]`` in ``[-1, 1]``.

    Args:
        images: A batch as the loaders give it. Float input is taken to be a
            network input already and is returned as is.
        mirror: ``bool[N]``, the images to mirror (a training batch's third item).

    Bit-identical to ``RandomHorizontalFlip``, ``ToTensor`` then ``Normalize(0.5, 0.5)``
    on every device.
    """
    if images.dtype != torch.uint8:
        return images
    if images.shape[-1] != 3:
        raise ValueError(
            "normalize_images: expected uint8 images [..., H, W, 3], "
            f"got shape {tuple(images.shape)}"
        )
    if mirror is not None:  # where, not indexing: no host-device synchronisation
        images = torch.where(mirror.view(-1, 1, 1, 1), images.flip(-2), images)
    images = images.movedim(-1, -3).contiguous()
    if images.device.type == "cpu":
        return images.float().div_(255).sub_(0.5).div_(0.5)
    levels = _LEVELS_ON.get(images.device)
    if levels is None:
        levels = _LEVELS_ON.setdefault(images.device, _LEVELS.to(images.device))
    return levels[images.long()]
