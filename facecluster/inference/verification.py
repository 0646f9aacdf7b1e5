"""Face verification on pair lists: the 10-fold protocol of LFW, and of the
``lfw.bin`` / ``cfp_fp.bin`` / ``agedb_30.bin`` sets of arcface_torch.

Each image is embedded together with its mirror image, the two embeddings added
and L2-normalised (as arcface_torch's ``verification.py`` does). A pair's distance
is the squared Euclidean distance of its two embeddings, in [0, 4]. The P pairs
are cut into 10 contiguous folds (LFW's ``pairs.txt`` lists its official folds in
that order, 600 pairs each). For each fold, the threshold that is most accurate on
the other nine (0, 0.01, ..., 3.99; the lowest among equals) decides that fold's
pairs. The result is the mean and standard deviation of the ten accuracies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from facecluster.data.transforms import load_faces, normalize_images
from facecluster.data.verification import FOLDS, VerificationPairs, fold_sizes

THRESHOLDS = torch.arange(0, 400, dtype=torch.float64) / 100


@dataclass(frozen=True)
class VerificationResult:
    accuracy: float
    """Mean accuracy over the folds."""
    std: float
    """Standard deviation of the fold accuracies (population, as arcface_torch)."""
    threshold: float
    """Mean of the folds' chosen squared-distance thresholds."""
    pairs: int


def ten_fold_accuracy(
    embeddings: Tensor, issame: list[bool], folds: int = FOLDS
) -> VerificationResult:
    """The protocol above on ``embeddings`` ``[2P, d]`` (pair p: rows 2p and 2p + 1)."""
    same = torch.as_tensor(issame, dtype=torch.bool)
    if len(embeddings) != 2 * len(same):
        raise ValueError(f"{len(embeddings)} embeddings for {len(same)} pairs (expected 2 each)")
    if len(same) < folds:
        raise ValueError(f"{len(same)} pairs cannot make {folds} folds")
    e = F.normalize(embeddings.double(), dim=1)
    distance = (e[0::2] - e[1::2]).pow(2).sum(dim=1)
    correct = (distance[None, :] < THRESHOLDS[:, None]) == same[None, :]  # [T, P]
    sizes = torch.tensor(fold_sizes(len(same), folds))
    fold_of = torch.repeat_interleave(torch.arange(folds), sizes)
    accuracies, thresholds = [], []
    for fold in range(folds):
        held = fold_of == fold
        best = int(correct[:, ~held].double().mean(dim=1).argmax())  # first: lowest
        accuracies.append(correct[best, held].double().mean())
        thresholds.append(THRESHOLDS[best])
    acc = torch.stack(accuracies)
    return VerificationResult(
        acc.mean().item(),
        acc.std(correction=0).item(),
        torch.stack(thresholds).mean().item(),
        len(same),
    )


@torch.inference_mode()
def pair_embeddings(
    embed: Callable[[Tensor], Tensor],
    pairs: VerificationPairs,
    image_size: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``[2P, d]`` float32 embeddings of the pairs' images, each plus its mirror's.

    An image that appears in several pairs (same bytes) is decoded and embedded once:
    LFW's 6,000 pairs name 7,701 distinct images among their 12,000.
    """
    index: dict[bytes, int] = {}
    order = torch.tensor([index.setdefault(image, len(index)) for image in pairs.images])
    distinct = list(index)
    out = []
    for start in range(0, len(distinct), batch_size):
        images = load_faces(distinct[start : start + batch_size], image_size).to(device)
        x = normalize_images(images)
        # the mirror of a normalised image is the normalised mirror image, bit for bit
        out.append((embed(x).float() + embed(x.flip(-1)).float()).cpu())
    return torch.cat(out)[order]


def verify(
    embed: Callable[[Tensor], Tensor],
    pairs: VerificationPairs,
    image_size: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> VerificationResult:
    """10-fold verification accuracy of ``embed`` (images -> embeddings) on ``pairs``."""
    return ten_fold_accuracy(
        pair_embeddings(embed, pairs, image_size, batch_size, device), pairs.issame
    )
